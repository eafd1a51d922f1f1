"""The one way headprune loads a model, and the way it saves a pruned one.

``load_model(name_or_path)`` (transformers' ``from_pretrained`` habit) understands:

- ``"default"``: the embedded classifier, MiniLM fine-tuned on the embedded tweets
  (``prune.finetune.DEFAULT_FINETUNE_CONFIG``); fine-tuned on first use, then taken from the cache;
- ``"minilm"``: the bundled MiniLM-L6-H384 encoder (its classification head is freshly initialised);
- a pruned headprune directory (written by ``save_pruned``): the dense architecture is built from
  the config, sliced to the heads recorded under ``headprune_kept_heads`` and the feed-forward
  neurons recorded under ``headprune_kept_neurons``, and only then are the weights loaded, with no
  missing or unexpected keys;
- a dense model directory, or a hub id: ``AutoModelForSequenceClassification.from_pretrained``.

A pruned checkpoint is an ordinary ``save_pretrained`` directory (safetensors weights, config,
tokenizer) whose config carries ``headprune_kept_heads``: per layer, the original indices of the
heads that remain, and, when any feed-forward neuron was removed, ``headprune_kept_neurons``: per
layer, the original indices of the neurons that remain (widths may differ between layers, and may be
0). Plain ``from_pretrained`` on such a directory raises (the q/k/v, output-projection and
feed-forward shapes do not match the config), so it cannot silently load as a wrong dense model —
unless the caller passes ``ignore_mismatched_sizes=True``, which re-initialises those weights by
request. Recorded indices that are malformed or do not match the weights: a one-line
``HeadpruneError`` naming the file.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.cache import base_model_path
from attribution.core.errors import HeadpruneError, one_line, raised_by
from attribution.core.io import atomic_directory
from attribution.core.log import get_logger
from attribution.core.trust import refuse_remote_code, remote_code_allowed

# The key is defined beside remove_heads, which keeps a model's config in step with its heads.
from prune.surgery import KEPT_HEADS_KEY, KEPT_NEURONS_KEY, bake_mask

DEFAULT_MODEL = "default"

__all__ = [
    "DEFAULT_MODEL",
    "KEPT_HEADS_KEY",
    "KEPT_NEURONS_KEY",
    "load_model",
    "read_kept_heads",
    "read_kept_neurons",
    "resolve_model",
    "save_pruned",
]

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
    from prune.remote_code import is_headprune_remote_code

    refuse_remote_code(path, shown, exempt=is_headprune_remote_code)
    if path.is_dir() and (read_kept_heads(path) is not None or read_kept_neurons(path) is not None):
        model = _load_pruned(path)
    else:
        model = _load_dense(target, shown, local_files_only=local_files_only)
    model.eval()
    tok = _load_tokenizer(target, shown, local_files_only=local_files_only) if tokenizer else None
    return model, tok


def save_pruned(
    model: PreTrainedModel, directory: str | os.PathLike[str], tokenizer: Any = None, *, remote_code: bool = False
) -> Path:
    """Write a pruned (or masked, or dense) model to ``directory``: ``model.safetensors``,
    ``config.json`` with ``headprune_kept_heads`` (and ``headprune_kept_neurons`` when any
    feed-forward neuron was removed) and, if given, the tokenizer files.

    ``remote_code``: also write ``modeling_headprune.py`` and its ``auto_map`` in the config, so
    that ``AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)``
    loads the checkpoint without headprune (``prune.remote_code``). Off by default: running a
    checkpoint's code is the user's security decision. Without it, headprune's own ``auto_map`` and
    modeling file (from a checkpoint that had them) are not carried over.

    Persistent head and neuron masks are baked into a copy first (masked units removed, repair
    scales folded), so the saved model computes what ``model`` computes. The directory is written next
    to its final place and renamed into it, replacing an existing directory only when complete.
    ``load_model(directory)`` gives the model back, with identical logits.
    """
    instrument.model_family(model)
    masks = [*instrument.get_head_mask(model), *instrument.get_neuron_mask(model)]
    if any(g is not None for g in masks):
        model = copy.deepcopy(model)
        bake_mask(model)
    final = Path(directory).expanduser().resolve()
    if final.exists() and not final.is_dir():
        raise HeadpruneError(f"{final} exists and is not a directory")
    config = model.config
    width = instrument.original_intermediate_size(model)
    neurons = instrument.kept_neurons(model)
    recorded = {
        KEPT_HEADS_KEY: instrument.kept_heads(model),
        KEPT_NEURONS_KEY: neurons if any(len(kept) != width for kept in neurons) else None,  # None: dense FFNs
    }
    previous = {key: (hasattr(config, key), getattr(config, key, None)) for key in recorded}
    try:
        for key, value in recorded.items():
            if value is not None:
                setattr(config, key, value)
            elif hasattr(config, key):
                delattr(config, key)
        with atomic_directory(final) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            _set_remote_code(tmp, remote_code)
            _stamp_weights(tmp, recorded)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        for key, (had, value) in previous.items():
            if had:
                setattr(config, key, value)
            elif hasattr(config, key):
                delattr(config, key)
    return final


def _set_remote_code(directory: Path, remote_code: bool) -> None:
    """Add (``remote_code``) or drop headprune's modeling file and ``auto_map`` in a checkpoint being
    written; an ``auto_map`` that is not headprune's is left alone."""
    from prune.remote_code import AUTO_MAP_KEY, MODELING_FILE, auto_map, is_headprune_remote_code, write_modeling_file

    path = directory / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if remote_code:
        config[AUTO_MAP_KEY] = auto_map(str(config.get("model_type")))
        write_modeling_file(directory)
    elif is_headprune_remote_code(config):
        del config[AUTO_MAP_KEY]
        (directory / MODELING_FILE).unlink(missing_ok=True)
    else:
        return
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_kept_heads(directory: str | os.PathLike[str]) -> list[list[int]] | None:
    """The ``headprune_kept_heads`` recorded in a model directory's config, or None (dense)."""
    return _read_config(directory).get(KEPT_HEADS_KEY)


