"""Dynamic INT8 quantization of exported models: the INT8 model predicts what its FP32 ONNX parent
predicts, ONNX evaluation equals PyTorch evaluation, and failures leave no file behind.

The agreement tests use tiny BERTs *trained* for a few dozen steps on a bag-of-words task: a random
tiny model's [CLS] state barely varies between inputs, so any quantization noise flips its argmax
(or every row falls in one class, where agreement is trivially 100%). The trained ones predict all
three classes with margins, and a broken quantization (zeroed weights) fails the check."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import numpy_helper  # noqa: E402

from attribution.core.data import iter_batches  # noqa: E402
from attribution.core.errors import HeadpruneError  # noqa: E402
from attribution.core.predict import predict_logits  # noqa: E402
from prune import quantize  # noqa: E402
from prune.evaluate import evaluate  # noqa: E402
from prune.export import example_batch, export_onnx  # noqa: E402
from prune.surgery import remove_heads  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.prune_helpers import tiny_dataset, tiny_tokenizer  # noqa: E402

ROWS = 300
PRUNED = {0: [0, 2], 1: [0, 1, 2, 3]}  # layer 1 loses every head: a zero-width output projection


def _bag_of_words(dataset):
    """Label = the most frequent class among the words (word ``wI`` belongs to class ``I % 3``)."""
    labels = []
    for text in dataset["text"]:
        counts = [0, 0, 0]
        for word in text.split():
            counts[int(word[1:]) % 3] += 1
        labels.append(max(range(3), key=lambda k: (counts[k], -k)))
    return dataset.remove_columns("label").add_column("label", labels)


def _trained(tokenizer, steps: int = 60):
    torch.manual_seed(0)
    model = tiny_model("bert", seed=0).train()
    train = _bag_of_words(tiny_dataset(steps * 32, seed=5))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for batch in iter_batches(train, tokenizer, batch_size=32, max_length=64):
        batch.pop("index")
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tokenizer, evaluation rows, and a trained dense and head-pruned model with their FP32 ONNX files."""
    root = tmp_path_factory.mktemp("quantize")
    tokenizer = tiny_tokenizer(root / "tokenizer")
    dense = _trained(tokenizer)
    pruned = copy.deepcopy(dense)
    remove_heads(pruned, PRUNED)
    rows = _bag_of_words(tiny_dataset(ROWS, seed=1))
    models = {"dense": dense, "pruned": pruned}
    paths = {name: export_onnx(model, root / f"{name}.onnx") for name, model in models.items()}
    return tokenizer, rows, models, paths


@pytest.mark.parametrize("name", ["dense", "pruned"])
def test_int8_agrees_with_its_fp32_onnx_model(setup, tmp_path, name):
    tokenizer, rows, models, paths = setup
    latency = {1: example_batch(models[name], batch_size=1, length=8, padded=False)}
    result = quantize.quantize_and_check(
        paths[name], tmp_path / "int8.onnx", tokenizer, rows, latency_batches=latency, repeats=1, threads=1
    )
    fp32 = quantize.onnx_predict_logits(paths[name], tokenizer, rows)
    classes = torch.bincount(fp32.argmax(1), minlength=3)
    assert (classes > 0).sum() >= 2 and classes.max() < 0.9 * ROWS  # not a one-class model
    assert result.checked_examples == ROWS and result.agreement >= 0.99
    assert 0 < result.max_abs_diff < 0.1  # 0.17 on the pruned model with its zero-width MatMul quantized
    assert result.int8_bytes < result.fp32_bytes == paths[name].stat().st_size
    assert set(result.fp32_metrics) == set(result.int8_metrics) == {"accuracy", "macro_f1"}
    assert set(result.fp32_latency_ms) == set(result.int8_latency_ms) == {1} and result.speedup[1] > 0
    assert result.per_channel and result.reduce_range and result.weight_type == "qint8" and result.threads == 1
    # the layer without heads keeps its zero-width MatMul in FP32 (onnxruntime's INT8 kernels get it wrong)
    assert bool(result.skipped_nodes) == (name == "pruned")
    again = quantize.QuantizedExport.load(result.save(tmp_path / "quantized.json"))
    assert again == result and again.int8_latency_ms == result.int8_latency_ms
    assert result.to_dict()["format"] == "headprune.QuantizedExport"
    assert set(result.to_dict()) - {"format", "version"} == {f.name for f in dataclasses.fields(result)}
    # where the disagreements lie, recomputed row by row from both models' logits
    int8 = quantize.onnx_predict_logits(tmp_path / "int8.onnx", tokenizer, rows)
    noise = sorted(float((fp32[i] - int8[i]).abs().max()) for i in range(ROWS))
    p99 = float(np.quantile(noise, 0.99))  # linear interpolation, as torch.quantile
    assert result.p99_abs_diff == pytest.approx(p99, rel=1e-5)
    decided = [i for i in range(ROWS) if (lambda t: t[0] - t[1])(sorted(fp32[i].tolist(), reverse=True)) > 2 * p99]
    assert result.decided_rows == pytest.approx(len(decided) / ROWS)
    same = [int(fp32[i].argmax()) == int(int8[i].argmax()) for i in decided]
    assert result.decided_agreement == pytest.approx(sum(same) / len(same))
    assert result.decided_agreement >= result.agreement


def test_agreement_by_margin_puts_the_flips_among_near_ties():
    fp32 = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.99, 0.0], [0.0, 3.0, 1.0], [0.5, 0.0, 0.49]])
    int8 = fp32 + torch.tensor([[0.0, 0.05, 0.0], [0.0, 0.03, 0.0], [0.05, 0.0, 0.0], [0.0, 0.0, 0.02]])
    result = quantize.agreement_by_margin(fp32, int8)  # row 1 flips: its margin 0.01 is under the noise
    assert result["p99_abs_diff"] == pytest.approx(float(torch.tensor([0.05, 0.03, 0.05, 0.02]).quantile(0.99)))
    assert result["decided_rows"] == 0.5 and result["decided_agreement"] == 1.0
    with pytest.raises(HeadpruneError, match="cannot be compared"):
        quantize.agreement_by_margin(fp32, int8[:2])


