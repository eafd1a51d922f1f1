"""Weight-level repair without retraining: refit each pruned sub-layer's output projection by ridge
least squares so it reproduces the dense model's (after K-prune, ICLR 2024; FLAP's bias
compensation for sub-layers left empty).

``prune.repair`` rescales whole heads (one scalar each); this refits the whole output matrix and
its bias (K-prune reports this much stronger than scaling units at high compression). Both stay
available.

Which sub-layers: the **attention output projection** ``W_O`` of a layer that lost heads and the
**feed-forward output projection** ``W_2`` of a layer that lost neurons. "Lost" is read from the
shapes of the linear layers alone — the projection of the pruned model has fewer input features
than the dense model's — so the same code serves heads (``prune.surgery.remove_heads``) and
feed-forward neurons (intermediate rows and output columns sliced), and nothing here depends on how
the units were chosen or removed.

For one pruned sub-layer with projection ``y = x W^T + b`` (``W`` ``[D, k]``, ``k`` the surviving
input features: ``H_l * d_h`` context features or ``F_l`` intermediate activations):

- ``X`` ``[N, k]``: the *pruned* model's input to that projection on the calibration rows, computed
  by the current model — so with every sub-layer below (and this layer's attention, for its
  feed-forward block) already refit: each layer is fitted on the inputs the repaired layers below
  really produce (K-prune's bottom-up order).
- ``Y`` ``[N, D]``, the target (``target=``):

  - ``"stream"`` (default): what makes the LayerNorm after the projection see the *dense* model's
    input — the dense LayerNorm input (projection output plus residual, dense forward pass of the
    same rows) minus the residual the *pruned* model adds there. The projection then also absorbs
    the drift the pruned layers below left in the residual stream, which no later refit can see
    as such. On the embedded default at 60% of the dense latency: 0.7420 test accuracy against
    0.7370 for ``"sublayer"``.
  - ``"sublayer"``: the dense model's output of the same projection (before the residual and the
    LayerNorm, bias included), as K-prune states it.
- ``N`` counts the non-padding tokens of all calibration batches (padding is excluded) — except in
  the last layer of a model whose head reads only the first token (every sequence classifier
  here, ``instrument.reads_first_token_only``): with ``first_token=True`` (default) that layer is
  fitted on the first token of each row only, since no other position of it reaches the output.
  Fitting the tokens that do not matter there spends the few surviving units on them: with it the
  default above reaches 0.7490 (dense 0.7560) instead of 0.7420.
- Solve ``min_{W, b} ||X W^T + 1 b^T - Y||^2 + lam ||W||^2`` — the bias is not regularised — from
  the normal equations of the augmented system ``[X, 1]`` in float64, one solve per sub-layer for all
  ``D`` outputs (Cholesky; a singular system, possible only at ``ridge=0``, falls back to the
  minimum-norm ``lstsq``).
- ``lam = ridge * mean(diag(X^T X))``: ``ridge`` is relative to the mean squared input feature
  summed over the tokens, so the same value means the same shrinkage whatever the layer's scale and
  the number of calibration tokens (the papers leave the regulariser open; K-prune uses none). A
  small ``ridge`` keeps the solve well posed when features are nearly collinear or outnumber the
  calibration tokens; the held-out guard below catches what it does not.
- A sub-layer left with **no** units (``k = 0``) has nothing to refit but its bias, which becomes
  ``mean(Y)``, the mean target over the calibration tokens: FLAP's bias compensation
  (FLAP adds ``W_removed · mean(x_removed)`` to the bias; this is the least-squares version of it,
  measured on the pruned model's own inputs).

Errors: ``relative error = ||X W^T + b - Y||^2 / ||Y - b_dense||^2`` over the fitted tokens, i.e.
the squared error against the target relative to the energy of what the projection must supply
beyond the dense bias. With ``target="sublayer"`` and every token fitted that is the same quantity
as ``prune.repair``'s ``relative_before``/``relative_after``, so the two repairs compare directly.

The 60%-latency figures above are one run on the embedded default (2,000 test tweets, scores and
latency model of that run); ridge ``1e-2``/``1e-4`` and 1,024 calibration rows instead of 256 moved
the ``"stream"`` result by at most 0.15 points.

Cost: both models' hidden states entering the current layer are cached per batch, so each layer
runs once in the dense model and about twice (plus once per pruned sub-layer, up to its projection)
in the pruned one: linear in depth. Length-sorted batches waste less on padding.

Guard: with ``held_out`` rows the relative error of the previous weights and of the refit weights
are both measured on them (inputs again from the already-refit model); a refit that is worse there
is not applied — the sub-layer keeps its previous weights and its record says ``"kept"``. Without
``held_out`` every refit is applied (the ridge optimum never raises the *calibration* error by more
than ``lam * ||W_previous||^2``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError
from attribution.core.inputs import validate_inputs
from attribution.core.io import Record, timing_field
from attribution.core.log import get_logger

log = get_logger("refit")

SUBLAYERS: tuple[str, ...] = ("attention", "ffn")
TARGETS: tuple[str, ...] = ("sublayer", "stream")

def _projection(model: PreTrainedModel, layer: int, kind: str) -> nn.Linear:
    if kind == "attention":
        return instrument.output_projection(model, layer)
    return instrument.ffn_output_projection(model, layer)


@dataclass
class SublayerRefit:
    """One refit sub-layer. ``kind`` is ``"attention"`` (``W_O``) or ``"ffn"`` (``W_2``); ``units``
    the heads or neurons it has (``original_units`` in the dense model; 0 = bias only). The errors
    are relative (module docstring) and describe the *refit candidate* against the previous weights
    — on the calibration rows and, with a guard, on the held-out rows (``None`` without).
    ``action`` is ``"applied"`` or ``"kept"`` (the guard kept the previous weights). ``lam`` is the
    absolute ridge term used; ``seconds`` the time of this sub-layer's captures and solve (the dense
    model's layer passes, shared by a layer's sub-layers, count only in ``RefitResult.seconds``).
    Stored inside a ``RefitResult`` (no format tag of its own)."""

    layer: int
    kind: str
    units: int
    original_units: int
    calibration_before: float
    calibration_after: float
    held_out_before: float | None
    held_out_after: float | None
    action: str
    lam: float
    seconds: float = timing_field()  # in memory only (io.timing_field)

    @property
    def applied(self) -> bool:
        return self.action == "applied"


@dataclass
class RefitResult(Record):
    """What ``refit`` did, per pruned sub-layer bottom-up; saved as a ``headprune.RefitResult``."""

    FORMAT: ClassVar[str] = "headprune.RefitResult"
    VERSION: ClassVar[int] = 1

    sublayers: list[SublayerRefit]
    examples: int
    tokens: int
    held_out_examples: int
    held_out_tokens: int
    seconds: float = timing_field()  # in memory only (io.timing_field)
    options: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per sub-layer: units, relative errors before -> after, and what was done."""
        lines = []
        for r in self.sublayers:
            unit = "heads" if r.kind == "attention" else "neurons"
            text = (
                f"layer {r.layer} {r.kind}: {r.units}/{r.original_units} {unit}"
                f"{' (bias only)' if r.units == 0 else ''}, calibration error "
                f"{r.calibration_before:.4f} -> {r.calibration_after:.4f}"
            )
            if r.held_out_before is not None and r.held_out_after is not None:
                text += f", held-out {r.held_out_before:.4f} -> {r.held_out_after:.4f}"
            lines.append(text + ("" if r.applied else ", kept the previous weights (worse on held-out rows)"))
        if not lines:
            lines.append("nothing to refit: no sub-layer lost units")
        return "\n".join(lines)


