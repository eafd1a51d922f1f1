"""Latency model: a fake timer's known piecewise-linear cost is recovered exactly, predictions are
monotone and add up by construction, the blocks compute what the model's first layer computes
(PyTorch and ONNX), FLOPs agree with prune.cost, records round-trip, bad input is one line."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from attribution import instrument
from attribution.core.errors import HeadpruneError
from prune.cost import model_flops
from prune.latency import LatencyModel, _monotone, fit_latency_model, flops
from prune.latency_blocks import (
    AttentionBlock,
    Block,
    FeedForwardBlock,
    block_mask,
    layer_parts,
    model_shape,
    time_interleaved,
)
from prune.surgery import remove_heads
from tests.conftest import padded_batch, tiny_model
from tests.prune_helpers import sensitive

# tiny BERT: L = 3, H = 4, d = 32, d_h = 8, F = 37, C = 3
GRID = [0, 8, 16, 24, 32, 37]


def attention_cost(h: float) -> float:  # flat up to 2 heads, then linear
    return 1.0 + 0.5 * max(0.0, h - 2)


def ffn_cost(f: float) -> float:  # flat up to 16 neurons, then linear
    return 2.0 + 0.25 * max(0.0, f - 16)


OVERHEAD = 7.0


def known_timer(shape, batch_size, seq_len, seen):
    """Runs every block once (checking its output shape) and returns the known cost of each."""

    def timer(blocks):
        times = []
        for block in blocks:
            out = torch.as_tensor(block.run())
            seen.append((block.kind, block.width))
            if block.kind == "model":
                assert tuple(out.shape) == (batch_size, shape.classes)
                times.append(OVERHEAD + shape.layers * (attention_cost(shape.heads) + ffn_cost(shape.ffn)))
            else:
                assert tuple(out.shape) == (batch_size, seq_len, shape.hidden)
                times.append(attention_cost(block.width) if block.kind == "attention" else ffn_cost(block.width))
        return times

    return timer


def noisy_timer(seed):
    rng = random.Random(seed)
    return lambda blocks: [rng.uniform(1.0, 5.0) for _ in blocks]


def test_the_fit_recovers_a_known_piecewise_linear_cost():
    model = tiny_model("bert")
    shape = model_shape(model)
    seen = []
    fitted = fit_latency_model(model, batch_size=3, seq_len=7, grid=GRID, timer=known_timer(shape, 3, 7, seen))
    assert seen == [("attention", h) for h in range(5)] + [("ffn", f) for f in GRID] + [("model", 0)]
    assert fitted.attention_heads == [0, 1, 2, 3, 4] and fitted.ffn_neurons == GRID
    assert fitted.overhead_ms == pytest.approx(OVERHEAD)
    for h in range(shape.heads + 1):
        assert fitted.attention_ms(h) == pytest.approx(attention_cost(h))
    for f in range(shape.ffn + 1):  # between grid points too: the kinks lie on the grid
        assert fitted.ffn_ms(f) == pytest.approx(ffn_cost(f))
    heads, neurons = [4, 0, 1], [37, 5, 20]
    expected = OVERHEAD + sum(map(attention_cost, heads)) + sum(map(ffn_cost, neurons))
    assert fitted.predict(heads, neurons) == pytest.approx(expected)


def test_full_width_prediction_is_the_dense_measurement_by_construction():
    model = tiny_model("bert")
    fitted = fit_latency_model(model, batch_size=2, seq_len=5, grid=GRID, timer=noisy_timer(1))
    full = fitted.predict([4] * 3, [37] * 3)
    assert full == pytest.approx(fitted.dense_ms)
    assert full == pytest.approx(fitted.overhead_ms + 3 * (fitted.attention_ms(4) + fitted.ffn_ms(37)))


def test_predict_is_monotone_even_when_the_timings_are_not():
    model = tiny_model("bert")
    fitted = fit_latency_model(model, batch_size=2, seq_len=5, timer=noisy_timer(2))
    assert len(fitted.ffn_neurons) > 20  # the default grid: F/32 steps (here 37 -> every 1-2 neurons)
    # the medians are noisy, so the fit had something to correct
    assert any(b < a for a, b in zip(fitted.ffn_measured_ms[:-1], fitted.ffn_measured_ms[1:], strict=True))
    rng = random.Random(0)
    for _ in range(20):
        heads = [rng.randint(0, 4) for _ in range(3)]
        neurons = [rng.randint(0, 37) for _ in range(3)]
        base = fitted.predict(heads, neurons)
        for layer in range(3):
            if heads[layer] < 4:
                more = list(heads)
                more[layer] += 1
                assert fitted.predict(more, neurons) >= base
            if neurons[layer] < 37:
                more = list(neurons)
                more[layer] += 1
                assert fitted.predict(heads, more) >= base


def test_monotone_fit_pools_adjacent_violators():
    assert _monotone([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]
    assert _monotone([5, 1, 1, 9]) == [7 / 3] * 3 + [9]
    assert _monotone([1, 2, 2, 3]) == [1, 2, 2, 3]


@pytest.mark.parametrize("family", ["bert", "distilbert"])
@pytest.mark.parametrize(("heads", "neurons"), [(4, 37), (2, 20), (0, 0)])
def test_blocks_compute_the_first_layer(family, heads, neurons):
    """Attention block (h heads) then FFN block (f neurons) == the model's first layer with the other
    heads removed and the other neurons zeroed (GELU(0) = 0, so a zeroed neuron adds nothing)."""
    dense = sensitive(tiny_model(family))
    batch = padded_batch(3, 7)
    pruned = copy.deepcopy(dense)
    if heads < 4:
        remove_heads(pruned, {0: list(range(heads, 4))})
    up = [m for m in instrument.encoder_layers(pruned)[0].modules() if isinstance(m, torch.nn.Linear)][-2]
    with torch.no_grad():
        up.weight[neurons:] = 0
        up.bias[neurons:] = 0
    hidden = instrument.layer_inputs(dense, batch)
    expected = instrument.layer_inputs(pruned, batch)[1]
    parts = layer_parts(dense)
    with torch.no_grad():
        attended = AttentionBlock(parts, heads, 8)(hidden[0], block_mask(batch["attention_mask"]))
        got = FeedForwardBlock(parts, neurons)(attended)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_onnx_blocks_compute_what_the_torch_blocks_compute():
    model = sensitive(tiny_model("bert", layers=1, heads=2))
    outputs = {}

    def capture(blocks):
        for block in blocks:
            outputs.setdefault((block.kind, block.width), []).append(torch.as_tensor(block.run()))
        return [1.0] * len(blocks)

    for backend in ("onnx", "torch"):
        fitted = fit_latency_model(model, backend=backend, batch_size=2, seq_len=6, grid=[0, 20], timer=capture)
        assert fitted.backend == backend and fitted.padded
    assert sorted(outputs) == [("attention", 0), ("attention", 1), ("attention", 2), ("ffn", 0), ("ffn", 20),
                               ("ffn", 37), ("model", 0)]
    for onnx_out, torch_out in outputs.values():
        torch.testing.assert_close(onnx_out, torch_out, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    fitted = fit_latency_model(tiny_model("bert"), batch_size=2, seq_len=5, grid=GRID, timer=noisy_timer(3))
    path = fitted.save(tmp_path / "latency.json")
    loaded = LatencyModel.load(path)
    assert loaded == fitted
    assert loaded.predict([1, 2, 3], [3, 17, 36]) == fitted.predict([1, 2, 3], [3, 17, 36])
    data = json.loads(path.read_text())
    data["ffn_fit_ms"] = data["ffn_fit_ms"][:-1]
    path.write_text(json.dumps(data))
    with pytest.raises(HeadpruneError, match="latency.json.*ffn_fit_ms") as error:
        LatencyModel.load(path)
    assert "\n" not in str(error.value)


def test_flops_agree_with_the_cost_report_and_drop_by_the_unit_cost():
    model = tiny_model("bert")
    shape = model_shape(model)
    dense = flops(shape, [4] * 3, [37] * 3, 10)
    assert dense == model_flops(model, 10)
    head, neuron = 4 * 10 * 32 * 8 + 2 * 10**2 * 8, 2 * 10 * 32  # DESIGN.md §5 by hand
    assert dense - flops(shape, [4, 3, 4], [37] * 3, 10) == head
    assert dense - flops(shape, [4] * 3, [37, 37, 36], 10) == neuron
    assert dense - flops(shape, [0, 4, 2], [37, 0, 30], 10) == 6 * head + 44 * neuron
    remove_heads(model, {0: [0, 1, 2, 3], 2: [1, 3]})
    assert flops(shape, [0, 4, 2], [37] * 3, 10) == model_flops(model, 10)


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_time_interleaved_runs_every_block_each_round(clock):
    calls = []
    blocks = [Block("ffn", i, lambda i=i: calls.append(i)) for i in range(4)]
    times = time_interleaved(blocks, repeats=5, warmup=2, clock=clock, progress=False)
    assert len(times) == 4 and all(t >= 0 for t in times)
    assert [calls.count(i) for i in range(4)] == [7] * 4
    rounds = [calls[i : i + 4] for i in range(0, 28, 4)]
    assert all(sorted(r) == [0, 1, 2, 3] for r in rounds) and len({tuple(r) for r in rounds}) > 1  # shuffled


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"backend": "tpu"}, "backend must be one of torch, onnx"),
        ({"seq_len": 0}, "seq_len must be a positive integer"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"grid": [0, 40]}, "the neuron grid must lie in 0..37"),
        ({"clock": "cpu", "threads": 2}, "the cpu clock times one thread"),
        ({"clock": "sundial"}, "clock must be one of wall, cpu"),
    ],
)
def test_bad_fit_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(HeadpruneError, match=message) as error:
        fit_latency_model(tiny_model("bert"), timer=noisy_timer(0), **kwargs)
    assert "\n" not in str(error.value)


def test_bad_widths_and_a_pruned_first_layer_are_one_line_errors():
    model = tiny_model("bert")
    fitted = fit_latency_model(model, batch_size=2, seq_len=5, grid=GRID, timer=noisy_timer(0))
    for heads, neurons, message in [
        ([4, 4], [37] * 3, "expected 3 heads and 3 neuron counts"),
        ([4, 5, 4], [37] * 3, "heads per layer must be in 0..4"),
        ([4] * 3, [37, -1, 37], "neurons per layer must be in 0..37"),
    ]:
        for cost in (fitted.predict, lambda h, n: flops(fitted.shape, h, n, 10)):
            with pytest.raises(HeadpruneError, match=message) as error:
                cost(heads, neurons)
            assert "\n" not in str(error.value)
    remove_heads(model, {0: [1]})
    with pytest.raises(HeadpruneError, match="fit the latency model on a dense model: layer 0 has 3 of 4 heads"):
        fit_latency_model(model, timer=noisy_timer(0))
