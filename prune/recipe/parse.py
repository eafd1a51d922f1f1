"""Parsing and validating a recipe: YAML with line numbers, ``--set`` overrides, the checks across
sections and against the file system."""


from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import yaml

from attribution.core.errors import HeadpruneError
from attribution.core.validate import SEED_MAX
from prune.recipe.schema import (
    TREE_FORMATS,
    AnalysisSection,
    Recipe,
    RecipeError,
    ScoreSection,
    is_metric_name,
    metric_expect,
    unit_open,
)

# A recipe is a few dozen lines; a larger document is a mistake or an attack on the parser.
MAX_RECIPE_BYTES = 256 * 1024


def _check_yaml_safety(text: str, source: str) -> None:
    """Refuse anchors and aliases (``&a``/``*a``: a few hundred bytes of nested aliases expand to
    billions of nodes, the "billion laughs") and documents over ``MAX_RECIPE_BYTES``, before any
    node is built. Scanning events is linear in the text."""
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{source}: {size} bytes; expected a recipe of at most {MAX_RECIPE_BYTES} bytes")
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
                raise RecipeError(
                    f"{source}: line {event.start_mark.line + 1}: YAML {kind}{event.anchor} is not allowed in "
                    "recipes; expected every value written out"
                )
    except yaml.YAMLError:
        return  # the parser proper reports it, with its line


# --------------------------------------------------------------------------------------------
# Locations: path -> line, from the composed node tree
# --------------------------------------------------------------------------------------------

Path_ = tuple[str | int, ...]


