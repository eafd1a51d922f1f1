"""Heal a pruned classifier by distillation from its dense parent, under a wall-clock budget.

The loss, per batch of B rows, with student logits ``s``, teacher logits ``t``, labels ``y``,
temperature ``T`` and weight ``alpha``::

    loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(softmax(s), y)

the KL summed over classes and averaged over rows (``batchmean``), the cross-entropy on the
unscaled student logits averaged over rows. ``T^2`` keeps the soft term's gradients on the scale of
the hard term's as ``T`` grows (Hinton et al., 2015). The teacher runs in eval mode (no dropout)
without gradients, on the same batches; teacher and student must share the tokenizer.

Training is ``prune.finetune``'s recipe: AdamW (weight decay 0.01, none on biases and LayerNorm),
gradient clipping at 1.0, dropout on in the student. Learning-rate schedule, a decision: with
``max_steps``, linear warmup over the first 10% of them, then linear decay to 0 at ``max_steps``
(exactly the fine-tuning schedule); with only a wall-clock budget the number of steps is unknown,
so after a warmup over 10% of one epoch the rate stays at ``lr`` (best-weights selection and early
stopping stand in for annealing). Rows are reshuffled every epoch by a permutation seeded with
``seed`` and the epoch, and epochs repeat until a stop.

Held-out accuracy is measured before the first step and every ``eval_every`` steps (and once more
at a stop that falls between). Only a strictly higher accuracy counts as an improvement; after
``patience`` evaluations without one the heal stops. The student is left holding the weights of
the best evaluation — the starting weights when none beat them (``restored_start``), so a heal
never returns a model worse on the held-out rows than the one it was given.

A budget covers the whole heal (every call of a resumed one, as recorded in its checkpoints): a
step is not started when the time so far plus one step and one evaluation (as last measured) would
exceed it. Under a budget the number of steps, hence the result, depends on the machine's speed;
with ``max_steps`` alone the heal is deterministic (bit-identical on CPU for the same seed, thread
count and arguments, interrupted or not).

Resuming: with ``checkpoint_dir``, every evaluation writes one file atomically (current weights,
optimizer, scheduler, torch RNG state, step, epoch and position in it, best weights and accuracy,
history, seconds spent). A later call with the same arguments continues from there; the student
passed in must be the same starting model (its weights are fingerprinted, as are the teacher's and
both data sets). The budget is not part of the fingerprint, so a budget-stopped heal can be given
more time. A heal that ended on ``max_steps`` or ``patience`` is not continued: the call returns
its result with the best weights loaded. Only torch's RNG drives the heal (dropout); it runs in a
forked RNG, so the caller's random state is left as it was.

Accelerator and processes (``prune.training``): the student and the teacher run on Accelerate's
device; under ``accelerate launch`` / ``torchrun`` every process calls ``heal`` and trains its
shard of each batch (same batches, schedule and stops as one process; gradients averaged),
evaluates its shard of the held-out rows (the accuracy is gathered, so every process takes the same
decisions), and stops on the main process's budget decision. Only the main process writes the
checkpoints and the result; every process reads a checkpoint to resume, with any number of
processes. On one CPU process the heal is the plain PyTorch loop, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from attribution.core import processes
from attribution.core.errors import HeadpruneError
from attribution.core.io import Record, save_tensors
from attribution.core.log import get_logger
from prune.finetune import MAX_GRAD_NORM, WARMUP_FRACTION, WEIGHT_DECAY
from prune.training import DataParallel, check_accumulation, make_accelerator, resolve_precision

log = get_logger("heal")

STATE_FILE = "heal_state.pt"
RESULT_FILE = "heal_result.json"
STATE_VERSION = 1
STOP_REASONS = ("budget", "max_steps", "patience")

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str | float) -> float:
    """Seconds in a duration such as ``"10m"``, ``"90s"``, ``"1h30m"``, ``"1.5h"`` or ``"600"``
    (a bare number is seconds; a number, e.g. from YAML, is taken as seconds too). Units go from
    hours to seconds, each at most once; anything else, or a duration that is not positive, is a
    one-line ``HeadpruneError``."""
    error = HeadpruneError(f"--budget must be a duration like 10m, 90s or 1h; got {str(text)!r}")
    if isinstance(text, bool):
        raise error
    if isinstance(text, (int, float)):
        seconds = float(text)
    elif isinstance(text, str):
        spec = text.strip().lower()
        if re.fullmatch(r"\d+(?:\.\d+)?", spec):
            seconds = float(spec)
        else:
            match = _DURATION.fullmatch(spec)
            if not spec or match is None or not any(match.groups()):
                raise error
            hours, minutes, secs = (float(part) if part else 0.0 for part in match.groups())
            seconds = 3600 * hours + 60 * minutes + secs
    else:
        raise error
    if not (math.isfinite(seconds) and seconds > 0):
        raise error
    return seconds


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)`` (see the
    module docstring): logits ``[B, C]``, labels ``[B]`` (unused, and may be None, when alpha is 1).
    A scalar with the student's gradient; the teacher's logits are treated as constants."""
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=-1),
        F.log_softmax(teacher_logits.detach().float() / t, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    loss = alpha * t * t * soft
    if alpha < 1:
        if labels is None:
            raise HeadpruneError("the cross-entropy term (alpha < 1) needs labels")
        loss = loss + (1 - alpha) * F.cross_entropy(student_logits.float(), labels)
    return loss


@dataclass
class HealPoint:
    """One evaluation: after ``step`` training steps (0: the starting model), the mean training
    loss over the steps since the previous evaluation (None at step 0) and the held-out accuracy."""

    step: int
    loss: float | None
    accuracy: float


@dataclass
class HealResult(Record):
    """What ``heal`` did. ``steps`` and ``seconds`` count every call of a resumed heal (seconds up
    to its last checkpoint for the earlier calls); ``best_step`` 0 with ``restored_start`` means no
    evaluation beat the starting model and its weights were put back. ``stopped_because`` is
    ``"budget"``, ``"max_steps"`` or ``"patience"``; ``resumed_from`` the step of the checkpoint
    this call continued from (None: started afresh). Saved as a ``headprune.HealResult`` record."""

    FORMAT: ClassVar[str] = "headprune.HealResult"
    VERSION: ClassVar[int] = 1

    steps: int
    seconds: float
    start_accuracy: float
    best_accuracy: float
    best_step: int
    restored_start: bool
    stopped_because: str
    history: list[HealPoint] = field(default_factory=list)
    resumed_from: int | None = None
    examples: int = 0
    held_out_examples: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        gain = 100 * (self.best_accuracy - self.start_accuracy)
        kept = "kept the starting weights" if self.restored_start else f"best at step {self.best_step}"
        return (
            f"healed {self.steps} steps in {self.seconds:.0f} s (stopped: {self.stopped_because}); held-out accuracy "
            f"{self.start_accuracy:.4f} -> {self.best_accuracy:.4f} ({gain:+.2f} points, {kept})"
        )


@dataclass
class _Progress:
    """The loop's position and bookkeeping, saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    offset: int = 0  # batches of the current epoch already trained on
    seconds: float = 0.0  # spent by earlier calls, up to their last checkpoint
    start_accuracy: float = 0.0
    best_accuracy: float = 0.0
    best_step: int = 0
    stale: int = 0  # evaluations since the last improvement
    eval_seconds: float = 0.0  # the last evaluation's duration (the budget's reserve)
    stopped_because: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def heal(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer: Any,
    train: Any,
    held_out: Any,
    *,
    budget_seconds: float | None = None,
    max_steps: int | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    lr: float = 3e-5,
    batch_size: int = 32,
    max_length: int = 64,
    eval_every: int = 50,
    patience: int = 3,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    mixed_precision: str | None = None,
    gradient_accumulation_steps: int | None = None,
) -> HealResult:
    """Distil ``teacher`` into ``student`` (in place) on the rows of ``train`` until the budget,
    ``max_steps`` (at least one is required) or early stopping on ``held_out`` ends it; leave the
    student holding its best held-out weights and return what happened.

    ``train`` and ``held_out`` are ``datasets.Dataset`` s with ``text`` (and ``text_pair``) and
    ``label`` columns, as ``attribution.core.data`` makes them (``train`` may lack labels when
    ``alpha`` is 1). ``alpha`` weighs the KL term, ``1 - alpha`` the cross-entropy (module
    docstring). ``budget_seconds`` is wall-clock seconds (``parse_duration`` reads ``"10m"``).
    The student's and teacher's train/eval modes are restored afterwards; with ``checkpoint_dir``
    the result is also saved there as ``heal_result.json``. ``mixed_precision`` and
    ``gradient_accumulation_steps`` are ``prune.training``'s (a precision other than ``"no"`` is
    part of the resume key; micro-batches are not: ``batch_size`` rows make one step either way).
    Both models are put back on their devices afterwards.
    """
    _check_arguments(student, teacher, train, held_out, budget_seconds, max_steps, temperature, alpha, lr,
                     batch_size, max_length, eval_every, patience)
    precision = resolve_precision(mixed_precision)
    check_accumulation(gradient_accumulation_steps)
    accelerator = make_accelerator(precision, gradient_accumulation_steps)  # set-up: not part of the budget
    started = time.perf_counter()
    options: dict[str, Any] = {
        "max_steps": None if max_steps is None else int(max_steps), "temperature": float(temperature),
        "alpha": float(alpha), "lr": float(lr), "batch_size": int(batch_size), "max_length": int(max_length),
        "eval_every": int(eval_every), "patience": int(patience), "seed": int(seed),
    }
    if precision != "no":
        options["mixed_precision"] = precision
    state_path = None
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir).expanduser()
        if folder.exists() and not folder.is_dir():
            raise HeadpruneError(f"the heal checkpoint directory {folder} is a file")
        state_path = folder / STATE_FILE
    key: dict[str, Any] = {}
    saved = None
    if state_path is not None:
        key = {**options, **_fingerprints(student, teacher, train, held_out)}
        saved = _load_state(state_path, key) if state_path.is_file() else None

    decay = [p for p in student.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.ndim < 2]  # biases, LayerNorm
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    scheduler = _schedule(optimizer, max_steps, math.ceil(len(train) / batch_size))
    modes = student.training, teacher.training
    homes = next(student.parameters()).device, next(teacher.parameters()).device
    gpu = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []

    with torch.random.fork_rng(devices=gpu):  # the caller's RNG state is left alone
        torch.manual_seed(seed)
        if saved is not None:
            progress_state = _Progress(**saved["progress"])
            try:
                student.load_state_dict(saved["model"])
            except RuntimeError as error:
                first = (str(error).strip().splitlines() or [""])[0][:160]
                raise HeadpruneError(f"{state_path} does not fit this student ({first})") from None
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            torch.set_rng_state(saved["rng"])
            if gpu and "cuda_rng" in saved:
                torch.cuda.set_rng_state(saved["cuda_rng"], gpu[0])
            best = saved["best"]
            resumed_from: int | None = progress_state.step
            log.info("resuming the heal from step %d (%s)", progress_state.step, state_path)
        else:
            progress_state, best, resumed_from = _Progress(), _clone(student), None
            log.info(
                "healing from the teacher: %d training rows, %d held-out rows, %s", len(train), len(held_out),
                ", ".join(f"{k} {v}" for k, v in {**options, "budget": budget_seconds}.items() if v is not None),
            )
        trainer = DataParallel(accelerator, student, optimizer, scheduler, tokenizer=tokenizer,
                               max_length=max_length, max_grad_norm=MAX_GRAD_NORM)
        teacher.to(trainer.device)
        loop = _Loop(trainer, teacher, train, held_out, progress_state, options, budget_seconds, started,
                     state_path, key, progress)
        try:
            teacher.eval()
            best = loop.run(best, fresh=saved is None)
        finally:
            loop.bar.close()
            trainer.release(homes[0])
            teacher.to(homes[1])
            student.train(modes[0])
            teacher.train(modes[1])
    with torch.no_grad():
        student.load_state_dict(best)
    p = progress_state
    result = HealResult(
        steps=p.step,
        seconds=round(loop.elapsed(), 3),
        start_accuracy=p.start_accuracy,
        best_accuracy=p.best_accuracy,
        best_step=p.best_step,
        restored_start=p.best_step == 0,
        stopped_because=str(p.stopped_because),
        history=[HealPoint(**point) for point in p.history],
        resumed_from=resumed_from,
        examples=len(train),
        held_out_examples=len(held_out),
        options={**options, "budget_seconds": budget_seconds},
    )
    if state_path is not None and loop.main:
        result.save(state_path.parent / RESULT_FILE)
    processes.barrier()  # the result file is there for every process
    if loop.main:
        log.info("%s", result.summary())
    return result


class _Loop:
    """The training loop of one ``heal`` call: steps, evaluations, stops and checkpoints."""

    def __init__(
        self, trainer: DataParallel, teacher: Any, train: Any, held_out: Any, p: _Progress, options: dict[str, Any],
        budget: float | None, started: float, state_path: Path | None, key: dict[str, Any], progress: bool,
    ) -> None:
        from tqdm.auto import tqdm

        self.trainer, self.student, self.teacher, self.tokenizer = trainer, trainer.model, teacher, trainer.tokenizer
        self.train, self.held_out = train, held_out
        self.p, self.o = p, options
        self.budget, self.started, self.before = budget, started, p.seconds
        self.state_path, self.key = state_path, key
        self.main = trainer.accelerator.is_main_process
        self.labels = torch.as_tensor(list(held_out["label"]), dtype=torch.long)
        self.window: list[float] = []  # training losses since the last evaluation
        self.step_seconds = 0.0  # the mean duration of this call's steps
        self.steps_here = 0
        self.bar = tqdm(total=options["max_steps"], initial=p.step, desc="healing", unit="step",
                        disable=not (progress and self.main))

    def elapsed(self) -> float:
        """Seconds of the whole heal so far: earlier calls (to their last checkpoint) plus this one."""
        return self.before + (time.perf_counter() - self.started)

    def run(self, best: dict[str, torch.Tensor], *, fresh: bool) -> dict[str, torch.Tensor]:
        """Train until a stop; returns the best weights (a state dict)."""
        p = self.p
        if fresh:
            accuracy = self.evaluate(loss=None)
            p.start_accuracy = p.best_accuracy = accuracy
            self.save(best)
        elif p.stopped_because in ("max_steps", "patience"):
            return best  # finished: nothing to continue
        p.stopped_because = None
        self.student.train()
        batches = self._batches()
        reason = None
        while reason is None:
            reason = self._stop_before_step()
            if self.budget is not None and self.trainer.world > 1:
                reason = processes.broadcast(reason)  # the clocks differ: the main process decides
            if reason is not None:
                break
            self._step(next(batches))
            if p.step % self.o["eval_every"] == 0 or p.step == self.o["max_steps"]:
                best = self._evaluate_and_keep(best)
                if p.stale >= self.o["patience"]:
                    reason = "patience"
        if p.history[-1]["step"] != p.step:  # a stop between evaluations: measure the last weights too
            best = self._evaluate_and_keep(best, save=False)
        p.stopped_because = reason
        self.save(best)
        return best

    def _stop_before_step(self) -> str | None:
        p = self.p
        if self.o["max_steps"] is not None and p.step >= self.o["max_steps"]:
            return "max_steps"
        if self.budget is not None and self.elapsed() + self.step_seconds + p.eval_seconds > self.budget:
            return "budget"
        return None

    def _batches(self) -> Any:
        """Training batches (rows, tokenized by the trainer) forever: each epoch a seeded
        permutation of the rows, starting at the saved position in it (the step updates ``epoch``
        and ``offset``)."""
        p, size, n = self.p, self.o["batch_size"], len(self.train)
        while True:
            generator = torch.Generator().manual_seed(self.o["seed"] * 1000 + p.epoch)
            rows = self.train.select(torch.randperm(n, generator=generator)[p.offset * size :].tolist())
            for first in range(0, len(rows), size):
                yield rows.select(range(first, min(first + size, len(rows))))

    def _loss(self, student: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The distillation loss of one micro-batch (on the trainer's device)."""
        o = self.o
        batch = dict(batch)
        labels = batch.pop("labels", None)
        with torch.no_grad():
            teacher_logits = self.teacher(**batch).logits
        student_logits = student(**batch).logits
        return distillation_loss(student_logits, teacher_logits, labels, temperature=o["temperature"], alpha=o["alpha"])

    def _step(self, rows: Any) -> None:
        started = time.perf_counter()
        p, o = self.p, self.o
        loss = self.trainer.step(rows, self._loss)
        p.step += 1
        p.offset += 1
        if p.offset >= math.ceil(len(self.train) / o["batch_size"]):
            p.epoch, p.offset = p.epoch + 1, 0
        self.window.append(loss)
        self.steps_here += 1
        self.step_seconds += (time.perf_counter() - started - self.step_seconds) / self.steps_here
        self.bar.update(1)
        self.bar.set_postfix(self._postfix(), refresh=False)

    def _postfix(self) -> dict[str, str]:
        shown = {"held_out": f"{self.p.history[-1]['accuracy']:.4f}"} if self.p.history else {}
        if self.window:
            shown["loss"] = f"{sum(self.window) / len(self.window):.4f}"
        return shown

    def _evaluate_and_keep(self, best: dict[str, torch.Tensor], *, save: bool = True) -> dict[str, torch.Tensor]:
        p = self.p
        accuracy = self.evaluate(loss=sum(self.window) / len(self.window) if self.window else None)
        self.window = []
        if accuracy > p.best_accuracy:
            p.best_accuracy, p.best_step, p.stale = accuracy, p.step, 0
            best = _clone(self.student)
        else:
            p.stale += 1
        if save:
            self.save(best)
        return best

    def evaluate(self, *, loss: float | None) -> float:
        """Held-out accuracy of the student now; appended to the history."""
        from attribution.core.predict import predict_logits

        started = time.perf_counter()
        logits = predict_logits(self.student, self.tokenizer, self.held_out, batch_size=max(64, self.o["batch_size"]),
                                max_length=self.o["max_length"], sharded=True)
        accuracy = int((logits.argmax(-1) == self.labels).sum()) / len(self.labels)
        self.p.eval_seconds = time.perf_counter() - started
        self.p.history.append({"step": self.p.step, "loss": loss, "accuracy": accuracy})
        self.bar.set_postfix(self._postfix())
        return accuracy

    def save(self, best: dict[str, torch.Tensor]) -> None:
        """One checkpoint file, written atomically by the main process (nothing without a
        checkpoint directory). Every process holds the same weights, optimizer state and RNG
        state (``prune.training``), so the main process's are everyone's."""
        if self.state_path is None or not self.main:
            return
        progress = {**asdict(self.p), "seconds": self.elapsed()}
        state = {
            "version": STATE_VERSION,
            "key": self.key,
            "progress": progress,
            "model": self.student.state_dict(),
            "optimizer": self.trainer.optimizer.state_dict(),
            "scheduler": self.trainer.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "best": best,
        }
        if self.trainer.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.trainer.device)
        save_tensors(state, self.state_path)


