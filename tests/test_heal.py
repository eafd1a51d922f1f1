"""prune.heal: the distillation loss against a hand computation, durations, the never-worse guarantee,
budget stops, and a heal killed mid-way and resumed giving the same weights as an uninterrupted one.
Tiny random BERTs and word-level data (tests.prune_helpers)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from attribution.core.errors import HeadpruneError
from attribution.core.predict import predict_logits
from prune.heal import RESULT_FILE, STATE_FILE, HealResult, distillation_loss, heal, parse_duration
from tests.conftest import tiny_model
from tests.prune_helpers import sensitive, tiny_dataset, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _with_dropout(model, p: float = 0.1):
    """Dropout on, so a resumed heal must also restore the RNG to match an uninterrupted one."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    return model


def _teacher_and_student(noise: float = 0.15):
    """A teacher with visible head effects, and a student: the teacher with seeded noise on its
    weights (a stand-in for a pruned model that lost accuracy)."""
    teacher = sensitive(tiny_model("bert", layers=2, heads=2, seed=1), seed=1)
    student = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise)
    return teacher, student


def _teacher_labelled(teacher, tokenizer, rows):
    """``rows`` relabelled with the teacher's predictions (what the student should recover)."""
    predicted = predict_logits(teacher, tokenizer, rows).argmax(-1).tolist()
    return rows.remove_columns("label").add_column("label", predicted).cast(rows.features)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Killed(Exception):
    pass


def _kill_after(model, steps: int):
    """A hook that raises on the student's training forward number ``steps + 1``: a kill mid-heal."""
    seen = {"n": 0}

    def hook(module, args, kwargs):
        if module.training:
            seen["n"] += 1
            if seen["n"] > steps:
                raise _Killed

    return model.register_forward_pre_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600), ("90s", 90), ("1h", 3600), ("1h30m", 5400), ("600", 600), ("2m30s", 150), ("1.5h", 5400),
     (" 10M ", 600), ("1h 5s", 3605), ("0.5s", 0.5), (45, 45), (2.5, 2.5)],
)
def test_parse_duration_accepts(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["soon", "", "  ", "0", "0m", "0h0m0s", "-5m", "10 minutes", "1m1h", "m", "1.5.2s", "10mm", "inf", "nan",
     "1d", "h30m", 0, -3, float("inf"), True, None],
)
def test_parse_duration_refuses(text):
    with pytest.raises(HeadpruneError) as caught:
        parse_duration(text)
    message = str(caught.value)
    assert "\n" not in message
    assert message == f"--budget must be a duration like 10m, 90s or 1h; got {str(text)!r}"


def test_loss_is_the_documented_formula_computed_by_hand():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]
    labels = [1, 0]
    T, alpha = 2.0, 0.3

    def softmax(row, t=1.0):
        e = [math.exp(x / t) for x in row]
        return [x / sum(e) for x in e]

    kl = sum(
        sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(softmax(t, T), softmax(s, T), strict=True))
        for s, t in zip(student, teacher, strict=True)
    ) / 2
    ce = -sum(math.log(softmax(s)[y]) for s, y in zip(student, labels, strict=True)) / 2
    expected = alpha * T * T * kl + (1 - alpha) * ce
    got = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), temperature=T,
                            alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert kl > 0.05 and ce > 0.05  # both terms matter in this check
    # the extremes: pure KL (labels not needed) and pure cross-entropy
    pure_kl = distillation_loss(torch.tensor(student), torch.tensor(teacher), None, temperature=T, alpha=1.0)
    assert pure_kl.item() == pytest.approx(T * T * kl, rel=1e-6)
    pure_ce = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), alpha=0.0)
    assert pure_ce.item() == pytest.approx(ce, rel=1e-6)


