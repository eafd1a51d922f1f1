"""``headprune run``: run a YAML recipe end to end; reruns resume where the last run stopped."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the run options."""
    parser.add_argument("recipe", help="the YAML recipe (see recipes/ and `headprune validate --schema`)")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="output directory (default: the recipe's output, else runs/<recipe name>)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe value (YAML syntax), e.g. --set score.examples=100; repeatable",
    )
    parser.add_argument("--force", action="store_true", help="recompute every stage, even those already done")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Validate (nothing is written on a bad recipe, model or data), run the stages, print the final table."""
    from attribution.core.trust import allow_remote_code, remote_code_allowed
    from attribution.core.validate import check_output_dir
    from prune.pipeline import run_recipe
    from prune.recipe import load_recipe
    from prune.report import final_table_text

    recipe = load_recipe(args.recipe, args.overrides)
    given = "--out" if args.out else f"{args.recipe}: output" if recipe.output else "the default output"
    out = check_output_dir(Path(args.out or recipe.output or Path("runs") / Path(args.recipe).stem), given)
    with allow_remote_code(remote_code_allowed() or recipe.trust_remote_code):
        _preflight(recipe, progress=not args.quiet)
        if recipe.compress is not None:
            from prune.latency_blocks import pin_malloc_thresholds

            # this process is ours: a fixed malloc regime makes PyTorch timings match the latency model
            pin_malloc_thresholds()
        command = shlex.join(
            ["headprune", "run", args.recipe, "--out", str(out)] + [f"--set={o}" for o in args.overrides]
        )
        result = run_recipe(recipe, out, progress=not args.quiet, force=args.force, command=command)
    if result.main:
        table = final_table_text(out, result.files)
        if table:
            print()
            print(table)
        print()
        print(f"report: {out / 'report.md'} and {out / 'report.html'}")
        print(f"wall time: {result.seconds:.1f} s ({len(result.ran)} stage(s) ran, {len(result.skipped)} skipped)")
    return 0


def _preflight(recipe, *, progress: bool) -> None:  # noqa: ANN001 - a Recipe
    """Load the model and the data the run will use, before its output directory exists: a model
    that does not load, data whose classes are not the model's, or a length beyond its position
    limit is a one-line error with nothing written. With a finetune section the base model is
    checked by the finetune stage itself (it trains a new head for the data's classes)."""
    from attribution.core.data import DataSpec, load_splits
    from attribution.core.validate import check_max_length
    from prune.commands.checks import checked_data, checked_model

    spec = DataSpec(**recipe.section("data"))
    if recipe.finetune is not None:
        load_splits(spec)
        return
    model, _ = checked_model(recipe.model, progress=progress)
    check_max_length(model, recipe.data.max_length, "data.max_length")
    checked_data(spec, model)
