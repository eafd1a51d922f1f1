"""Head-importance criteria and :func:`head_importance`, which runs one over a data set.

Criteria are pluggable (as in Torch-Pruning): a subclass of :class:`Criterion` registered with
:func:`register_criterion` gives per-example scores ``[B, L, H]``; ``head_importance`` streams
batches through it, reduces to ``[L, H]`` (mean or sum over examples) and wraps the result in a
:class:`~attribution.scores.HeadScores` with provenance. Nothing of size ``[B, L, H, T, T]`` is
kept beyond one layer of one batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from attribution import instrument
from attribution.attattr import AttAttr
from attribution.core.errors import HeadpruneError
from attribution.core.inputs import inference_setup, resolve_target, validate_inputs
from attribution.scores import HeadScores

CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make a criterion available to ``head_importance(method=cls.name)``."""
    CRITERIA[cls.name] = cls
    return cls


def _scatter_heads(model: PreTrainedModel, per_layer: dict[int, torch.Tensor], batch_size: int) -> torch.Tensor:
    """``{layer: [B, H_l]}`` in current heads -> ``[B, L, H]`` in original heads (absent heads 0)."""
    kept = instrument.kept_heads(model)
    out = torch.zeros(batch_size, len(kept), instrument.original_num_heads(model), dtype=torch.float64)
    for layer, values in per_layer.items():
        if kept[layer]:
            out[:, layer, kept[layer]] = values.detach().double().cpu()
    return out


