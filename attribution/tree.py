"""Attribution trees (AttAttr §4; Hao, Dong, Wei, Xu, AAAI 2021).

An attribution tree shows, for one input, the strongest token-to-token information flows inside the
encoder, layer by layer. From AttAttr scores ``[L, H, T, T]`` of one example:

1. sum over the heads of each layer: ``S_l`` ``[T, T]`` (``S_l[i, j]``: query ``i`` reading key ``j``);
2. scale each layer by its maximum, taken over every query row except the classifier's (``[CLS]``,
   position 0) — that row's attributions dwarf the rest and it is the terminal of the flow, not a
   step in it, so it is never a source of edges either — and over off-diagonal entries only;
3. keep the edges whose scaled score is strictly above ``tau`` (0.4 in the paper);
4. the root is the token with the largest total attribution as a query (sum over layers and keys of
   the positive, off-diagonal ``S_l[i, j]``, the authors' code), special tokens excluded;
5. walk from the top layer down; at layer ``l`` an edge ``i -> j`` joins the tree when ``i`` was in
   the tree before layer ``l`` and ``j`` is not in it yet. Each node so has one parent.

Choices the paper leaves open, made deliberately here:

- Within a layer, candidate edges are taken strongest first (ties by position), and only nodes that
  were already in the tree *before* that layer can be parents: a node that joins at layer ``l``
  stands for its hidden state entering layer ``l``, so its own layer-``l`` edges describe a
  different state. (The authors' script scans positions in index order and lets a node that just
  joined take children in the same layer, which makes the tree depend on token order.)
- The diagonal (a token reading itself) is left out of the scale: it can never be an edge, and
  with words merged it holds the interactions *inside* a word, which on real tweets dominate
  (``ap -> ##olo`` of "apologise") and would push every real edge below tau. (The authors' script
  includes the diagonal; at token level the difference is usually small.)
- In a classifier only the ``[CLS]`` row of the last layer reaches the output, so the last layer
  has no edges once that row is excluded; a layer whose scale (its maximum) is not positive
  contributes no edges.
- Special tokens: ``[CLS]``/``[SEP]`` (``<s>``/``</s>``...) are never the root. With
  ``special_tokens="keep"`` (default, as the authors) they may join as children (``[SEP]`` as a query
  may also be a parent); with ``"drop"`` they take no part at all (not in the scale, no edges).
- Sentence pairs: every node records its segment (0, 1; ``None`` for special tokens), so renderers
  can tell the two texts apart; the algorithm itself treats both segments alike.
- Words: with ``word_level=True`` the WordPiece (or BPE/SentencePiece) pieces of a word are merged
  *before* building the tree by summing their attribution rows and columns — attributions are
  additive, so a word's score is the sum of its pieces' — and interactions inside a word become
  the (ignored) diagonal. The tree then has one node per word, shown as the word.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from attribution.core.errors import HeadpruneError
from attribution.core.inputs import class_index, label_names
from attribution.core.io import Record

FORMAT_VERSION = 1
DEFAULT_TAU = 0.4
SpecialTokens = Literal["keep", "drop"]


@dataclass
class TreeNode:
    """One unit of the input (a token, or a word when pieces were merged), in sentence order.

    ``positions``: the token positions it covers; ``segment``: 0 for the first text, 1 for the second,
    ``None`` for special tokens; ``total``: its total attribution as a query (what picks the root).
    """

    index: int
    text: str
    positions: list[int]
    segment: int | None
    special: bool
    total: float = 0.0


@dataclass
class TreeEdge:
    """``parent`` reads ``child`` in ``layer`` (0-based): information flows child -> parent.

    ``score``: the layer-scaled attribution (> tau); ``raw``: the attribution summed over heads.
    """

    parent: int
    child: int
    layer: int
    score: float
    raw: float


@dataclass
class AttributionTree(Record):
    """The attribution tree of one input.

    ``nodes`` lists every unit of the input (in the tree or not); ``edges`` are in the order they
    were added (top layer first); ``root`` is a node index (``None`` only when no node can be a
    root). ``provenance`` says how it was made (model, prediction, n_steps, integration, ...).
    Saved as JSON (``save``/``load``, format ``headprune.attribution_tree``).
    """

    FORMAT: ClassVar[str] = "headprune.attribution_tree"
    VERSION: ClassVar[int] = FORMAT_VERSION

    nodes: list[TreeNode]
    edges: list[TreeEdge]
    root: int | None
    tau: float
    num_layers: int
    provenance: dict[str, Any] = field(default_factory=dict)

    # ---- structure -----------------------------------------------------------------------------

    @property
    def members(self) -> list[int]:
        """Node indices in the tree, root first, then in the order they joined."""
        if self.root is None:
            return []
        return [self.root] + [e.child for e in self.edges]

    def parent(self, node: int) -> int | None:
        """The parent of ``node`` (``None`` for the root and nodes outside the tree)."""
        for edge in self.edges:
            if edge.child == node:
                return edge.parent
        return None

    def edge_to(self, node: int) -> TreeEdge | None:
        """The edge through which ``node`` joined the tree."""
        return next((e for e in self.edges if e.child == node), None)

    def children(self, node: int) -> list[TreeEdge]:
        """Edges from ``node`` to its children, highest layer first, then sentence order."""
        return sorted((e for e in self.edges if e.parent == node), key=lambda e: (-e.layer, e.child))

    def level(self, node: int) -> int | None:
        """The layer at which ``node`` joined (the root: ``num_layers``, above every layer)."""
        if node == self.root:
            return self.num_layers
        edge = self.edge_to(node)
        return None if edge is None else edge.layer

    def validate(self) -> None:
        """Raise ``HeadpruneError`` unless this is a tree: one root, one parent per node, every edge
        from a node already in the tree, no cycles, layers non-increasing away from the root."""
        if self.root is None:
            if self.edges:
                raise HeadpruneError("a tree without a root cannot have edges")
            return
        seen = {self.root}
        for edge in self.edges:
            if edge.parent not in seen:
                raise HeadpruneError(f"edge {edge.parent}->{edge.child}: the parent is not in the tree yet")
            if edge.child in seen:
                raise HeadpruneError(f"node {edge.child} has two parents (or closes a cycle)")
            parent_level = self.level(edge.parent)
            if parent_level is None or edge.layer >= parent_level:
                raise HeadpruneError(f"edge {edge.parent}->{edge.child} at layer {edge.layer} is not below its parent")
            seen.add(edge.child)

    def word(self, node: int) -> str:
        """The display text of a node."""
        return self.nodes[node].text

    # ---- serialisation (``Record``: to_dict/from_dict/save/load) --------------------------------

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> AttributionTree:
        """The tree in ``data`` (``to_dict``'s output), checked to be a tree."""
        tree = super().from_dict(data, where)
        try:
            tree.validate()
        except HeadpruneError as error:
            raise HeadpruneError(f"{where or cls.__name__}: {error}") from None
        return tree

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # ---- text ------------------------------------------------------------------------------------

    def to_text(self) -> str:
        """The tree for a terminal: one line per node, ``[L<layer> <score>]`` on each edge.

        Layers are printed 1-based (``L1`` = the first encoder layer), like the rendered figures.
        """
        lines = [self._header()]
        if self.root is None:
            lines.append("(empty tree: no token can be the root)")
            return "\n".join(lines)
        lines.append(self._label(self.root))

        def walk(node: int, prefix: str) -> None:
            edges = self.children(node)
            for k, edge in enumerate(edges):
                last = k == len(edges) - 1
                lines.append(f"{prefix}{'└── ' if last else '├── '}[L{edge.layer + 1} {edge.score:.2f}] "
                             f"{self._label(edge.child)}")
                walk(edge.child, prefix + ("    " if last else "│   "))

        walk(self.root, "")
        outside = [n.text for n in self.nodes if n.index not in set(self.members) and not n.special]
        if outside:
            lines.append(f"not in the tree: {' '.join(outside)}")
        return "\n".join(lines)

    def _label(self, node: int) -> str:
        n = self.nodes[node]
        segment = "" if n.segment in (None, 0) or not self._is_pair() else f" (text {n.segment + 1})"
        return f"{n.text}{segment}"

    def _is_pair(self) -> bool:
        return any(n.segment == 1 for n in self.nodes)

    def _header(self) -> str:
        p = self.provenance
        inside = sum(not self.nodes[i].special for i in self.members)
        total = sum(not n.special for n in self.nodes)
        unit = "words" if p.get("unit", "word") == "word" else "tokens"
        parts = [f"attribution tree: tau {self.tau:g}, {inside}/{total} {unit} in the tree"]
        if "predicted_label" in p:
            prob = p.get("probability")
            parts.append(f"prediction {p['predicted_label']}" + (f" ({prob:.2f})" if prob is not None else ""))
        if "target_label" in p and p.get("target_label") != p.get("predicted_label"):
            parts.append(f"explaining {p['target_label']}")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# building


def _check_special_mode(special_tokens: str) -> None:
    if special_tokens not in ("keep", "drop"):
        raise HeadpruneError(f"special_tokens must be 'keep' or 'drop', got {special_tokens!r}")


def build_tree(
    layer_scores: torch.Tensor,
    tokens: Sequence[str],
    *,
    tau: float = DEFAULT_TAU,
    segments: Sequence[int | None] | None = None,
    special: Sequence[bool] | None = None,
    positions: Sequence[Sequence[int]] | None = None,
    cls_index: int | None = 0,
    special_tokens: SpecialTokens = "keep",
    provenance: dict[str, Any] | None = None,
) -> AttributionTree:
    """Build the attribution tree from per-layer attribution matrices of one example.

    Args:
        layer_scores: ``[L, N, N]`` (already summed over heads) or ``[L, H, N, N]`` (summed here);
            entry ``[l, i, j]`` is the attribution of query ``i`` reading key ``j`` in layer ``l``.
            ``N`` counts real units only (no padding).
        tokens: ``N`` display texts.
        tau: edges need a layer-scaled score strictly above this.
        segments: ``N`` segment ids (0/1, ``None`` for special tokens); default all 0.
        special: ``N`` flags for special tokens; default: only ``cls_index``.
        positions: ``N`` lists of token positions each unit covers (default ``[[i]]``).
        cls_index: the classifier's query row, excluded from the scale and from edges (``None``: none).
        special_tokens: ``"keep"`` or ``"drop"`` (see the module docstring).
        provenance: stored on the tree.
    """
    _check_special_mode(special_tokens)
    scores = torch.as_tensor(layer_scores).detach().to("cpu", torch.float64)
    if scores.dim() == 4:
        scores = scores.sum(dim=1)
    if scores.dim() != 3 or scores.shape[1] != scores.shape[2]:
        raise HeadpruneError(f"layer_scores must be [L, N, N] or [L, H, N, N], got {tuple(scores.shape)}")
    n_layers, n = int(scores.shape[0]), int(scores.shape[1])
    if len(tokens) != n:
        raise HeadpruneError(f"{len(tokens)} tokens for attribution matrices of size {n}")
    if not 0.0 <= float(tau) <= 1.0:
        raise HeadpruneError(f"tau must lie in [0, 1] (scaled scores are at most 1), got {tau!r}")
    if cls_index is not None and not 0 <= cls_index < n:
        raise HeadpruneError(f"cls_index {cls_index} outside 0..{n - 1}")
    segments = [0] * n if segments is None else list(segments)
    special = [i == cls_index for i in range(n)] if special is None else [bool(s) for s in special]
    positions = [[i] for i in range(n)] if positions is None else [list(p) for p in positions]
    if not len(segments) == len(special) == len(positions) == n:
        raise HeadpruneError("tokens, segments, special and positions must have the same length")

    # which query rows may carry edges, and which keys may join
    source = torch.ones(n, dtype=torch.bool)
    target = torch.ones(n, dtype=torch.bool)
    if cls_index is not None:
        source[cls_index] = False
    if special_tokens == "drop":
        dropped = torch.tensor(special, dtype=torch.bool)
        source &= ~dropped
        target &= ~dropped
    allowed = source[:, None] & target[None, :] & ~torch.eye(n, dtype=torch.bool)

    # per-layer scale: the maximum over the possible edges ([CLS] row and diagonal excluded)
    scaled = torch.zeros_like(scores)
    for layer in range(n_layers):
        possible = scores[layer][allowed]
        top = float(possible.max()) if possible.numel() else 0.0
        if top > 0:
            scaled[layer] = scores[layer] / top

    # root: largest total positive off-diagonal attribution as a query; never a special token
    positive = (scores.clamp(min=0) * allowed).sum(dim=(0, 2))  # [N]
    candidates = [i for i in range(n) if source[i] and not special[i]]
    root = min(candidates, key=lambda i: (-float(positive[i]), i)) if candidates else None

    edges: list[TreeEdge] = []
    if root is not None:
        in_tree = {root}
        for layer in range(n_layers - 1, -1, -1):
            parents = sorted(in_tree)  # frozen for this layer: new members take children lower down
            found = []
            for i in parents:
                for j in range(n):
                    if allowed[i, j] and j not in in_tree and float(scaled[layer, i, j]) > tau:
                        found.append((-float(scaled[layer, i, j]), i, j))
            for neg_score, i, j in sorted(found):
                if j in in_tree:
                    continue
                in_tree.add(j)
                edges.append(TreeEdge(i, j, layer, -neg_score, float(scores[layer, i, j])))

    nodes = [
        TreeNode(i, str(tokens[i]), positions[i], segments[i], special[i], float(positive[i])) for i in range(n)
    ]
    tree = AttributionTree(nodes, edges, root, float(tau), n_layers, dict(provenance or {}))
    tree.validate()
    return tree


def merge_units(layer_scores: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Sum attribution rows and columns over groups of tokens (e.g. the pieces of each word).

    layer_scores: ``[..., T, T]``; groups: ``W`` lists of token positions. Returns ``[..., W, W]``
    with ``out[..., a, b] = sum over i in groups[a], j in groups[b] of layer_scores[..., i, j]``.
    """
    size = layer_scores.shape[-1]
    assign = torch.zeros(size, len(groups), dtype=layer_scores.dtype, device=layer_scores.device)
    for unit, group in enumerate(groups):
        for position in group:
            if not 0 <= position < size:
                raise HeadpruneError(f"token position {position} outside 0..{size - 1}")
            assign[position, unit] = 1.0
    return assign.T @ layer_scores @ assign


@dataclass
class TokenInfo:
    """What the tree needs to know about each real token of one example (length ``T``).

    ``word_ids``: word index per token (``None`` for special tokens; restarts per segment is fine);
    ``segments``: 0/1 per token, ``None`` for special tokens.
    """

    tokens: list[str]
    word_ids: list[int | None]
    segments: list[int | None]

    @classmethod
    def from_encoding(cls, encoding: Any, tokenizer: Any, row: int = 0) -> TokenInfo:
        """From a (fast) tokenizer's ``BatchEncoding``; falls back to ``##`` continuation pieces and
        the special-tokens mask when the tokenizer keeps no word alignment."""
        ids_all = torch.as_tensor(encoding["input_ids"])
        ids_all = ids_all[row] if ids_all.dim() == 2 else ids_all
        mask = encoding.get("attention_mask")
        mask = torch.as_tensor(mask) if mask is not None else torch.ones_like(ids_all)
        mask = mask[row] if mask.dim() == 2 else mask
        n = int(mask.sum())  # right padding: the first n tokens are real
        ids = ids_all[:n].tolist()
        tokens = tokenizer.convert_ids_to_tokens(ids)
        try:
            word_ids = list(encoding.word_ids(row))[:n]
            segments = list(encoding.sequence_ids(row))[:n]
        except (ValueError, AttributeError, TypeError):
            specials = set(getattr(tokenizer, "all_special_ids", []))
            types = encoding.get("token_type_ids")
            if types is None:
                types = [0] * n
            else:
                types = torch.as_tensor(types)
                types = (types[row] if types.dim() == 2 else types).tolist()[:n]
            segments = [None if t in specials else int(s) for t, s in zip(ids, types, strict=True)]
            word_ids, word = [], -1
            for token, segment in zip(tokens, segments, strict=True):
                if segment is None:
                    word_ids.append(None)
                    continue
                if not str(token).startswith("##") or word < 0:
                    word += 1
                word_ids.append(word)
        return cls(list(tokens), word_ids, segments)

    def groups(self, word_level: bool) -> list[list[int]]:
        """Token positions of each unit: words (pieces merged) or single tokens, in order."""
        if not word_level:
            return [[i] for i in range(len(self.tokens))]
        out: list[list[int]] = []
        last: tuple[int | None, int | None] | None = None
        for i, (word, segment) in enumerate(zip(self.word_ids, self.segments, strict=True)):
            key = (segment, word)
            if word is not None and key == last:
                out[-1].append(i)
            else:
                out.append([i])
            last = key if word is not None else None
        return out


def _join_pieces(pieces: list[str], tokenizer: Any | None) -> str:
    if len(pieces) == 1 and tokenizer is None:
        return pieces[0]
    if tokenizer is not None and hasattr(tokenizer, "convert_tokens_to_string"):
        text = tokenizer.convert_tokens_to_string(pieces).strip()
        if text:
            return text
    return "".join(p[2:] if k and p.startswith("##") else p for k, p in enumerate(pieces))


def tree_from_attributions(
    attributions: torch.Tensor,
    info: TokenInfo,
    *,
    tau: float = DEFAULT_TAU,
    word_level: bool = True,
    special_tokens: SpecialTokens = "keep",
    tokenizer: Any | None = None,
    provenance: dict[str, Any] | None = None,
) -> AttributionTree:
    """The tree of one example from its AttAttr scores.

    Args:
        attributions: ``[L, H, T', T']`` (one example of ``AttAttr.attribute``; ``T' >= T``, the
            padding beyond ``T = len(info.tokens)`` is cut) or ``[L, T', T']`` summed over heads.
        info: tokens, word ids and segments of the example (``TokenInfo.from_encoding``).
        word_level: merge the pieces of each word (sum of attributions) into one node.
        tokenizer: used to spell merged words (``convert_tokens_to_string``).
    """
    scores = torch.as_tensor(attributions).detach().to("cpu", torch.float64)
    if scores.dim() == 4:
        scores = scores.sum(dim=1)
    if scores.dim() != 3:
        raise HeadpruneError(f"attributions must be [L, H, T, T] or [L, T, T], got {tuple(scores.shape)}")
    n = len(info.tokens)
    if scores.shape[-1] < n:
        raise HeadpruneError(f"{n} tokens but attributions cover only {scores.shape[-1]}")
    scores = scores[:, :n, :n]
    groups = info.groups(word_level)
    merged = merge_units(scores, groups) if word_level else scores
    texts = [_join_pieces([info.tokens[i] for i in g], tokenizer if word_level else None) for g in groups]
    segments = [info.segments[g[0]] for g in groups]
    special = [info.segments[g[0]] is None for g in groups]
    cls_index = 0 if special and special[0] else None
    prov = {"unit": "word" if word_level else "token", "special_tokens": special_tokens, **(provenance or {})}
    return build_tree(
        merged,
        texts,
        tau=tau,
        segments=segments,
        special=special,
        positions=groups,
        cls_index=cls_index,
        special_tokens=special_tokens,
        provenance=prov,
    )


def attribution_tree(
    model: Any,
    tokenizer: Any,
    text: str,
    text_pair: str | None = None,
    *,
    tau: float = DEFAULT_TAU,
    n_steps: int = 20,
    integration: str = "riemann_right",
    target: int | str | None = None,
    output: str = "probability",
    word_level: bool = True,
    special_tokens: SpecialTokens = "keep",
    max_length: int = 128,
    internal_batch_size: int | None = None,
) -> AttributionTree:
    """Attribute one input with AttAttr and build its tree.

    Args:
        text, text_pair: the input (a sentence, or a sentence pair).
        target: the class to explain, by index or name (default: the predicted class).
        n_steps, integration, output: passed to ``AttAttr`` (the paper: 20 or 64 Riemann steps on
            the probability; ``gausslegendre`` with 4-6 nodes is far more exact for the same cost).
        max_length: truncation (tokens).
    """
    from attribution.attattr import AttAttr

    if not isinstance(text, str) or not text.strip():
        raise HeadpruneError("the text to explain is empty")
    if text_pair is not None and not text_pair.strip():
        raise HeadpruneError("--text-pair is empty")
    target = class_index(target, model)
    encoding = tokenizer(text, text_pair, truncation=True, max_length=max_length, return_tensors="pt")
    info = TokenInfo.from_encoding(encoding, tokenizer)
    batch = {k: v for k, v in encoding.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    attr = AttAttr(model, output=output)  # type: ignore[arg-type]
    attributions, delta = attr.attribute(
        batch,
        target=target,
        n_steps=n_steps,
        integration=integration,
        internal_batch_size=internal_batch_size,
        return_convergence_delta=True,
    )
    with torch.no_grad():
        logits = model(**{k: v.to(next(model.parameters()).device) for k, v in batch.items()}).logits[0].float()
    probs = torch.softmax(logits, dim=-1)
    predicted = int(probs.argmax())
    explained = predicted if target is None else target
    names = label_names(model)
    provenance = {
        "model": str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")),
        "text": text,
        "text_pair": text_pair,
        "tokens": info.tokens,
        "predicted_label": names[predicted],
        "probability": float(probs[predicted]),
        "target_label": names[explained],
        "output": output,
        "n_steps": n_steps,
        "integration": integration,
        "max_abs_delta": float(delta.abs().max()),
    }
    return tree_from_attributions(
        attributions[0],
        info,
        tau=tau,
        word_level=word_level,
        special_tokens=special_tokens,
        tokenizer=tokenizer,
        provenance=provenance,
    )
