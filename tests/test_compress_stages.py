"""The compression stages on a tiny recipe: unit scores, the latency model, the compressed model to
a budget (heads and neurons, refit), the frontier, the heal, the report — and a rerun skips them."""

from __future__ import annotations

import pytest
import torch

from prune.checkpoints import load_model
from prune.latency import LatencyModel, flops, model_shape
from prune.pipeline import run_recipe
from prune.pipeline.artifacts import CompressRun, FrontierRun, HealRun, QuantizeRun
from prune.recipe import RecipeError, load_recipe
from tests.tiny_recipe import tiny_recipe

COMPRESS = {
    "score": "score: null\n",
    "sweep": "sweep: null\n",
    "prune": "prune: null\n",
    "repair": "",
    "export": "export: null\n",
    "compress": (
        "compress:\n  criterion: fisher\n  split: train\n  examples: 16\n  batch_size: 4\n"
        "  target: {flops: 0.6}\n  latency_batch_size: 4\n  frontier: [0.7]\n"
        "  calibration_examples: 16\n  held_out_examples: 8\n"
    ),
    "heal": "heal:\n  budget: 1m\n  max_steps: 4\n  train_examples: 16\n  held_out_examples: 8\n  batch_size: 4\n",
    "quantize": "quantize: {}\n",
}
STAGES = ["dense", "compress-score", "latency-model", "compress", "frontier", "heal", "quantize", "report"]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compress")
    recipe = tiny_recipe(tmp, **COMPRESS)
    out = tmp / "out"
    result = run_recipe(load_recipe(recipe), out, progress=False)
    return recipe, out, result


def test_every_compression_stage_runs_and_writes_its_files(compressed):
    _, out, result = compressed
    assert result.ran == STAGES
    for name in ("head-scores.json", "neuron-scores.json", "latency.json", "compress.json", "frontier.json",
                 "heal.json", "model/config.json", "healed/config.json", "quantize.json", "onnx/model.onnx",
                 "onnx/model_quantized.onnx", "onnx/config.json", "onnx/tokenizer.json"):
        assert (out / "compress" / name).is_file(), name
    assert not (out / "compress" / "heal").exists()  # the heal's resume state is removed once done
    assert "Compression" in (out / "report.md").read_text()


def test_the_compressed_model_fits_its_budget_and_reloads(compressed):
    _, out, _ = compressed
    run = CompressRun.load(out / "compress" / "compress.json")
    model, _ = load_model(str(out / "compress" / "model"), tokenizer=False)
    from attribution import instrument

    heads, neurons = instrument.heads_per_layer(model), instrument.neurons_per_layer(model)
    assert heads == run.heads_per_layer and neurons == run.neurons_per_layer
    shape, seq_len = model_shape(model), LatencyModel.load(out / "compress" / "latency.json").seq_len
    dense = flops(shape, [shape.heads] * shape.layers, [shape.ffn] * shape.layers, seq_len)
    assert flops(shape, heads, neurons, seq_len) <= 0.6 * dense  # at the token length the search used
    assert 0 < run.flops_fraction <= 0.6 + 1e-9
    assert run.neurons_removed > 0 and set(run.metrics) >= {"dense", "pruned", "repaired"}


def test_frontier_points_are_measured_side_by_side(compressed):
    _, out, _ = compressed
    frontier = FrontierRun.load(out / "compress" / "frontier.json")
    labels = [p.label for p in frontier.points]
    assert labels[0] == "dense" and any(label.startswith("heads + neurons at 70%") for label in labels)
    for point in frontier.points:
        assert set(point.latency_ms) == {"1", "4"} and all(v > 0 for v in point.latency_ms.values())
        assert point.predicted_ms is not None and point.predicted_ms > 0


def test_the_latency_model_is_fitted_at_the_shape_the_frontier_times(compressed):
    from prune.pipeline.context import RunContext

    recipe, out, _ = compressed
    loaded = load_recipe(recipe)
    ctx = RunContext(loaded, out, progress=False, model_path=str(loaded.model))  # no finetune section
    timed = ctx.timing_batches[4]["input_ids"]
    latency = LatencyModel.load(out / "compress" / "latency.json")
    assert (latency.batch_size, latency.seq_len) == (4, timed.shape[1])
    assert FrontierRun.load(out / "compress" / "frontier.json").predicted_batch_size == 4  # what the report judges