class Criterion:
    """Base class. ``per_example`` returns ``[B, L, H]``; ``reduction`` says how examples combine."""

    name: ClassVar[str] = ""
    reduction: ClassVar[str] = "mean"  # "mean" or "sum" over examples
    needs_data: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        if options:
            raise HeadpruneError(f"criterion {self.name!r} takes no option(s) {', '.join(sorted(options))}")

    def options(self) -> dict[str, Any]:
        """Settings recorded in the provenance."""
        return {}

    def per_example(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def finalize(self, values: torch.Tensor) -> torch.Tensor:
        """Post-process the reduced ``[L, H]`` (e.g. per-layer normalisation)."""
        return values


@register_criterion
class AttAttrCriterion(Criterion):
    """AttAttr (Hao et al.): mean over examples of the max over token pairs of each head's
    attribution (signed max, padding excluded)."""

    name = "attattr"

    def __init__(
        self,
        n_steps: int = 20,
        method: str = "riemann_right",
        output: str = "probability",
        target: str = "predicted",
        internal_batch_size: int | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        if target not in ("predicted", "gold"):
            raise HeadpruneError(f"attattr target must be 'predicted' or 'gold', got {target!r}")
        self.n_steps, self.method, self.output, self.target = n_steps, method, output, target
        self.internal_batch_size = internal_batch_size
        self.autocast_dtype = autocast_dtype
        self.deltas: list[torch.Tensor] = []  # [B, L] per batch, relative completeness errors

    def options(self) -> dict[str, Any]:
        return {"n_steps": self.n_steps, "method": self.method, "output": self.output, "target": self.target}

    def per_example(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        target = batch.get("labels") if self.target == "gold" else None
        if self.target == "gold" and target is None:
            raise HeadpruneError("attattr with target='gold' needs labels in the batch")
        mask = batch["attention_mask"].bool() if "attention_mask" in batch else None
        explainer = AttAttr(model, output=self.output)
        scores, deltas = [], []
        for result in explainer.iter_layers(
            batch, target, self.n_steps, self.method, None, self.internal_batch_size, self.autocast_dtype
        ):
            attr = result.attributions  # [B, H, T, T]
            if mask is not None:
                pair = (mask[:, :, None] & mask[:, None, :])[:, None].to(attr.device)
                attr = attr.masked_fill(~pair, float("-inf"))
            scores.append(attr.flatten(2).max(dim=-1).values)
            gap = (result.full - result.baseline).abs().clamp_min(1e-12)
            deltas.append((result.delta.abs() / gap).cpu())
        self.deltas.append(torch.stack(deltas, dim=1))
        out = torch.stack(scores, dim=1).double().cpu()  # [B, L, H]
        pruned = torch.ones_like(out, dtype=torch.bool)
        for layer, heads in enumerate(instrument.kept_heads(model)):
            pruned[:, layer, heads] = False
        return out.masked_fill(pruned, 0.0)


class _GateGradient(Criterion):
    """Shared by Taylor and Fisher: per-example ``dL/dxi_h`` through head gates fixed at 1."""

    def gate_gradients(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = validate_inputs(model, batch)
        bsz = inputs["input_ids"].shape[0]
        sizes = instrument.heads_per_layer(model)
        device = inputs["input_ids"].device
        gates = {
            layer: torch.ones(bsz, size, device=device, requires_grad=True)
            for layer, size in enumerate(sizes)
            if size
        }
        with inference_setup(model), instrument.AttentionProbe(model) as probe, torch.enable_grad():
            probe.gates.update(gates)
            logits = model(**inputs).logits.float()
            labels = batch.get("labels")
            labels = resolve_target(None if labels is None else labels.to(device), logits)
            # Summed loss: examples are independent, so dL/dgate[b] is example b's own gradient.
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            grads = torch.autograd.grad(loss, list(gates.values()))
        return _scatter_heads(model, dict(zip(gates, grads, strict=True)), bsz)


@register_criterion
class TaylorCriterion(_GateGradient):
    """Michel et al. (2019): ``E_x |dL/dxi_h|`` with L the cross-entropy (gold labels when the batch
    has them, else predictions); each layer normalised to unit L2 norm by default."""

    name = "taylor"

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize

    def options(self) -> dict[str, Any]:
        return {"normalize": self.normalize}

    def per_example(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.gate_gradients(model, batch).abs()

    def finalize(self, values: torch.Tensor) -> torch.Tensor:
        if not self.normalize:
            return values
        norms = values.norm(dim=1, keepdim=True)
        return values / torch.where(norms > 0, norms, torch.ones_like(norms))


@register_criterion
class FisherCriterion(_GateGradient):
    """Kwon et al. (2022): ``sum_x (dL/dxi_h)^2``, the diagonal of the empirical Fisher of the mask."""

    name = "fisher"
    reduction = "sum"

    def per_example(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.gate_gradients(model, batch).square()


@register_criterion
class AttentionCriterion(Criterion):
    """Mean over examples of the head's largest attention probability (padding excluded)."""

    name = "attention"

    def per_example(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = validate_inputs(model, batch)
        query_valid = inputs["attention_mask"].bool()[:, None, :, None]
        with inference_setup(model), instrument.AttentionProbe(model, capture=True) as probe, torch.no_grad():
            model(**inputs)
            peaks = {
                layer: probs.masked_fill(~query_valid, 0.0).flatten(2).max(dim=-1).values
                for layer, probs in probe.attentions.items()
            }
        return _scatter_heads(model, peaks, inputs["input_ids"].shape[0])


@register_criterion
class RandomCriterion(Criterion):
    """Seeded uniform random scores: the baseline every criterion must beat."""

    name = "random"
    needs_data = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def scores(self, model: PreTrainedModel) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        layers = len(instrument.encoder_layers(model))
        values = torch.rand(layers, instrument.original_num_heads(model), generator=generator, dtype=torch.float64)
        for layer, heads in enumerate(instrument.kept_heads(model)):
            absent = [h for h in range(values.shape[1]) if h not in heads]
            values[layer, absent] = 0.0
        return values


def make_criterion(method: str, /, **options: Any) -> Criterion:
    """Instantiate a registered criterion; a clear error for unknown names or options."""
    if method not in CRITERIA:
        raise HeadpruneError(f"unknown head-importance method {method!r}; choose one of {', '.join(CRITERIA)}")
    try:
        return CRITERIA[method](**options)
    except TypeError as error:
        raise HeadpruneError(f"bad option for {method!r}: {error}") from None


Reducer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def head_importance(
    model: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    method: str = "attattr",
    /,  # positional-only, so a criterion's own ``method`` option (attattr's quadrature) can pass
    *,
    max_examples: int | None = None,
    progress: bool = True,
    reduce: Reducer | None = None,
    total: int | None = None,
    **options: Any,
) -> HeadScores:
    """Score every head of ``model`` on ``batches`` (tokenizer batches; ``labels`` used when present).

    Args:
        method: a registered criterion: ``attattr``, ``taylor``, ``fisher``, ``attention``, ``random``...
        max_examples: stop after this many examples (the last batch is cut).
        reduce: combines ``(sum [L, H], count [])`` across processes (see ``prune.distributed``).
        total: number of examples for the progress bar, when ``batches`` has no ``len``.
        options: passed to the criterion (e.g. ``n_steps``, ``method`` for attattr).

    Returns:
        ``HeadScores`` with ``values`` ``[L, H]``.
    """
    instrument.model_family(model)
    criterion = make_criterion(method, **options)
    started = time.perf_counter()
    layers = len(instrument.encoder_layers(model))
    heads = instrument.original_num_heads(model)
    summed = torch.zeros(layers, heads, dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    if isinstance(criterion, RandomCriterion):
        summed, count = criterion.scores(model), torch.ones((), dtype=torch.float64)
    else:
        bar = tqdm(total=max_examples or total, desc=f"scoring heads ({method})", unit="ex", disable=not progress)
        for batch in batches:
            if max_examples is not None and count >= max_examples:
                break
            if max_examples is not None:
                keep = int(max_examples - count)
                batch = {k: v[:keep] for k, v in batch.items()}
            values = criterion.per_example(model, batch)
            summed += values.sum(dim=0)
            count += values.shape[0]
            bar.update(values.shape[0])
        bar.close()
        if reduce is not None:
            summed, count = reduce(summed, count)
        if count == 0:
            raise HeadpruneError("no examples to score heads on")
    values = summed / count if criterion.reduction == "mean" else summed
    values = criterion.finalize(values)
    provenance: dict[str, Any] = {
        "model": getattr(model.config, "_name_or_path", "") or model.config.model_type,
        "model_type": model.config.model_type,
        "examples": int(count) if criterion.needs_data else 0,
        "options": criterion.options(),
        "kept_heads": instrument.kept_heads(model),
        "seconds": round(time.perf_counter() - started, 3),
        **_versions(),
    }
    if isinstance(criterion, AttAttrCriterion) and criterion.deltas:
        relative = torch.cat(criterion.deltas).flatten()
        provenance["relative_completeness_error"] = {
            "median": float(relative.median()),
            "p90": float(torch.quantile(relative.double(), 0.9)),
        }
    return HeadScores(values, method, provenance)


def _versions() -> dict[str, str]:
    import transformers

    from attribution import __version__

    return {"headprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


# Criteria defined with their methods elsewhere register on import; importing them here makes
# CRITERIA complete whenever this module is loaded (they import only names defined above).
from attribution import disentangled, relevance  # noqa: E402, F401
