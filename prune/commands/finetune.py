"""``headprune finetune``: fine-tune a sequence classifier, or find it already cached.

On several processes or GPUs, data-parallel (each process its shard of every batch)::

    accelerate launch --multi_gpu --num_processes 4 -m prune.cli finetune --base bert-base-uncased --data glue:sst2
"""

from __future__ import annotations

import argparse

from prune.commands._data import DATA_HELP, add_split_map_argument, split_map
from prune.finetune import FinetuneConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the fine-tuning options (defaults: ``FinetuneConfig``'s, which make the embedded
    MiniLM-on-tweets classifier)."""
    defaults = FinetuneConfig()
    parser.add_argument(
        "--base",
        default=defaults.base,
        help="base encoder: 'minilm' (embedded), 'mpnet-base' (the mpnet extra), a local directory or a hub id "
        "(default: %(default)s)",
    )
    parser.add_argument("--data", default=defaults.data, help=DATA_HELP)
    parser.add_argument("--text-column", default=None, help="text column of --data (guessed if omitted)")
    parser.add_argument("--text-pair-column", default=None, help="second text column for sentence-pair tasks")
    parser.add_argument("--label-column", default=None, help="label column of --data (guessed if omitted)")
    add_split_map_argument(parser)
    parser.add_argument(
        "--train-examples",
        type=int,
        default=defaults.train_examples,
        help="training examples taken from the train split (default: %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)")
    parser.add_argument(
        "--max-length",
        type=int,
        default=defaults.max_length,
        help="tokens per example after truncation (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="training seed (default: %(default)s)")
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where to save the model (default: the headprune cache, keyed by the arguments)",
    )
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "bf16", "fp16"),
        default=None,
        help="autocast precision (fp16 needs a GPU); default: what `accelerate launch --mixed_precision` says, else no",
    )
    parser.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=None,
        metavar="N",
        help="split each process's share of a batch into N micro-batches (less memory; same batch size and model)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Fine-tune (or reuse the cache) and print where the model is and how well it does."""
    from attribution.core import processes
    from attribution.core.data import DataSpec, load_splits
    from attribution.core.validate import check_max_length, check_output_dir
    from prune.finetune import finetuned_path, run_finetune

    data: DataSpec | str = args.data
    mapping = split_map(args)
    if args.text_column or args.text_pair_column or args.label_column or mapping:
        data = DataSpec(
            name=args.data,
            text_column=args.text_column,
            text_pair_column=args.text_pair_column,
            label_column=args.label_column,
            split_map=mapping,
        )
    config = FinetuneConfig(
        base=args.base,
        data=data,
        train_examples=args.train_examples,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
    )  # checks the hyperparameters (finite, positive, seed range)
    final = check_output_dir(args.out).resolve() if args.out is not None else finetuned_path(config.key())
    base = _base_config(args.base)
    if base is not None:
        check_max_length(base, args.max_length)
    load_splits(data)  # an unreadable data set fails before the lock file or any directory exists
    lock = final.parent / f".{final.name}.lock"  # prune.finetune's lock beside the model directory
    had_lock = lock.exists()
    try:
        result = run_finetune(
            config,
            out_dir=args.out,
            progress=not args.quiet,
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        )
    finally:
        if not had_lock:
            _remove_idle_lock(lock)
    if processes.is_distributed() and not processes.is_main_process():
        return 0  # one report, from the main process
    print(f"model: {result.path}")
    for split in ("validation", "test"):
        values = result.metrics.get(split, {})
        extra = "".join(f"  {k} {v:.4f}" for k, v in values.items() if k != "accuracy")
        print(f"{split} accuracy: {values.get('accuracy', float('nan')):.4f}{extra}")
    if result.cached:
        print(f"cache: reused (no training; the original run took {result.seconds:.0f} s)")
    else:
        print(f"cache: trained now in {result.seconds:.0f} s and saved")
    return 0


def _base_config(base: str):  # noqa: ANN202 - a transformers PretrainedConfig, or None for a hub id
    """The base model's config when it is a local directory, after loading it once (refusing shipped
    code, naming unreadable weights), else None."""
    from pathlib import Path

    from prune.checkpoints import load_model, resolve_model

    if base == "default":  # the default classifier is no base (and resolving it would train it)
        return None
    if not Path(resolve_model(base, progress=False)).is_dir():
        return None
    model, _ = load_model(base, tokenizer=False, progress=False)
    return model.config


def _remove_idle_lock(path) -> None:  # noqa: ANN001 - a Path
    """Delete a lock file this command created, unless another process holds it right now."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # another finetune waits on it or holds it
            path.unlink(missing_ok=True)
    except OSError:
        pass
