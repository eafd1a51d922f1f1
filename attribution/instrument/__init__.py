"""The one package that touches transformers internals.

Everything headprune does to attention and to feed-forward neurons goes through here: capturing
attention probabilities (and their gradients), replacing one layer's probabilities, gating each
head's output, running the encoder from a given layer on, slicing heads out of the projections,
and gating, capturing and slicing feed-forward neurons.

transformers 5 removed ``head_mask`` and ``prune_heads``; the supported extension point is the
attention interface. We register one implementation, ``"headprune"``, with both
``AttentionInterface`` and ``AttentionMaskInterface`` (without the latter, padding masks would be
silently dropped) and switch a model to it only while instrumenting, so an uninstrumented model
keeps its fastest backend (SDPA).

Head indices: a physically pruned layer keeps a subset of its original heads. Gates, captured
attentions and replacements speak in the layer's *current* heads; :func:`kept_heads` maps them back
to the original indices, which is what results (``HeadScores``, ``[B, L, H, T, T]``) use.

Modules: ``families`` (the table of attribute paths per model family), ``probe`` (capture,
replacement, gates, persistent masks), ``fastpath`` (running the encoder in pieces, for AttAttr),
``heads`` (slicing heads out) and ``neurons`` (feed-forward neurons: gates, capture, persistent
masks, slicing; indices current vs original as for heads). Everything public is importable from
here.
"""

from __future__ import annotations

from attribution.instrument.families import (  # noqa: F401
    ATTN_IMPLEMENTATION,
    BERT_LIKE,
    FAMILIES,
    SUPPORTED_MODEL_TYPES,
    Family,
    attention_modules,
    checked_mask,
    encoder_layers,
    head_size,
    heads_per_layer,
    kept_heads,
    model_family,
    original_num_heads,
    output_projection,
    sublayer_norm,
    submodule,
)
from attribution.instrument.fastpath import (  # noqa: F401
    first_token_last_layer,
    head_values,
    inject_attention_output,
    layer_inputs,
    project_heads,
    reads_first_token_only,
    start_at_layer,
)
from attribution.instrument.heads import (  # noqa: F401
    HeadProjections,
    head_projections,
    keep_heads_in_layer,
)
from attribution.instrument.neurons import (  # noqa: F401
    NeuronProbe,
    ffn_output_projection,
    get_neuron_mask,
    intermediate_projection,
    keep_neurons_in_layer,
    kept_neurons,
    neurons_per_layer,
    original_intermediate_size,
    set_neuron_mask,
)
from attribution.instrument.probe import (  # noqa: F401
    AttentionProbe,
    apply_gates,
    get_head_mask,
    headprune_attention,
    set_head_mask,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionProbe",
    "BERT_LIKE",
    "FAMILIES",
    "Family",
    "HeadProjections",
    "NeuronProbe",
    "SUPPORTED_MODEL_TYPES",
    "checked_mask",
    "apply_gates",
    "attention_modules",
    "encoder_layers",
    "ffn_output_projection",
    "first_token_last_layer",
    "get_head_mask",
    "get_neuron_mask",
    "head_projections",
    "head_size",
    "head_values",
    "headprune_attention",
    "heads_per_layer",
    "inject_attention_output",
    "intermediate_projection",
    "keep_heads_in_layer",
    "keep_neurons_in_layer",
    "kept_heads",
    "kept_neurons",
    "layer_inputs",
    "model_family",
    "neurons_per_layer",
    "original_intermediate_size",
    "original_num_heads",
    "output_projection",
    "project_heads",
    "reads_first_token_only",
    "set_head_mask",
    "set_neuron_mask",
    "start_at_layer",
    "submodule",
    "sublayer_norm",
]