class _Stop(Exception):
    """Raised from a hook once the module of interest has run: nothing above it is needed."""


class _Rows:
    """Calibration (or held-out) batches and, per batch, the hidden states ``[B, T, D]`` entering
    layer ``self.layer`` of the pruned model and of the dense model.

    Each layer is run from its cached input (``instrument.start_at_layer``), so refitting ``L``
    layers costs ``O(L)`` layer passes instead of ``O(L^2)``: the dense model runs each layer once
    (its projection outputs, the targets, are taken on the way), the pruned model once per pruned
    sub-layer (up to that projection) plus once to move on. The pruned model's states are moved on
    only after the layer's refits are decided: the next layer's inputs come from the repaired ones.
    """

    def __init__(
        self, batches: list[dict[str, torch.Tensor]], target: str = "sublayer", first_token_layer: int | None = None
    ) -> None:
        self.batches = batches
        self.target = target
        self.first_token_layer = first_token_layer
        self.layer = 0
        self.model_states: list[torch.Tensor | None] = [None] * len(batches)
        self.dense_states: list[torch.Tensor | None] = [None] * len(batches)
        self.dense_next: list[torch.Tensor | None] = [None] * len(batches)
        self.targets: dict[str, list[torch.Tensor]] = {}

    def _forward(
        self, network: PreTrainedModel, state: torch.Tensor | None, index: int, capture: list[nn.Module]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run ``network`` on batch ``index`` from ``state`` (the input of layer ``self.layer``; the
        embeddings when None) until the last module of ``capture`` has run; each module's first
        input and output."""
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(position: int) -> Any:
            def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: Any) -> None:
                output = output[0] if isinstance(output, tuple) else output
                seen[position] = (args[0].detach(), output.detach())
                if position == len(capture) - 1:
                    raise _Stop

            return record

        start = (
            instrument.start_at_layer(network, self.layer, state) if state is not None else contextlib.nullcontext()
        )
        handles = [module.register_forward_hook(hook(p)) for p, module in enumerate(capture)]
        try:
            with torch.no_grad(), start:
                network(**self.batches[index])
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if len(seen) != len(capture):
            raise HeadpruneError("a module being captured was not reached by the forward pass")
        return [seen[p] for p in range(len(capture))]

    def valid(self, index: int) -> torch.Tensor:
        """``[B, T]`` bool: the tokens of batch ``index`` the current layer is fitted on — the
        non-padding ones, or only the first of each row in ``first_token_layer`` (the last layer
        of a model whose head reads the first token: nothing else there reaches the output)."""
        valid = self.batches[index]["attention_mask"].bool()
        if self.layer == self.first_token_layer:
            valid = torch.zeros_like(valid)
            valid[:, 0] = True
        return valid

    def run_dense(self, dense: PreTrainedModel, kinds: Sequence[str]) -> None:
        """Run the dense model's layer ``self.layer`` once per batch: the targets of its ``kinds``
        projections on the valid tokens (``self.targets[kind]``, ``[N_b, D]`` each: the projection's
        output, or with ``target="stream"`` the input of the LayerNorm after it) and its output."""
        modules: list[nn.Module] = []
        for kind in kinds:
            modules += [_projection(dense, self.layer, kind), instrument.sublayer_norm(dense, self.layer, kind)]
        modules.append(instrument.encoder_layers(dense)[self.layer])
        self.targets = {kind: [] for kind in kinds}
        for index in range(len(self.batches)):
            seen = self._forward(dense, self.dense_states[index], index, modules)
            valid = self.valid(index)
            for position, kind in enumerate(kinds):
                projected, norm_input = seen[2 * position][1], seen[2 * position + 1][0]
                self.targets[kind].append((norm_input if self.target == "stream" else projected)[valid])
            self.dense_next[index] = seen[-1][1]

    def inputs(self, model: PreTrainedModel, kind: str, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pruned model's input to its ``kind`` projection of layer ``self.layer`` on batch
        ``index``, valid tokens only (``[N_b, k]``), and with ``target="stream"`` the residual
        ``[N_b, D]`` that the pruned model adds to that projection's output (else None)."""
        projection = _projection(model, self.layer, kind)
        capture: list[nn.Module] = [projection]
        if self.target == "stream":
            capture.append(instrument.sublayer_norm(model, self.layer, kind))
        seen = self._forward(model, self.model_states[index], index, capture)
        valid = self.valid(index)
        if self.target != "stream":
            return seen[0][0][valid], None
        return seen[0][0][valid], (seen[1][0] - seen[0][1])[valid]

    def advance(self, model: PreTrainedModel) -> None:
        """Move both models on to the next layer (call ``run_dense`` for this layer first)."""
        block = instrument.encoder_layers(model)[self.layer]
        self.model_states = [self._forward(model, s, i, [block])[0][1] for i, s in enumerate(self.model_states)]
        self.dense_states, self.dense_next = self.dense_next, [None] * len(self.batches)
        self.targets = {}
        self.layer += 1


@dataclass
class _Sums:
    """Normal-equation sums of the augmented system ``A = [X, 1]`` against ``Y``."""

    gram: torch.Tensor  # [k+1, k+1]  A^T A
    cross: torch.Tensor  # [k+1, D]    A^T Y
    energy: float  # ||Y||^2
    tokens: int

    def error(self, theta: torch.Tensor) -> float:
        """``||A theta - Y||^2`` for ``theta = [W^T; b^T]`` ``[k+1, D]``."""
        value = (theta * (self.gram @ theta)).sum() - 2 * (theta * self.cross).sum() + self.energy
        return max(float(value), 0.0)

    def relative(self, theta: torch.Tensor, dense_bias: torch.Tensor) -> float:
        """The error relative to ``||Y - b_dense||^2`` (the dense projection's contribution)."""
        total_y = self.cross[-1]  # sum of Y over tokens (the ones column)
        contribution = self.energy - 2 * float(dense_bias @ total_y) + self.tokens * float(dense_bias @ dense_bias)
        return self.error(theta) / contribution if contribution > 0 else 0.0


def _sums(model: PreTrainedModel, kind: str, rows: _Rows) -> _Sums:
    """Normal-equation sums for the ``kind`` projection of layer ``rows.layer`` (``run_dense`` done)."""
    projection = _projection(model, rows.layer, kind)
    k = projection.in_features
    gram = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    cross = torch.zeros(k + 1, projection.out_features, dtype=torch.float64)
    energy, tokens = 0.0, 0
    for index in range(len(rows.batches)):
        inputs, residual = rows.inputs(model, kind, index)
        target = rows.targets[kind][index].double().cpu()  # [N, D]
        if residual is not None:  # "stream": what the projection must add to the pruned residual
            target = target - residual.double().cpu()
        inputs = inputs.double().cpu()  # [N, k]
        augmented = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)
        gram += augmented.T @ augmented
        cross += augmented.T @ target
        energy += float(target.square().sum())
        tokens += len(inputs)
    return _Sums(gram, cross, energy, tokens)


