"""Token-level relevance: which input tokens a sequence classifier's decision rests on.

Every method has the same captum-like interface::

    relevance = Method(model, **options).attribute(inputs, target=None)   # [B, T]

``inputs`` is a tokenizer batch (``input_ids`` ``[B, T]``, ``attention_mask``, ``token_type_ids``);
``target`` is the class to explain (None: the predicted class; an int; or ``[B]`` class ids). The
result is float32 ``[B, T]`` on the model's device, higher = more relevant, exactly zero on padding.
Special tokens ([CLS], [SEP]) get values like any other token; callers that show or delete words
skip them. Each example is explained independently: a batch gives the same values as its examples
one by one (up to float error).

Methods (``RELEVANCE_METHODS``, by name):

- ``attention`` :class:`RawAttention` -- last layer's [CLS] row, mean over heads.
- ``rollout`` :class:`AttentionRollout` (Abnar & Zuidema 2020).
- ``gae`` :class:`GenericAttentionExplainability` (Chefer, Gur & Wolf, ICCV 2021).
- ``grad_attention`` :class:`GradAttentionProduct` -- gradient x attention, multiplied over layers.
- ``tokentm`` :class:`TokenTM` (Wu et al., CVPR 2024), re-implemented from the paper's definitions.
- ``attattr`` :class:`AttAttrRelevance` -- token relevance from self-attention attribution.
- ``ig`` :class:`IntegratedGradientsEmbeddings` -- captum's integrated gradients on the word
  embeddings, the standard reference.
- ``random`` :class:`Random` -- seeded per example, the baseline every method must beat.

The attention-based methods read attention probabilities ``A_l`` ``[B, H_l, T, T]`` (and their
gradients ``dF/dA_l`` of the target logit, upper layers recomputing as usual) through
``instrument.AttentionProbe``. Physically pruned heads are simply absent; a layer left with no
heads mixes no tokens and is skipped (treated as the identity). The pure functions of
:mod:`attribution.relevance_rules` (:func:`rollout`, :func:`generic_attention_relevance`,
:func:`grad_attention_product`, :func:`token_tm`; re-exported here) take those tensors directly,
so they can be checked by hand.

Chefer's weights ``(dF/dA * A)^+`` also give the ``gradient_weighted`` head-importance criterion
(:mod:`attribution.criteria.diagnostics`): per head, their mean over token pairs.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.attattr import AttAttr
from attribution.core.errors import HeadpruneError
from attribution.core.inputs import inference_setup, resolve_target, target_output, validate_inputs
from attribution.quadrature import INTEGRATIONS
from attribution.relevance_rules import (  # noqa: F401 (chefer_weights, pair_mask: re-exported)
    chefer_weights,
    generic_attention_relevance,
    grad_attention_product,
    pair_mask,
    rollout,
    token_tm,
    transformation_weights,
)

_pair_mask = pair_mask  # the former name

Target = int | torch.Tensor | list[int] | None

RELEVANCE_METHODS: dict[str, type[TokenRelevance]] = {}


def register_relevance(cls: type[TokenRelevance]) -> type[TokenRelevance]:
    """Class decorator: make a relevance method available by ``cls.name``."""
    RELEVANCE_METHODS[cls.name] = cls
    return cls


def make_relevance(name: str, model: PreTrainedModel, **options: Any) -> TokenRelevance:
    """Instantiate a registered relevance method; a clear error for unknown names or options."""
    if name not in RELEVANCE_METHODS:
        raise HeadpruneError(f"unknown relevance method {name!r}; choose one of {', '.join(RELEVANCE_METHODS)}")
    try:
        return RELEVANCE_METHODS[name](model, **options)
    except TypeError as error:
        raise HeadpruneError(f"bad option for relevance method {name!r}: {error}") from None


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """``"all"``, ``"gae,ig"`` or a list of names -> validated method names (in registry order for all)."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    names = [n for n in names if n]
    if names == ["all"] or not names:
        return list(RELEVANCE_METHODS)
    unknown = [n for n in names if n not in RELEVANCE_METHODS]
    if unknown:
        raise HeadpruneError(
            f"unknown relevance method {unknown[0]!r}; choose 'all' or some of {', '.join(RELEVANCE_METHODS)}"
        )
    return list(dict.fromkeys(names))


def special_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's [CLS]/[SEP]/<s>/</s> ids (not [UNK] or [MASK], which stand for text)."""
    ids = {getattr(tokenizer, f"{name}_token_id", None) for name in ("cls", "sep", "bos", "eos")}
    return sorted(int(i) for i in ids if i is not None)