def read_kept_neurons(directory: str | os.PathLike[str]) -> list[list[int]] | None:
    """The ``headprune_kept_neurons`` recorded in a model directory's config, or None (dense FFNs)."""
    return _read_config(directory).get(KEPT_NEURONS_KEY)


def _read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HeadpruneError(f"{directory} is not a model directory (no config.json in it)") from None
    except json.JSONDecodeError as error:
        raise HeadpruneError(f"{path} is not valid JSON: {error}") from None
    except UnicodeDecodeError:
        raise HeadpruneError(f"{path} is not UTF-8 text") from None
    except OSError as error:
        raise HeadpruneError(f"cannot read {path}: {error.strerror or error}") from None
    if not isinstance(config, dict):
        raise HeadpruneError(f"{path} is not a model config (a JSON object)")
    return config


# --------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with a slash or a leading dot is a path
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "", 1)


def _first_line(error: BaseException, limit: int = 200) -> str:
    return (str(error).strip().splitlines() or [""])[0][:limit]


def _unreadable_weights(error: BaseException) -> bool:
    """An error of the safetensors reader (truncated or random bytes), or of the OS reading a file."""
    return raised_by(error, "safetensors") or isinstance(error, OSError)


# Beside the config, the safetensors header records which original heads/neurons the weights hold:
# a config edited to list other indices with the same counts would otherwise load the wrong units.
def _stamp_weights(directory: Path, recorded: dict[str, Any]) -> None:
    """Add ``recorded`` (JSON-encoded, None values left out) to the ``__metadata__`` of every
    safetensors file in ``directory``; tensors and their offsets are unchanged."""
    stamp = {key: json.dumps(value, separators=(",", ":")) for key, value in recorded.items() if value is not None}
    if not stamp:
        return
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
            data = handle.read()
        header["__metadata__"] = {**(header.get("__metadata__") or {}), **stamp}
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
        with open(file, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little") + encoded + data)


def _weights_metadata(file: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:
        if _unreadable_weights(error):
            raise HeadpruneError(f"unreadable weights {file}: {one_line(str(error), 200)}") from None
        raise


def _check_stamp(path: Path, key: str, kept: list[list[int]], config_file: Path) -> None:
    """The indices in config.json must be those the weights were saved with (when recorded there)."""
    for file in sorted(path.glob("*.safetensors")):
        stamped = _weights_metadata(file).get(key)
        if stamped is None:
            continue  # written before headprune recorded it, or by another tool
        try:
            saved = json.loads(stamped)
        except ValueError:
            raise HeadpruneError(f"{file}: malformed {key} in the weights' metadata") from None
        if [sorted(k) for k in saved] != [sorted(k) for k in kept]:
            raise HeadpruneError(
                f"{key} in {config_file} does not match the units the weights in {file.name} were saved with "
                f"({one_line(stamped, 120)}); the config was edited or belongs to other weights"
            )


def _load_dense(target: str, shown: str, *, local_files_only: bool) -> PreTrainedModel:
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(
            target, local_files_only=local_files_only, trust_remote_code=remote_code_allowed()
        )
    except Exception as error:
        if raised_by(error, "safetensors"):
            raise HeadpruneError(f"unreadable weights in {shown}: {one_line(str(error), 200)}") from None
        if not isinstance(error, (OSError, ValueError, KeyError, RuntimeError, ImportError)):
            raise
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
        return AutoTokenizer.from_pretrained(
            target, local_files_only=local_files_only or path.is_dir(), trust_remote_code=remote_code_allowed()
        )
    except Exception as error:
        if not isinstance(error, (OSError, ValueError, KeyError, ImportError)) and not raised_by(error, "tokenizers"):
            raise
        raise HeadpruneError(
            f"cannot load the tokenizer of {shown!r} ({type(error).__name__}: {_first_line(error)})"
        ) from None


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as error:
        if _unreadable_weights(error):
            raise HeadpruneError(f"unreadable weights {file}: {one_line(str(error), 200)}") from None
        raise


def _load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    single = directory / "model.safetensors"
    if single.is_file():
        return _read_weights(single)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise HeadpruneError(f"unreadable {index}: {one_line(str(error), 200)}") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_read_weights(directory / str(shard)))
        return state
    raise HeadpruneError(f"no safetensors weights in {directory} (expected model.safetensors)")


def _recorded_indices(value: Any, key: str, config: Path, layers: int, size: int, unit: str) -> list[list[int]]:
    """``value`` checked as, per layer, distinct ``unit`` indices in ``0..size-1`` (sorted)."""
    if (
        not isinstance(value, list)
        or len(value) != layers
        or not all(
            isinstance(k, list)
            and len(set(k)) == len(k)
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < size for i in k)
            for k in value
        )
    ):
        raise HeadpruneError(
            f"{key} in {config} must list, for each of the {layers} layers, distinct {unit} indices in 0..{size - 1}"
        )
    return [sorted(k) for k in value]


