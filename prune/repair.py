"""Retraining-free repair of a pruned model (after Kwon et al., NeurIPS 2022).

After heads are dropped, each pruned layer's attention output is rescaled to match the dense
model's on calibration data. Choice made here: **one scalar per surviving head** (Kwon et al.'s
mask-value tuning), not one per head and output dimension: a scalar per head is exactly a gate
value, so a masked model stores the scales in its head mask, a physically pruned model folds them
into its output-projection columns, and the two stay identical. (A per-dimension scale would have
``H_l * D`` unknowns per layer — enough to overfit a few hundred calibration examples — and could
not be expressed as a gate.)

For a pruned layer l, with ``u_h = W_o^h c_h`` the contribution of surviving head h to the
attention output (``c_h`` its context vectors, ``W_o^h`` its columns of the output projection) and
``y`` the dense model's attention output minus the projection bias, over all non-padding tokens of
the calibration batches:

    s* = argmin_s || sum_h s_h u_h - y ||^2          (normal equations, [H_l x H_l], float64)

Layers are repaired bottom-up and each layer's ``u_h`` are computed on the hidden states of the
already-repaired pruned model (Kwon et al.'s layer-wise reconstruction), while ``y`` comes from
the dense model on the same inputs — so later layers also compensate for drift from below. Since
``s = 1`` (no repair) is one of the candidates, the least-squares optimum never has a larger
reconstruction error on the calibration data; a numerically worse solve falls back to 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError
from attribution.core.inputs import validate_inputs
from attribution.core.io import Record, timing_field
from attribution.core.log import get_logger
from prune.surgery import fold_head_scales

log = get_logger("repair")


@dataclass
class LayerRepair:
    """One repaired layer: surviving ``heads`` (original indices), the ``scales`` applied to them,
    and the attention-output reconstruction error (mean squared error per element over the
    calibration tokens) without and with the scales; ``target_energy`` is the mean square of the
    dense output (minus bias), for relative errors. Stored inside a ``RepairResult`` record (not a
    file of its own, so its JSON has no format tag)."""

    layer: int
    heads: list[int]
    scales: list[float]
    error_before: float
    error_after: float
    target_energy: float
    applied_as: str  # "gates" (masked model) or "weights" (folded into the output projection)

    @property
    def relative_before(self) -> float:
        return self.error_before / self.target_energy if self.target_energy > 0 else 0.0

    @property
    def relative_after(self) -> float:
        return self.error_after / self.target_energy if self.target_energy > 0 else 0.0


@dataclass
class RepairResult(Record):
    """What ``repair`` did: per-layer scales and errors, and the metric before/after if measured.
    Saved as a ``headprune.RepairResult`` record (``save``/``load``, ``to_dict``/``from_dict``)."""

    FORMAT: ClassVar[str] = "headprune.RepairResult"
    VERSION: ClassVar[int] = 1

    layers: list[LayerRepair]
    examples: int
    tokens: int
    seconds: float = timing_field()  # in memory only: the file holds what was computed
    metric_before: dict[str, float] | None = None
    metric_after: dict[str, float] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lines = []
        for r in self.layers:
            lines.append(
                f"layer {r.layer}: {len(r.heads)} heads, relative error {r.relative_before:.4f} -> "
                f"{r.relative_after:.4f}, scales {min(r.scales):.3f}..{max(r.scales):.3f}"
            )
        if self.metric_before is not None and self.metric_after is not None:
            for name, before in self.metric_before.items():
                lines.append(f"{name}: {before:.4f} -> {self.metric_after.get(name, float('nan')):.4f}")
        return "\n".join(lines)


class _Stop(Exception):
    """Raised from a hook once the layer of interest has been seen: nothing above it is needed."""


def _capture(model: PreTrainedModel, layer: int, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` up to layer ``layer``'s output projection; return its input ``[B, T, H_l d_h]``
    and output ``[B, T, D]``."""
    projection = instrument.output_projection(model, layer)
    seen: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["input"], seen["output"] = args[0].detach(), output.detach()
        raise _Stop

    handle = projection.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(**batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "output" not in seen:
        raise HeadpruneError(f"layer {layer}'s output projection was not reached")
    return seen["input"], seen["output"]


def _pruned_layers(model: PreTrainedModel) -> list[int]:
    heads = instrument.original_num_heads(model)
    out = []
    for layer, (kept, gate) in enumerate(
        zip(instrument.kept_heads(model), instrument.get_head_mask(model), strict=True)
    ):
        if len(kept) < heads or (gate is not None and bool((gate == 0).any())):
            out.append(layer)
    return out


def _error(s: torch.Tensor, gram: torch.Tensor, rhs: torch.Tensor, energy: torch.Tensor) -> float:
    """``|| sum_h s_h u_h - y ||^2`` from the normal-equation sums."""
    return float((s @ gram @ s - 2 * s @ rhs + energy).clamp_min(0.0))


class _DenseView:
    """The dense reference: a separate model, or ``model`` itself with its head mask lifted."""

    def __init__(self, model: PreTrainedModel, dense: PreTrainedModel | None) -> None:
        self.model, self.dense = model, dense

    def capture(self, layer: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.dense is not None:
            return _capture(self.dense, layer, batch)[1]
        saved = instrument.get_head_mask(self.model)
        # keep the eager implementation (no SDPA switch) while the mask is lifted: identical math
        with instrument.AttentionProbe(self.model):
            instrument.set_head_mask(self.model, None)
            try:
                return _capture(self.model, layer, batch)[1]
            finally:
                instrument.set_head_mask(self.model, saved)


def repair(
    model: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    dense: PreTrainedModel | None = None,
    layers: list[int] | None = None,
    metric_fn: Callable[[PreTrainedModel], dict[str, float] | float] | None = None,
    ridge: float = 0.0,
    progress: bool = True,
) -> RepairResult:
    """Rescale the surviving heads of every pruned layer by least squares (see module docstring).

    Args:
        model: a masked (persistent head mask) and/or physically pruned model; changed in place.
            Layers with a mask get the scales multiplied into their gates; layers without one have
            them folded into the output projection.
        batches: calibration tokenizer batches (e.g. a few hundred training examples); read once
            per pruned layer, so they are materialised as a list.
        dense: the unpruned reference model. Needed when heads were physically removed; for a
            masked-only model the default is ``model`` with its mask lifted.
        layers: restrict to these layers (default: every layer that lost a head).
        metric_fn: optional ``model -> metric(s)`` (higher is better) measured before and after.
        ridge: optional Tikhonov term added to the normal equations (0 = plain least squares).

    Returns:
        ``RepairResult`` with per-layer scales and reconstruction errors.
    """
    started = time.perf_counter()
    instrument.model_family(model)
    batches = [validate_inputs(model, b) for b in batches]
    if not batches:
        raise HeadpruneError("repair needs at least one calibration batch")
    if ridge < 0:
        raise HeadpruneError(f"ridge must be >= 0, got {ridge}")
    original = instrument.original_num_heads(model)
    if dense is None and any(len(k) < original for k in instrument.kept_heads(model)):
        raise HeadpruneError("heads were physically removed from this model: pass the dense model as dense=")
    if dense is not None:
        if instrument.model_family(dense) is not instrument.model_family(model) or len(
            instrument.encoder_layers(dense)
        ) != len(instrument.encoder_layers(model)):
            raise HeadpruneError("the dense reference model has another architecture than the pruned one")
        dense.eval()
    targets = _pruned_layers(model)
    if layers is not None:
        targets = [layer for layer in targets if layer in set(layers)]
    was_training = model.training
    model.eval()

    def measure() -> dict[str, float] | None:
        if metric_fn is None:
            return None
        value = metric_fn(model)
        return dict(value) if isinstance(value, dict) else {"metric": float(value)}

    metric_before = measure()
    reference = _DenseView(model, dense)
    d_h = instrument.head_size(model)
    results: list[LayerRepair] = []
    tokens_total = 0
    for layer in tqdm(targets, desc="repairing layers", unit="layer", disable=not progress):
        kept = instrument.kept_heads(model)[layer]
        gate = instrument.get_head_mask(model)[layer]
        active = [p for p in range(len(kept)) if gate is None or gate[p] != 0]
        if not active:
            continue  # nothing survives: the layer is just the output bias
        n = len(active)
        gram = torch.zeros(n, n, dtype=torch.float64)
        rhs = torch.zeros(n, dtype=torch.float64)
        energy = torch.zeros((), dtype=torch.float64)
        tokens = 0
        projection = instrument.output_projection(model, layer)
        weight = projection.weight.detach().double().cpu()  # [D, H_l * d_h]
        bias = projection.bias.detach().double().cpu() if projection.bias is not None else 0.0
        for batch in batches:
            valid = batch["attention_mask"].bool().cpu()
            target = reference.capture(layer, batch).double().cpu()[valid] - bias  # [N, D]
            context, _ = _capture(model, layer, batch)
            context = context.double().cpu()[valid]  # [N, H_l * d_h]
            contributions = torch.stack(
                [context[:, p * d_h : (p + 1) * d_h] @ weight[:, p * d_h : (p + 1) * d_h].T for p in active], dim=1
            )  # [N, n, D]
            gram += torch.einsum("thd,tkd->hk", contributions, contributions)
            rhs += torch.einsum("thd,td->h", contributions, target)
            energy += target.square().sum()
            tokens += int(valid.sum())
        tokens_total = max(tokens_total, tokens)
        ones = torch.ones(n, dtype=torch.float64)

        system = gram + ridge * torch.eye(n, dtype=torch.float64)
        scales = torch.linalg.lstsq(system, rhs[:, None], driver="gelsd").solution[:, 0]
        before, after = _error(ones, gram, rhs, energy), _error(scales, gram, rhs, energy)
        if not torch.isfinite(scales).all() or after > before:
            log.debug("layer %d: the least-squares scales do not lower the error; keeping 1", layer)
            scales, after = ones, before
        elements = tokens * weight.shape[0]
        full = torch.ones(len(kept), dtype=torch.float64)
        full[active] = scales
        if gate is not None:
            new_mask = list(instrument.get_head_mask(model))
            new_mask[layer] = (gate.double().cpu() * full).float()
            instrument.set_head_mask(model, new_mask)
            applied = "gates"
        else:
            fold_head_scales(model, layer, full)
            applied = "weights"
        record = LayerRepair(
            layer=layer,
            heads=[kept[p] for p in active],
            scales=[float(x) for x in scales],
            error_before=before / elements,
            error_after=after / elements,
            target_energy=float(energy) / elements,
            applied_as=applied,
        )
        results.append(record)
        log.debug(
            "repaired layer %d (%d heads, as %s): relative error %.4f -> %.4f",
            layer, n, applied, record.relative_before, record.relative_after,
        )
    metric_after = measure()
    model.train(was_training)
    return RepairResult(
        layers=results,
        examples=sum(int(b["input_ids"].shape[0]) for b in batches),
        tokens=tokens_total,
        seconds=round(time.perf_counter() - started, 3),
        metric_before=metric_before,
        metric_after=metric_after,
        options={"ridge": ridge, "scales": "per head", "dense": "separate model" if dense is not None else "unmasked"},
    )
