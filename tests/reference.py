"""Independent slow implementations that the fast paths are tested (and benchmarked) against.

The AttAttr reference follows the authors' procedure literally: per example and per layer, a batch
of ``m`` scaled copies runs through the *whole* model, the scaling applied inside the forward pass.
"""

from __future__ import annotations

import torch

from attribution import instrument
from attribution.quadrature import quadrature


def _output(logits: torch.Tensor, target: int, output: str) -> torch.Tensor:
    probs = torch.softmax(logits.double(), dim=-1)[:, target]
    if output == "probability":
        return probs
    if output == "loss":
        return -torch.log(probs)
    return logits[:, target].double()


def reference_attattr(
    model, inputs: dict[str, torch.Tensor], target: torch.Tensor | None = None, n_steps: int = 20,
    method: str = "riemann_right", output: str = "probability",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns attributions ``[B, L, H, T, T]`` and delta ``[B, L]`` (unpruned models only)."""
    model.eval()
    alphas, weights = quadrature(method, n_steps)
    ids, mask = inputs["input_ids"], inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    n_layers = len(instrument.encoder_layers(model))
    heads = instrument.original_num_heads(model)
    bsz, seq = ids.shape
    attributions = torch.zeros(bsz, n_layers, heads, seq, seq, dtype=torch.float64)
    deltas = torch.zeros(bsz, n_layers, dtype=torch.float64)
    for b in range(bsz):
        length = int(mask[b].sum())
        one = {k: v[b : b + 1, :length] for k, v in inputs.items() if k != "labels"}
        with torch.no_grad(), instrument.AttentionProbe(model, capture=True) as probe:
            logits = model(**one).logits
            originals = {k: v.clone() for k, v in probe.attentions.items()}
        cls = int(logits.argmax()) if target is None else int(target[b])
        f_full = _output(logits, cls, output)[0]
        for layer in range(n_layers):
            copies = {k: v.expand(n_steps + 1, -1) for k, v in one.items()}
            scale = torch.tensor([*alphas, 0.0])[:, None, None, None]
            with instrument.AttentionProbe(model, capture=True, layers=[layer]) as probe:
                probe.replace[layer] = lambda probs, scale=scale: scale * probs
                values = _output(model(**copies).logits, cls, output)
                # gradient at the scaled attention only (no parameter gradients: a fair baseline)
                (grads,) = torch.autograd.grad(values.sum(), probe.attentions[layer])
                grads = grads.double()
            integral = (grads[:-1] * torch.tensor(weights, dtype=torch.float64)[:, None, None, None]).sum(0)
            attr = originals[layer][0].double() * integral
            attributions[b, layer, :, :length, :length] = attr
            deltas[b, layer] = attr.sum() - (f_full - values[-1].detach())  # no graph kept alive
    return attributions, deltas
