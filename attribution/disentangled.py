"""The disentangled-attention head diagnostic (after Yin et al., "Disentangled Non-Local Neural
Networks", ECCV 2020).

A head's attention logit between query i and key j splits as::

    q_i . k_j = (q_i - mu_q) . (k_j - mu_k)   pairwise, "whitened"
              + mu_q . k_j                    unary: depends on the key only
              + (q_i - mu_q) . mu_k           constant over keys: cancels in the softmax

with ``mu_q``, ``mu_k`` the means of the example's real queries and keys. Over the keys of a query
row only the first two vary. The *unary share* of a head on an example is::

    u = Var_j(mu_q . k_j)                     (the same for every query)
    p = mean_i Var_j((q_i - mu_q) . (k_j - mu_k))
    share = u / (u + p)

over the real tokens (population variances; the ``1/sqrt(d_h)`` scaling cancels). A share near 1
means the head attends to the same keys whatever the query (a "degenerate", query-independent
head: e.g. every token looking at [SEP]); near 0, it attends by content. A head whose logits do not
vary over keys at all (uniform attention, also query-independent) gets share 1. Averaged over
examples it is a data-light head diagnostic: one forward pass, no gradients, no labels.

Two head-importance criteria build on it (in :mod:`attribution.criteria.diagnostics`):
``unary_share`` (values = the share, as named) and ``pairwise_share`` (``1 - share``:
content-driven heads score high, the direction to prune by if degenerate heads are the expendable
ones).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.inputs import inference_setup, validate_inputs


def logit_decomposition(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split attention logits into the whitened pairwise and the unary term.

    Args:
        query, key: ``[B, H, T, d]`` (unscaled projections, biases included).
        mask: ``[B, T]`` attention mask.

    Returns:
        ``pairwise`` ``[B, H, T, T]`` = ``(q_i - mu_q) . (k_j - mu_k)`` and ``unary`` ``[B, H, T]``
        = ``mu_q . k_j``; means over the real tokens. ``softmax_j(scaling * (pairwise + unary))``
        over the real keys equals the head's attention.
    """
    maskf = mask.to(query.dtype)[:, None, :, None]  # [B, 1, T, 1]
    count = maskf.sum(dim=2, keepdim=True).clamp_min(1.0)
    mu_q = (query * maskf).sum(dim=2, keepdim=True) / count  # [B, H, 1, d]
    mu_k = (key * maskf).sum(dim=2, keepdim=True) / count
    pairwise = torch.matmul(query - mu_q, (key - mu_k).transpose(-1, -2))
    unary = torch.matmul(mu_q, key.transpose(-1, -2))[:, :, 0]  # [B, H, T]
    return pairwise, unary


def unary_share(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per example and head, the unary share of the logit variance over keys, ``[B, H]`` in [0, 1]
    (see the module docstring; 1 where neither term varies)."""
    pairwise, unary = logit_decomposition(query.double(), key.double(), mask)
    valid = mask.to(torch.float64)  # [B, T]
    n = valid.sum(dim=-1).clamp_min(1.0)  # [B]

    def variance_over_keys(values: torch.Tensor) -> torch.Tensor:  # [..., T] -> [...]
        weights = valid.view(valid.shape[0], *([1] * (values.dim() - 2)), valid.shape[1])
        norm = n.view(-1, *([1] * (values.dim() - 2)))
        mean = (values * weights).sum(dim=-1) / norm
        return (((values - mean[..., None]) ** 2) * weights).sum(dim=-1) / norm

    u = variance_over_keys(unary)  # [B, H]
    per_query = variance_over_keys(pairwise)  # [B, H, T]
    p = (per_query * valid[:, None]).sum(dim=-1) / n[:, None]
    total = u + p
    return torch.where(total > 0, u / total.where(total > 0, torch.ones_like(total)), torch.ones_like(total))


def head_unary_share(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, L, H]`` unary share of every head on every example (original head indices; 0 for
    pruned heads)."""
    batch = validate_inputs(model, inputs)
    mask = batch["attention_mask"]
    kept = instrument.kept_heads(model)
    out = torch.zeros(mask.shape[0], len(kept), instrument.original_num_heads(model), dtype=torch.float64)
    with inference_setup(model), torch.no_grad():
        hidden = instrument.layer_inputs(model, batch)
        for layer, heads in enumerate(kept):
            if heads:
                projections = instrument.head_projections(model, layer, hidden[layer])
                out[:, layer, heads] = unary_share(projections.query, projections.key, mask).double().cpu()
    return out