def _load_pruned(path: Path) -> PreTrainedModel:
    """A ``save_pruned`` directory: rebuild the architecture from the config, remove the heads and
    feed-forward neurons the config says are gone, then load the weights with no missing or
    unexpected keys (a recorded width that does not match the weights is a one-line error)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config_file = path / "config.json"
    raw_heads, raw_neurons = read_kept_heads(path), read_kept_neurons(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=remote_code_allowed())
    except (OSError, ValueError, KeyError) as error:
        raise HeadpruneError(f"cannot read the config in {path}: {_first_line(error)}") from None
    # headprune rebuilds the architecture itself: an auto_map's file is never imported here
    model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=False)
    layers = len(instrument.encoder_layers(model))
    kept = neurons = None
    if raw_heads is not None:
        heads = instrument.original_num_heads(model)
        kept = _recorded_indices(raw_heads, KEPT_HEADS_KEY, config_file, layers, heads, "head")
        for layer, keep in enumerate(kept):
            instrument.keep_heads_in_layer(model, layer, keep)
    if raw_neurons is not None:
        width = instrument.original_intermediate_size(model)
        neurons = _recorded_indices(raw_neurons, KEPT_NEURONS_KEY, config_file, layers, width, "neuron")
        for layer, keep in enumerate(neurons):
            instrument.keep_neurons_in_layer(model, layer, keep)
    state = _load_state_dict(path)
    weights = path / "model.safetensors" if (path / "model.safetensors").is_file() else path
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).strip().splitlines()]
        raise HeadpruneError(
            f"weights in {weights} do not fit the recorded heads/neurons of {config_file}: {' '.join(lines[:2])[:300]}"
        ) from None
    # Non-persistent buffers (e.g. position_ids) are never saved; anything else must match exactly.
    transient = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    missing = [k for k in missing if k not in transient]
    if missing or unexpected:
        raise HeadpruneError(
            f"weights in {weights} do not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    # against what the model now has: a key left out of the config means every unit of that kind
    _check_stamp(path, KEPT_HEADS_KEY, instrument.kept_heads(model), config_file)
    _check_stamp(path, KEPT_NEURONS_KEY, instrument.kept_neurons(model), config_file)
    setattr(model.config, KEPT_HEADS_KEY, instrument.kept_heads(model))
    if raw_neurons is not None:
        setattr(model.config, KEPT_NEURONS_KEY, instrument.kept_neurons(model))
    log.debug(
        "loaded a pruned checkpoint from %s: heads per layer %s, neurons per layer %s",
        path, instrument.heads_per_layer(model), instrument.neurons_per_layer(model),
    )
    return model