def _solve(sums: _Sums, ridge: float) -> tuple[torch.Tensor, float]:
    """The ridge solution ``[W^T; b^T]`` ``[k+1, D]`` (bias unpenalised) and the absolute ``lam``."""
    k = sums.gram.shape[0] - 1
    lam = ridge * float(sums.gram.diagonal()[:k].mean()) if k else 0.0
    system = sums.gram.clone()
    system.diagonal()[:k] += lam
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        theta = torch.cholesky_solve(sums.cross, factor)
    else:  # singular (ridge 0 with dependent features): the minimum-norm least-squares solution
        theta = torch.linalg.lstsq(system, sums.cross, driver="gelsd").solution
    return theta, lam


def _current(projection: nn.Linear) -> torch.Tensor:
    weight = projection.weight.detach().double().cpu()  # [D, k]
    bias = projection.bias.detach().double().cpu() if projection.bias is not None else torch.zeros(weight.shape[0])
    return torch.cat([weight.T, bias.double()[None, :]], dim=0)


def _write(projection: nn.Linear, theta: torch.Tensor) -> None:
    with torch.no_grad():
        weight = projection.weight
        weight.copy_(theta[:-1].T.to(dtype=weight.dtype, device=weight.device))
        projection.bias.copy_(theta[-1].to(dtype=projection.bias.dtype, device=projection.bias.device))


