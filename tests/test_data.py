"""attribution.core.data: split loading, column handling, and padded batches."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch

from attribution.core.data import (
    DataSpec,
    encode,
    iter_batches,
    label_names,
    load_splits,
    parse_split_map,
    restore_order,
    tweets_csv_path,
)
from attribution.core.errors import HeadpruneError

WORDS = "the movie is very good great fine bad awful not a plot actor was".split()


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny offline WordPiece tokenizer over WORDS (no hub, no real model)."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def review_rows(n: int) -> list[dict]:
    """n reviews of varied length; label alternates pos/neg/neutral-ish by a fixed rule."""
    rows = []
    for i in range(n):
        length = 1 + (i * 7) % 11
        words = [WORDS[(i + j) % len(WORDS)] for j in range(length)]
        rows.append({"review": " ".join(words), "stars": ["neg", "pos", "mid"][i % 3], "other": i})
    return rows


def as_multiset(split: datasets.Dataset) -> Counter:
    return Counter(zip(split["text"], split["label"], strict=True))


# ------------------------------------------------------------------------------------------
# the embedded tweets


@pytest.fixture(scope="module")
def tweets() -> datasets.DatasetDict:
    return load_splits("tweets")


def test_tweets_sizes_and_labels(tweets: datasets.DatasetDict) -> None:
    assert list(tweets) == ["train", "validation", "test"]
    assert {k: len(v) for k, v in tweets.items()} == {"train": 34158, "validation": 2000, "test": 2000}
    assert label_names(tweets) == ["negative", "neutral", "positive"]
    assert label_names(tweets["test"]) == ["negative", "neutral", "positive"]
    total = Counter()
    for split in tweets.values():
        assert split.column_names == ["text", "label"]
        total.update(split["label"])
    assert total == Counter({0: 16186, 1: 15018, 2: 6954})


def test_tweets_label_mapping_matches_the_csv(tweets: datasets.DatasetDict) -> None:
    with tweets_csv_path().open(encoding="latin-1", newline="") as handle:
        raw = Counter((row["text"], row["sentiment"]) for row in csv.DictReader(handle))
    names = label_names(tweets)
    loaded = Counter()
    for split in tweets.values():
        loaded.update((text, names[label]) for text, label in zip(split["text"], split["label"], strict=True))
    # the splits are exactly a partition of the csv, with each text keeping its own sentiment
    assert loaded == raw


def test_tweets_split_is_deterministic_and_seeded(tweets: datasets.DatasetDict) -> None:
    again = load_splits(DataSpec("tweets"))
    for name in tweets:
        assert list(again[name]["text"]) == list(tweets[name]["text"])
    other = load_splits(DataSpec("tweets", seed=1))
    assert list(other["test"]["text"]) != list(tweets["test"]["text"])
    assert len(other["test"]) == 2000


# ------------------------------------------------------------------------------------------
# local files


def test_local_csv_carves_disjoint_deterministic_splits(tmp_path: Path) -> None:
    rows = review_rows(50)
    path = write_csv(tmp_path / "reviews.csv", rows, ["review", "stars", "other"])
    spec = DataSpec(str(path), text_column="review", label_column="stars")
    splits = load_splits(spec)
    assert {k: len(v) for k, v in splits.items()} == {"train": 40, "validation": 5, "test": 5}
    assert label_names(splits) == ["mid", "neg", "pos"]  # string labels: sorted class names
    for split in splits.values():
        assert split.column_names == ["text", "label"]
    # partition of the file: every (text, label) exactly once across the splits
    names = label_names(splits)
    seen = Counter()
    for split in splits.values():
        seen.update((t, names[y]) for t, y in zip(split["text"], split["label"], strict=True))
    assert seen == Counter((r["review"], r["stars"]) for r in rows)
    again = load_splits(spec)
    assert all(list(again[k]["text"]) == list(splits[k]["text"]) for k in splits)


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_local_parquet_reads_like_the_same_rows_as_csv(tmp_path: Path) -> None:
    rows = review_rows(50)
    csv_path = write_csv(tmp_path / "r.csv", rows, ["review", "stars", "other"])
    parquet_path = write_parquet(tmp_path / "r.parquet", rows)
    from_csv = load_splits(DataSpec(str(csv_path), text_column="review", label_column="stars"))
    from_parquet = load_splits(DataSpec(str(parquet_path), text_column="review", label_column="stars"))
    assert label_names(from_parquet) == label_names(from_csv) == ["mid", "neg", "pos"]
    for name in ("train", "validation", "test"):
        assert list(from_parquet[name]["text"]) == list(from_csv[name]["text"])
        assert list(from_parquet[name]["label"]) == list(from_csv[name]["label"])


def test_recipes_check_parquet_files_and_their_columns(tmp_path: Path) -> None:
    from prune.recipe import RecipeError, parse_recipe

    path = write_parquet(tmp_path / "r.parquet", review_rows(12))
    recipe = parse_recipe(f"model: default\ndata:\n  name: {path}\n  text_column: review\n  label_column: stars\n")
    assert recipe.data.name == str(path)
    with pytest.raises(RecipeError, match="line 5: data.label_column: column .label. not in r.parquet; .*stars"):
        parse_recipe(f"model: default\ndata:\n  name: {path}\n  text_column: review\n  label_column: label\n")
    with pytest.raises(RecipeError, match="data.name: file not found"):
        parse_recipe(f"model: default\ndata:\n  name: {tmp_path / 'missing.parquet'}\n")


def test_directory_of_parquet_files_per_split(tmp_path: Path) -> None:
    folder = tmp_path / "per_split"
    folder.mkdir()
    write_parquet(folder / "train.parquet", [{"text": f"good {i}", "label": i % 2} for i in range(30)])
    write_parquet(folder / "validation.parquet", [{"text": f"fine {i}", "label": i % 2} for i in range(6)])
    write_parquet(folder / "test.parquet", [{"text": f"bad {i}", "label": i % 2} for i in range(4)])
    splits = load_splits(str(folder))
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "validation": 6, "test": 4}
    assert all(t.startswith("fine") for t in splits["validation"]["text"])


def test_guessed_columns_int_labels_and_empty_text(tmp_path: Path) -> None:
    rows = [{"sentence": f"good movie {i}" if i % 10 else "", "label": i % 2} for i in range(40)]
    path = write_csv(tmp_path / "s.csv", rows, ["sentence", "label"])
    splits = load_splits(str(path))
    assert label_names(splits) == ["0", "1"]
    assert sum(len(s) for s in splits.values()) == 36  # 4 empty texts dropped
    assert all(t.strip() for s in splits.values() for t in s["text"])


def test_jsonl_sentence_pairs(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as handle:
        for i in range(30):
            handle.write(json.dumps({"premise": f"the plot {i}", "hypothesis": "not good", "label": i % 3}) + "\n")
    splits = load_splits(str(path))  # premise/hypothesis guessed as a pair
    assert splits["train"].column_names == ["text", "text_pair", "label"]
    explicit = load_splits(DataSpec(str(path), text_column="premise", text_pair_column="hypothesis"))
    assert list(explicit["test"]["text"]) == list(splits["test"]["text"])


def test_directory_with_hidden_test_labels(tmp_path: Path) -> None:
    # GLUE style: a labelled train split and a test split whose labels are all -1
    folder = tmp_path / "glue_like"
    folder.mkdir()
    write_csv(folder / "train.csv", [{"text": f"good {i}", "label": i % 2} for i in range(40)], ["text", "label"])
    write_csv(folder / "test.csv", [{"text": f"bad {i}", "label": -1} for i in range(10)], ["text", "label"])
    splits = load_splits(str(folder))
    assert {k: len(v) for k, v in splits.items()} == {"train": 32, "validation": 4, "test": 4}
    assert all(t.startswith("good") for t in splits["test"]["text"])


def test_missing_column_names_it_and_the_available_ones(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "r.csv", review_rows(20), ["review", "stars", "other"])
    with pytest.raises(HeadpruneError) as info:
        load_splits(DataSpec(str(path), text_column="body", label_column="stars"))
    message = str(info.value)
    assert "'body'" in message and "review, stars, other" in message and "\n" not in message
    with pytest.raises(HeadpruneError, match="no label column found"):
        load_splits(DataSpec(str(path), text_column="review"))


@pytest.mark.parametrize("name", ["missing.csv", "./nowhere/data.jsonl"])
def test_missing_file_is_a_clear_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(HeadpruneError, match="not found"):
        load_splits(str(tmp_path / name))


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.parquetx"
    path.write_text("x")
    with pytest.raises(HeadpruneError, match="unsupported data file type"):
        load_splits(str(path))


# ------------------------------------------------------------------------------------------
# split mapping (a held-out split under another name, as GLUE MNLI's validation_matched)

MNLI_SPLITS = {"train": 40, "validation_matched": 9, "validation_mismatched": 7, "test_matched": 5}


def mnli_like(root: Path) -> Path:
    """A local data set laid out like a hub one: parquet files per split, named by the README's
    ``configs`` (so ``datasets.load_dataset(dir)`` keeps the split names; without it datasets
    would merge both validation files into one ``validation`` split)."""
    root.mkdir()
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split, n in MNLI_SPLITS.items():
        hidden = split.startswith("test")
        rows = [
            {"premise": f"{split} premise {i}", "hypothesis": "a movie", "label": -1 if hidden else i % 3}
            for i in range(n)
        ]
        write_parquet(root / f"{split}.parquet", rows)
        lines += [f"  - split: {split}", f"    path: {split}.parquet"]
    (root / "README.md").write_text("\n".join([*lines, "---", ""]))
    return root


def origins(split: datasets.Dataset) -> set[str]:
    return {text.split(" premise ")[0] for text in split["text"]}


def test_split_map_uses_the_named_split_instead_of_carving(tmp_path: Path) -> None:
    folder = str(mnli_like(tmp_path / "mnli"))
    carved = load_splits(folder)  # today's rule: no split is called validation or test, both are carved
    assert {k: len(v) for k, v in carved.items()} == {"train": 32, "validation": 4, "test": 4}
    assert all(origins(split) == {"train"} for split in carved.values())

    mapped = load_splits(DataSpec(folder, split_map={"validation": "validation_matched"}))
    assert {k: len(v) for k, v in mapped.items()} == {"train": 36, "validation": 9, "test": 4}
    assert origins(mapped["validation"]) == {"validation_matched"}
    assert list(mapped["validation"]["text"]) == [f"validation_matched premise {i}" for i in range(9)]
    assert origins(mapped["train"]) == origins(mapped["test"]) == {"train"}
    assert mapped["train"].column_names == ["text", "text_pair", "label"]

    both = load_splits(
        DataSpec(folder, split_map=[("test", "validation_mismatched"), ("validation", "validation_matched")])
    )
    assert {k: len(v) for k, v in both.items()} == {"train": 40, "validation": 9, "test": 7}  # nothing carved
    assert origins(both["test"]) == {"validation_mismatched"}
    assert list(both["test"]["label"]) == [i % 3 for i in range(7)]


def test_split_map_on_a_saved_dataset_dict(tmp_path: Path) -> None:
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["n", "p"])})
    parts = {
        name: datasets.Dataset.from_dict(
            {"text": [f"{name} {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}, features=features
        )
        for name, n in {"train": 30, "dev_clean": 6, "heldout": 5}.items()
    }
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "saved"))
    spec = DataSpec(str(tmp_path / "saved"), split_map={"validation": "dev_clean", "test": "heldout"})
    splits = load_splits(spec)
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "validation": 6, "test": 5}
    assert list(splits["test"]["text"]) == [f"heldout {i}" for i in range(5)]
    assert label_names(splits) == ["n", "p"]


def test_split_map_spec_is_normalised_and_hashable() -> None:
    a = DataSpec("x", split_map={"validation": "validation_matched", "test": "validation_mismatched"})
    b = DataSpec("x", split_map=[("test", "validation_mismatched"), ("validation", "validation_matched")])
    assert a == b and hash(a) == hash(b)
    assert a.split_map == (("test", "validation_mismatched"), ("validation", "validation_matched"))
    assert DataSpec("x") != a and DataSpec("x").split_map == ()


def test_parse_split_map_repeated_or_comma_separated() -> None:
    expected = {"validation": "validation_matched", "test": "validation_mismatched"}
    assert parse_split_map(["validation=validation_matched", "test=validation_mismatched"]) == expected
    assert parse_split_map(["validation=validation_matched,test=validation_mismatched"]) == expected
    assert parse_split_map([" validation = validation_matched , "]) == {"validation": "validation_matched"}
    assert parse_split_map([]) == {}


@pytest.mark.parametrize(
    ("items", "fragment"),
    [
        (["validation"], "'validation': expected SPLIT=SOURCE"),
        (["=validation_matched"], "expected SPLIT=SOURCE"),
        (["validation=a=b"], "expected SPLIT=SOURCE"),
        (["dev=validation_matched"], "'dev' is not a split headprune uses (train, validation, test)"),
        (["validation=a", "validation=b"], "'validation' is mapped twice"),
        (["validation=a,test=a"], "source split 'a' is mapped twice"),
    ],
)
def test_bad_split_maps_are_one_line_errors(items: list[str], fragment: str) -> None:
    with pytest.raises(HeadpruneError) as info:
        parse_split_map(items)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_split_map_naming_a_missing_or_unlabelled_split(tmp_path: Path) -> None:
    folder = str(mnli_like(tmp_path / "mnli"))
    with pytest.raises(HeadpruneError) as info:
        load_splits(DataSpec(folder, split_map={"validation": "validation_matchd"}))
    message = str(info.value)
    assert "no split 'validation_matchd'" in message and "validation_matched, validation_mismatched" in message
    with pytest.raises(HeadpruneError, match="mapped to test has no labels"):
        load_splits(DataSpec(folder, split_map={"test": "test_matched"}))
    with pytest.raises(HeadpruneError, match="'valid' is not a split"):
        DataSpec(folder, split_map={"valid": "validation_matched"})


# ------------------------------------------------------------------------------------------
# batches


@pytest.fixture()
def small(tmp_path: Path) -> datasets.Dataset:
    path = write_csv(tmp_path / "r.csv", review_rows(23), ["review", "stars", "other"])
    spec = DataSpec(str(path), text_column="review", label_column="stars")
    return datasets.concatenate_datasets(list(load_splits(spec).values()))


def test_batches_are_padded_to_the_longest(small: datasets.Dataset, tokenizer) -> None:
    lengths = [len(tokenizer(t)["input_ids"]) for t in small["text"]]
    seen = []
    for batch in iter_batches(small, tokenizer, batch_size=4, max_length=64):
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "index"}
        rows = batch["index"].tolist()
        seen += rows
        width = batch["input_ids"].shape[1]
        assert width == max(lengths[i] for i in rows)  # padded to the longest in this batch only
        assert batch["attention_mask"].sum(1).tolist() == [lengths[i] for i in rows]
        padded = batch["attention_mask"] == 0
        assert (batch["input_ids"][padded] == tokenizer.pad_token_id).all()
        assert batch["labels"].dtype == torch.long
        assert batch["labels"].tolist() == [small[i]["label"] for i in rows]
    assert seen == list(range(len(small)))  # dataset order


def test_truncation_to_max_length(small: datasets.Dataset, tokenizer) -> None:
    widths = [b["input_ids"].shape[1] for b in iter_batches(small, tokenizer, batch_size=8, max_length=5)]
    assert max(widths) == 5
    first = next(iter_batches(small, tokenizer, batch_size=8, max_length=5))
    assert (first["input_ids"][first["attention_mask"].sum(1) == 5, -1] == tokenizer.sep_token_id).all()


def test_sort_by_length_cuts_padding_and_restores_order(small: datasets.Dataset, tokenizer) -> None:
    def run(sort: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
        cells, index, first_ids = 0, [], []
        for batch in iter_batches(small, tokenizer, batch_size=4, sort_by_length=sort):
            cells += batch["input_ids"].numel()
            index.append(batch["index"])
            first_ids.append(batch["input_ids"][:, 1])  # the first word piece of every row
        return cells, torch.cat(index), torch.cat(first_ids)

    plain_cells, plain_index, plain_first = run(False)
    sorted_cells, sorted_index, sorted_first = run(True)
    assert sorted_cells < plain_cells
    assert sorted(sorted_index.tolist()) == list(range(len(small)))
    assert torch.equal(restore_order(sorted_first, sorted_index), plain_first)
    again = torch.cat([b["index"] for b in iter_batches(small, tokenizer, batch_size=4, sort_by_length=True)])
    assert torch.equal(again, sorted_index)  # deterministic


def test_pairs_and_encoded_datasets_match_raw_text(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as handle:
        for i in range(12):
            handle.write(json.dumps({"premise": "the movie " * (1 + i % 4), "hypothesis": "not good", "label": i % 2}))
            handle.write("\n")
    data = load_splits(str(path))["train"]
    raw = list(iter_batches(data, tokenizer, batch_size=5, max_length=12))
    assert all((b["token_type_ids"] == 1).any(dim=1).all() for b in raw)  # second segment present
    encoded = encode(data, tokenizer, DataSpec("x", max_length=12))
    for a, b in zip(raw, iter_batches(encoded, tokenizer, batch_size=5, max_length=12), strict=True):
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # encoded longer than asked: truncated like raw text (final [SEP] kept), not sliced
    shorter = list(iter_batches(data, tokenizer, batch_size=5, max_length=6))
    for a, b in zip(shorter, iter_batches(encoded, tokenizer, batch_size=5, max_length=6), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert (a["input_ids"][:, -1] == tokenizer.sep_token_id).all()


def test_no_token_type_ids_when_the_tokenizer_has_none(small: datasets.Dataset, tokenizer) -> None:
    class NoTypes:
        """Wraps a tokenizer and drops token_type_ids, as RoBERTa-style tokenizers do."""

        def __call__(self, *args, **kwargs):
            out = tokenizer(*args, **kwargs)
            out.pop("token_type_ids", None)
            return out

    batch = next(iter_batches(small, NoTypes(), batch_size=3))
    assert "token_type_ids" not in batch and batch["input_ids"].shape[0] == 3


def test_bad_batch_arguments(small: datasets.Dataset, tokenizer) -> None:
    with pytest.raises(HeadpruneError, match="batch_size"):
        next(iter_batches(small, tokenizer, batch_size=0))
    with pytest.raises(HeadpruneError, match="'review'"):
        next(iter_batches(small, tokenizer, text_column="review"))


def test_recipe_split_map_reaches_the_data_spec(tmp_path: Path) -> None:
    from prune.finetune import DEFAULT_FINETUNE_CONFIG, FinetuneConfig, finetune_fingerprint
    from prune.recipe import RecipeError, parse_recipe

    folder = mnli_like(tmp_path / "mnli")
    recipe = parse_recipe(f"model: default\ndata:\n  name: {folder}\n  split_map: {{validation: validation_matched}}\n")
    spec = DataSpec(**recipe.section("data"))
    assert spec.split_map == (("validation", "validation_matched"),)
    assert origins(load_splits(spec)["validation"]) == {"validation_matched"}
    # the fine-tune cache key follows the mapping; plain specs (the default classifier's) keep theirs
    plain = FinetuneConfig(data=DataSpec(str(folder))).key()["data"]
    mapped = FinetuneConfig(data=spec).key()["data"]
    assert plain == str(folder.resolve())
    assert mapped["name"] == plain and mapped["split_map"] == (("validation", "validation_matched"),)
    assert finetune_fingerprint(FinetuneConfig(data=spec)) != finetune_fingerprint(FinetuneConfig(data=plain))
    assert DEFAULT_FINETUNE_CONFIG.key()["data"] == "tweets"
    for text, problem in [
        ("split_map: {valid: validation_matched}", "data.split_map: valid=validation_matched: 'valid' is not a split"),
        ("split_map: {validation: a, test: a}", "data.split_map: source split 'a' is mapped twice"),
        ("split_map: [a]", "data.split_map: got a list"),
    ]:
        with pytest.raises(RecipeError) as info:
            parse_recipe(f"model: default\ndata:\n  {text}\n")
        message = str(info.value)
        assert f"line 3: {problem}" in message and "expected a mapping of train, validation or test" in message
        assert "\n" not in message