def test_prediction_error_compares_fractions_of_the_dense_latency():
    from prune.report.compression import Point, prediction_error

    dense = Point("dense", 0.8, 1.0, {"32": 600.0}, predicted_ms=400.0, kind="dense")
    half = Point("half", 0.7, 2.0, {"32": 300.0}, predicted_ms=220.0)  # predicted 0.55 of dense, measured 0.5
    assert prediction_error(half, dense, "32") == pytest.approx(0.1)
    assert prediction_error(dense, dense, "32") == pytest.approx(0.0)
    assert prediction_error(half, dense, "1") is None and prediction_error(half, None, "32") is None
    from prune.report.compression import predicted_batch

    old = FrontierRun(split="test", examples=1, metric="accuracy", batch_sizes=[1, 32], threads=1, points=[])
    assert predicted_batch(old, "32") == "32"  # written before the batch size was recorded
    old.predicted_batch_size = 1
    assert predicted_batch(old, "32") == "1"


def test_heal_is_never_worse_than_where_it_started(compressed):
    _, out, _ = compressed
    heal = HealRun.load(out / "compress" / "heal.json")
    assert heal.result["best_accuracy"] >= heal.result["start_accuracy"]
    healed, _ = load_model(str(out / "compress" / "healed"), tokenizer=False)
    assert all(torch.isfinite(p).all() for p in healed.parameters())


def test_int8_is_checked_against_its_fp32_parent_and_timed_beside_dense_pytorch(compressed):
    _, out, _ = compressed
    run = QuantizeRun.load(out / "compress" / "quantize.json")
    assert run.source == "compress/healed" and set(run.speedup_vs_torch) == {"1", "4"}
    assert 0 <= run.result["agreement"] <= 1 and run.result["int8_metrics"]
    report = (out / "report.md").read_text()
    assert "final model, INT8 ONNX" in report and "final model, healed" in report
    assert f"agrees with its FP32 ONNX model on {run.result['agreement']:.2%}" in report


def test_rerun_skips_every_compression_stage(compressed):
    recipe, out, _ = compressed
    result = run_recipe(load_recipe(recipe), out, progress=False)
    assert result.ran == [] and result.skipped == STAGES


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"compress": "compress:\n  target: {flops: 1.5}\n"}, "compress.target.flops"),
        ({"compress": "compress:\n  target: {flops: 0.5, latency: 0.5}\n"}, "exactly one of latency, flops, max_drop"),
        ({"heal": "heal:\n  budget: soon\n"}, "heal.budget"),
        ({"compress": "", "heal": "heal: {budget: 10m}\n"}, "heal needs the compress section"),
        ({"compress": "", "heal": "", "quantize": "quantize: {}\n"}, "quantize needs the compress section"),
    ],
)
def test_bad_compression_recipes_are_one_line(tmp_path, sections, message):
    recipe = tiny_recipe(tmp_path, **{**COMPRESS, **sections})
    with pytest.raises(RecipeError, match=message) as error:
        load_recipe(recipe)
    assert "\n" not in str(error.value)


def test_cli_heal_saves_a_model_never_worse_than_it_started(tmp_path, capsys):
    from prune.checkpoints import save_pruned
    from prune.cli import main
    from prune.heal import HealResult
    from prune.surgery import remove_heads, remove_neurons
    from tests.tiny_recipe import tiny_csv, tiny_model_dir

    teacher = tiny_model_dir(tmp_path / "world")
    data = tiny_csv(tmp_path / "world" / "data.csv")
    student, tokenizer = load_model(str(teacher))
    remove_heads(student, {0: [0, 1]})
    remove_neurons(student, {1: list(range(20))})
    save_pruned(student, tmp_path / "pruned", tokenizer)
    out = tmp_path / "healed"
    args = ["heal", "--model", str(tmp_path / "pruned"), "--teacher", str(teacher), "--data", str(data),
            "--max-steps", "4", "--train-examples", "32", "--held-out-examples", "8", "--max-length", "16",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    result = HealResult.load(out / "heal_result.json")
    assert result.best_accuracy >= result.start_accuracy and result.steps <= 4
    healed, _ = load_model(str(out))
    assert healed.config.headprune_kept_heads[0] == [2, 3]  # still the pruned architecture
    assert not (out / ".heal").exists() and "saved ->" in capsys.readouterr().out


def test_a_latency_target_reachable_only_by_removing_every_unit_is_one_line(tmp_path, capsys):
    """Known only once the latency model is fitted: the run stops at the compress stage with exit 2
    and one line naming the smallest reachable fraction; no compressed model is written."""
    from prune.cli import main

    compress = COMPRESS["compress"].replace("target: {flops: 0.6}", "target: {latency: 0.001}")
    recipe = tiny_recipe(tmp_path, **{**COMPRESS, "compress": compress, "heal": "", "quantize": ""})
    out = tmp_path / "out"
    capsys.readouterr()  # what building the tiny model printed
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "only by removing every unit" in err and "minimum reachable" in err
    assert not (out / "compress" / "model").exists() and not (out / "compress" / "compress.json").exists()