def pruned_sublayers(
    model: PreTrainedModel, dense: PreTrainedModel, sublayers: Iterable[str] = SUBLAYERS
) -> list[tuple[int, str]]:
    """``(layer, kind)`` of every sub-layer whose output projection has fewer input features than
    the dense model's, bottom-up (attention before feed-forward within a layer)."""
    kinds = set(sublayers)
    out = []
    for layer in range(len(instrument.encoder_layers(model))):
        for kind in SUBLAYERS:
            if kind not in kinds:
                continue
            kept, full = _projection(model, layer, kind).in_features, _projection(dense, layer, kind).in_features
            if kept > full:
                raise HeadpruneError(f"layer {layer} {kind}: the pruned model is wider than the dense reference")
            if kept < full:
                out.append((layer, kind))
    return out


def _check(model: PreTrainedModel, dense: PreTrainedModel, ridge: float, sublayers: Sequence[str]) -> None:
    if dense is model:
        raise HeadpruneError("refit needs the dense model as a separate reference, not the pruned model itself")
    if instrument.model_family(dense) is not instrument.model_family(model) or len(
        instrument.encoder_layers(dense)
    ) != len(instrument.encoder_layers(model)):
        raise HeadpruneError("the dense reference model has another architecture than the pruned one")
    if not ridge >= 0:
        raise HeadpruneError(f"ridge must be >= 0, got {ridge}")
    unknown = sorted(set(sublayers) - set(SUBLAYERS))
    if unknown or not sublayers:
        raise HeadpruneError(f"sublayers must be a non-empty subset of {list(SUBLAYERS)}, got {list(sublayers)}")
    if any(mask is not None for mask in instrument.get_head_mask(model)):
        raise HeadpruneError("refit changes weights: bake the head mask into the model first (prune.surgery.bake_mask)")
    if any(mask is not None for mask in instrument.get_neuron_mask(model)):
        raise HeadpruneError("refit changes weights: remove the masked neurons from the model first")
    for layer in range(len(instrument.encoder_layers(model))):
        for kind in sublayers:
            if _projection(model, layer, kind).bias is None:
                raise HeadpruneError(f"layer {layer} {kind}: the output projection has no bias to refit")


