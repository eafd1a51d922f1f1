"""Fine-tune a sequence classifier once, cache it, and never retrain what is on disk.

The cache key (fingerprint) hashes every argument that changes the trained weights; the model is
trained in a temporary directory next to its final place and renamed into it only when complete,
so an interrupted run never leaves a half-written model that later looks cached. A file lock
keeps two processes (say, two test runs) from training the same model at once.

Recipe: AdamW (weight decay 0.01, none on biases and LayerNorm), linear warmup over the first
10% of steps then linear decay to 0, gradient clipping at 1.0, dropout on while training. The
data split seed is the data spec's (0 by default), not the training seed, so models trained with
different seeds are evaluated on the same held-out tweets and never see them in training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attribution.core.data import DataSpec, as_spec, iter_batches, label_names, load_splits
from attribution.core.errors import HeadpruneError
from attribution.core.predict import predict_logits
from attribution.models import (
    DEFAULT_BASE_MODEL,
    DEFAULT_FINETUNE_CONFIG,
    DEFAULT_MODEL,
    FINETUNE_META,
    FINETUNE_RECIPE_VERSION,
    finetune_fingerprint,
    finetuned_path,
    load_classifier,
)
from prune.metrics import compute_metrics

WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
EVAL_METRICS = ("accuracy", "macro_f1", "matthews_corrcoef")


@dataclass
class FinetuneResult:
    """What ``finetune`` produced (or found cached).

    ``seconds`` is the wall time of the training run that made the model (for a cached model, the
    original run's). ``metrics`` maps split name -> metric name -> value.
    """

    path: Path
    validation_accuracy: float
    test_accuracy: float
    seconds: float
    cached: bool
    fingerprint: str = ""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def finetune_config(
    base: str | os.PathLike = DEFAULT_BASE_MODEL,
    data: DataSpec | str = "tweets",
    *,
    train_examples: int = 12000,
    epochs: int = 1,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """The JSON-able arguments that determine the trained weights (the fingerprint's input)."""
    base = os.fspath(base)
    if base != DEFAULT_BASE_MODEL and os.path.exists(base):
        base = str(Path(base).resolve())  # the same directory from any working directory
    spec = as_spec(data)
    if spec == DataSpec(name=spec.name, max_length=spec.max_length):
        data_key: Any = spec.name  # plain specs hash as their name, like the default "tweets"
    else:
        data_key = {k: v for k, v in dataclasses.asdict(spec).items() if k != "max_length"}
    if spec.name not in ("tweets",) and os.path.exists(spec.name):
        # local files: key on the absolute path (contents are the user's responsibility)
        if isinstance(data_key, str):
            data_key = str(Path(spec.name).resolve())
        else:
            data_key["name"] = str(Path(spec.name).resolve())
    return {
        "base": base,
        "data": data_key,
        "train_examples": int(train_examples),
        "epochs": int(epochs),
        "lr": float(lr),
        "batch_size": int(batch_size),
        "max_length": int(max_length),
        "seed": int(seed),
    }


def finetune(
    base: str | os.PathLike = DEFAULT_BASE_MODEL,
    data: DataSpec | str = "tweets",
    *,
    train_examples: int = 12000,
    epochs: int = 1,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``base`` on the train split of ``data``, evaluate, and cache the result.

    The model goes to ``out_dir`` if given, else ``cache_dir()/finetuned/<fingerprint>``. If a
    model trained with the same arguments is already there it is returned with ``cached=True``
    and nothing is trained. ``train_examples`` takes the first rows of the (shuffled) train split;
    fewer are used if the split is smaller.
    """
    _check_positive(train_examples=train_examples, epochs=epochs, batch_size=batch_size, lr=lr)
    if max_length < 8:
        raise HeadpruneError(f"max_length must be at least 8, got {max_length}")
    config = finetune_config(
        base,
        data,
        train_examples=train_examples,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
    )
    fingerprint = finetune_fingerprint(config)
    final = Path(out_dir).expanduser().resolve() if out_dir is not None else finetuned_path(config)

    cached = _read_cached(final, fingerprint)
    if cached is not None:
        return cached
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{final.name}.lock"):
        cached = _read_cached(final, fingerprint)  # another process may have finished meanwhile
        if cached is not None:
            return cached
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            meta = _train(config, as_spec(data), tmp, progress=progress)
            meta["fingerprint"] = fingerprint
            (tmp / FINETUNE_META).write_text(json.dumps(meta, indent=2) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
            os.replace(tmp, final)  # atomic: the final directory is complete or absent
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _result(final, meta, cached=False)


def resolve_model(name: str | os.PathLike, *, progress: bool = True) -> str:
    """A loadable model name: ``"default"`` becomes the cached default classifier's path
    (fine-tuned on first use, ~10 minutes on 2 CPU cores); anything else passes through."""
    name = os.fspath(name)
    if name != DEFAULT_MODEL:
        return name
    # the config's keys are finetune's parameter names (a test keeps them equal)
    return str(finetune(**DEFAULT_FINETUNE_CONFIG, progress=progress).path)


# --------------------------------------------------------------------------------------------


def _train(config: dict[str, Any], spec: DataSpec, out: Path, *, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    seed, batch_size, max_length = config["seed"], config["batch_size"], config["max_length"]
    spec = dataclasses.replace(spec, max_length=max_length)
    splits = load_splits(spec)
    names = label_names(splits)
    train = splits["train"]
    n = min(config["train_examples"], len(train))
    train = train.select(range(n))  # the train split is already a seeded shuffle

    torch.manual_seed(seed)  # seeds the fresh classification head
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier weights newly initialised" report is expected
    try:
        model, tokenizer = load_classifier(config["base"], label_names=names)
    finally:
        hf_logging.set_verbosity(verbosity)
    if progress:
        print(
            f"fine-tuning {config['base']} on {spec.name}: {n} examples, {config['epochs']} epoch(s), "
            f"{len(names)} classes -> {out.parent}",
            file=sys.stderr,
        )

    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim < 2 else decay).append(param)  # biases and LayerNorm weights
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config["lr"],
    )
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = steps_per_epoch * config["epochs"]
    scheduler = get_linear_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * total_steps), total_steps)

    model.train()
    bar = tqdm(total=total_steps, desc="fine-tuning", unit="step", disable=not progress)
    running = None
    for epoch in range(config["epochs"]):
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(n, generator=generator).tolist()
        for batch in iter_batches(train.select(order), tokenizer, batch_size=batch_size, max_length=max_length):
            batch.pop("index")
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", epoch=epoch + 1)
    bar.close()
    train_seconds = time.perf_counter() - start

    model.eval()
    metrics: dict[str, dict[str, float]] = {}
    for split in ("validation", "test"):
        logits = predict_logits(
            model,
            tokenizer,
            splits[split],
            batch_size=64,
            max_length=max_length,
            progress=progress,
            desc=f"evaluating {split}",
        )
        metrics[split] = compute_metrics(logits, torch.as_tensor(list(splits[split]["label"])), EVAL_METRICS)

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    import transformers

    return {
        "config": config,
        "data_spec": dataclasses.asdict(spec),
        "recipe_version": FINETUNE_RECIPE_VERSION,
        "recipe": {
            "optimizer": "AdamW",
            "weight_decay": WEIGHT_DECAY,
            "warmup_fraction": WARMUP_FRACTION,
            "schedule": "linear",
            "max_grad_norm": MAX_GRAD_NORM,
        },
        "label_names": names,
        "train_examples_used": n,
        "steps": total_steps,
        "final_train_loss": running,
        "metrics": metrics,
        "train_seconds": round(train_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _read_cached(final: Path, fingerprint: str) -> FinetuneResult | None:
    meta_path = final / FINETUNE_META
    if not final.exists() or (final.is_dir() and not any(final.iterdir())):
        return None  # an empty --out directory is fine to train into
    if not meta_path.is_file():
        raise HeadpruneError(f"{final} exists but is not a headprune fine-tuned model; choose another --out")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        raise HeadpruneError(f"unreadable {meta_path}: {error}") from None
    if meta.get("fingerprint") != fingerprint:
        raise HeadpruneError(
            f"{final} holds a model fine-tuned with other arguments ({meta.get('config')}); "
            "choose another --out or delete it"
        )
    return _result(final, meta, cached=True)


def _result(path: Path, meta: dict[str, Any], *, cached: bool) -> FinetuneResult:
    metrics = meta["metrics"]
    return FinetuneResult(
        path=path,
        validation_accuracy=metrics["validation"]["accuracy"],
        test_accuracy=metrics["test"]["accuracy"],
        seconds=meta["seconds"],
        cached=cached,
        fingerprint=meta.get("fingerprint", ""),
        metrics=metrics,
    )


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (POSIX flock; no locking where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent trainings just race, the rename keeps one
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise HeadpruneError(f"{name.replace('_', ' ')} must be positive, got {value}")
