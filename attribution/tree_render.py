"""Rendering attribution trees: PNG/PDF (matplotlib), self-contained SVG and HTML, plain text.

Layout (all formats): one column per node in the tree, in sentence order; one row per level — the
root on top, every other node at the layer where it joined (``L1`` = the first encoder layer,
1-based as in the paper's figures). Edges are coloured by layer (viridis, low layers dark), drawn
as arrows in the direction information flows (from the key, lower, into the query, higher), and
thicker for higher scaled scores. Nodes of the second text of a pair are tinted differently;
special tokens are grey.

graphviz is deliberately not used: it needs a system binary, and this fixed layered layout is what
the tree means (level = layer), which matplotlib and hand-written SVG draw exactly.
"""

from __future__ import annotations

import functools
import html
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attribution.core.errors import HeadpruneError
from attribution.core.io import atomic_output, atomic_write_text
from attribution.tree import DEFAULT_TAU, AttributionTree, SpecialTokens, attribution_tree

FORMATS = (".png", ".pdf", ".svg", ".html", ".htm", ".txt", ".json")
SEGMENT_FILL = {0: "#dbe9f6", 1: "#fde3c8", None: "#e6e6e6"}
ROOT_EDGE = "#b2182b"


def layer_colour(layer: int, num_layers: int) -> str:
    """Hex colour of a (0-based) layer: viridis from the first (dark) to the last (yellow)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    return to_hex(colormaps["viridis"](layer / max(num_layers - 1, 1)))


def layout(tree: AttributionTree) -> dict[int, tuple[int, int]]:
    """``node -> (column, level)``: column = rank in sentence order among the tree's nodes,
    level = ``tree.level(node)`` (the root: ``num_layers``)."""
    members = sorted(tree.members, key=lambda i: (tree.nodes[i].positions[0], i))
    out = {}
    for column, node in enumerate(members):
        level = tree.level(node)
        out[node] = (column, int(level if level is not None else 0))
    return out


def render_text(tree: AttributionTree) -> str:
    """The terminal form (see ``AttributionTree.to_text``)."""
    return tree.to_text()


def _title(tree: AttributionTree) -> str:
    p = tree.provenance
    text = p.get("text")
    pair = p.get("text_pair")
    parts = []
    if text:
        parts.append(f"“{text}”" + (f" / “{pair}”" if pair else ""))
    if "predicted_label" in p:
        prob = p.get("probability")
        parts.append(f"prediction: {p['predicted_label']}" + (f" ({prob:.2f})" if prob is not None else ""))
    parts.append(f"τ = {tree.tau:g}")
    return "   ".join(parts)


def _levels(tree: AttributionTree, positions: dict[int, tuple[int, int]]) -> list[int]:
    return sorted({level for _, level in positions.values()}, reverse=True)


# --------------------------------------------------------------------------------------------
# matplotlib


def render_figure(tree: AttributionTree):
    """A matplotlib ``Figure`` of the tree (no pyplot: no global state, any backend)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    positions = layout(tree)
    columns = max(len(positions), 1)
    levels = _levels(tree, positions)
    width = min(max(4.0, 1.1 * columns + 1.5), 40.0)
    height = max(2.5, 0.9 * max(len(levels), 1) + 1.6)
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot(1, 1, 1)
    # rows: the levels actually used, evenly spaced (top = root)
    row_of = {level: len(levels) - 1 - k for k, level in enumerate(levels)}
    xy = {node: (float(col), float(row_of[level])) for node, (col, level) in positions.items()}
    used_layers = sorted({e.layer for e in tree.edges})
    for edge in tree.edges:
        (x0, y0), (x1, y1) = xy[edge.child], xy[edge.parent]
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops=dict(
                arrowstyle="-|>",
                color=layer_colour(edge.layer, tree.num_layers),
                lw=1.0 + 2.5 * edge.score,
                shrinkA=11,
                shrinkB=11,
                alpha=0.9,
            ),
        )
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, f"{edge.score:.2f}", fontsize=7, ha="center", va="center",
                color="#333333", bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.7))
    for node, (x, y) in xy.items():
        n = tree.nodes[node]
        ax.text(
            x, y, n.text, ha="center", va="center", fontsize=10, zorder=3,
            fontweight="bold" if node == tree.root else "normal",
            bbox=dict(boxstyle="round,pad=0.35", fc=SEGMENT_FILL.get(n.segment, SEGMENT_FILL[0]),
                      ec=ROOT_EDGE if node == tree.root else "#555555", lw=1.6 if node == tree.root else 0.8),
        )
    ax.set_xlim(-0.7, columns - 0.3)
    ax.set_ylim(-0.6, max(len(levels) - 1, 0) + 0.6)
    ax.set_yticks([row_of[level] for level in levels])
    ax.set_yticklabels(["root" if level == tree.num_layers else f"layer {level + 1}" for level in levels])
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    if used_layers:
        handles = [Line2D([0], [0], color=layer_colour(layer, tree.num_layers), lw=2.5) for layer in used_layers]
        ax.legend(handles, [f"L{layer + 1}" for layer in used_layers], title="edge layer", loc="upper left",
                  bbox_to_anchor=(1.0, 1.0), fontsize=8, title_fontsize=8, frameon=False)
    ax.set_title(_title(tree), fontsize=9, loc="left")
    fig.tight_layout()
    return fig


