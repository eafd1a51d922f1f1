"""Data-parallel training steps through Accelerate, shared by ``prune.finetune`` and ``prune.heal``.

One optimizer step takes one *global* batch: the same rows, in the same order, whatever the
number of processes. Under ``accelerate launch`` / ``torchrun`` process ``p`` of ``N`` takes the
contiguous shard ``attribution.core.processes.shard_bounds(B, N, p)`` of each global batch of
``B`` rows, splits it into ``gradient_accumulation_steps`` contiguous micro-batches, and
back-propagates each micro-batch's mean loss weighted by ``rows * N / B``; Accelerate's
``DistributedDataParallel`` averages the gradients over the processes, so the update is the
gradient of the mean loss over the global batch, as on one process. Global batch size, learning-
rate schedule and example order therefore do not depend on ``N``; only the summation order of the
gradients and the padding of each shard do (float noise). A process whose shard of a small last
batch is empty runs one row with weight 0, so that every process joins every gradient exchange.

Decisions the data-parallel papers leave open:

- Dropout: every process draws from the same seeded torch RNG stream (so one saved RNG state
  resumes all of them); with dropout on, N processes therefore train a model that is as good as,
  but not bitwise equal to, the one-process model. With dropout off, N processes give the one-
  process weights up to float summation order.
- Mixed precision (``"no"``, ``"bf16"``, ``"fp16"``) is Accelerate's autocast (and loss scaling for
  fp16). ``None`` takes what the launch says (``accelerate launch --mixed_precision bf16``), else
  ``"no"``. fp16 needs a GPU; bf16 also runs on CPUs (slowly on most). Accelerate fixes the
  precision once per process: asking for another one later is a one-line error.
- On one process with ``"no"`` and one micro-batch, a step is exactly the plain PyTorch loop
  (``loss.backward``, ``clip_grad_norm_``, ``optimizer.step``, ``scheduler.step``,
  ``zero_grad``): the same weights bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from attribution.core import processes
from attribution.core.errors import HeadpruneError

MIXED_PRECISION = ("no", "bf16", "fp16")

LossFn = Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]
"""``loss_fn(model, batch) -> scalar``: the mean loss over the batch's rows (the model may be
wrapped by ``DistributedDataParallel``; the batch is on the accelerator's device)."""


def resolve_precision(mixed_precision: str | None) -> str:
    """``mixed_precision`` checked, or (None) the launch's choice: ``ACCELERATE_MIXED_PRECISION``,
    which ``accelerate launch --mixed_precision`` sets, else ``"no"``."""
    import os

    value = mixed_precision if mixed_precision is not None else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    value = value.lower() if isinstance(value, str) else value
    if value not in MIXED_PRECISION:
        raise HeadpruneError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}; got {value!r}")
    return value


