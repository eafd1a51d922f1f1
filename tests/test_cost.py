"""Cost report: hand-computed FLOPs and parameters, file sizes, latency bookkeeping, round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest

from attribution import instrument
from attribution.core.errors import HeadpruneError
from prune.cost import (
    CostReport,
    attention_flops,
    attention_params,
    compare_costs,
    cost_report,
    file_bytes,
    format_comparison,
    latency_batches,
    mean_token_length,
    measure_latency,
    model_flops,
)
from prune.surgery import remove_heads
from tests.conftest import tiny_model
from tests.prune_helpers import tiny_dataset, tiny_tokenizer

# tiny BERT: d = 32, d_h = 8, d_ff = 37, L = 3, H = 4, C = 3; at T = 10 one head costs
# 4*10*32*8 + 2*10^2*8 = 11,840 multiply-adds; the feed-forward 3 * 2*10*32*37 = 71,040;
# the classifier 32*32 + 32*3 = 1,120.
HEAD = 11_840
FFN = 71_040
CLS = 1_120


def test_flops_by_hand():
    model = tiny_model("bert")
    assert attention_flops(model, 10) == 12 * HEAD
    assert model_flops(model, 10) == 12 * HEAD + FFN + CLS
    remove_heads(model, {0: [0, 1, 2, 3], 2: [1, 3]})
    assert attention_flops(model, 10) == 6 * HEAD
    assert model_flops(model, 10) == 6 * HEAD + FFN + CLS


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_attention_params_equal_counted_projection_params(family):
    model = tiny_model(family)
    remove_heads(model, {1: [0, 2]})

    def counted(m):
        total = 0
        for layer, attention in enumerate(instrument.attention_modules(m)):
            total += sum(p.numel() for n, p in attention.named_parameters() if n.split(".")[0] in
                         ("query", "key", "value", "q_lin", "k_lin", "v_lin"))
            projection = instrument.output_projection(m, layer)
            total += projection.weight.numel() + projection.bias.numel()
        return total

    assert attention_params(model) == counted(model)


def test_report_compare_and_round_trip(tmp_path):
    dense = tiny_model("bert")
    pruned = tiny_model("bert")
    remove_heads(pruned, {0: [0, 1, 2, 3], 2: [1, 3]})
    removed_params = sum(p.numel() for p in dense.parameters()) - sum(p.numel() for p in pruned.parameters())
    assert removed_params == 6 * (4 * 32 * 8 + 3 * 8)
    # float32 weights: the file shrinks by 4 bytes per removed parameter (plus a smaller header)
    shrink = file_bytes(dense) - file_bytes(pruned)
    assert 0 <= shrink - 4 * removed_params < 512

    tokenizer = tiny_tokenizer(tmp_path / "tok")
    data = tiny_dataset(40, seed=1)
    length = mean_token_length(data, tokenizer)
    assert length == pytest.approx(sum(len(tokenizer(t)["input_ids"]) for t in data["text"]) / 40)
    batches = latency_batches(data, tokenizer, sizes=(1, 8))
    assert batches[1]["input_ids"].shape[0] == 1 and batches[8]["input_ids"].shape[0] == 8
    assert abs(batches[1]["input_ids"].shape[1] - length) <= min(
        abs(len(tokenizer(t)["input_ids"]) - length) for t in data["text"]
    ) + 1e-9
    latency = measure_latency({"dense": dense, "pruned": pruned}, batches, repeats=3, warmup=1, progress=False)
    assert set(latency) == {"dense", "pruned"} and all(set(v) == {1, 8} for v in latency.values())
    assert all(ms > 0 for v in latency.values() for ms in v.values())

    a = cost_report(dense, length, name="dense", latency_ms=latency["dense"], repeats=3)
    b = cost_report(pruned, length, name="pruned", latency_ms=latency["pruned"], repeats=3)
    assert b.heads == 6 and b.heads_per_layer == [0, 4, 2]
    ratios = compare_costs(a, b)
    assert ratios["predicted_speedup"] == pytest.approx(model_flops(dense, length) / model_flops(pruned, length))
    assert ratios["attention_flops_ratio"] == pytest.approx(2.0)
    assert set(ratios["measured_speedup"]) == {"1", "8"}
    assert "predicted speedup" in format_comparison(a, b)
    assert CostReport.load(a.save(tmp_path / "cost.json")) == a


def _cost_report() -> CostReport:
    return CostReport(
        model="dense", heads=12, heads_per_layer=[4, 4, 4], params=1000, attention_params=400, mean_length=9.5,
        attention_flops=1e5, total_flops=3e5, latency_ms={"1": 1.5, "32": 12.0}, latency_repeats=3,
        file_bytes=None, threads=2, extra={"note": "x"},
    )


def test_cost_report_record_round_trip_and_keys(tmp_path):
    report = _cost_report()
    data = report.to_dict()
    assert data == {"format": "headprune.CostReport", "version": 1, **dataclasses.asdict(report)}
    assert CostReport.from_dict(data) == report
    path = report.save(tmp_path / "cost.json")
    assert CostReport.load(path) == report
    path.write_text(json.dumps({**dataclasses.asdict(report), "format": "headprune.CostReport"}))  # no version
    assert CostReport.load(path) == report


def test_cost_report_bad_files_are_one_line_errors_naming_the_file(tmp_path):
    path = tmp_path / "cost.json"
    path.write_text("{not json")
    with pytest.raises(HeadpruneError) as info:
        CostReport.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    data = _cost_report().to_dict()
    del data["params"]
    path.write_text(json.dumps(data))
    with pytest.raises(HeadpruneError, match=r"missing key 'params'") as info:
        CostReport.load(path)
    assert str(path) in str(info.value)
    path.write_text(json.dumps({**_cost_report().to_dict(), "version": 99}))
    with pytest.raises(HeadpruneError, match="newer"):
        CostReport.load(path)