# --------------------------------------------------------------------------------------------


def _check_arguments(
    student: Any, teacher: Any, train: Any, held_out: Any, budget_seconds: float | None, max_steps: int | None,
    temperature: float, alpha: float, lr: float, batch_size: int, max_length: int, eval_every: int, patience: int,
) -> None:
    if budget_seconds is None and max_steps is None:
        raise HeadpruneError("a heal needs a budget (--budget) or a step limit (max_steps)")
    if budget_seconds is not None and not (math.isfinite(budget_seconds) and budget_seconds > 0):
        raise HeadpruneError(f"the heal budget must be a positive number of seconds, got {budget_seconds}")
    for name, value, low in (("max_steps", max_steps, 1), ("batch_size", batch_size, 1), ("max_length", max_length, 8),
                             ("eval_every", eval_every, 1), ("patience", patience, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise HeadpruneError(f"{name} must be an integer of at least {low}, got {value!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise HeadpruneError(f"the distillation temperature must be positive, got {temperature}")
    if not 0 <= alpha <= 1:
        raise HeadpruneError(f"alpha (the weight of the KL term) must be in [0, 1], got {alpha}")
    if not (math.isfinite(lr) and lr > 0):
        raise HeadpruneError(f"the learning rate must be positive, got {lr}")
    for name, rows, labelled in (("training", train, alpha < 1), ("held-out", held_out, True)):
        if len(rows) == 0:
            raise HeadpruneError(f"the {name} rows are empty")
        if labelled and "label" not in rows.column_names:
            raise HeadpruneError(f"the {name} rows have no 'label' column (columns: {', '.join(rows.column_names)})")
        if labelled and min(rows["label"]) < 0:
            raise HeadpruneError(f"the {name} rows have unlabelled rows (label -1)")
    classes = [getattr(getattr(model, "config", None), "num_labels", None) for model in (student, teacher)]
    if classes[0] != classes[1]:
        raise HeadpruneError(f"the student has {classes[0]} classes and the teacher {classes[1]}")


def _schedule(optimizer: Any, max_steps: int | None, steps_per_epoch: int) -> Any:
    """Warmup then linear decay to 0 at ``max_steps``; with no step limit, warmup then constant."""
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    if max_steps is not None:
        return get_linear_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * max_steps), max_steps)
    return get_constant_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * steps_per_epoch))