def check_accumulation(steps: int | None) -> int | None:
    """``steps`` (None: the launch's choice), or a one-line error unless an integer of at least 1."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise HeadpruneError(f"gradient_accumulation_steps must be an integer of at least 1, got {steps!r}")
    return steps


def make_accelerator(mixed_precision: str | None = None, gradient_accumulation_steps: int | None = None) -> Any:
    """An ``accelerate.Accelerator`` on this process's device (see the module docstring for
    ``None``: the launch's settings). Bad values, fp16 without a GPU, or a precision other than
    the one this process already uses are one-line ``HeadpruneError`` s."""
    from accelerate import Accelerator

    precision = resolve_precision(mixed_precision)
    steps = check_accumulation(gradient_accumulation_steps)
    state = processes.state()  # the process group, with headprune's CPU and timeout choices
    kwargs: dict[str, Any] = {"cpu": state.device.type == "cpu"}
    if steps is not None:
        kwargs["gradient_accumulation_steps"] = steps
    try:
        accelerator = Accelerator(mixed_precision=precision, **kwargs)
    except ValueError as error:
        first = (str(error).strip().splitlines() or [""])[0][:160]
        raise HeadpruneError(f"cannot set up Accelerate for mixed precision {precision} ({first})") from None
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise HeadpruneError("mixed_precision fp16 needs a GPU; on a CPU use bf16 or no")
    return accelerator


class DataParallel:
    """A model, its optimizer and scheduler stepping on global batches across processes.

    ``model`` is moved to the accelerator's device and, under a multi-process launch, wrapped in
    ``DistributedDataParallel`` (``self.wrapped``); ``self.model`` stays the caller's module.
    Call ``release()`` when done: it removes Accelerate's mixed-precision wrapper from the
    module's forward and puts the module back on ``home`` (None: leave it on the device).
    """

    def __init__(self, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any, *,
                 tokenizer: Any, max_length: int, max_grad_norm: float) -> None:
        self.accelerator, self.model, self.scheduler = accelerator, model, scheduler
        self.tokenizer, self.max_length, self.max_grad_norm = tokenizer, max_length, max_grad_norm
        model.to(accelerator.device)
        # A layer that lost every head keeps empty query/key/value weights, which get no gradient:
        # DistributedDataParallel would wait for them forever. They hold nothing to train, so they
        # are frozen while wrapped (and unfrozen by ``release``).
        self.frozen = [p for p in model.parameters() if p.requires_grad and p.numel() == 0]
        if accelerator.num_processes > 1:
            for param in self.frozen:
                param.requires_grad_(False)
        self.wrapped, self.optimizer = accelerator.prepare(model, optimizer)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.micro = int(accelerator.gradient_accumulation_steps)

    @property
    def device(self) -> torch.device:
        return torch.device(self.accelerator.device)

    def pieces(self, rows: Any) -> Iterator[tuple[Any, float]]:
        """This process's micro-batches of the global batch ``rows`` (a ``datasets.Dataset``) with
        their weights ``rows * N / B``; an empty one is row 0 with weight 0 (under several
        processes only, where every process must join every gradient exchange)."""
        total = len(rows)
        start, stop = processes.shard_bounds(total, self.world, self.rank)
        for index in range(self.micro):
            a, b = processes.shard_bounds(stop - start, self.micro, index)
            if b > a:
                yield rows.select(range(start + a, start + b)), (b - a) * self.world / total
            elif self.world > 1:
                yield rows.select(range(1)), 0.0

    def step(self, rows: Any, loss_fn: LossFn) -> float:
        """One optimizer step on the global batch ``rows``; returns its mean loss over all rows
        (the same on every process)."""
        from attribution.core.data import iter_batches

        accelerator, total = self.accelerator, torch.zeros((), dtype=torch.float64)
        pieces = list(self.pieces(rows))
        for index, (piece, weight) in enumerate(pieces):
            batch = next(iter_batches(piece, self.tokenizer, batch_size=len(piece), max_length=self.max_length))
            batch.pop("index")
            batch = {name: value.to(self.device) for name, value in batch.items()}
            # gradients are exchanged after the last micro-batch only
            last = index == len(pieces) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(self.wrapped):
                with accelerator.autocast():
                    loss = loss_fn(self.wrapped, batch)
                # accelerator.backward divides by the accumulation steps; the weights already split the batch
                factor = weight * self.micro
                accelerator.backward(loss if factor == 1.0 else loss * factor)
            value, share = loss.detach().double().cpu(), weight / self.world  # share: of the global batch's rows
            total += value if share == 1.0 else value * share
        accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, no schedule step
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            total = processes.all_sum(total)
        return float(total)

    def release(self, home: torch.device | None = None) -> None:
        """Unwrap the module (its own forward back) and move it to ``home``."""
        self.accelerator.unwrap_model(self.wrapped, keep_fp32_wrapper=False)
        self.accelerator.free_memory()
        for param in self.frozen:
            param.requires_grad_(True)
        if home is not None:
            self.model.to(home)
