"""``headprune validate``: check a recipe (and ``--set`` overrides) without running anything."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the validation options."""
    parser.add_argument("recipe", nargs="?", help="the YAML recipe to check")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe value (YAML syntax), e.g. --set score.examples=100; repeatable",
    )
    parser.add_argument(
        "--print", dest="show", action="store_true", help="print the recipe with every default filled in"
    )
    parser.add_argument("--schema", action="store_true", help="print every recipe key, its default and what it expects")


def run(args: argparse.Namespace) -> int:
    """Exit 0 and summarise the stages when the recipe is valid; errors exit 2 (one line)."""
    from attribution.core.errors import HeadpruneError
    from prune.recipe import describe_schema, load_recipe

    if args.schema:
        print(describe_schema())
        return 0
    if not args.recipe:
        raise HeadpruneError("give a recipe file (or --schema)")
    recipe = load_recipe(args.recipe, args.overrides)
    if args.show:
        print(recipe.to_yaml(), end="")
        return 0
    print(f"{args.recipe}: valid")
    for line in plan(recipe):
        print(f"  {line}")
    return 0


def plan(recipe) -> list[str]:  # noqa: ANN001 - a Recipe
    """One line per stage the recipe will run."""
    lines = []
    if recipe.finetune is not None:
        lines.append(
            f"finetune  {recipe.model} on {recipe.data.name} ({recipe.finetune.train_examples} examples, cached)"
        )
    elif recipe.model == "default":
        lines.append("finetune  the default MiniLM tweets classifier, if not cached")
    else:
        lines.append(f"model     {recipe.model}")
    lines.append(f"dense     {', '.join(recipe.evaluate.metrics)} on {recipe.evaluate.split}")
    for name, options in (recipe.score.criteria if recipe.score is not None else {}).items():
        extra = ", ".join(f"{k}={v}" for k, v in options.items())
        lines.append(
            f"score     {name}{f' ({extra})' if extra else ''} on {recipe.score.examples} {recipe.score.split} rows, "
            f"shards of {recipe.score.shard_size}"
        )
    if recipe.sweep is not None:
        fractions = ", ".join(f"{f:g}" for f in recipe.sweep.fractions)
        lines.append(f"sweep     fractions {fractions} by {recipe.sweep.metric} on {recipe.sweep.split}")
    if recipe.prune is not None:
        target = recipe.prune.target
        how = (
            f"fraction {target.fraction}"
            if target.fraction is not None
            else f"keep {target.keep_per_layer} per layer"
            if target.keep_per_layer is not None
            else f"largest swept fraction within {target.max_drop} of dense"
        )
        lines.append(f"prune     by {recipe.prune.criterion}: {how}")
    if recipe.repair is not None:
        lines.append(f"repair    on {recipe.repair.examples} {recipe.repair.split} rows")
    if recipe.cost is not None and recipe.prune is not None:
        lines.append(f"cost      params, FLOPs, latency at batch {', '.join(map(str, recipe.cost.batch_sizes))}")
    if recipe.export is not None and recipe.export.onnx:
        lines.append(f"export    ONNX opset {recipe.export.opset}")
    analysis = recipe.analysis
    if analysis is not None and analysis.tree is not None:
        tree = analysis.tree
        lines.append(
            f"analysis  {len(tree.texts)} attribution tree(s), tau {tree.tau:g}, "
            f"{tree.n_steps} {tree.integration} steps -> analysis/trees/ ({', '.join(tree.formats)})"
        )
    if analysis is not None and analysis.triggers is not None:
        trig = analysis.triggers
        attack = f", attack {trig.attack_examples or 'all'} {trig.attack_split} rows" if trig.attack else ""
        lines.append(
            f"analysis  triggers from {trig.examples} {trig.split} rows, "
            f"{trig.n_steps} {trig.integration} steps{attack} -> analysis/triggers.json"
        )
    compress = recipe.compress
    if compress is not None:
        target = compress.target
        goal = (f"{target.latency:g} of the dense {compress.backend} latency (batch {compress.latency_batch_size})"
                if target.latency is not None else f"{target.flops:g} of the multiply-adds" if target.flops is not None
                else f"the most compression within {target.max_drop:g} of dense")
        lines.append(f"compress  heads + neurons by {compress.criterion} on {compress.examples} {compress.split} rows "
                     f"to {goal}; repair: {compress.repair}; frontier at {', '.join(map(str, compress.frontier))}")
    if recipe.heal is not None:
        lines.append(f"heal      distillation from the dense model, budget {recipe.heal.budget}")
    if recipe.quantize is not None:
        lines.append("quantize  ONNX, then dynamic INT8 (ONNX Runtime), evaluated and timed")
    lines.append("report    report.md + report.html")
    return lines