def _clone(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _fingerprints(student: Any, teacher: Any, train: Any, held_out: Any) -> dict[str, str]:
    """Hashes of what a resumed heal must get again: both models' weights and both data sets."""
    return {
        "student": _weights_hash(student),
        "teacher": _weights_hash(teacher),
        "train": _rows_hash(train),
        "held_out": _rows_hash(held_out),
    }


def _weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, value in model.state_dict().items():
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _rows_hash(rows: Any) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(len(rows)).encode())
    for column in ("text", "text_pair", "label", "input_ids", "attention_mask", "token_type_ids"):
        if column in rows.column_names:
            digest.update(column.encode())
            digest.update(json.dumps(list(rows[column])).encode())
    return digest.hexdigest()


_KEY_NAMES = {
    "student": "the student's starting weights",
    "teacher": "the teacher's weights",
    "train": "the training rows",
    "held_out": "the held-out rows",
}


def _load_state(path: Path, key: dict[str, Any]) -> dict[str, Any]:
    """A heal checkpoint written with the same arguments; a one-line error otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise HeadpruneError(f"{path} is not a readable heal checkpoint ({type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "key" not in state:
        raise HeadpruneError(f"{path} is not a heal checkpoint of this headprune version")
    for name, value in key.items():
        there = state["key"].get(name)
        if there != value:
            what = _KEY_NAMES.get(name)
            detail = f"{what} differ" if what else f"{name}: {there!r} there, {value!r} here"
            raise HeadpruneError(
                f"{path.parent} holds a heal with other arguments ({detail}); pass the same ones or another directory"
            )
    return state
