"""Feed-forward neurons as a prunable unit: gates on each layer's intermediate activations, their
capture, persistent neuron masks, and physical slicing (a layer may keep no neuron at all).

Every supported family computes its feed-forward block as ``W_2 act(W_1 x + b_1) + b_2`` followed by
dropout, the residual and LayerNorm. Neuron ``j`` of layer ``l`` is row ``j`` of ``W_1``/``b_1`` and
column ``j`` of ``W_2`` (paths in the family table: ``Family.intermediate``, ``.activation``,
``.ffn_output``). A gate multiplies neuron ``j``'s activation output, so a zero gate removes the
neuron exactly as slicing it out does, and a layer gated (or sliced) to no neurons adds exactly its
output bias ``b_2``. A zero-width ``W_1``/``W_2`` runs as an empty matmul plus bias in PyTorch and in
onnxruntime, so no stand-in module is needed (``tests/test_neurons.py`` checks both).

Gates are applied by a forward hook on the activation module (installed only while a
:class:`NeuronProbe` or a persistent mask needs it, so an uninstrumented model runs its own code).
The activation module is never replaced by slicing, so it also carries the bookkeeping: the
original indices of the neurons still present (``headprune_kept_neurons``) and the persistent mask
(``headprune_neuron_mask``). Like heads, gates, captured activations and masks speak in the layer's
*current* neurons; :func:`kept_neurons` maps them back to the original indices ``0..F-1``.

Decisions left open by the literature: gates multiply the activation *output* (after GELU), not its
input (Kwon et al. mask the intermediate output, which is the same thing); ``capture`` records the
activation output before gating; a ``[B, F_l]`` gate gates each example separately (per-example
Fisher/Taylor scores need it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from attribution.core.errors import HeadpruneError
from attribution.instrument.families import checked_mask, encoder_layers, model_family, submodule
from attribution.instrument.heads import set_submodule, slice_linear

_KEPT_ATTR = "headprune_kept_neurons"
_MASK_ATTR = "headprune_neuron_mask"
_PROBE_ATTR = "_headprune_neuron_probe"

# --------------------------------------------------------------------------------------------
# Where the neurons are
# --------------------------------------------------------------------------------------------


def _activations(model: PreTrainedModel) -> list[nn.Module]:
    """Per layer, the activation module whose output the gates multiply (one instance per layer)."""
    family = model_family(model)
    modules = [submodule(layer, family.activation) for layer in encoder_layers(model)]
    if not all(isinstance(m, nn.Module) for m in modules):
        raise HeadpruneError(
            f"the feed-forward activation ({family.activation}) is a plain function, not a module; "
            "neuron gates need an activation module (set the config's activation by name)"
        )
    if len({id(m) for m in modules}) != len(modules):
        raise HeadpruneError("the encoder layers share one activation module; neuron gates need one per layer")
    return modules


def intermediate_projection(model: PreTrainedModel, layer: int) -> nn.Linear:
    """The ``nn.Linear`` ``d -> F_l`` of ``layer``'s feed-forward block: output row ``p`` (weight
    ``[F_l, d]``, bias ``[F_l]``) belongs to the p-th present neuron."""
    family = model_family(model)
    return submodule(encoder_layers(model)[layer], family.intermediate)  # type: ignore[return-value]


def ffn_output_projection(model: PreTrainedModel, layer: int) -> nn.Linear:
    """The ``nn.Linear`` ``F_l -> d`` of ``layer``'s feed-forward block: input column ``p`` (weight
    ``[d, F_l]``) belongs to the p-th present neuron; its bias ``[d]`` is what an empty block adds."""
    family = model_family(model)
    return submodule(encoder_layers(model)[layer], family.ffn_output)  # type: ignore[return-value]


def original_intermediate_size(model: PreTrainedModel) -> int:
    """Feed-forward width per layer before any pruning (F in ``[L, F]`` results), from the config."""
    family = model_family(model)
    return int(getattr(model.config, family.intermediate_size))


def neurons_per_layer(model: PreTrainedModel) -> list[int]:
    """Per layer, how many neurons it has now (read from the intermediate linear's shape)."""
    return [intermediate_projection(model, layer).out_features for layer in range(len(encoder_layers(model)))]


def kept_neurons(model: PreTrainedModel) -> list[list[int]]:
    """Per layer, the original indices of the neurons still present (all of them if never pruned)."""
    width = original_intermediate_size(model)
    kept = [list(getattr(m, _KEPT_ATTR, range(width))) for m in _activations(model)]
    for layer, (present, size) in enumerate(zip(kept, neurons_per_layer(model), strict=True)):
        if len(present) != size:
            raise HeadpruneError(
                f"layer {layer} has {size} feed-forward neurons but records {len(present)} kept ones; "
                "slice neurons with keep_neurons_in_layer"
            )
    return kept


# --------------------------------------------------------------------------------------------
# Gates: the hook, the probe and persistent masks
# --------------------------------------------------------------------------------------------


def _gate_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook on an activation module: record and gate its output ``[B, T, F_l]``."""
    mask = module.__dict__.get(_MASK_ATTR)
    probe, layer = module.__dict__.get(_PROBE_ATTR) or (None, -1)
    gate = mask
    if probe is not None:
        if probe._wants(layer):
            if output.requires_grad:
                output.retain_grad()
            probe.activations[layer] = output
        if layer in probe.gates:
            gate = probe.gates[layer] if gate is None else gate * probe.gates[layer]
    if gate is None:
        return None
    if gate.shape[-1] != output.shape[-1] or gate.dim() not in (1, 2):
        raise HeadpruneError(
            f"neuron gate of layer {layer} has shape {tuple(gate.shape)}; expected ({output.shape[-1]},) "
            f"or (batch, {output.shape[-1]})"
        )
    gate = gate.to(output.dtype)
    return output * (gate[:, None, :] if gate.dim() == 2 else gate)


def _sync_hook(module: nn.Module) -> None:
    """Install the gate hook while a probe or a mask needs it; remove it otherwise.

    Found by identity rather than through a handle: a deep copy of the model keeps the hook, and a
    copied handle would still point at the original's hook table.
    """
    needed = module.__dict__.get(_MASK_ATTR) is not None or module.__dict__.get(_PROBE_ATTR) is not None
    ours = [key for key, hook in module._forward_hooks.items() if hook is _gate_hook]
    if needed and not ours:
        module.register_forward_hook(_gate_hook)
    elif not needed:
        for key in ours:
            del module._forward_hooks[key]


class NeuronProbe:
    """Instruments a model's feed-forward neurons for the duration of a ``with`` block.

    Settings can change between forward passes inside the block:

    - ``gates[layer]``: ``[F_l]`` or ``[B, F_l]`` multipliers of layer ``layer``'s activation output
      ``[B, T, F_l]`` (current neurons; differentiable: gradients flow into the gates). A zero gate
      removes the neuron exactly as :func:`keep_neurons_in_layer` does; all gates at 1 leave the
      logits bit-identical. Layers without an entry are untouched. Gates multiply any persistent
      neuron mask.
    - ``capture``: record each layer's activation output before gating, ``[B, T, F_l]``, in
      ``activations[layer]`` (``T`` is 1 in the last layer under ``first_token_last_layer``); when it
      requires grad, its ``.grad`` is retained after backward.
    - ``layers``: restrict capture to these layers (all by default).

    Composes with :class:`~attribution.instrument.AttentionProbe` (both may be active at once); two
    NeuronProbes on one model at once are refused. On exit the hooks are removed (unless a
    persistent mask still needs them), exceptions included.
    """

    def __init__(self, model: PreTrainedModel, capture: bool = False, *, layers: list[int] | None = None) -> None:
        self.model = model
        self.capture = capture
        self.layers = None if layers is None else set(layers)
        self.gates: dict[int, torch.Tensor] = {}
        self.activations: dict[int, torch.Tensor] = {}
        self._modules = _activations(model)

    def __enter__(self) -> NeuronProbe:
        if any(m.__dict__.get(_PROBE_ATTR) is not None for m in self._modules):
            raise HeadpruneError("this model is already instrumented by another NeuronProbe")
        for index, module in enumerate(self._modules):
            module.__dict__[_PROBE_ATTR] = (self, index)
            _sync_hook(module)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for module in self._modules:
            module.__dict__.pop(_PROBE_ATTR, None)
            _sync_hook(module)
        self.clear()

    def clear(self) -> None:
        """Forget captured activations (call between forward passes to free memory)."""
        self.activations = {}

    def _wants(self, layer: int) -> bool:
        return self.capture and (self.layers is None or layer in self.layers)


def get_neuron_mask(model: PreTrainedModel) -> list[torch.Tensor | None]:
    """Per layer, the persistent neuron gate ``[F_l]`` or None."""
    return [m.__dict__.get(_MASK_ATTR) for m in _activations(model)]


def set_neuron_mask(model: PreTrainedModel, mask: list[torch.Tensor | None] | None) -> None:
    """Set (or with None clear) persistent per-layer neuron gates ``[F_l]`` (current neurons).

    A zero gate computes exactly what removing the neuron computes; other values scale it.
    """
    modules = _activations(model)
    device = next(model.parameters()).device
    for module, gate in zip(modules, checked_mask(mask, neurons_per_layer(model), "neuron", device), strict=True):
        module.__dict__[_MASK_ATTR] = gate
        _sync_hook(module)


# --------------------------------------------------------------------------------------------
# Physical removal
# --------------------------------------------------------------------------------------------


def keep_neurons_in_layer(model: PreTrainedModel, layer: int, keep: list[int]) -> None:
    """Keep only the neurons ``keep`` (original indices, a subset of those present) of ``layer``.

    Slices the intermediate linear's output rows and the output linear's input columns; composes
    with earlier slicing, and slices a persistent mask along. A layer left with no neurons then adds
    exactly its output linear's bias (the block is ``Linear(d, 0)``, the activation, ``Linear(0, d)``).
    """
    layers = encoder_layers(model)
    if not 0 <= layer < len(layers):
        raise HeadpruneError(f"layer {layer} out of range 0..{len(layers) - 1}")
    family = model_family(model)
    present = kept_neurons(model)[layer]
    if len(set(keep)) != len(keep):
        raise HeadpruneError(f"layer {layer}: the neurons to keep repeat an index")
    absent = sorted(set(keep) - set(present))
    if absent:
        raise HeadpruneError(f"layer {layer}: neurons {absent[:5]} to keep are not present (removed or unknown)")
    keep = sorted(keep)
    if keep == present:
        return
    positions = [present.index(n) for n in keep]
    layer_module = layers[layer]
    intermediate = submodule(layer_module, family.intermediate)
    index = torch.tensor(positions, dtype=torch.long, device=intermediate.weight.device)
    set_submodule(layer_module, family.intermediate, slice_linear(intermediate, index, dim=0))
    output = submodule(layer_module, family.ffn_output)
    set_submodule(layer_module, family.ffn_output, slice_linear(output, index, dim=1))
    activation = _activations(model)[layer]
    activation.__dict__[_KEPT_ATTR] = keep
    mask = activation.__dict__.get(_MASK_ATTR)
    if mask is not None:
        activation.__dict__[_MASK_ATTR] = mask[index.to(mask.device)] if keep else None
        _sync_hook(activation)
