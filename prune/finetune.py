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
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attribution.core.cache import DEFAULT_BASE_MODEL, base_model_path, cache_dir
from attribution.core.errors import HeadpruneError
from attribution.core.io import apply_umask
from attribution.core.log import get_logger
from attribution.core.trust import refuse_remote_code, remote_code_allowed
from attribution.core.validate import check_seed

if TYPE_CHECKING:
    from attribution.core.data import DataSpec

FINETUNE_META = "headprune_finetune.json"
# bump when the training recipe changes so old caches are not mistaken for new ones
FINETUNE_RECIPE_VERSION = 1
WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
EVAL_METRICS = ("accuracy", "macro_f1", "matthews_corrcoef")

log = get_logger("finetune")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HeadpruneError(f"{name.replace('_', ' ')} must be a finite number, got {value!r}")
        if not value > 0:
            raise HeadpruneError(f"{name.replace('_', ' ')} must be positive, got {value}")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that determines a fine-tuned model's weights.

    Its defaults are *the* fine-tuning defaults, declared here only: ``finetune()``, the default
    classifier (``DEFAULT_FINETUNE_CONFIG``: MiniLM fine-tuned on the embedded tweets),
    ``headprune finetune`` and the recipe's ``finetune`` section all take them from this class.
    ``base`` is ``"minilm"`` (the bundled encoder), a local directory or a hub id; ``data`` a
    ``DataSpec`` or a data set name (see ``attribution.core.data``).
    """

    base: str = DEFAULT_BASE_MODEL
    data: DataSpec | str = "tweets"
    train_examples: int = 12000
    epochs: int = 1
    lr: float = 5e-5
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", os.fspath(self.base))
        _check_positive(train_examples=self.train_examples, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)
        if self.max_length < 8:
            raise HeadpruneError(f"max_length must be at least 8, got {self.max_length}")
        check_seed(self.seed, "seed")

    def key(self) -> dict[str, Any]:
        """The JSON-able arguments that determine the trained weights (the fingerprint's input):
        local paths made absolute, a plain data spec reduced to its name."""
        from attribution.core.data import DataSpec, as_spec

        base = self.base
        if base != DEFAULT_BASE_MODEL and os.path.exists(base):
            base = str(Path(base).resolve())  # the same directory from any working directory
        spec = as_spec(self.data)
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
            "train_examples": int(self.train_examples),
            "epochs": int(self.epochs),
            "lr": float(self.lr),
            "batch_size": int(self.batch_size),
            "max_length": int(self.max_length),
            "seed": int(self.seed),
        }


# The embedded default classifier ("default" to every command): MiniLM fine-tuned on the tweets.
DEFAULT_FINETUNE_CONFIG = FinetuneConfig()
_DEFAULTS = DEFAULT_FINETUNE_CONFIG


def finetune_fingerprint(config: FinetuneConfig | Mapping[str, Any]) -> str:
    """A short stable hash of fine-tuning arguments (plus the recipe version): the cache key.

    ``config`` is a ``FinetuneConfig`` or its ``key()`` (any JSON-able mapping; key order does
    not matter).
    """
    values = config.key() if isinstance(config, FinetuneConfig) else dict(config)
    payload = json.dumps({"recipe": FINETUNE_RECIPE_VERSION, **values}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def finetuned_path(config: FinetuneConfig | Mapping[str, Any]) -> Path:
    """Where ``finetune`` caches the model trained with ``config``."""
    return cache_dir() / "finetuned" / finetune_fingerprint(config)


def default_finetuned_path() -> Path:
    """Where the default classifier (MiniLM fine-tuned on tweets) is, or would be, cached."""
    return finetuned_path(DEFAULT_FINETUNE_CONFIG)


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


def finetune(
    base: str | os.PathLike = _DEFAULTS.base,
    data: DataSpec | str = _DEFAULTS.data,
    *,
    train_examples: int = _DEFAULTS.train_examples,
    epochs: int = _DEFAULTS.epochs,
    lr: float = _DEFAULTS.lr,
    batch_size: int = _DEFAULTS.batch_size,
    max_length: int = _DEFAULTS.max_length,
    seed: int = _DEFAULTS.seed,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    mixed_precision: str | None = None,
    gradient_accumulation_steps: int | None = None,
) -> FinetuneResult:
    """Fine-tune ``base`` on the train split of ``data``, evaluate, and cache the result.

    The defaults are ``FinetuneConfig``'s. The model goes to ``out_dir`` if given, else
    ``cache_dir()/finetuned/<fingerprint>``. If a model trained with the same arguments is already
    there it is returned with ``cached=True`` and nothing is trained. ``train_examples`` takes the
    first rows of the (shuffled) train split; fewer are used if the split is smaller.

    Training runs on Accelerate's device, data-parallel under ``accelerate launch`` or
    ``torchrun`` (every process must call this; ``prune.training``). ``mixed_precision`` and
    ``gradient_accumulation_steps`` say how to compute, not what: the batch size stays
    ``batch_size`` rows per optimizer step. A mixed precision other than ``"no"`` enters the
    cache key; the number of processes and of micro-batches do not (they change float summation
    order only, and with dropout the draws: an equally good model, not the same bits).
    """
    config = FinetuneConfig(
        base,
        data,
        train_examples=train_examples,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
    )
    return run_finetune(config, out_dir=out_dir, progress=progress, mixed_precision=mixed_precision,
                        gradient_accumulation_steps=gradient_accumulation_steps)


def finetune_default(*, progress: bool = True) -> FinetuneResult:
    """The default classifier (``DEFAULT_FINETUNE_CONFIG``): fine-tuned on first use (~10 minutes
    on 2 CPU cores), then taken from the cache. Always in full precision, whatever the launch says,
    so that "default" is one model."""
    return run_finetune(DEFAULT_FINETUNE_CONFIG, progress=progress, mixed_precision="no")


def run_finetune(
    config: FinetuneConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    mixed_precision: str | None = None,
    gradient_accumulation_steps: int | None = None,
) -> FinetuneResult:
    """``finetune`` with its arguments as one ``FinetuneConfig``.

    Under several processes every process trains its shard of each batch; only the main one
    writes the model (atomically, under the lock) while the others wait for it.
    """
    from attribution.core import processes
    from prune.training import check_accumulation, resolve_precision

    check_accumulation(gradient_accumulation_steps)  # bad options fail before anything is read or written
    key = config.key()
    precision = resolve_precision(mixed_precision)
    if precision != "no":
        key["mixed_precision"] = precision  # "no" stays out: the key of every full-precision model is as before
    fingerprint = finetune_fingerprint(key)
    final = Path(out_dir).expanduser().resolve() if out_dir is not None else finetuned_path(key)

    cached = _read_cached(final, fingerprint)
    if cached is not None:
        return cached
    main = processes.is_main_process() if processes.is_distributed() else True
    if main:
        final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{final.name}.lock") if main else contextlib.nullcontext():
        # another process may have finished meanwhile: the main process decides for all
        cached = _read_cached(final, fingerprint) if main else None
        if processes.broadcast(cached is not None):
            found = cached or _read_cached(final, fingerprint)  # the main process saw it complete
            if found is None:
                raise HeadpruneError(f"{final} vanished while the processes were deciding whether to train")
            return found
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent)) if main else None
        failure = None
        try:
            meta = _train(key, config.data, tmp, progress=progress, mixed_precision=precision,
                          gradient_accumulation_steps=gradient_accumulation_steps)
            meta["fingerprint"] = fingerprint
            if tmp is not None:
                try:
                    (tmp / FINETUNE_META).write_text(json.dumps(meta, indent=2) + "\n")
                    apply_umask(tmp)  # mkdtemp and the safetensors writer make them private; the cache is shared
                    os.replace(tmp, final)  # atomic: the final directory is complete or absent
                except OSError as error:
                    failure = f"cannot save the fine-tuned model to {final}: {error}"
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        failure = processes.broadcast(failure)  # the others wait here until the model is saved
        if failure is not None:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise HeadpruneError(failure)
    if main:
        log.info("fine-tuned model saved to %s", final)
    return _result(final, meta, cached=False)


# --------------------------------------------------------------------------------------------


def _train(
    config: dict[str, Any], data: DataSpec | str, out: Path | None, *, progress: bool, mixed_precision: str,
    gradient_accumulation_steps: int | None,
) -> dict[str, Any]:
    """Train and evaluate (every process); save to ``out`` (the main process: others pass None)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from attribution.core.data import as_spec, label_names, load_splits
    from attribution.core.predict import predict_logits
    from prune.metrics import compute_metrics
    from prune.training import DataParallel, make_accelerator

    start = time.perf_counter()
    seed, batch_size, max_length = config["seed"], config["batch_size"], config["max_length"]
    spec = dataclasses.replace(as_spec(data), max_length=max_length)
    splits = load_splits(spec)
    names = label_names(splits)
    train = splits["train"]
    n = min(config["train_examples"], len(train))
    train = train.select(range(n))  # the train split is already a seeded shuffle

    accelerator = make_accelerator(mixed_precision, gradient_accumulation_steps)
    main = accelerator.is_main_process
    torch.manual_seed(seed)  # seeds the fresh classification head (the same on every process)
    model, tokenizer = _load_base(config["base"], names)
    if main:
        log.info(
            "fine-tuning %s on %s: %d examples, %d epoch(s), %d classes, %d process(es) on %s -> %s",
            config["base"], spec.name, n, config["epochs"], len(names), accelerator.num_processes,
            accelerator.device.type, out.parent if out is not None else "-",
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
    trainer = DataParallel(accelerator, model, optimizer, scheduler, tokenizer=tokenizer, max_length=max_length,
                           max_grad_norm=MAX_GRAD_NORM)

    def loss_fn(net: Any, batch: dict[str, Any]) -> Any:
        return net(**batch).loss

    model.train()
    bar = tqdm(total=total_steps, desc="fine-tuning", unit="step", disable=not (progress and main))
    running = None
    try:
        for epoch in range(config["epochs"]):
            generator = torch.Generator().manual_seed(seed * 1000 + epoch)
            rows = train.select(torch.randperm(n, generator=generator).tolist())
            for first in range(0, n, batch_size):
                loss = trainer.step(rows.select(range(first, min(first + batch_size, n))), loss_fn)
                running = loss if running is None else 0.98 * running + 0.02 * loss
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}", epoch=epoch + 1)
    finally:
        bar.close()
        trainer.release()
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
            progress=progress and main,
            desc=f"evaluating {split}",
            sharded=True,
        )
        metrics[split] = compute_metrics(logits, torch.as_tensor(list(splits[split]["label"])), EVAL_METRICS)

    if out is not None:
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
        "compute": {
            "processes": accelerator.num_processes,
            "device": accelerator.device.type,
            "mixed_precision": accelerator.mixed_precision,
            "gradient_accumulation_steps": trainer.micro,
        },
        "train_examples_used": n,
        "steps": total_steps,
        "final_train_loss": running,
        "metrics": metrics,
        "train_seconds": round(train_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _load_base(base: str, names: list[str]) -> tuple[Any, Any]:
    """The encoder ``base`` with a fresh classification head for ``names``, and its tokenizer.

    Only dense checkpoints: the weights of a pruned one (``prune.checkpoints``) do not fit the head
    count of its config, and re-initialising them here would train a different model silently.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    target = base_model_path(base)
    path = Path(target).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise HeadpruneError(f"{base} is not a model directory (no config.json in it)")
    if not path.exists() and (target.startswith(("/", ".", "~")) or target.count("/") > 1):
        raise HeadpruneError(f"model directory not found: {base}")
    refuse_remote_code(path, base)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier weights newly initialised" report is expected
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            target,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
            ignore_mismatched_sizes=True,  # an existing head of another size is replaced
            output_loading_info=True,
            trust_remote_code=remote_code_allowed(),
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise HeadpruneError(f"cannot load base model {base!r} ({type(error).__name__}: {first})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    encoder = f"{model.base_model_prefix}."
    misfits = sorted(str(key[0] if isinstance(key, tuple) else key) for key in info.get("mismatched_keys") or [])
    misfits = [key for key in misfits if key.startswith(encoder)]
    if misfits:
        raise HeadpruneError(
            f"the encoder weights of {base} do not fit its config (e.g. {misfits[0]}): a pruned checkpoint "
            "cannot be fine-tuned; fine-tune the dense model, then prune"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=remote_code_allowed())
    except (OSError, ValueError, KeyError) as error:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise HeadpruneError(f"cannot load the tokenizer of {base!r} ({type(error).__name__}: {first})") from None
    return model, tokenizer


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