def render_png(tree: AttributionTree, path: str | os.PathLike[str], *, dpi: int = 150) -> None:
    """Write the figure as PNG (or PDF, by the file's suffix)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = render_figure(tree)
    FigureCanvasAgg(fig)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")


# --------------------------------------------------------------------------------------------
# SVG / HTML


# The SVG names DejaVu Sans first and sizes every box by its advance widths (the font matplotlib ships,
# so measured offline, the same everywhere); the fallbacks are narrower, so a label never overflows.
SVG_FONT = "'DejaVu Sans', 'Bitstream Vera Sans', Arial, Helvetica, sans-serif"
_FALLBACK_EM = 1.0  # a character DejaVu lacks (CJK, other scripts): full width in the fallback font
_EMOJI_EM = 1.25  # colour emoji fonts (Noto Color Emoji: 1.245 em) are wider than DejaVu's own glyphs


@functools.lru_cache(maxsize=2)
def _font_advances(bold: bool) -> tuple[dict[int, int], Any]:
    """DejaVu Sans (bold or regular) from matplotlib's data: its character map and the font."""
    import matplotlib
    from matplotlib.ft2font import FT2Font

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    font = FT2Font(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name))
    font.set_size(100.0, 72)  # 100 px: advances come back in hundredths of an em
    return font.get_charmap(), font


