"""Physical head removal, and pruned checkpoints that reload into the identical model.

``remove_heads`` slices the query/key/value rows and the output projection's input columns of
each layer (through ``attribution.instrument.keep_heads_in_layer``), so the model really gets
smaller and faster. Indices always name the **original** heads, so removals compose.

A pruned checkpoint (``save_pruned``) is an ordinary ``save_pretrained`` directory (safetensors
weights, config, tokenizer) whose config carries ``headprune_kept_heads``: per layer, the original
indices of the heads that remain. ``load_pruned`` builds the dense architecture from the config,
slices it to those heads and only then loads the weights, insisting on no missing or unexpected
keys. Plain ``AutoModelForSequenceClassification.from_pretrained`` on such a directory raises
(the q/k/v and output-projection shapes do not match the config's head count), so a pruned
checkpoint cannot silently load as a wrong dense model — unless the caller passes
``ignore_mismatched_sizes=True``, which re-initialises those weights by request.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError
from prune.masking import HeadSet, head_gates, model_heads

KEPT_HEADS_KEY = "headprune_kept_heads"


def _check_not_empty(kept: Sequence[Sequence[int]]) -> None:
    if not any(kept):
        raise HeadpruneError("refusing to remove every attention head of the model (at least one must remain)")


def remove_heads(model: PreTrainedModel, heads: HeadSet) -> dict[int, list[int]]:
    """Physically remove ``heads`` (original indices) from ``model``, in place.

    A layer may lose all its heads: its attention block then contributes exactly the output
    projection's bias, as a fully masked layer does. Heads that were already removed are ignored
    (so repeated removals compose); removing every head of the model raises ``HeadpruneError``.
    Persistent gates of the remaining heads are kept. Returns the heads removed by this call.
    """
    chosen = model_heads(model, heads)
    kept = instrument.kept_heads(model)
    new_kept = [[h for h in present if h not in chosen.get(layer, [])] for layer, present in enumerate(kept)]
    _check_not_empty(new_kept)
    removed: dict[int, list[int]] = {}
    for layer, (present, keep) in enumerate(zip(kept, new_kept, strict=True)):
        if keep != present:
            instrument.keep_heads_in_layer(model, layer, keep)
            removed[layer] = [h for h in present if h not in keep]
    setattr(model.config, KEPT_HEADS_KEY, instrument.kept_heads(model))
    return removed


def fold_head_scales(model: PreTrainedModel, layer: int, scales: torch.Tensor | Sequence[float]) -> None:
    """Multiply each present head's output in ``layer`` by ``scales[p]`` (``[H_l]``, current order) by
    scaling its columns of the output projection. Exact: the projection is linear in each head's
    output and its bias is untouched."""
    scales = torch.as_tensor(scales, dtype=torch.float64).flatten()
    sizes = instrument.heads_per_layer(model)
    if scales.numel() != sizes[layer]:
        raise HeadpruneError(f"layer {layer} has {sizes[layer]} heads but {scales.numel()} scales were given")
    if sizes[layer] == 0:
        return
    projection = instrument.output_projection(model, layer)
    d_h = instrument.head_size(model)
    column_scales = scales.repeat_interleave(d_h).to(projection.weight.dtype).to(projection.weight.device)
    with torch.no_grad():
        projection.weight.mul_(column_scales[None, :])


def bake_mask(model: PreTrainedModel) -> dict[int, list[int]]:
    """Turn the persistent head mask into weights: heads gated to 0 are removed, other non-unit
    gates (e.g. repair scales) are folded into the output projection, and the mask is cleared.

    The model computes the same function before and after, now on its fastest backend.
    Returns the heads removed.
    """
    gates = head_gates(model)
    kept = instrument.kept_heads(model)
    zero = {layer: [kept[layer][p] for p in range(len(g)) if g[p] == 0] for layer, g in enumerate(gates)}
    _check_not_empty([[h for h in present if h not in zero[layer]] for layer, present in enumerate(kept)])
    instrument.set_head_mask(model, None)
    for layer, gate in enumerate(gates):
        if bool((gate != 1).any()):
            fold_head_scales(model, layer, torch.where(gate == 0, torch.ones_like(gate), gate))
    return remove_heads(model, {layer: heads for layer, heads in zero.items() if heads}) if any(zero.values()) else {}


def _has_mask(model: PreTrainedModel) -> bool:
    return any(g is not None for g in instrument.get_head_mask(model))


def save_pruned(model: PreTrainedModel, directory: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """Write a pruned (or masked, or dense) model to ``directory``: ``model.safetensors``,
    ``config.json`` with ``headprune_kept_heads`` and, if given, the tokenizer files.

    A persistent head mask is baked into a copy first (masked heads removed, repair scales
    folded), so the saved model computes what ``model`` computes. The directory is written next
    to its final place and renamed into it, replacing an existing directory only when complete.
    """
    instrument.model_family(model)
    if _has_mask(model):
        model = copy.deepcopy(model)
        bake_mask(model)
    final = Path(directory).expanduser().resolve()
    if final.exists() and not final.is_dir():
        raise HeadpruneError(f"{final} exists and is not a directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    config = model.config
    had_key = hasattr(config, KEPT_HEADS_KEY)
    previous = getattr(config, KEPT_HEADS_KEY, None)
    try:
        setattr(config, KEPT_HEADS_KEY, instrument.kept_heads(model))
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if had_key:
            setattr(config, KEPT_HEADS_KEY, previous)
        elif hasattr(config, KEPT_HEADS_KEY):
            delattr(config, KEPT_HEADS_KEY)
    return final


def read_kept_heads(directory: str | os.PathLike[str]) -> list[list[int]] | None:
    """The ``headprune_kept_heads`` recorded in a model directory's config, or None (dense)."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HeadpruneError(f"{directory} is not a model directory (no config.json in it)") from None
    except json.JSONDecodeError as error:
        raise HeadpruneError(f"{path} is not valid JSON: {error}") from None
    return config.get(KEPT_HEADS_KEY)