def _units(model: PreTrainedModel, layer: int, kind: str) -> int:
    width = _projection(model, layer, kind).in_features
    return width // instrument.head_size(model) if kind == "attention" else width


def _refit_one(
    model: PreTrainedModel, dense: PreTrainedModel, kind: str, rows: _Rows, checks: _Rows | None, ridge: float
) -> SublayerRefit:
    """Refit the ``kind`` projection of layer ``rows.layer`` (guarded by ``checks``); in place."""
    began = time.perf_counter()
    layer = rows.layer
    projection = _projection(model, layer, kind)
    dense_bias = _current(_projection(dense, layer, kind))[-1]
    sums = _sums(model, kind, rows)
    previous = _current(projection)
    theta, lam = _solve(sums, ridge)
    if not bool(torch.isfinite(theta).all()):
        raise HeadpruneError(f"layer {layer} {kind}: the least-squares solve did not give finite weights")
    record = SublayerRefit(
        layer=layer, kind=kind, units=_units(model, layer, kind), original_units=_units(dense, layer, kind),
        calibration_before=sums.relative(previous, dense_bias), calibration_after=sums.relative(theta, dense_bias),
        held_out_before=None, held_out_after=None, action="applied", lam=lam, seconds=0.0,
    )
    if checks is not None:
        check = _sums(model, kind, checks)
        record.held_out_before = check.relative(previous, dense_bias)
        record.held_out_after = check.relative(theta, dense_bias)
        if record.held_out_after > record.held_out_before:
            record.action = "kept"
    if record.applied:
        _write(projection, theta)
    record.seconds = round(time.perf_counter() - began, 3)
    log.debug(
        "layer %d %s (%d units%s): relative error %.4f -> %.4f, %s",
        layer, kind, record.units, ", bias only" if record.units == 0 else "",
        record.calibration_before, record.calibration_after, record.action,
    )
    return record


