"""Tokenizer batches, targets and inference mode: what every measuring method checks first."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from transformers import PreTrainedModel

from attribution.core.errors import HeadpruneError


def target_output(logits: torch.Tensor, target: torch.Tensor, output: str) -> torch.Tensor:
    """Per-row scalar ``F``: logits ``[R, C]``, target ``[R]`` -> ``[R]``."""
    if output == "logit":
        return logits.gather(1, target[:, None])[:, 0]
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(1, target[:, None])[:, 0]
    return log_probs.exp() if output == "probability" else -log_probs


def resolve_target(target: int | torch.Tensor | list[int] | None, logits: torch.Tensor) -> torch.Tensor:
    """``[B]`` class indices: the predicted class when ``target`` is None."""
    batch, classes = logits.shape
    if target is None:
        return logits.argmax(dim=-1)
    target = torch.as_tensor(target, dtype=torch.long, device=logits.device)
    if target.dim() == 0:
        target = target.expand(batch)
    if target.shape != (batch,):
        raise HeadpruneError(f"target must be an int or have shape ({batch},), got {tuple(target.shape)}")
    if bool((target < 0).any()) or bool((target >= classes).any()):
        raise HeadpruneError(f"target classes must lie in 0..{classes - 1}")
    return target


def validate_inputs(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check a tokenizer batch and move it to the model's device; drops non-model keys (labels...)."""
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:  # dict or BatchEncoding
        raise HeadpruneError("inputs must be a tokenizer batch (a dict with at least 'input_ids')")
    ids = inputs["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise HeadpruneError("inputs['input_ids'] must be a [batch, tokens] tensor (use return_tensors='pt')")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch


@contextlib.contextmanager
def inference_setup(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode (attention dropout off, as the authors ran it) and no parameter gradients."""
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, g in zip(model.parameters(), grads, strict=True):
            p.requires_grad_(g)
        model.train(was_training)


def label_names(model: PreTrainedModel) -> list[str]:
    """The model's class names, index i naming class i (``config.id2label``; ``"i"`` where unnamed)."""
    mapping = getattr(model.config, "id2label", None) or {}
    classes = int(model.config.num_labels)
    return [str(mapping.get(i, mapping.get(str(i), i))) for i in range(classes)]


def class_index(target: int | str | None, model: PreTrainedModel) -> int | None:
    """A class given by name or index (``"positive"``, ``"2"``, ``2``) as the model's class index.

    ``None`` stays ``None`` (the predicted class). A name is looked up first, so a model whose
    class names are digits is addressed by name; one-line errors for unknown names and indices
    out of range.
    """
    if target is None:
        return None
    names = label_names(model)
    if isinstance(target, str):
        if target in names:
            return names.index(target)
        try:
            index = int(target.strip())
        except ValueError:
            raise HeadpruneError(f"unknown class {target!r}; the model's classes: {', '.join(names)}") from None
    elif isinstance(target, bool) or not hasattr(target, "__index__"):
        raise HeadpruneError(f"a class must be a name or an index, got {target!r}")
    else:
        index = target.__index__()
    if not 0 <= index < len(names):
        raise HeadpruneError(f"class index {index} outside 0..{len(names) - 1} (classes: {', '.join(names)})")
    return index