def _load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(directory / shard)))
        return state
    raise HeadpruneError(f"no safetensors weights in {directory} (expected model.safetensors)")


def load_pruned(directory: str | os.PathLike[str], *, tokenizer: bool = True) -> tuple[PreTrainedModel, Any]:
    """Load ``(model, tokenizer)`` saved by ``save_pruned`` (eval mode; tokenizer None if absent).

    Rebuilds the architecture from the config, removes the heads the config says are gone, then
    loads the weights with no missing or unexpected keys. A directory without
    ``headprune_kept_heads`` is a dense model and is loaded as such.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = Path(directory).expanduser()
    if not path.is_dir():
        raise HeadpruneError(f"model directory not found: {directory}")
    kept = read_kept_heads(path)
    if kept is None:
        from attribution.models import load_classifier

        model, tok = load_classifier(str(path), local_files_only=True)
        return model, (tok if tokenizer else None)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise HeadpruneError(f"cannot read the config in {directory}: {str(error).splitlines()[0][:200]}") from None
    model = AutoModelForSequenceClassification.from_config(config)
    layers = len(instrument.encoder_layers(model))
    heads = instrument.original_num_heads(model)
    if (
        not isinstance(kept, list)
        or len(kept) != layers
        or not all(isinstance(k, list) and all(isinstance(h, int) and 0 <= h < heads for h in k) for k in kept)
    ):
        raise HeadpruneError(
            f"{KEPT_HEADS_KEY} in {path / 'config.json'} must list, for each of the {layers} layers, "
            f"head indices in 0..{heads - 1}"
        )
    for layer, keep in enumerate(kept):
        instrument.keep_heads_in_layer(model, layer, sorted(keep))
    state = _load_state_dict(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise HeadpruneError(
            f"weights in {directory} do not fit the recorded heads: {' '.join(first[:2])[:300]}"
        ) from None
    # Non-persistent buffers (e.g. position_ids) are never saved; anything else must match exactly.
    transient = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    missing = [k for k in missing if k not in transient]
    if missing or unexpected:
        raise HeadpruneError(
            f"weights in {directory} do not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    setattr(model.config, KEPT_HEADS_KEY, instrument.kept_heads(model))
    model.eval()
    tok = None
    if tokenizer and any(path.glob("tokenizer*")):
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tok