class _Locations:
    """Line numbers (1-based) of keys and values by key path; paths set by ``--set`` are marked."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.key_lines: dict[Path_, int] = {}
        self.value_lines: dict[Path_, int] = {}
        self.overridden: set[Path_] = set()

    def walk(self, node: yaml.Node | None, path: Path_ = ()) -> None:
        if node is None:
            return
        self.value_lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    where = ".".join(map(str, (*path, key)))
                    raise RecipeError(
                        f"{self.source}: line {line}: {where}: duplicate key (first on line {seen[key]}); "
                        "expected each key once"
                    )
                seen[key] = line
                self.key_lines[(*path, key)] = line
                self.walk(value_node, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.walk(item, (*path, index))

    def where(self, path: Path_, *, key: bool = False) -> str:
        """``"file: line N"`` (or ``"--set"``) for the nearest located ancestor of ``path``."""
        for cut in range(len(path), -1, -1):
            prefix = path[:cut]
            if any(prefix[: len(o)] == o for o in self.overridden):
                return f"{self.source} (--set {_dotted(_override_key(prefix, self.overridden))})"
            table = self.key_lines if key and cut == len(path) else self.value_lines
            line = table.get(prefix) or self.key_lines.get(prefix)
            if line is not None:
                return f"{self.source}: line {line}"
        return f"{self.source}: line 1"


def _override_key(prefix: Path_, overridden: set[Path_]) -> Path_:
    """The ``--set`` key that covers ``prefix``."""
    return next(o for o in overridden if prefix[: len(o)] == o)


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Validator:
    def __init__(self, locations: _Locations) -> None:
        self.loc = locations

    def fail(self, path: Path_, problem: str, expect: str, *, key: bool = False) -> typing.NoReturn:
        name = _dotted(path) or "recipe"
        raise RecipeError(f"{self.loc.where(path, key=key)}: {name}: {problem}; expected {expect}")

    # ---- generic conversion by type annotation ------------------------------------------------

    def convert(self, value: Any, tp: Any, path: Path_, expect: str) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (Union, types.UnionType):
            inner = [a for a in args if a is not type(None)]
            if value is None:
                if type(None) in args:
                    return None
                self.fail(path, "got null", expect)
            if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
                if value is False:
                    return None  # an optional stage switched off
                if value is True:
                    value = {}
            return self.convert(value, inner[0], path, expect)
        if dataclasses.is_dataclass(tp):
            return self.section(value, tp, path, expect)
        if tp is Any:
            return value
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(path, f"got {_describe(value)}", expect)
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(path, f"got {_describe(value)}", expect)
            return value
        if tp is float:
            if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    self.fail(path, f"got {_describe(value)}", expect)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(path, f"got {_describe(value)}", expect)
            if not math.isfinite(value):
                self.fail(path, f"got {_describe(value)}", f"a finite number: {expect}")
            return float(value)
        if tp is str:
            if not isinstance(value, str) or not value.strip():
                self.fail(path, f"got {_describe(value) if value != '' else 'an empty string'}", expect)
            return value
        if origin is list:
            if not isinstance(value, list):
                self.fail(path, f"got {_describe(value)}", expect)
            return [self.convert(v, args[0], (*path, i), expect) for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                self.fail(path, f"got {_describe(value)}", expect)
            return {str(k): self.convert(v, args[1], (*path, str(k)), expect) for k, v in value.items()}
        raise TypeError(f"unsupported schema type {tp!r}")  # a bug in the schema, not in the recipe

    def section(self, value: Any, cls: type, path: Path_, expect: str) -> Any:
        if not isinstance(value, dict):
            self.fail(path, f"got {_describe(value)}", expect)
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        renamed = getattr(cls, "RENAMED", {})  # old key -> new key: say so instead of "unknown key"
        for key in value:
            if key in renamed:
                new = renamed[key]
                self.fail((*path, str(key)), f"renamed to {new}", f"{new}: {fields[new].metadata['expect']}", key=True)
            if key not in fields:
                known = ", ".join(fields)
                self.fail((*path, str(key)), "unknown key", f"one of: {known}", key=True)
        kwargs = {}
        for name, item in fields.items():
            sub = (*path, name)
            if name not in value:
                if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
                    where = _dotted(path) or "the recipe"
                    raise RecipeError(
                        f"{self.loc.where(path)}: missing required key {_dotted(sub)!r} in {where}; "
                        f"expected {item.metadata['expect']}"
                    )
                continue
            if name == "criteria" and cls is ScoreSection:
                kwargs[name] = self.criteria(value[name], sub)
                continue
            converted = self.convert(value[name], hints[name], sub, item.metadata["expect"])
            check = item.metadata.get("check")
            if check is not None and converted is not None:
                items = converted if isinstance(converted, list) and name != "fractions" else [converted]
                if name == "fractions":
                    if not check(converted):
                        self.fail(sub, "got an empty list", item.metadata["expect"])
                    for i, fraction in enumerate(converted):
                        if not unit_open(fraction):
                            self.fail((*sub, i), f"got {_describe(fraction)}", "a number strictly between 0 and 1")
                elif isinstance(converted, list):
                    if not check(converted):
                        self.fail(sub, "got an empty list", item.metadata["expect"])
                    self.list_items(converted, name, sub)
                else:
                    for single in items:
                        if not check(single):
                            self.fail(sub, f"got {_describe(single)}", item.metadata["expect"])
            kwargs[name] = converted
        return cls(**kwargs)

    def list_items(self, values: list[Any], name: str, path: Path_) -> None:
        for i, item in enumerate(values):
            if name == "metrics" and not is_metric_name(item):
                self.fail((*path, i), f"unknown metric {item!r}", metric_expect())
            if name == "batch_sizes" and item < 1:
                self.fail((*path, i), f"got {_describe(item)}", "a positive integer")
            if name == "formats" and str(item).lower().lstrip(".") not in TREE_FORMATS:
                self.fail((*path, i), f"unknown format {item!r}", "one of: " + ", ".join(TREE_FORMATS))

    # ---- criteria: names from the registry, options from the constructor's signature ----------

    def criteria(self, value: Any, path: Path_) -> dict[str, dict[str, Any]]:
        from attribution.criteria import CRITERIA

        expect = "a mapping (or list) of criterion names to their options"
        if isinstance(value, list):
            for i, name in enumerate(value):
                if not isinstance(name, str):
                    self.fail((*path, i), f"got {_describe(name)}", "a criterion name: " + ", ".join(CRITERIA))
            value = {name: {} for name in value}
        if not isinstance(value, dict):
            self.fail(path, f"got {_describe(value)}", expect)
        if not value:
            self.fail(path, "got no criteria", "at least one of: " + ", ".join(CRITERIA))
        out: dict[str, dict[str, Any]] = {}
        for name, options in value.items():
            sub = (*path, str(name))
            if name not in CRITERIA:
                self.fail(sub, f"unknown criterion {name!r}", "one of: " + ", ".join(CRITERIA), key=True)
            options = {} if options is None else options
            if not isinstance(options, dict):
                self.fail(sub, f"got {_describe(options)}", f"a mapping of {name} options (or null)")
            out[name] = self.criterion_options(name, CRITERIA[name], options, sub)
        return out

    def criterion_options(self, name: str, cls: Any, options: dict[str, Any], path: Path_) -> dict[str, Any]:
        """Options checked by the criterion's own ``option_spec`` (names, types, choices), then by
        constructing it (checks across options); errors point at the option."""
        from attribution.criteria import CriterionOptionError

        spec = cls.option_spec()
        described = ", ".join(f"{key} (default {_describe(o.default)})" for key, o in spec.items()) or "none"
        for key, value in options.items():
            sub = (*path, str(key))
            if key not in spec:
                renamed = cls.RENAMED.get(key)
                if renamed is not None:
                    self.fail(sub, f"renamed to {renamed}", f"{renamed}: {spec[renamed].expect}", key=True)
                self.fail(sub, f"unknown option of {name}", f"one of its options: {described}", key=True)
            if spec[key].problem(value) is not None:
                self.fail(sub, f"got {_describe(value)}", spec[key].expect)
            if key == "seed" and not (isinstance(value, int) and 0 <= value <= SEED_MAX):
                self.fail(sub, f"got {_describe(value)}", f"an integer in 0..{SEED_MAX}")
        try:
            cls(**options)
        except CriterionOptionError as error:
            where = (*path, error.option) if error.option in options else path
            self.fail(where, error.problem, error.expect or f"valid {name} options")
        except (HeadpruneError, TypeError, ValueError) as error:
            self.fail(path, str(error).splitlines()[0], f"valid {name} options")
        return dict(options)


# --------------------------------------------------------------------------------------------
# Cross-section rules and checks against the file system
# --------------------------------------------------------------------------------------------


def _compress_checks(recipe: Recipe, v: _Validator) -> None:
    for name in ("heal", "quantize"):
        if getattr(recipe, name) is not None and recipe.compress is None:
            v.fail((name,), f"{name} needs the compress section, which is off", "null (or a compress section)")
    if recipe.compress is not None:
        target = recipe.compress.target
        chosen = [k for k in ("latency", "flops", "max_drop") if getattr(target, k) is not None]
        if len(chosen) != 1:
            got = "none of them" if not chosen else " and ".join(chosen)
            v.fail(("compress", "target"), f"got {got}", "exactly one of latency, flops, max_drop")
    if recipe.heal is not None:
        from prune.heal import parse_duration

        try:
            parse_duration(recipe.heal.budget)
        except HeadpruneError:
            v.fail(("heal", "budget"), f"got {recipe.heal.budget!r}", "a duration like 10m, 90s or 1h")


def _split_map_checks(recipe: Recipe, v: _Validator) -> None:
    from attribution.core.data import check_split_map

    try:
        check_split_map(recipe.data.split_map)
    except HeadpruneError as error:
        field = next(f for f in dataclasses.fields(recipe.data) if f.name == "split_map")
        v.fail(("data", "split_map"), str(error).removeprefix("split_map: "), field.metadata["expect"])


def _cross_checks(recipe: Recipe, v: _Validator) -> None:
    _compress_checks(recipe, v)
    _split_map_checks(recipe, v)
    if recipe.score is None:
        for name in ("sweep", "prune"):
            if getattr(recipe, name) is not None:
                v.fail((name,), f"{name} needs the score section, which is off", "null (or a score section)")
    if recipe.analysis is not None:
        _analysis_checks(recipe.analysis, v)
    target = recipe.prune.target if recipe.prune else None
    if recipe.prune is not None:
        chosen = [k for k in ("fraction", "keep_per_layer", "max_drop") if getattr(target, k) is not None]
        if len(chosen) != 1:
            got = "none of them" if not chosen else " and ".join(chosen)
            v.fail(("prune", "target"), f"got {got}", "exactly one of fraction, keep_per_layer, max_drop")
        if target.max_drop is not None and recipe.sweep is None:
            v.fail(("prune", "target", "max_drop"), "max_drop needs the sweep, which is off", "a sweep section")
        if recipe.prune.criterion is None:
            recipe.prune.criterion = "best" if recipe.sweep is not None else next(iter(recipe.score.criteria))
        criterion = recipe.prune.criterion
        if criterion == "best":
            if recipe.sweep is None:
                v.fail(("prune", "criterion"), "'best' needs the sweep, which is off", "a scored criterion's name")
        elif criterion not in recipe.score.criteria:
            v.fail(
                ("prune", "criterion"),
                f"{criterion!r} is not scored",
                "one of the score.criteria (" + ", ".join(recipe.score.criteria) + ") or 'best'",
            )
    if recipe.repair is not None and recipe.prune is None:
        v.fail(("repair",), "repair needs the prune section, which is off", "null (or a prune section)")
    if recipe.export is not None and recipe.export.onnx and recipe.prune is None and not recipe.export.dense:
        v.fail(("export",), "nothing to export (no prune section, dense: false)", "a prune section or dense: true")
    if recipe.data.text_pair_column is not None and recipe.data.text_column is None:
        v.fail(("data", "text_pair_column"), "set without text_column", "text_column as well")


def _analysis_checks(analysis: AnalysisSection, v: _Validator) -> None:
    from attribution.quadrature import INTEGRATIONS

    for name in ("tree", "triggers"):
        section = getattr(analysis, name)
        if section is None:
            continue
        if section.integration not in INTEGRATIONS:
            v.fail(("analysis", name, "integration"), f"unknown integration method {section.integration!r}",
                   "one of: " + ", ".join(INTEGRATIONS))
        if section.integration == "riemann_trapezoid" and section.n_steps < 2:
            v.fail(("analysis", name, "n_steps"), f"got {section.n_steps}", "an integer >= 2 for riemann_trapezoid")
    tree = analysis.tree
    if tree is not None and tree.text_pairs is not None and len(tree.text_pairs) != len(tree.texts):
        v.fail(("analysis", "tree", "text_pairs"), f"got {len(tree.text_pairs)} for {len(tree.texts)} texts",
               "one second text per text")
    if analysis.tree is None and analysis.triggers is None:
        v.fail(("analysis",), "neither tree nor triggers", "a tree and/or a triggers section (or analysis: null)")


def _resolve_relative(recipe: Recipe, base: Path) -> None:
    """Local paths in ``model`` and ``data.name`` are relative to the recipe file's directory."""
    for owner, attr in ((recipe, "model"), (recipe.data, "name")):
        value = getattr(owner, attr)
        if value in ("default", "minilm", "tweets") or os.path.isabs(value) or value.startswith("~"):
            continue
        candidate = base / value
        if candidate.exists():
            setattr(owner, attr, str(candidate.resolve()))