def refit(
    model: PreTrainedModel,
    dense: PreTrainedModel,
    calibration: Sequence[dict[str, torch.Tensor]],
    *,
    held_out: Sequence[dict[str, torch.Tensor]] | None = None,
    ridge: float = 1e-3,
    sublayers: Sequence[str] = SUBLAYERS,
    target: str = "stream",
    first_token: bool = True,
    progress: bool = True,
) -> RefitResult:
    """Refit the output projection (weight and bias) of every pruned sub-layer of ``model``, in
    place, bottom-up, by ridge least squares against ``dense`` (see the module docstring).

    Args:
        model: a physically pruned model (heads and/or feed-forward neurons removed); no persistent
            head mask (bake it first). Changed in place.
        dense: the unpruned reference, same family and depth; not changed.
        calibration: tokenizer batches (a few hundred training rows). Both models' hidden states
            entering the current layer are kept per batch (``[B, T, D]`` each, see ``_Rows``).
        held_out: optional tokenizer batches for the guard: a refit that raises the relative error
            on them is not applied.
        ridge: relative ridge strength: ``lam = ridge * mean(diag(X^T X))`` (bias unpenalised).
        sublayers: which kinds to refit, a subset of ``("attention", "ffn")``.
        target: what a refit projection reproduces (module docstring): ``"sublayer"``, the dense
            projection's output; ``"stream"``, the dense residual stream entering the LayerNorm
            after it (the projection also absorbs the drift of the pruned residual).
        first_token: fit the last layer on the first token of each row only, when the model's
            head reads nothing else (``instrument.reads_first_token_only``); other heads: ignored.
        progress: show a progress bar over the sub-layers.

    Returns:
        ``RefitResult`` with one ``SublayerRefit`` per pruned sub-layer.
    """
    started = time.perf_counter()
    sublayers = tuple(sublayers)
    _check(model, dense, ridge, sublayers)
    if target not in TARGETS:
        raise HeadpruneError(f"refit target must be one of {', '.join(TARGETS)}, got {target!r}")
    calibration = [validate_inputs(model, b) for b in calibration]
    if not calibration:
        raise HeadpruneError("refit needs at least one calibration batch")
    guard = [validate_inputs(model, b) for b in held_out] if held_out is not None else []
    if held_out is not None and not guard:
        raise HeadpruneError("held_out was given but has no batches (pass None for no guard)")
    targets = pruned_sublayers(model, dense, sublayers)
    modes = model.training, dense.training
    model.eval()
    dense.eval()
    records: list[SublayerRefit] = []
    last = len(instrument.encoder_layers(model)) - 1
    first_token_layer = last if first_token and instrument.reads_first_token_only(model) else None
    rows = _Rows(calibration, target, first_token_layer)
    checks = _Rows(guard, target, first_token_layer) if guard else None
    cached = [r for r in (rows, checks) if r is not None]
    bar = tqdm(total=len(targets), desc="refitting sub-layers", unit="sub-layer", disable=not progress)
    try:
        for layer in range(targets[-1][0] + 1 if targets else 0):
            kinds = [kind for at, kind in targets if at == layer]
            for r in cached:
                r.run_dense(dense, kinds)
            for kind in kinds:
                record = _refit_one(model, dense, kind, rows, checks, ridge)
                records.append(record)
                bar.set_postfix_str(f"L{layer} {kind} {record.calibration_before:.3f}->{record.calibration_after:.3f}")
                bar.update(1)
            if layer < targets[-1][0]:  # the next layer's inputs, from this (now repaired) layer
                for r in cached:
                    r.advance(model)
    finally:
        bar.close()
        model.train(modes[0])
        dense.train(modes[1])
    kept = sum(not r.applied for r in records)
    if kept:
        log.info("refit: the guard kept the previous weights of %d of %d sub-layers", kept, len(records))
    return RefitResult(
        sublayers=records,
        examples=sum(int(b["input_ids"].shape[0]) for b in calibration),
        tokens=sum(int(b["attention_mask"].sum()) for b in calibration),
        held_out_examples=sum(int(b["input_ids"].shape[0]) for b in guard),
        held_out_tokens=sum(int(b["attention_mask"].sum()) for b in guard),
        seconds=round(time.perf_counter() - started, 3),
        options={"ridge": ridge, "sublayers": list(sublayers), "guard": bool(guard), "bias": "unpenalised",
                 "target": target, "first_token": first_token_layer is not None},
    )
