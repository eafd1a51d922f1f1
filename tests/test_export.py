"""ONNX export of pruned models: logits match PyTorch with dynamic batch/sequence axes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("onnxruntime")

from attribution import instrument  # noqa: E402
from attribution.core.errors import HeadpruneError  # noqa: E402
from prune import export  # noqa: E402
from prune.checkpoints import load_model, save_pruned  # noqa: E402
from prune.cli import main  # noqa: E402
from prune.masking import mask_heads  # noqa: E402
from prune.surgery import remove_heads  # noqa: E402
from tests.conftest import padded_batch, tiny_model  # noqa: E402


def _pruned(family: str = "bert"):
    model = tiny_model(family, layers=3, heads=4)
    # layer 1 loses every head: its attention runs the patched bias-only forward
    remove_heads(model, {0: [0, 2], 1: [0, 1, 2, 3], 2: [3]})
    return model


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_onnx_matches_pytorch_for_pruned_model_with_an_empty_layer(tmp_path, family):
    model = _pruned(family)
    assert instrument.heads_per_layer(model) == [2, 0, 3]
    path = export.export_onnx(model, tmp_path / "m.onnx")
    session = export.onnx_session(path)
    names = [i.name for i in session.get_inputs()]
    assert names == export.model_input_names(model)
    # dynamic axes: batch sizes and lengths never traced, padded and unpadded
    for size, length, lengths in [(3, 7, None), (1, 12, [12]), (5, 20, [20, 3, 9, 20, 2])]:
        batch = padded_batch(batch=size, length=length, seed=size, lengths=lengths)
        batch = {k: v for k, v in batch.items() if k in names}
        if "token_type_ids" in names:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        expected = model(**batch).logits
        got = export.onnx_logits(session, batch)
        torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=0)


def test_export_out_must_be_a_directory_not_a_file_name(tmp_path, capsys):
    save_pruned(_pruned(), tmp_path / "model")
    capsys.readouterr()  # transformers' save progress bar
    command = ["export", "--model", str(tmp_path / "model"), "--format", "onnx", "--out"]
    assert main([*command, str(tmp_path / "model.onnx")]) == 2
    error = capsys.readouterr().err
    assert "is a directory" in error and f"{tmp_path / 'model'}/" in error and len(error.strip().splitlines()) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main([*command, str(tmp_path / "other")]) == 2
    assert "holds no model.onnx" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "other"]  # nothing written
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


def test_reloaded_checkpoint_exports_through_the_cli(tmp_path, capsys):
    model = _pruned()
    save_pruned(model, tmp_path / "model")
    reloaded, _ = load_model(tmp_path / "model", tokenizer=False)
    folder = tmp_path / "exported"
    assert main(["export", "--model", str(tmp_path / "model"), "--format", "onnx", "--out", str(folder)]) == 0
    printed = capsys.readouterr().out
    out = folder / export.ONNX_FILE
    assert "max |onnx - torch|" in printed and out.is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.onnx"]  # no tokenizer saved
    assert "no tokenizer found" in printed
    batch = padded_batch(batch=4, length=9, seed=7)
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    got = export.onnx_logits(export.onnx_session(out), batch)
    torch.testing.assert_close(got, reloaded(**batch).logits.detach(), atol=1e-5, rtol=0)
    # and the pruned ONNX graph really is smaller than the dense one
    dense_path = export.export_onnx(tiny_model("bert"), tmp_path / "dense.onnx")
    assert out.stat().st_size < dense_path.stat().st_size


def test_export_and_check_reports_difference_and_latency(tmp_path):
    model = _pruned()
    latency = {1: export.example_batch(model, batch_size=1, length=8, padded=False)}
    result = export.export_and_check(model, tmp_path / "m.onnx", latency_batches=latency, repeats=2)
    assert 0 <= result.max_abs_diff <= 1e-5
    assert result.checked_examples == 8 and result.file_bytes == (tmp_path / "m.onnx").stat().st_size
    assert set(result.latency_ms) == {1} and result.latency_ms[1] > 0


def test_soft_masked_model_is_refused_and_failures_are_one_line(tmp_path, monkeypatch):
    model = tiny_model("bert")
    with mask_heads(model, {0: [1]}):
        with pytest.raises(HeadpruneError, match="soft head mask"):
            export.export_onnx(model, tmp_path / "m.onnx")
    pruned = _pruned()

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded\nlong traceback")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(HeadpruneError, match=r"ONNX export failed \(layers \[1\] have no heads left") as info:
        export.export_onnx(pruned, tmp_path / "m.onnx")
    assert "\n" not in str(info.value) and not (tmp_path / "m.onnx").exists()


def test_check_fails_clearly_when_onnx_disagrees(tmp_path):
    model = _pruned()
    path = export.export_onnx(model, tmp_path / "m.onnx")
    with torch.no_grad():
        model.classifier.bias.add_(1.0)  # the ONNX file now describes another model
    with pytest.raises(HeadpruneError, match="differ from PyTorch"):
        export.check_onnx(path, model)


def _onnx_export() -> export.OnnxExport:
    return export.OnnxExport(
        path="out/model.onnx", inputs=["input_ids", "attention_mask"], opset=17, max_abs_diff=2e-6,
        checked_examples=8, file_bytes=12345, latency_ms={1: 0.5, 32: 4.25}, sequence_length=16, threads=2,
    )


def test_onnx_export_record_round_trip_and_keys(tmp_path):
    result = _onnx_export()
    data = result.to_dict()
    assert data["format"] == "headprune.OnnxExport" and data["version"] == 1
    assert set(data) - {"format", "version"} == {f.name for f in dataclasses.fields(export.OnnxExport)}
    assert data["latency_ms"] == {"1": 0.5, "32": 4.25}  # batch sizes as JSON keys
    again = export.OnnxExport.from_dict(data)
    assert again == result and again.latency_ms == {1: 0.5, 32: 4.25}
    assert export.OnnxExport.load(result.save(tmp_path / "export.json")) == result


def test_onnx_export_bad_files_are_one_line_errors_naming_the_file(tmp_path):
    path = tmp_path / "export.json"
    path.write_text('{"format": "headprune.OnnxExport", "opset": ')
    with pytest.raises(HeadpruneError) as info:
        export.OnnxExport.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    data = _onnx_export().to_dict()
    del data["opset"]
    path.write_text(json.dumps(data))
    with pytest.raises(HeadpruneError, match=r"missing key 'opset'") as info:
        export.OnnxExport.load(path)
    assert str(path) in str(info.value)
