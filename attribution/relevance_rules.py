"""The pure aggregation rules of the attention-based token-relevance methods: attention
probabilities (and their gradients) in, relevance out. Plain tensor functions, so they can be
checked by hand; :mod:`attribution.relevance` wraps them as methods."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def pair_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` -> ``[B, T, T]`` float, 1 where both tokens are real."""
    mask = mask.to(torch.float32)
    return mask[:, :, None] * mask[:, None, :]


def rollout(attentions: Sequence[torch.Tensor | None], mask: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): ``[CLS]`` row of ``prod_l (0.5 mean_h A_l + 0.5 I)``.

    Args:
        attentions: per layer bottom-up, ``[B, H_l, T, T]`` (None or ``H_l = 0``: layer skipped).
        mask: ``[B, T]`` attention mask.

    Each ``0.5 mean_h A_l + 0.5 I`` is row-renormalised (rows of padded queries are zeroed first,
    so they cannot leak mass), and the layers compose as ``R = Â_L ... Â_1``. Returns ``[B, T]``.
    """
    pair = pair_mask(mask)
    bsz, seq = mask.shape
    eye = torch.eye(seq, device=mask.device).expand(bsz, seq, seq) * mask.to(torch.float32)[:, :, None]
    joint = eye.clone()
    for probs in attentions:
        if probs is None or probs.shape[1] == 0:
            continue
        mixed = 0.5 * probs.float().mean(dim=1) * pair + 0.5 * eye
        sums = mixed.sum(dim=-1, keepdim=True)
        mixed = mixed / torch.where(sums > 0, sums, torch.ones_like(sums))
        joint = torch.bmm(mixed, joint)
    return joint[:, 0] * mask.to(torch.float32)


def chefer_weights(probs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``(grad * A)^+`` per head: ``[B, H, T, T]`` each -> ``[B, H, T, T]``."""
    return (grads.float() * probs.float()).clamp_min(0.0)


def generic_attention_relevance(
    attentions: Sequence[torch.Tensor | None], gradients: Sequence[torch.Tensor | None], mask: torch.Tensor
) -> torch.Tensor:
    """Chefer et al. (ICCV 2021), self-attention rule: ``R = I``; per layer bottom-up
    ``Ā = mean_h (∇A ⊙ A)^+`` and ``R <- R + Ā R``; returns the ``[CLS]`` row ``[B, T]``."""
    pair = pair_mask(mask)
    bsz, seq = mask.shape
    relevance = torch.eye(seq, device=mask.device).expand(bsz, seq, seq).clone()
    for probs, grads in zip(attentions, gradients, strict=True):
        if probs is None or probs.shape[1] == 0:
            continue
        weights = chefer_weights(probs, grads).mean(dim=1) * pair
        relevance = relevance + torch.bmm(weights, relevance)
    return relevance[:, 0] * mask.to(torch.float32)


def grad_attention_product(
    attentions: Sequence[torch.Tensor | None],
    gradients: Sequence[torch.Tensor | None],
    mask: torch.Tensor,
    eps: float = 1e-3,
    signed: bool = False,
) -> torch.Tensor:
    """Gradient x attention multiplied over layers.

    Per layer ``s_l = |mean_h (A ⊙ ∇A)[CLS, :]|`` (with ``signed``, without the absolute value: the
    rule as DESIGN.md §7 first wrote it) over the real tokens, shifted so its minimum is
    ``eps * (max - min)`` (``eps`` is relative, so the rule does not depend on the gradients'
    scale; a constant ``s_l`` becomes all ones and changes nothing); the product over layers is
    taken as a sum of logs and returned as ``exp(sum - max)``: the largest token gets 1, ratios are
    the product's. ``[B, T]``, zero on padding.
    """
    valid = mask.bool()
    log_sum = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for probs, grads in zip(attentions, gradients, strict=True):
        if probs is None or probs.shape[1] == 0:
            continue
        score = (probs.float() * grads.float()).mean(dim=1)[:, 0]  # [B, T]
        if not signed:
            score = score.abs()
        low = score.masked_fill(~valid, math.inf).amin(dim=-1, keepdim=True)
        high = score.masked_fill(~valid, -math.inf).amax(dim=-1, keepdim=True)
        spread = high - low
        shifted = torch.where(spread > 0, score - low + eps * spread, torch.ones_like(score))
        log_sum = log_sum + torch.log(shifted.masked_fill(~valid, 1.0))
    top = log_sum.masked_fill(~valid, -math.inf).amax(dim=-1, keepdim=True)
    return torch.exp(log_sum - top).masked_fill(~valid, 0.0)


def transformation_weights(
    hidden: torch.Tensor, transformed: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """TokenTM's token-transformation measure ``W = length ratio x NECC`` per head and token.

    Args:
        hidden: ``[B, T, D]`` tokens entering the layer (``x_j``).
        transformed: ``[B, H, T, D]`` each token as head h transforms it (``T_h(x_j) = v_j W_O^h``).
        mask: ``[B, T]``.

    ``L_hj = ||T_h(x_j)|| / ||x_j||``; ``NECC_hj = n exp(cos(x_j, T_h(x_j))) / sum_k exp(cos(x_k,
    T_h(x_k)))`` over the ``n`` real tokens (a softmax of the cosines over tokens, scaled by ``n``
    so a head that turns every token alike gets 1). Returns ``W`` ``[B, H, T]``, zero on padding.
    """
    valid = mask.bool()[:, None, :]
    x = hidden.float()[:, None]  # [B, 1, T, D]
    t = transformed.float()
    length = t.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)
    cosine = torch.nn.functional.cosine_similarity(x.expand_as(t), t, dim=-1, eps=1e-12)
    necc = torch.softmax(cosine.masked_fill(~valid, -math.inf), dim=-1) * mask.sum(dim=-1)[:, None, None]
    return (length * necc).masked_fill(~valid, 0.0)


def token_tm(
    attentions: Sequence[torch.Tensor | None],
    gradients: Sequence[torch.Tensor | None],
    weights: Sequence[torch.Tensor | None],
    input_lengths: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """TokenTM aggregation (see :class:`TokenTM` for every choice made).

    Args:
        attentions, gradients: per layer ``[B, H_l, T, T]``.
        weights: per layer ``W`` ``[B, H_l, T]`` from :func:`transformation_weights`.
        input_lengths: ``[B, T]`` L2 norms of the input tokens (the embedding output).
        mask: ``[B, T]``.

    ``C_0 = diag(|e_j| / mean_k |e_k|)``; per layer ``Ã_h = A_h ⊙ W_h[None, :]`` (column j scaled
    by how head h transforms token j), ``Ā = mean_h (∇A_h ⊙ Ã_h)^+`` and ``C <- C + Ā C``; returns
    the ``[CLS]`` row of ``C_L`` ``[B, T]``.
    """
    pair = pair_mask(mask)
    maskf = mask.to(torch.float32)
    lengths = input_lengths.float() * maskf
    lengths = lengths / (lengths.sum(dim=-1, keepdim=True) / maskf.sum(dim=-1, keepdim=True)).clamp_min(1e-12)
    contribution = torch.diag_embed(lengths)
    for probs, grads, weight in zip(attentions, gradients, weights, strict=True):
        if probs is None or probs.shape[1] == 0:
            continue
        aware = probs.float() * weight.float()[:, :, None, :]
        fused = (grads.float() * aware).clamp_min(0.0).mean(dim=1) * pair
        contribution = contribution + torch.bmm(fused, contribution)
    return contribution[:, 0] * maskf