def _resolve_metric_scripts(data: dict[str, Any], base: Path) -> None:
    """Metric script paths (``evaluate.metrics``, ``sweep.metric``) relative to the recipe file's
    directory, like ``data.name``; done before validation, which loads the scripts."""
    from prune.metrics import builtin_name

    def resolved(value: Any) -> Any:
        if not isinstance(value, str) or builtin_name(value) is not None or os.path.isabs(value):
            return value
        if value.startswith("~") or not (value.endswith(".py") or "/" in value):
            return value
        candidate = base / value
        return str(candidate.resolve()) if candidate.exists() else value

    evaluate, sweep = data.get("evaluate"), data.get("sweep")
    if isinstance(evaluate, dict) and isinstance(evaluate.get("metrics"), list):
        evaluate["metrics"] = [resolved(m) for m in evaluate["metrics"]]
    if isinstance(sweep, dict) and "metric" in sweep:
        sweep["metric"] = resolved(sweep["metric"])


def _check_paths(recipe: Recipe, v: _Validator) -> None:
    model = recipe.model
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        v.fail(("model",), f"directory not found: {model}", "'default', 'minilm', a local directory or a hub id")
    if Path(model).expanduser().is_dir() and not (Path(model).expanduser() / "config.json").is_file():
        v.fail(("model",), f"{model} has no config.json", "a model directory (config.json and weights)")
    name = recipe.data.name
    suffix = Path(name).suffix.lower()
    if suffix in (".csv", ".tsv", ".json", ".jsonl", ".parquet"):
        path = Path(name).expanduser()
        if not path.is_file():
            v.fail(("data", "name"), f"file not found: {name}", "an existing data file or a data set name")
        columns = _file_columns(path)
        if columns is None:
            return
        for key in ("text_column", "text_pair_column", "label_column"):
            column = getattr(recipe.data, key)
            if column is not None and column not in columns:
                v.fail(
                    ("data", key),
                    f"column {column!r} not in {path.name}",
                    "one of its columns: " + ", ".join(columns),
                )