def test_heal_trains_on_that_loss(tokenizer):
    """One step over all rows as one batch: the history's loss is the loss of the starting student."""
    teacher, student = _teacher_and_student()
    train = tiny_dataset(24, seed=3)
    batch = tokenizer(list(train["text"]), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = distillation_loss(student(**batch).logits, teacher(**batch).logits,
                                     torch.tensor(list(train["label"])), temperature=3.0, alpha=0.7).item()
    result = heal(student, teacher, tokenizer, train, tiny_dataset(8, seed=4), max_steps=1, eval_every=1,
                  batch_size=64, temperature=3.0, alpha=0.7, progress=False)
    assert [point.step for point in result.history] == [0, 1]
    assert result.history[1].loss == pytest.approx(expected, rel=1e-5)


def test_heal_improves_and_returns_the_best_weights(tokenizer, tmp_path):
    teacher, start = _teacher_and_student()
    train = _teacher_labelled(teacher, tokenizer, tiny_dataset(96, seed=5))
    held_out = _teacher_labelled(teacher, tokenizer, tiny_dataset(48, seed=6))
    args = dict(max_steps=30, eval_every=5, patience=10, lr=1e-2, batch_size=16, progress=False)
    student = copy.deepcopy(start)
    result = heal(student, teacher, tokenizer, train, held_out, checkpoint_dir=tmp_path / "full", **args)
    assert result.best_accuracy > result.start_accuracy
    assert not result.restored_start and 0 < result.best_step < 30  # later evaluations did not beat it
    assert result.stopped_because == "max_steps" and result.steps == 30
    assert result.best_accuracy == max(point.accuracy for point in result.history)
    assert [point.step for point in result.history] == list(range(0, 31, 5))
    assert HealResult.load(tmp_path / "full" / RESULT_FILE) == result
    # the student holds the weights of the best evaluation, not the last ones: the same heal killed
    # just after that evaluation has them in its checkpoint
    predicted = predict_logits(student, tokenizer, held_out).argmax(-1)
    assert int((predicted == torch.tensor(list(held_out["label"]))).sum()) / len(held_out) == result.best_accuracy
    final = torch.load(tmp_path / "full" / STATE_FILE, weights_only=True)["model"]
    assert not _same(_weights(student), final)
    killed = copy.deepcopy(start)
    _kill_after(killed, result.best_step)
    with pytest.raises(_Killed):
        heal(killed, teacher, tokenizer, train, held_out, checkpoint_dir=tmp_path / "cut", **args)
    at_best = torch.load(tmp_path / "cut" / STATE_FILE, weights_only=True)
    assert at_best["progress"]["step"] == result.best_step
    assert _same(_weights(student), at_best["model"])

    # early stopping: with patience 2 the same heal ends two evaluations after its best one
    early = heal(copy.deepcopy(start), teacher, tokenizer, train, held_out, **{**args, "patience": 2})
    assert early.stopped_because == "patience"
    assert early.steps == result.best_step + 2 * 5 and early.history == result.history[: len(early.history)]


def test_never_worse_an_absurd_learning_rate_returns_the_starting_weights(tokenizer):
    teacher, student = _teacher_and_student()
    held_out = _teacher_labelled(student, tokenizer, tiny_dataset(40, seed=8))  # the start is 100% right
    start = _weights(student)
    result = heal(student, teacher, tokenizer, tiny_dataset(64, seed=9), held_out, max_steps=6, eval_every=2,
                  lr=50.0, batch_size=16, progress=False)
    assert result.start_accuracy == 1.0
    assert min(point.accuracy for point in result.history[1:]) < 1.0  # the training did hurt
    assert result.restored_start and result.best_step == 0 and result.best_accuracy == result.start_accuracy
    assert _same(_weights(student), start)


def test_budget_exhaustion_stops_and_says_so(tokenizer, tmp_path):
    teacher, student = _teacher_and_student()
    train, held_out = tiny_dataset(64, seed=10), tiny_dataset(16, seed=11)
    args = dict(max_steps=10**6, eval_every=10**6, batch_size=8, progress=False, checkpoint_dir=tmp_path)
    result = heal(copy.deepcopy(student), teacher, tokenizer, train, held_out, budget_seconds=0.4, **args)
    assert result.stopped_because == "budget"
    assert 0 < result.steps < 10**6
    assert result.seconds < 0.4 + 1.0  # stops at the budget (give or take one step and one evaluation)
    assert result.history[-1].step == result.steps  # the last weights were evaluated before choosing

    # the budget covers every call: the same budget again is spent already, a larger one continues
    again = heal(copy.deepcopy(student), teacher, tokenizer, train, held_out, budget_seconds=0.4, **args)
    assert again.stopped_because == "budget" and again.resumed_from == again.steps == result.steps
    assert again.history == result.history
    more = heal(copy.deepcopy(student), teacher, tokenizer, train, held_out, budget_seconds=1.5, **args)
    assert more.stopped_because == "budget" and more.resumed_from == result.steps < more.steps
    assert more.history[: len(result.history)] == result.history


def test_a_killed_heal_resumes_to_the_same_weights_as_an_uninterrupted_one(tokenizer, tmp_path):
    teacher, start = _teacher_and_student()
    _with_dropout(start)
    train = tiny_dataset(40, seed=12)  # 5 batches of 8: the kill and the stop fall in the second/third epoch
    held_out = tiny_dataset(16, seed=13)
    args = dict(max_steps=13, eval_every=3, patience=100, lr=1e-3, batch_size=8, seed=5, progress=False)

    whole = copy.deepcopy(start)
    uninterrupted = heal(whole, teacher, tokenizer, train, held_out, checkpoint_dir=tmp_path / "a", **args)

    killed = copy.deepcopy(start)
    handle = _kill_after(killed, 8)
    with pytest.raises(_Killed):
        heal(killed, teacher, tokenizer, train, held_out, checkpoint_dir=tmp_path / "b", **args)
    handle.remove()
    assert not (tmp_path / "b" / RESULT_FILE).exists()

    fresh = copy.deepcopy(start)
    resumed = heal(fresh, teacher, tokenizer, train, held_out, checkpoint_dir=tmp_path / "b", **args)
    assert resumed.resumed_from == 6  # the last evaluation before the kill
    assert uninterrupted.resumed_from is None
    assert resumed.steps == uninterrupted.steps == 13
    assert resumed.history == uninterrupted.history
    assert _same(_weights(fresh), _weights(whole))  # the returned (best) weights
    state = {name: torch.load(tmp_path / name / STATE_FILE, weights_only=True) for name in ("a", "b")}
    assert _same(state["a"]["model"], state["b"]["model"])  # the final training weights, bit for bit
    assert not _same(state["a"]["model"], _weights(start))  # and training did move them

    # a finished heal is not continued: the same call returns its result and best weights
    again = copy.deepcopy(start)
    repeat = heal(again, teacher, tokenizer, train, held_out, checkpoint_dir=tmp_path / "b", **args)
    assert repeat.resumed_from == 13 and repeat.history == uninterrupted.history
    assert _same(_weights(again), _weights(whole))


def test_resuming_with_other_arguments_is_a_one_line_error(tokenizer, tmp_path):
    teacher, student = _teacher_and_student()
    train, held_out = tiny_dataset(32, seed=14), tiny_dataset(8, seed=15)
    args = dict(max_steps=2, eval_every=1, batch_size=8, progress=False, checkpoint_dir=tmp_path)
    heal(copy.deepcopy(student), teacher, tokenizer, train, held_out, **args)
    for change, named in (({"lr": 1e-3}, "lr: 3e-05 there, 0.001 here"), ({"seed": 1}, "seed"),
                          ({"train": tiny_dataset(32, seed=16)}, "the training rows differ"),
                          ({"student": teacher}, "the student's starting weights differ")):
        call = {"student": copy.deepcopy(student), "teacher": teacher, "tokenizer": tokenizer, "train": train,
                "held_out": held_out, **args, **change}
        with pytest.raises(HeadpruneError) as caught:
            heal(**call)
        assert "\n" not in str(caught.value)
        assert named in str(caught.value) and str(tmp_path) in str(caught.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_steps": None}, "needs a budget"),
        ({"budget_seconds": -1.0}, "positive number of seconds"),
        ({"max_steps": 0}, "max_steps must be an integer of at least 1"),
        ({"alpha": 1.5}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"lr": 0.0}, "learning rate"),
        ({"patience": 0}, "patience"),
        ({"eval_every": 0}, "eval_every"),
        ({"held_out": tiny_dataset(4).remove_columns("label")}, "no 'label' column"),
        ({"train": tiny_dataset(4).select([])}, "training rows are empty"),
        ({"teacher": tiny_model("bert", layers=2, heads=2, labels=2)}, "the teacher 2"),
    ],
)
def test_bad_arguments_are_one_line_errors(tokenizer, change, message):
    teacher, student = _teacher_and_student()
    call = {"student": student, "teacher": teacher, "tokenizer": tokenizer, "train": tiny_dataset(8),
            "held_out": tiny_dataset(4), "max_steps": 1, "progress": False, **change}
    start = _weights(student)
    with pytest.raises(HeadpruneError) as caught:
        heal(**call)
    assert "\n" not in str(caught.value) and message in str(caught.value)
    assert _same(_weights(student), start)
