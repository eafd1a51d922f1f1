"""One process or many, through Accelerate: rank, sharding, gathering, reducing, barriers.

Launch any headprune code with ``accelerate launch --num_processes N ...`` (or ``torchrun``) and
the functions here split the data between the processes and put the results back together:

- ``shard_bounds`` / ``shard``: contiguous shards whose sizes differ by at most one, so no example
  is duplicated or dropped at uneven sizes (Accelerate's own data loaders pad the last batch by
  repeating examples; we do not use them).
- ``gather_rows``: concatenate every process's rows in process order -- that is dataset order,
  because the shards are contiguous -- padding for the collective and trimming the padding after.
- ``reduce``: sums ``(sum [L, H], count)`` over processes (the ``reduce`` hook of
  ``attribution.head_importance``), so every process ends with the scores of the whole data set.
- ``all_sum``: a tensor summed over every process (a training step's loss).
- ``barrier``, ``broadcast`` (the main process's decision on every process) and ``mine``
  (round-robin ownership of work items) for the recipe runner and ``headprune attribute``.

On a single process every function is the identity, so the same code runs anywhere.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch

from attribution.core.errors import HeadpruneError

# the other processes wait at a barrier while the main one fine-tunes (minutes on a CPU, hours
# for BERT-base on MNLI): a generous timeout instead of Accelerate's default 30 minutes
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


def state() -> Any:
    """Accelerate's ``PartialState`` (initialises the process group under a distributed launch)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Without cpu=True, Accelerate treats a CPU-only multi-process launch (torchrun, or
    # ``accelerate launch --cpu``) as a single process.
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    # On a multi-process CPU launch without OMP_NUM_THREADS, Accelerate's first PartialState sets
    # torch's thread count to cores / processes. The thread count is the caller's (it also moves
    # float32 results in the last bits, so 1 process == 2 processes would depend on it): restore it.
    threads = torch.get_num_threads()
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
        return PartialState(cpu=cpu)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def num_processes() -> int:
    return int(state().num_processes)


def process_index() -> int:
    return int(state().process_index)


def is_main_process() -> bool:
    return bool(state().is_main_process)


def device() -> torch.device:
    """This process's device (``cpu``, or its own GPU under a multi-GPU launch)."""
    return torch.device(state().device)


def shard_bounds(n: int, processes: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of process ``index``'s contiguous shard of ``n`` rows; the first
    ``n % processes`` shards get one extra row."""
    if processes < 1 or not 0 <= index < processes:
        raise HeadpruneError(f"bad shard {index} of {processes}")
    if n < 0:
        raise HeadpruneError(f"cannot shard {n} rows")
    base, extra = divmod(n, processes)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard(dataset: Any) -> Any:
    """This process's contiguous shard of a ``datasets.Dataset`` (the whole set on one process)."""
    processes = num_processes()
    if processes == 1:
        return dataset
    start, stop = shard_bounds(len(dataset), processes, process_index())
    return dataset.select(range(start, stop))


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """All processes' ``[n_i, ...]`` rows concatenated in process order -> ``[sum n_i, ...]``
    (same on every process). Shards may differ in size, including empty ones."""
    if num_processes() == 1:
        return values
    from accelerate.utils import gather, pad_across_processes

    dev = device()
    local = values.to(dev)
    counts = gather(torch.tensor([local.shape[0]], device=dev)).cpu().tolist()
    padded = pad_across_processes(local.contiguous(), dim=0)
    gathered = gather(padded).cpu()
    width = max(counts)
    parts = [gathered[i * width : i * width + count] for i, count in enumerate(counts)]
    return torch.cat(parts, dim=0)


def reduce(summed: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``(summed [L, H], count [])`` over processes: the ``reduce`` hook of ``head_importance``.

    float64 throughout (gloo and NCCL both reduce doubles), so two processes give the scores of
    one up to summation order.
    """
    if num_processes() == 1:
        return summed, count
    from accelerate.utils import reduce as accelerate_reduce

    dev = device()
    total = accelerate_reduce(summed.to(dev, torch.float64), reduction="sum").cpu()
    n = accelerate_reduce(count.to(dev, torch.float64).reshape(1), reduction="sum").cpu().reshape(())
    return total, n


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over every process (float64 on the CPU); the identity on one process."""
    if num_processes() == 1:
        return values
    from accelerate.utils import reduce as accelerate_reduce

    return accelerate_reduce(values.to(device(), torch.float64), reduction="sum").cpu()


def is_distributed() -> bool:
    """Launched as several processes (``WORLD_SIZE`` > 1)?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def barrier() -> None:
    """Wait for every process (nothing on one process)."""
    if is_distributed() and num_processes() > 1:
        state().wait_for_everyone()


def broadcast(value: Any) -> Any:
    """The main process's ``value`` (any picklable object) on every process (identity on one)."""
    if not is_distributed() or num_processes() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def gather_objects(value: Any) -> list[Any]:
    """Every process's ``value`` (any picklable object), in process order, on every process
    (``[value]`` on one)."""
    if not is_distributed() or num_processes() == 1:
        return [value]
    from accelerate.utils import gather_object

    return list(gather_object([value]))


def mine(index: int) -> bool:
    """Work item ``index`` belongs to this process (round-robin)."""
    return not is_distributed() or index % num_processes() == process_index()


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside the block, restored after (None: unchanged)."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