def _file_columns(path: Path) -> list[str] | None:
    """Column names of a local data file from its first line (None when they cannot be read cheaply)."""
    try:
        if path.suffix.lower() in (".csv", ".tsv"):
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            for encoding in ("utf-8", "latin-1"):
                try:
                    with open(path, newline="", encoding=encoding) as handle:
                        return next(csv.reader(handle, delimiter=delimiter), [])
                except UnicodeDecodeError:
                    continue
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet

            return list(pyarrow.parquet.read_schema(path).names)
        if path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                first = json.loads(handle.readline() or "{}")
            return list(first) if isinstance(first, dict) else None
    except (OSError, ValueError):
        return None
    return None


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (``["a", "b", "c"]``, value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text!r}: expected key.path=value, e.g. --set score.examples=100")
    _check_yaml_safety(raw, f"--set {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise RecipeError(f"--set {text!r}: the value is not valid YAML ({_yaml_problem(error)})") from None
    return key.split("."), value


def _apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}  # e.g. `repair: true` then --set repair.examples=64
            node[key] = child
        node = child
    node[keys[-1]] = value


def _yaml_problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return str(problem)


def parse_recipe(
    text: str, source: str = "<recipe>", overrides: Sequence[str] = (), base_dir: Path | None = None
) -> Recipe:
    """Validate recipe text (plus ``key.path=value`` overrides) into a :class:`Recipe`.

    Raises:
        RecipeError: one line, ``"SOURCE: line N: key.path: problem; expected ..."``.
    """
    locations = _Locations(source)
    _check_yaml_safety(text, source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        line = f"line {mark.line + 1}" if mark is not None else "line 1"
        raise RecipeError(f"{source}: {line}: invalid YAML: {_yaml_problem(error)}") from None
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply; expected a recipe of a few levels") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: line 1: recipe: got {_describe(data)}; expected a mapping of sections")
    locations.walk(node)
    for text_override in overrides:
        keys, value = parse_override(text_override)
        _apply_override(data, keys, value)
        locations.overridden.add(tuple(keys))
    _resolve_metric_scripts(data, base_dir or Path.cwd())
    validator = _Validator(locations)
    recipe = validator.section(data, Recipe, (), "a mapping of sections")
    recipe.source = source
    _resolve_relative(recipe, base_dir or Path.cwd())
    _cross_checks(recipe, validator)
    _check_paths(recipe, validator)
    return recipe


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Read and validate a recipe file; relative paths inside resolve against its directory."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(
                f"{path}: {path.stat().st_size} bytes; expected a recipe of at most {MAX_RECIPE_BYTES} bytes"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except IsADirectoryError:
        raise RecipeError(f"{path} is a directory; expected a YAML recipe file") from None
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: not UTF-8 text (byte {error.start}); expected a YAML recipe") from None
    except OSError as error:
        raise RecipeError(f"cannot read recipe {path}: {error.strerror or error}") from None
    return parse_recipe(text, str(path), overrides, base_dir=path.resolve().parent)