@functools.lru_cache(maxsize=4096)
def _char_em(char: str, bold: bool) -> float:
    """The advance of one character in em: DejaVu Sans's own; for what it lacks a fallback font's,
    rounded up (1 em; emoji 1.25 em); combining marks and format characters take none."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Cf", "Mn", "Me"):
        return 0.0
    charmap, font = _font_advances(bold)
    code = ord(char)
    if 0x1F000 <= code <= 0x1FAFF or 0x2600 <= code <= 0x27BF:  # emoji: a colour emoji font draws them
        return _EMOJI_EM
    if code in charmap:
        return font.load_char(code).linearHoriAdvance / 65536 / 100.0
    return _FALLBACK_EM


def text_width(text: str, size: float, *, bold: bool = False) -> float:
    """Rendered width in px of ``text`` at font size ``size`` px in ``SVG_FONT`` (kerning ignored:
    it only narrows), at least one em."""
    return size * max(sum(_char_em(c, bold) for c in text), 1.0)


def render_svg(tree: AttributionTree) -> str:
    """A standalone SVG document (hover a node or an edge for its numbers)."""
    positions = layout(tree)
    levels = _levels(tree, positions)
    row_of = {level: k for k, level in enumerate(levels)}  # 0 = top
    font = 13.0
    pad = 8.0  # between a label and its box, each side
    widths = {i: text_width(tree.nodes[i].text, font, bold=i == tree.root) + 2 * pad for i in positions}
    col_w = max([w + 12 for w in widths.values()] + [70.0])
    row_h, left, top = 78.0, 70.0, 30.0
    width = left + col_w * max(len(positions), 1) + 90
    height = top + row_h * max(len(levels), 1) + 10
    xy = {node: (left + col_w * (col + 0.5), top + row_h * (row_of[level] + 0.5))
          for node, (col, level) in positions.items()}
    used_layers = sorted({e.layer for e in tree.edges})
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{SVG_FONT}" font-size="{font:g}">',
        "<defs>",
    ]
    for layer in used_layers:
        colour = layer_colour(layer, tree.num_layers)
        out.append(
            f'<marker id="arrow{layer}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            f'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="{colour}"/></marker>'
        )
    out.append("</defs>")
    for level in levels:
        y = top + row_h * (row_of[level] + 0.5)
        label = "root" if level == tree.num_layers else f"layer {level + 1}"
        out.append(f'<text x="6" y="{y + 4:.1f}" fill="#666" font-size="11">{label}</text>')
    box_h = font + 12
    for edge in tree.edges:
        (x0, y0), (x1, y1) = xy[edge.child], xy[edge.parent]
        # stop at the boxes' borders so the arrowheads stay visible
        y0e, y1e = y0 - box_h / 2, y1 + box_h / 2
        colour = layer_colour(edge.layer, tree.num_layers)
        child, parent = html.escape(tree.word(edge.child)), html.escape(tree.word(edge.parent))
        out.append(
            f'<line x1="{x0:.1f}" y1="{y0e:.1f}" x2="{x1:.1f}" y2="{y1e:.1f}" stroke="{colour}" '
            f'stroke-width="{1.0 + 3.0 * edge.score:.2f}" marker-end="url(#arrow{edge.layer})">'
            f"<title>layer {edge.layer + 1}: {parent} reads {child}; scaled {edge.score:.3f}, "
            f"raw {edge.raw:.4g}</title></line>"
        )
        out.append(
            f'<text x="{(x0 + x1) / 2 + 4:.1f}" y="{(y0e + y1e) / 2:.1f}" font-size="10" fill="#333">'
            f"{edge.score:.2f}</text>"
        )
    for node, (x, y) in xy.items():
        n = tree.nodes[node]
        w = widths[node]
        fill = SEGMENT_FILL.get(n.segment, SEGMENT_FILL[0])
        stroke, sw = (ROOT_EDGE, 2.0) if node == tree.root else ("#555", 1.0)
        weight = ' font-weight="bold"' if node == tree.root else ""
        out.append(
            f'<g><title>{html.escape(n.text)} (token positions {n.positions}, total {n.total:.4g})</title>'
            f'<rect x="{x - w / 2:.1f}" y="{y - box_h / 2:.1f}" width="{w:.1f}" height="{box_h:.1f}" rx="6" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{sw}"/>'
            f'<text x="{x:.1f}" y="{y + font * 0.35:.1f}" text-anchor="middle"{weight}>{html.escape(n.text)}</text>'
            "</g>"
        )
    lx = width - 80
    for k, layer in enumerate(used_layers):
        y = top + 16 * k
        colour = layer_colour(layer, tree.num_layers)
        out.append(f'<line x1="{lx:.0f}" y1="{y:.0f}" x2="{lx + 22:.0f}" y2="{y:.0f}" stroke="{colour}" '
                   'stroke-width="3"/>')
        out.append(f'<text x="{lx + 28:.0f}" y="{y + 4:.0f}" font-size="11">L{layer + 1}</text>')
    out.append("</svg>")
    return "\n".join(out)


def render_html(tree: AttributionTree) -> str:
    """A self-contained HTML page: header, the input with the tree's words marked, the SVG tree,
    and the edge table. No scripts, no external files."""
    p = tree.provenance
    members = set(tree.members)
    words = []
    for n in tree.nodes:
        if n.special and n.index not in members:
            continue
        style = "background:#fff2a8;font-weight:bold" if n.index == tree.root else (
            "background:#dbe9f6" if n.index in members else "color:#777")
        words.append(f'<span style="{style};padding:0 2px;border-radius:3px">{html.escape(n.text)}</span>')
    rows = "".join(
        f"<tr><td>L{e.layer + 1}</td><td>{html.escape(tree.word(e.parent))}</td>"
        f"<td>{html.escape(tree.word(e.child))}</td><td>{e.score:.3f}</td><td>{e.raw:.4g}</td></tr>"
        for e in tree.edges
    )
    details = ", ".join(
        f"{k}: {html.escape(str(p[k]))}"
        for k in ("model", "integration", "n_steps", "output", "max_abs_delta")
        if k in p
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>attribution tree</title>
<style>body{{font-family:sans-serif;margin:1.5em;color:#222}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}} .meta{{color:#666;font-size:12px}}</style>
</head><body>
<h2>Attribution tree</h2>
<p>{html.escape(_title(tree))}</p>
<p style="font-size:16px;line-height:1.8">{" ".join(words)}</p>
<p class="meta">Arrows show information flow (the key feeds the query that reads it) at the layer of their
colour; a node sits at the layer where it joined. Edges have layer-scaled attribution above τ = {tree.tau:g}.
{details}</p>
{render_svg(tree)}
<h3>Edges</h3>
<table><tr><th>layer</th><th>query (parent)</th><th>key (child)</th><th>scaled</th><th>raw</th></tr>{rows}</table>
<h3>As text</h3><pre>{html.escape(tree.to_text())}</pre>
</body></html>
"""


