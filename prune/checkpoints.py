"""The one way headprune loads a model, and the way it saves a pruned one.

``load_model(name_or_path)`` (transformers' ``from_pretrained`` habit) understands:

- ``"default"``: the embedded classifier, MiniLM fine-tuned on the embedded tweets
  (``prune.finetune.DEFAULT_FINETUNE_CONFIG``); fine-tuned on first use, then taken from the cache;
- ``"minilm"``: the bundled MiniLM-L6-H384 encoder (its classification head is freshly initialised);
- a pruned headprune directory (written by ``save_pruned``): the dense architecture is built from
  the config, sliced to the heads recorded under ``headprune_kept_heads``, and only then are the
  weights loaded, with no missing or unexpected keys;
- a dense model directory, or a hub id: ``AutoModelForSequenceClassification.from_pretrained``.

A pruned checkpoint is an ordinary ``save_pretrained`` directory (safetensors weights, config,
tokenizer) whose config carries ``headprune_kept_heads``: per layer, the original indices of the
heads that remain. Plain ``from_pretrained`` on such a directory raises (the q/k/v and
output-projection shapes do not match the config's head count), so it cannot silently load as a
wrong dense model — unless the caller passes ``ignore_mismatched_sizes=True``, which
re-initialises those weights by request.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.cache import base_model_path
from attribution.core.errors import HeadpruneError
from attribution.core.log import get_logger

# The key is defined beside remove_heads, which keeps a model's config in step with its heads.
from prune.surgery import KEPT_HEADS_KEY, bake_mask

DEFAULT_MODEL = "default"

__all__ = ["DEFAULT_MODEL", "KEPT_HEADS_KEY", "load_model", "read_kept_heads", "resolve_model", "save_pruned"]

log = get_logger("checkpoints")


def resolve_model(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, *, progress: bool = True) -> str:
    """The ``from_pretrained`` argument for a model name: a directory or a hub id.

    ``"default"`` becomes the cached default classifier's directory (fine-tuned on first use,
    ~10 minutes on 2 CPU cores; ``progress`` shows its bars), ``"minilm"`` the bundled weights'
    directory; a directory must hold a ``config.json``; anything else is taken for a hub id.
    """
    name = os.fspath(name_or_path)
    if not name.strip():
        raise HeadpruneError("empty model name")
    if name == DEFAULT_MODEL:
        from prune.finetune import finetune_default

        return str(finetune_default(progress=progress).path)
    name = base_model_path(name)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise HeadpruneError(f"{name} is not a model directory (no config.json in it)")
        return str(path)
    if _looks_like_path(name):
        raise HeadpruneError(f"model directory not found: {name}")
    return name


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    tokenizer: bool = True,
    progress: bool = True,
    local_files_only: bool = False,
) -> tuple[PreTrainedModel, Any]:
    """``(model, tokenizer)``: a sequence classifier in eval mode, and its tokenizer (``None``
    when ``tokenizer=False``).

    ``name_or_path`` is ``"default"``, ``"minilm"``, a pruned or dense model directory, or a hub
    id (see the module docstring). ``progress`` shows progress bars while the default classifier
    is fine-tuned on first use; ``local_files_only`` skips the hub (which, offline, otherwise
    costs ~20 s of retries before failing). Every failure is a one-line ``HeadpruneError``.
    """
    shown = os.fspath(name_or_path)
    target = resolve_model(name_or_path, progress=progress)
    path = Path(target)
    if path.is_dir() and read_kept_heads(path) is not None:
        model = _load_pruned(path)
    else:
        model = _load_dense(target, shown, local_files_only=local_files_only)
    model.eval()
    tok = _load_tokenizer(target, shown, local_files_only=local_files_only) if tokenizer else None
    return model, tok


def save_pruned(model: PreTrainedModel, directory: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """Write a pruned (or masked, or dense) model to ``directory``: ``model.safetensors``,
    ``config.json`` with ``headprune_kept_heads`` and, if given, the tokenizer files.

    A persistent head mask is baked into a copy first (masked heads removed, repair scales
    folded), so the saved model computes what ``model`` computes. The directory is written next
    to its final place and renamed into it, replacing an existing directory only when complete.
    ``load_model(directory)`` gives the model back, with identical logits.
    """
    instrument.model_family(model)
    if any(g is not None for g in instrument.get_head_mask(model)):
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
    if not isinstance(config, dict):
        raise HeadpruneError(f"{path} is not a model config (a JSON object)")
    return config.get(KEPT_HEADS_KEY)


# --------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with a slash or a leading dot is a path
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "", 1)


def _first_line(error: BaseException, limit: int = 200) -> str:
    return (str(error).strip().splitlines() or [""])[0][:limit]


def _load_dense(target: str, shown: str, *, local_files_only: bool) -> PreTrainedModel:
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(target, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        where = "a local directory" if Path(target).exists() else "a local directory or a reachable hub id"
        raise HeadpruneError(
            f"cannot load model {shown!r}: expected {where} ({type(error).__name__}: {_first_line(error)})"
        ) from None


def _load_tokenizer(target: str, shown: str, *, local_files_only: bool) -> Any:
    from transformers import AutoTokenizer

    path = Path(target)
    if path.is_dir() and not any(path.glob("tokenizer*")) and not any(path.glob("vocab*")):
        raise HeadpruneError(f"no tokenizer saved with the model in {shown} (load it with tokenizer=False)")
    try:
        return AutoTokenizer.from_pretrained(target, local_files_only=local_files_only or path.is_dir())
    except (OSError, ValueError, KeyError) as error:
        raise HeadpruneError(
            f"cannot load the tokenizer of {shown!r} ({type(error).__name__}: {_first_line(error)})"
        ) from None


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


def _load_pruned(path: Path) -> PreTrainedModel:
    """A ``save_pruned`` directory: rebuild the architecture from the config, remove the heads the
    config says are gone, then load the weights with no missing or unexpected keys."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    kept = read_kept_heads(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise HeadpruneError(f"cannot read the config in {path}: {_first_line(error)}") from None
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
        raise HeadpruneError(f"weights in {path} do not fit the recorded heads: {' '.join(first[:2])[:300]}") from None
    # Non-persistent buffers (e.g. position_ids) are never saved; anything else must match exactly.
    transient = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    missing = [k for k in missing if k not in transient]
    if missing or unexpected:
        raise HeadpruneError(
            f"weights in {path} do not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    setattr(model.config, KEPT_HEADS_KEY, instrument.kept_heads(model))
    log.debug("loaded a pruned checkpoint from %s: heads per layer %s", path, [len(k) for k in kept])
    return model
