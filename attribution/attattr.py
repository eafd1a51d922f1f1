"""Self-attention attribution (AttAttr; Hao, Dong, Wei, Xu, AAAI 2021).

For layer ``l`` with attention probabilities ``A_l`` (all heads), target output ``F``::

    Attr(A_l) = A_l * integral_0^1 dF(alpha * A_l) / dA_l  d alpha

One layer is scaled at a time: layers below are unchanged, layers above recompute from the changed
hidden states. The baseline is the all-zero attention. Completeness holds per layer:
``sum(Attr(A_l)) == F(A_l) - F(0 * A_l)`` up to the quadrature error, returned as the
convergence delta.

How it is computed (exact, not an approximation of the definition; see the README for the
measured speed-up):

- the hidden states entering layer ``l`` do not depend on alpha, so they are computed once per
  batch and only layers ``l..L-1`` run for each step;
- scaling layer ``l``'s attention by alpha scales its heads' outputs ``A @ V`` by alpha, so its
  attention block outputs ``alpha * P + b`` with ``P`` the projected head outputs, fixed: each
  step injects that (no Q, K, V or output projection of the layer, no ``[B, H, T, T]`` tensor per
  step), and the gradient with respect to the attention is the gradient with respect to it,
  summed over the steps, back through the projection and times ``V^T``;
- the classification head reads the first token only, so the last layer computes that one query
  row, carried back through the key projection (no key or value projection of every token);
- a node at alpha = 1 (riemann_right's last, Gauss-Radau's fixed node) is the unscaled model for
  every layer: one backward pass gives it for all layers at once;
- every (example, step) pair is a row of a few large forward calls, grouped by length (dynamic
  programming on a call's fixed cost against its padding); no parameter gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError
from attribution.core.inputs import inference_setup, resolve_target, target_output, validate_inputs
from attribution.quadrature import quadrature

Output = Literal["probability", "logit", "loss"]
OUTPUTS: tuple[str, ...] = ("probability", "logit", "loss")
TOKENS_PER_CALL = 4096  # default rows per forward pass: this many tokens (internal_batch_size overrides)
CALL_OVERHEAD_TOKENS = 96  # a forward + backward call's fixed cost, in tokens of work (measured on CPU)


def content_lengths(mask: torch.Tensor) -> list[int]:
    """Per example, how many leading positions hold tokens; the full width unless right-padded."""
    seq = mask.shape[1]
    lengths = mask.sum(dim=1)
    right_padded = bool((mask.bool() == (torch.arange(seq, device=mask.device)[None] < lengths[:, None])).all())
    return [int(n) for n in lengths] if right_padded else [seq] * mask.shape[0]


def row_chunks(
    lengths: list[int], steps: int, max_rows: int | None, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Split the (example, step) rows into forward calls: ``(examples [R], steps [R], length)``.

    Each call is cut to its longest row, so mixing lengths computes padding, while every call
    costs a fixed overhead (about ``CALL_OVERHEAD_TOKENS`` tokens' worth of work). Rows are
    sorted by length and cut into runs of whole length classes by dynamic programming on
    ``overhead * calls + rows * longest``; a run too big for one call (over ``max_rows`` rows,
    or by default over ``TOKENS_PER_CALL`` tokens) is spread evenly over several.
    """
    if steps == 0 or not lengths:
        return
    by_length: dict[int, list[int]] = {}
    for b in sorted(range(len(lengths)), key=lambda b: lengths[b]):
        by_length.setdefault(lengths[b], []).append(b)
    classes = sorted(by_length)

    def calls_for(rows: int, length: int) -> int:
        per_call = max_rows if max_rows else max(1, TOKENS_PER_CALL // length)
        return -(-rows // per_call)

    # best[j]: cheapest cost of the first j length classes; cut[j]: where its last run starts
    best, cut = [0.0] + [float("inf")] * len(classes), [0] * (len(classes) + 1)
    for j in range(1, len(classes) + 1):
        rows = 0
        for i in range(j, 0, -1):  # the last run covers classes i-1 .. j-1
            rows += len(by_length[classes[i - 1]]) * steps
            longest = classes[j - 1]
            cost = best[i - 1] + CALL_OVERHEAD_TOKENS * calls_for(rows, longest) + rows * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    runs, j = [], len(classes)
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    for first, last in reversed(runs):
        part = [(b, k) for length in classes[first:last] for b in by_length[length] for k in range(steps)]
        calls = calls_for(len(part), classes[last - 1])
        size = -(-len(part) // calls)
        for start in range(0, len(part), size):
            chunk = part[start : start + size]
            yield (
                torch.tensor([b for b, _ in chunk], device=device),
                torch.tensor([k for _, k in chunk], device=device),
                max(lengths[b] for b, _ in chunk),
            )


@dataclass
class LayerAttribution:
    """One layer's result for a batch: attributions ``[B, H, T, T]`` (original head indices,
    zero on padding), convergence delta ``[B]``, ``F(A)`` and ``F(0)`` ``[B]``."""

    layer: int
    attributions: torch.Tensor
    delta: torch.Tensor
    full: torch.Tensor
    baseline: torch.Tensor


class AttAttr:
    """Self-attention attribution by integrated gradients over scaled attention.

    Args:
        model: a supported sequence classifier (BERT, RoBERTa, ELECTRA, XLM-R, CamemBERT, DistilBERT).
        output: what ``F`` is: the target class's softmax ``"probability"`` (the paper),
            its ``"logit"``, or the cross-entropy ``"loss"``.
    """

    def __init__(self, model: PreTrainedModel, output: Output = "probability") -> None:
        instrument.model_family(model)
        if output not in OUTPUTS:
            raise HeadpruneError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
        self.model = model
        self.output = output

    def attribute(
        self,
        inputs: dict[str, torch.Tensor],
        target: int | torch.Tensor | list[int] | None = None,
        n_steps: int = 20,
        integration: str = "riemann_right",
        layers: list[int] | None = None,
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attribute the target output to every attention weight.

        Args:
            inputs: tokenizer batch, ``input_ids`` ``[B, T]`` (+ ``attention_mask``, ``token_type_ids``).
            target: class per example: None (the predicted class), an int, or ``[B]`` (e.g. gold labels).
            n_steps: quadrature nodes (model evaluations per example and layer; a node at alpha = 1
                is shared by all layers).
            integration: the quadrature rule: ``riemann_right`` (default; the paper's sum),
                ``riemann_left`` (the authors' code), ``riemann_middle``, ``riemann_trapezoid``,
                ``gausslegendre`` or
                ``gaussradau`` (recommended with ``n_steps=3``: a quarter of the paper setting's
                completeness error, about 11x faster than the authors' procedure; see the README).
            layers: layer indices to attribute (default all), in the order returned.
            internal_batch_size: at most this many (example, step) rows per forward pass; bounds
                memory. Default: as many rows as make ``TOKENS_PER_CALL`` tokens.
            return_convergence_delta: also return ``sum(Attr) - (F(A) - F(0))``.
            autocast_dtype: run the model under autocast with this dtype (e.g. ``torch.bfloat16`` on
                GPU); attributions are accumulated in float32. The delta shows what it cost.

        Returns:
            attributions ``[B, L', H, T, T]`` (``L' = len(layers)``, ``H`` original heads; exactly
            zero on padding rows and columns and on pruned heads), and with
            ``return_convergence_delta`` the delta ``[B, L']``.
        """
        results = list(
            self.iter_layers(inputs, target, n_steps, integration, layers, internal_batch_size, autocast_dtype)
        )
        attributions = torch.stack([r.attributions for r in results], dim=1)
        if return_convergence_delta:
            return attributions, torch.stack([r.delta for r in results], dim=1)
        return attributions

    def iter_layers(
        self,
        inputs: dict[str, torch.Tensor],
        target: int | torch.Tensor | list[int] | None = None,
        n_steps: int = 20,
        integration: str = "riemann_right",
        layers: list[int] | None = None,
        internal_batch_size: int | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> Iterator[LayerAttribution]:
        """Like :meth:`attribute`, one layer at a time, so callers can reduce without holding
        ``[B, L, H, T, T]`` (see ``head_importance``)."""
        model = self.model
        alphas, weights = quadrature(integration, n_steps)
        batch = validate_inputs(model, inputs)
        n_layers = len(instrument.encoder_layers(model))
        layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
        if any(not 0 <= x < n_layers for x in layers):
            raise HeadpruneError(f"layers must lie in 0..{n_layers - 1}, got {layers}")
        if internal_batch_size is not None and internal_batch_size < 1:
            raise HeadpruneError("internal_batch_size must be a positive integer")

        kept = instrument.kept_heads(model)
        total_heads = instrument.original_num_heads(model)
        mask = batch["attention_mask"]
        bsz, seq = mask.shape
        pair_mask = (mask[:, :, None] * mask[:, None, :]).to(torch.float32)  # [B, T, T]

        # A node at alpha = 1 is the model as it is, whichever layer is scaled: its gradients for every
        # layer come from the one backward pass of the unscaled model instead of a pass per layer.
        at_one = [k for k, alpha in enumerate(alphas) if alpha == 1.0]
        weight_at_one = sum(weights[k] for k in at_one)
        alphas, weights = (
            [alpha for k, alpha in enumerate(alphas) if k not in at_one],
            [weight for k, weight in enumerate(weights) if k not in at_one],
        )
        with inference_setup(model), self._autocast(autocast_dtype):
            lengths = content_lengths(mask)
            f_full, target_ids, hidden_in, attentions, grads_at_one = self._unscaled_pass(
                batch, lengths, internal_batch_size, target, gradients=bool(at_one)
            )

            for layer in layers:
                heads = kept[layer]
                result = torch.zeros(bsz, total_heads, seq, seq, dtype=torch.float32, device=mask.device)
                if not heads:  # no heads: scaling this layer's attention changes nothing
                    zero = torch.zeros_like(f_full)
                    yield LayerAttribution(layer, result, zero, f_full, f_full)
                    continue
                attention = attentions[layer].float()  # [B, H_l, T, T]
                values = instrument.head_values(model, layer, hidden_in[layer]).float()  # [B, H_l, T, d_h]
                # Scaling the attention by alpha scales the heads' outputs A @ V by alpha, and the
                # attention block's output (before residual and LayerNorm) becomes alpha * P + bias.
                context = (attention @ values).requires_grad_()
                with torch.enable_grad():
                    direction = instrument.project_heads(model, layer, context)  # P: [B, T, D]
                bias = instrument.output_projection(model, layer).bias
                bias = torch.zeros(direction.shape[-1], device=mask.device) if bias is None else bias.detach()
                f_base = torch.zeros_like(f_full)
                for ex, _, length in row_chunks(lengths, 1, internal_batch_size, mask.device):
                    alone = bias.expand(len(ex), seq, -1)  # alpha = 0: no head contributes
                    f_base[ex] = self._run_from(layer, batch, hidden_in[layer], target_ids, ex, length, alone, False)[0]
                output_grad = torch.zeros_like(direction, dtype=torch.float32)  # accumulated in fp32
                steps = torch.tensor(alphas, device=mask.device, dtype=torch.float32)
                step_weights = torch.tensor(weights, device=mask.device, dtype=torch.float32)
                for ex, k, length in row_chunks(lengths, len(alphas), internal_batch_size, mask.device):
                    output = steps[k][:, None, None] * direction[ex].detach() + bias
                    _, grad = self._run_from(layer, batch, hidden_in[layer], target_ids, ex, length, output, True)
                    weighted = grad.float() * step_weights[k][:, None, None]
                    output_grad[:, :length].index_add_(0, ex, weighted)
                # Back through the (linear) projection once for the weighted sum of all steps.
                (context_grad,) = torch.autograd.grad(direction, context, output_grad)
                if at_one:
                    context_grad += weight_at_one * grads_at_one[layer]
                # dF/dA = dF/d(A @ V) @ V^T, so the weighted sum over steps needs one product at the end.
                attribution = attention * (context_grad @ values.float().transpose(-1, -2)).float() * pair_mask[:, None]
                result[:, heads] = attribution
                delta = attribution.sum(dim=(1, 2, 3)) - (f_full - f_base)
                yield LayerAttribution(layer, result, delta, f_full, f_base)

    def _unscaled_pass(
        self,
        batch: dict[str, torch.Tensor],
        lengths: list[int],
        max_rows: int | None,
        target: int | torch.Tensor | list[int] | None,
        gradients: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """The model as it is, in length-grouped calls. Returns ``F(A)`` and the target ``[B]``, the
        hidden states entering each layer ``L x [B, T, D]``, each layer's attention ``[B, H_l, T, T]``
        and, with ``gradients``, dF/d(A @ V) per layer ``[B, H_l, T, d_h]`` (float32; all zero
        beyond each call's length). The classifier reads the first token only, so the last layer
        computes (and returns attention and gradient for) the first query row only: the other rows
        cannot change F, their gradient is zero, and so is their attribution."""
        model = self.model
        bsz, seq = batch["input_ids"].shape
        device = batch["input_ids"].device
        given = None if target is None else resolve_target(target, torch.empty(bsz, model.config.num_labels))
        f_full = torch.zeros(bsz, dtype=torch.float32, device=device)
        target_ids = torch.zeros(bsz, dtype=torch.long, device=device)
        hidden_in: list[torch.Tensor] = []
        attentions: dict[int, torch.Tensor] = {}
        grads: dict[int, torch.Tensor] = {}
        with (
            instrument.AttentionProbe(model, capture=True, capture_context=gradients) as probe,
            instrument.first_token_last_layer(model),  # the other query rows of the last layer get no gradient
            torch.set_grad_enabled(gradients),
        ):
            for rows, _, length in row_chunks(lengths, 1, max_rows, device):
                probe.clear()
                out = model(**{key: value[rows, :length] for key, value in batch.items()}, output_hidden_states=True)
                logits = out.logits.float()
                chunk_target = logits.argmax(dim=-1) if given is None else given.to(device)[rows]
                values = target_output(logits, chunk_target, self.output)
                f_full[rows], target_ids[rows] = values.detach(), chunk_target
                if not hidden_in:
                    hidden_in = [h.new_zeros(bsz, seq, h.shape[-1]) for h in out.hidden_states[:-1]]
                    attentions = {k: v.new_zeros(bsz, v.shape[1], seq, seq) for k, v in probe.attentions.items()}
                    grads = {
                        k: v.new_zeros(bsz, v.shape[1], seq, v.shape[-1], dtype=torch.float32)
                        for k, v in probe.contexts.items()
                    }
                for full, part in zip(hidden_in, out.hidden_states[:-1], strict=True):
                    full[rows, :length] = part.detach()
                for k, part in probe.attentions.items():  # the last layer's: first row only
                    attentions[k][rows, :, : part.shape[2], :length] = part.detach()
                if gradients:
                    layers = sorted(probe.contexts)
                    found = torch.autograd.grad(
                        values.sum(), [probe.contexts[k] for k in layers], allow_unused=True
                    )
                    for k, grad in zip(layers, found, strict=True):
                        if grad is not None:
                            grads[k][rows, :, : grad.shape[2]] = grad.float()
        return f_full, target_ids, hidden_in, attentions, grads

    def _run_from(
        self,
        layer: int,
        batch: dict[str, torch.Tensor],
        hidden: torch.Tensor,
        target: torch.Tensor,
        rows: torch.Tensor,
        length: int,
        output: torch.Tensor,
        with_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """F for ``rows`` (example indices, each repeated once per step) with layer ``layer``'s
        attention output set to ``output`` ``[R, T, D]``, running only layers ``layer..L-1`` (the
        last one for the first token only) on the first ``length`` positions (the rows' padding
        beyond them is cut); and dF/d(output) ``[R, length, D]`` when ``with_grad``."""
        model = self.model
        output = output[:, :length].detach().requires_grad_(with_grad)
        with (
            torch.set_grad_enabled(with_grad),
            instrument.start_at_layer(model, layer, hidden[rows, :length]),
            instrument.inject_attention_output(model, layer, output),
            instrument.first_token_last_layer(model),
        ):
            logits = model(**{key: value[rows, :length] for key, value in batch.items()}).logits.float()
            values = target_output(logits, target[rows], self.output)
            if not with_grad:
                return values, None
            (grad,) = torch.autograd.grad(values.sum(), output)
        return values.detach(), grad

    @staticmethod
    def _autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device_type=device, dtype=dtype)