def default_method_options(
    tokenizer: Any, options: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Per-method options that need the tokenizer (``ig``'s baseline keeps its special ids),
    overridden by ``options``."""
    merged: dict[str, dict[str, Any]] = {"ig": {"special_ids": special_token_ids(tokenizer)}}
    for name, values in (options or {}).items():
        merged[name] = {**merged.get(name, {}), **values}
    return merged


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


class TokenRelevance:
    """Base class: ``attribute(inputs, target=None) -> [B, T]``.

    ``fixed_attention`` maps a layer to probabilities ``[B, H_l, T, T]`` used instead of the
    model's (through ``AttentionProbe.replace``): for tests with hand-computed values and
    what-if analysis. Gradients are then taken at the fixed attention.
    """

    name: ClassVar[str] = ""
    uses_gradients: ClassVar[bool] = False

    def __init__(self, model: PreTrainedModel) -> None:
        instrument.model_family(model)  # one clear error for unsupported models
        self.model = model
        self.fixed_attention: dict[int, torch.Tensor] = {}

    def options(self) -> dict[str, Any]:
        """Settings recorded with results."""
        return {}

    def attribute(self, inputs: dict[str, torch.Tensor], target: Target = None) -> torch.Tensor:
        """Relevance ``[B, T]`` of each token of ``inputs`` for ``target`` (zero on padding)."""
        raise NotImplementedError

    # ---- shared capture ------------------------------------------------------------------------

    def _replacements(self, probe: instrument.AttentionProbe, with_grad: bool) -> None:
        for layer, probs in self.fixed_attention.items():
            fixed = probs.detach().to(next(self.model.parameters()).device).float().clone()
            probe.replace[layer] = fixed.requires_grad_(True) if with_grad else fixed
        if with_grad:
            # Parameters do not require grad here, so the lowest attention would not either: make it
            # a leaf that does; every higher layer then depends on it and keeps its full gradient.
            def as_leaf(probs: torch.Tensor) -> torch.Tensor:
                return probs if probs.requires_grad else probs.detach().requires_grad_(True)

            for layer in range(len(instrument.encoder_layers(self.model))):
                probe.replace.setdefault(layer, as_leaf)

    def _attentions(self, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """Per layer ``[B, H_l, T, T]`` (None for layers with no heads) and the logits, no grad."""
        n_layers = len(instrument.encoder_layers(self.model))
        with inference_setup(self.model), instrument.AttentionProbe(self.model, capture=True) as probe:
            self._replacements(probe, with_grad=False)
            with torch.no_grad():
                logits = self.model(**batch).logits.float()
            attentions = [probe.attentions.get(layer) for layer in range(n_layers)]
        return [None if a is None else a.detach().float() for a in attentions], logits

    def _attentions_and_gradients(
        self, batch: dict[str, torch.Tensor], target: Target, output: str = "logit", hidden: bool = False
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None], torch.Tensor, Any]:
        """Attentions and ``dF/dA`` per layer (F = the target's logit by default), the target ids,
        and (with ``hidden``) the hidden states entering each layer plus the last."""
        n_layers = len(instrument.encoder_layers(self.model))
        with inference_setup(self.model), instrument.AttentionProbe(self.model, capture=True) as probe:
            self._replacements(probe, with_grad=True)
            with torch.enable_grad():
                out = self.model(**batch, output_hidden_states=hidden)
                logits = out.logits.float()
                target_ids = resolve_target(target, logits.detach())
                layers = [layer for layer in range(n_layers) if layer in probe.attentions]
                attentions = [probe.attentions[layer] for layer in layers]
                # Examples are independent, so the gradient of the summed outputs is each one's own.
                grads = torch.autograd.grad(target_output(logits, target_ids, output).sum(), attentions)
        by_layer = dict(zip(layers, zip(attentions, grads, strict=True), strict=True))
        probs = [by_layer[layer][0].detach().float() if layer in by_layer else None for layer in range(n_layers)]
        gradients = [by_layer[layer][1].float() if layer in by_layer else None for layer in range(n_layers)]
        states = [h.detach() for h in out.hidden_states] if hidden else None
        return probs, gradients, target_ids, states


@register_relevance
class RawAttention(TokenRelevance):
    """Raw attention: the last layer's ``[CLS]`` row, mean over its heads (class-agnostic; the
    target is ignored). The last layer that still has heads, if the top one was pruned away."""

    name = "attention"

    def attribute(self, inputs: dict[str, torch.Tensor], target: Target = None) -> torch.Tensor:
        batch = validate_inputs(self.model, inputs)
        attentions, _ = self._attentions(batch)
        present = [a for a in attentions if a is not None and a.shape[1] > 0]
        mask = batch["attention_mask"]
        if not present:
            return torch.zeros(mask.shape, device=mask.device)
        return present[-1].mean(dim=1)[:, 0] * mask.to(torch.float32)


@register_relevance
class AttentionRollout(TokenRelevance):
    """Attention rollout (Abnar & Zuidema 2020), see :func:`rollout`. Class-agnostic."""

    name = "rollout"

    def attribute(self, inputs: dict[str, torch.Tensor], target: Target = None) -> torch.Tensor:
        batch = validate_inputs(self.model, inputs)
        attentions, _ = self._attentions(batch)
        return rollout(attentions, batch["attention_mask"])


@register_relevance
class GenericAttentionExplainability(TokenRelevance):
    """Generic attention-model explainability (Chefer, Gur & Wolf, ICCV 2021), self-attention rule:
    ``R = I``; per layer ``R <- R + mean_h (∇A ⊙ A)^+ R`` with ∇A the gradient of the target
    logit; the ``[CLS]`` row of R. See :func:`generic_attention_relevance`."""

    name = "gae"
    uses_gradients = True

    def attribute(self, inputs: dict[str, torch.Tensor], target: Target = None) -> torch.Tensor:
        batch = validate_inputs(self.model, inputs)
        probs, grads, _, _ = self._attentions_and_gradients(batch, target)
        return generic_attention_relevance(probs, grads, batch["attention_mask"])


@register_relevance
class GradAttentionProduct(TokenRelevance):
    """Gradient x attention product across layers, see :func:`grad_attention_product`.

    Each layer's factor is the magnitude of ``mean_h (A ⊙ ∇A)`` on the ``[CLS]`` row: to first
    order, how much the target logit would move if that attention weight were removed, in either
    direction. The signed score is an option, but a product punishes it badly: a token that a
    lower layer's ``[CLS]`` row weighs *against* the target gets the smallest factor there, and
    the product ranks it last even when every later layer ranks it first (it happens for one class
    of the toy model in tests/test_relevance.py, where the signed rule finds the deciding token in
    half the examples and the magnitude in all).

    Args:
        eps: the floor after shifting each layer's scores to a minimum of 0, relative to the
            layer's range (so no token's product collapses to exactly 0).
        signed: use ``mean_h (A ⊙ ∇A)`` without the absolute value.
    """

    name = "grad_attention"
    uses_gradients = True

    def __init__(self, model: PreTrainedModel, eps: float = 1e-3, signed: bool = False) -> None:
        super().__init__(model)
        if not eps > 0:
            raise HeadpruneError(f"eps must be positive, got {eps}")
        self.eps, self.signed = eps, bool(signed)

    def options(self) -> dict[str, Any]:
        return {"eps": self.eps, "signed": self.signed}

    def attribute(self, inputs: dict[str, torch.Tensor], target: Target = None) -> torch.Tensor:
        batch = validate_inputs(self.model, inputs)
        probs, grads, _, _ = self._attentions_and_gradients(batch, target)
        return grad_attention_product(probs, grads, batch["attention_mask"], self.eps, self.signed)


@register_relevance
class TokenTM(TokenRelevance):
    """TokenTM (Wu, Duan, Kang, Tang & Yan, CVPR 2024), re-implemented for text encoders from the
    paper's definitions (no official code was found). The paper leaves these choices open; ours:

    1. *Which transformation.* Inside multi-head attention token j enters token i's output as
       ``A_h[i, j] T_h(x_j)`` with ``T_h(x_j) = v_j^h W_O^h`` (head h's value through its slice of
       the output projection, bias excluded; ``instrument.head_projections``). That per-head map
       is the transformation measured; ``x_j`` is the hidden state entering the layer (the
       attention input in these post-LayerNorm encoders). The feed-forward block, residuals and
       LayerNorms are not measured: like GAE, the aggregation treats them as the identity.
    2. *Length.* ``L_hj = ||T_h(x_j)|| / ||x_j||`` (a ratio, so it reads as the change of length).
    3. *Direction.* NECC = normalised exponential cosine correlation: a softmax over the real
       tokens of ``cos(x_j, T_h(x_j))``, times the number of real tokens (mean 1 per head).
    4. *Measure.* ``W_hj = L_hj * NECC_hj``, applied to attention column-wise: ``Ã_h[i, j] =
       A_h[i, j] W_hj``.
    5. *Head fusion and class specificity.* As in GAE: ``Ā = mean_h (∇A_h ⊙ Ã_h)^+`` with ∇A the
       gradient of the target logit w.r.t. the (untransformed) attention.
    6. *Initialisation.* ``C_0 = diag(||e_j|| / mean_k ||e_k||)``, the input tokens' lengths
       (``e`` = the embedding output), normalised so the scale of embeddings does not matter.
    7. *Aggregation.* Over all layers bottom-up ``C <- C + Ā C`` (the residual keeps C); the
       relevance is the ``[CLS]`` row of ``C_L``.
    """

    name = "tokentm"
    uses_gradients = True

    def attribute(self, inputs: dict[str, torch.Tensor], target: Target = None) -> torch.Tensor:
        batch = validate_inputs(self.model, inputs)
        probs, grads, _, states = self._attentions_and_gradients(batch, target, hidden=True)
        mask = batch["attention_mask"]
        weights: list[torch.Tensor | None] = []
        with torch.no_grad():
            for layer, layer_probs in enumerate(probs):
                if layer_probs is None:
                    weights.append(None)
                    continue
                projections = instrument.head_projections(self.model, layer, states[layer])
                weights.append(transformation_weights(states[layer], projections.transformed, mask))
        return token_tm(probs, grads, weights, states[0].float().norm(dim=-1), mask)


@register_relevance
class AttAttrRelevance(TokenRelevance):
    """Token relevance from self-attention attribution (AttAttr, Hao et al. 2021).

    ``relevance_j = sum over layers, heads and queries i of Attr[l, h, i, j]``: the attribution of
    every attention edge that reads token j (j as the key is where information comes from). Signed
    (AttAttr is signed); by per-layer completeness the total is ``sum_l (F(A_l) - F(0))``.

    Args:
        n_steps, integration: quadrature (default: 4 Gauss-Legendre nodes, median relative
            completeness error ~0.03% on MiniLM; the paper's 20 right Riemann steps are far worse).
        output: F, ``"probability"`` of the target class (the paper), ``"logit"`` or ``"loss"``.
        internal_batch_size: rows per forward pass inside AttAttr.
    """

    name = "attattr"
    uses_gradients = True

    def __init__(
        self,
        model: PreTrainedModel,
        n_steps: int = 4,
        integration: str = "gausslegendre",
        output: str = "probability",
        internal_batch_size: int | None = None,
    ) -> None:
        super().__init__(model)
        self.explainer = AttAttr(model, output=output)  # validates output
        self.n_steps, self.integration, self.output = n_steps, integration, output
        self.internal_batch_size = internal_batch_size

    def options(self) -> dict[str, Any]:
        return {"n_steps": self.n_steps, "integration": self.integration, "output": self.output}

    def attribute(self, inputs: dict[str, torch.Tensor], target: Target = None) -> torch.Tensor:
        if self.fixed_attention:
            raise HeadpruneError("attattr relevance does not support fixed_attention")
        batch = validate_inputs(self.model, inputs)
        total = torch.zeros(batch["input_ids"].shape, dtype=torch.float32, device=batch["input_ids"].device)
        for result in self.explainer.iter_layers(
            batch, target, self.n_steps, self.integration, None, self.internal_batch_size
        ):
            total += result.attributions.sum(dim=(1, 2))  # [B, H, T(query), T(key)] -> [B, T(key)]
        return total * batch["attention_mask"].to(torch.float32)


@register_relevance
class IntegratedGradientsEmbeddings(TokenRelevance):
    """Integrated gradients on the word embeddings through captum (``LayerIntegratedGradients`` on
    ``model.get_input_embeddings()``), summed over the embedding dimension: the standard reference.

    Baseline: every real non-special token replaced by the pad token, [CLS]/[SEP]-like tokens
    (``special_ids``; default: the ids the model config names, else the first and last real token)
    kept; position and segment embeddings are not interpolated.

    Args:
        n_steps, integration: captum's quadrature (its ``method``; ``gausslegendre`` is captum's
            default).
        output: F, ``"probability"`` of the target class (default) or ``"logit"``.
        internal_batch_size: rows per forward pass (default: all steps of 8 examples).
        special_ids: token ids kept in the baseline.
    """

    name = "ig"
    uses_gradients = True

    def __init__(
        self,
        model: PreTrainedModel,
        n_steps: int = 20,
        integration: str = "gausslegendre",
        output: str = "probability",
        internal_batch_size: int | None = None,
        special_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__(model)
        if output not in ("probability", "logit"):
            raise HeadpruneError(f"ig output must be 'probability' or 'logit', got {output!r}")
        if not isinstance(n_steps, int) or n_steps < 1:
            raise HeadpruneError(f"n_steps must be a positive integer, got {n_steps!r}")
        captum_rules = [m for m in INTEGRATIONS if m != "gaussradau"]  # captum has no Radau rule
        if integration not in captum_rules:
            raise HeadpruneError(f"ig integration must be one of {', '.join(captum_rules)}, got {integration!r}")
        self.n_steps, self.integration, self.output = n_steps, integration, output
        self.internal_batch_size = internal_batch_size
        self.special_ids = None if special_ids is None else [int(i) for i in special_ids]
        self.last_delta: torch.Tensor | None = None  # [B] completeness gap of the last call

    def options(self) -> dict[str, Any]:
        return {"n_steps": self.n_steps, "integration": self.integration, "output": self.output}

    def baseline_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, T]`` baseline ids: real non-special tokens -> pad id."""
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        config = self.model.config
        pad = getattr(config, "pad_token_id", None)
        pad = 0 if pad is None else int(pad)
        keep = ~mask
        if self.special_ids is not None:
            special = self.special_ids
        else:
            names = ("cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id")
            special = [getattr(config, k, None) for k in names]
            special = [int(s) for s in special if s is not None and int(s) != pad]
        if special:
            keep |= torch.isin(ids, torch.tensor(special, device=ids.device))
        else:  # no ids known: keep the first and last real token ([CLS] ... [SEP])
            lengths = mask.sum(dim=-1)
            keep[:, 0] = True
            keep[torch.arange(ids.shape[0], device=ids.device), (lengths - 1).clamp_min(0)] = True
        return torch.where(keep, ids, torch.full_like(ids, pad))

    def attribute(self, inputs: dict[str, torch.Tensor], target: Target = None) -> torch.Tensor:
        try:
            from captum.attr import LayerIntegratedGradients
        except ImportError:
            raise HeadpruneError("the 'ig' relevance method needs captum: pip install captum") from None
        if self.fixed_attention:
            raise HeadpruneError("ig relevance does not support fixed_attention")
        batch = validate_inputs(self.model, inputs)
        model = self.model
        extra_keys = [k for k in ("attention_mask", "token_type_ids") if k in batch]

        def forward(input_ids: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids=input_ids, **dict(zip(extra_keys, extra, strict=True))).logits.float()
            return torch.softmax(logits, dim=-1) if self.output == "probability" else logits

        with inference_setup(model):
            with torch.no_grad():
                target_ids = resolve_target(target, model(**batch).logits.float())
            explainer = LayerIntegratedGradients(forward, model.get_input_embeddings())
            rows = self.internal_batch_size or self.n_steps * 8
            with torch.enable_grad():
                attributions, delta = explainer.attribute(
                    batch["input_ids"],
                    baselines=self.baseline_ids(batch),
                    target=target_ids,
                    additional_forward_args=tuple(batch[k] for k in extra_keys),
                    n_steps=self.n_steps,
                    method=self.integration,
                    internal_batch_size=rows,
                    return_convergence_delta=True,
                )
        self.last_delta = delta.detach()
        return attributions.detach().float().sum(dim=-1) * batch["attention_mask"].to(torch.float32)


@register_relevance
class Random(TokenRelevance):
    """Uniform random relevance, seeded per example: the generator's seed mixes ``seed`` with the
    example's real token ids, so an example gets the same values in any batch and any run."""

    name = "random"

    def __init__(self, model: PreTrainedModel, seed: int = 0) -> None:
        super().__init__(model)
        self.seed = int(seed)

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def attribute(self, inputs: dict[str, torch.Tensor], target: Target = None) -> torch.Tensor:
        batch = validate_inputs(self.model, inputs)
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        out = torch.zeros(ids.shape, dtype=torch.float32)
        for b in range(ids.shape[0]):
            real = ids[b][mask[b]].cpu().to(torch.int64).numpy().tobytes()
            generator = torch.Generator().manual_seed(zlib.crc32(real, self.seed & 0xFFFFFFFF))
            out[b, mask[b].cpu()] = torch.rand(int(mask[b].sum()), generator=generator)
        return out.to(ids.device)