def save_tree(tree: AttributionTree, path: str | os.PathLike[str], *, dpi: int = 150) -> str:
    """Write the tree in the format its suffix names (``.png .pdf .svg .html .htm .txt .json``).

    Returns the format used.
    """
    check_outputs([path])
    suffix = Path(path).suffix.lower()
    if suffix in (".png", ".pdf"):
        render_png(tree, path, dpi=dpi)
    elif suffix == ".svg":
        atomic_write_text(path, render_svg(tree) + "\n")
    elif suffix in (".html", ".htm"):
        atomic_write_text(path, render_html(tree))
    elif suffix == ".txt":
        atomic_write_text(path, tree.to_text() + "\n")
    else:
        tree.save(path)
    return suffix.lstrip(".")


def check_outputs(outputs: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse any path whose suffix is not a tree format (before anything slow runs)."""
    for out in outputs:
        if Path(out).suffix.lower() not in FORMATS:
            raise HeadpruneError(f"unsupported tree output {Path(out).name!r}: use one of {', '.join(FORMATS)}")


def write_tree(
    model: Any,
    tokenizer: Any,
    text: str,
    outputs: Sequence[str | os.PathLike[str]],
    *,
    text_pair: str | None = None,
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
    """Build the attribution tree of one input and write it to every path in ``outputs`` (format by
    suffix, each file atomically; none is written when a suffix is unsupported); returns the tree.

    The options are ``attribution.tree.attribution_tree``'s; ``outputs`` may be empty.
    """
    check_outputs(outputs)
    tree = attribution_tree(
        model,
        tokenizer,
        text,
        text_pair,
        tau=tau,
        n_steps=n_steps,
        integration=integration,
        target=target,
        output=output,
        word_level=word_level,
        special_tokens=special_tokens,
        max_length=max_length,
        internal_batch_size=internal_batch_size,
    )
    for out in outputs:
        save_tree(tree, out)
    return tree