def test_agreement_check_fails_on_a_broken_int8_model(setup, tmp_path):
    """The property has teeth: zero the quantized weights and agreement collapses."""
    tokenizer, rows, _, paths = setup
    good = quantize.quantize_onnx(paths["dense"], tmp_path / "int8.onnx")
    model = onnx.load(str(good))
    zeroed = 0
    for init in model.graph.initializer:
        if init.name.endswith("_quantized"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0, init.name))
            zeroed += 1
    assert zeroed > 0
    onnx.save(model, str(tmp_path / "broken.onnx"))
    fp32 = quantize.onnx_predict_logits(paths["dense"], tokenizer, rows).argmax(1)
    broken = quantize.onnx_predict_logits(tmp_path / "broken.onnx", tokenizer, rows).argmax(1)
    assert (fp32 == broken).float().mean() < 0.9


def test_evaluate_onnx_equals_pytorch_evaluate(setup):
    tokenizer, rows, models, paths = setup
    for name in ("dense", "pruned"):
        expected = evaluate(models[name], tokenizer, rows, metrics=("accuracy", "macro_f1", "mcc"))
        got = quantize.evaluate_onnx(paths[name], tokenizer, rows, metrics=("accuracy", "macro_f1", "mcc"))
        assert got.metrics == expected.metrics and got.examples == ROWS
        assert got.extra["runtime"] == "onnxruntime"
    with pytest.raises(HeadpruneError, match="unknown metric"):
        quantize.evaluate_onnx(paths["dense"], tokenizer, rows, metrics=("accuracy", "nope"))
    with pytest.raises(HeadpruneError, match="no 'label' column"):
        quantize.evaluate_onnx(paths["dense"], tokenizer, rows.remove_columns("label"))


def test_onnx_predict_logits_keeps_dataset_order(setup):
    tokenizer, rows, models, paths = setup
    logits = quantize.onnx_predict_logits(paths["pruned"], tokenizer, rows, batch_size=7)
    expected = predict_logits(models["pruned"], tokenizer, rows)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    backwards = rows.select(range(ROWS - 1, -1, -1))
    again = quantize.onnx_predict_logits(paths["pruned"], tokenizer, backwards, batch_size=64)
    torch.testing.assert_close(again.flip(0), logits, atol=1e-5, rtol=0)


def test_token_type_ids_the_tokenizer_does_not_produce_are_zeros(tmp_path):
    """RoBERTa's graph declares token_type_ids; its tokenizer does not return them."""
    model = tiny_model("roberta")
    path = export_onnx(model, tmp_path / "roberta.onnx")
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    rows = tiny_dataset(20, seed=3)
    assert "token_type_ids" in [i.name for i in quantize.open_session(path).get_inputs()]
    torch.testing.assert_close(
        quantize.onnx_predict_logits(path, tokenizer, rows), predict_logits(model, tokenizer, rows), atol=1e-5, rtol=0
    )


def test_bad_inputs_are_one_line_errors_and_write_nothing(setup, tmp_path):
    _, rows, _, paths = setup
    out = tmp_path / "out" / "int8.onnx"
    text = tmp_path / "notes.onnx"
    text.write_text("not a model\n")
    cases = [
        (lambda: quantize.quantize_onnx(tmp_path / "missing.onnx", out), "ONNX model not found"),
        (lambda: quantize.quantize_onnx(tmp_path, out), "is not a file"),
        (lambda: quantize.quantize_onnx(text, out), "is not an ONNX model"),
        (lambda: quantize.quantize_onnx(paths["dense"], out, weight_type="int4"), "weight_type must be one of"),
        (lambda: quantize.quantize_onnx(paths["dense"], paths["dense"]), "would overwrite its FP32 input"),
        (lambda: quantize.onnx_predict_logits(tmp_path / "missing.onnx", None, rows), "ONNX model not found"),
        (lambda: quantize.open_session(text), "onnxruntime cannot load"),
    ]
    for call, message in cases:
        with pytest.raises(HeadpruneError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert not out.parent.exists() or not any(out.parent.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.onnx"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_quantization_leaves_no_file(setup, tmp_path, monkeypatch, error):
    import onnxruntime.quantization

    _, _, _, paths = setup
    out = tmp_path / "int8.onnx"

    def interrupted(model, output, **kwargs):
        with open(output, "wb") as handle:
            handle.write(b"half a model")
        raise error("stopped\nmidway")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", interrupted)
    expected = KeyboardInterrupt if error is KeyboardInterrupt else HeadpruneError
    with pytest.raises(expected) as info:
        quantize.quantize_onnx(paths["dense"], out)
    if expected is HeadpruneError:
        assert "INT8 quantization" in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"the previous file")  # a failed run keeps the previous output as it was
    with pytest.raises(expected):
        quantize.quantize_onnx(paths["dense"], out)
    assert out.read_bytes() == b"the previous file" and list(tmp_path.iterdir()) == [out]


def test_unlabelled_rows_give_agreement_without_metrics(setup, tmp_path):
    tokenizer, rows, _, paths = setup
    unlabelled = rows.remove_columns("label")
    result = quantize.quantize_and_check(paths["dense"], tmp_path / "int8.onnx", tokenizer, unlabelled)
    assert result.fp32_metrics == result.int8_metrics == {} and result.agreement >= 0.99
    assert result.fp32_latency_ms == {} and result.sequence_length == 0
