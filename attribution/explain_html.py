"""Show what several token-relevance methods say about one input: a self-contained HTML page
(the text once per method, each word coloured by its relevance, methods in rows) and a PNG.

Word pieces are merged into the words of the original text (the fast tokenizer's word ids and
character offsets); a word's relevance is the *sum* of its pieces'. Special tokens ([CLS], [SEP])
are not shown. Each method's row is scaled by its own largest absolute word relevance: colour
compares words within a method, not magnitudes across methods (the raw values are in the
tooltips and in the JSON). Red = supports the explained class, blue = speaks against it (only
signed methods such as ``attattr`` and ``ig`` produce blue).
"""

from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from attribution.core.errors import HeadpruneError
from attribution.core.inputs import class_index, label_names
from attribution.core.io import Record, atomic_output, atomic_write_text
from attribution.relevance import default_method_options, make_relevance, parse_methods

FORMAT = "headprune.Explanation"


@dataclass
class Explanation(Record):
    """One input explained by several methods.

    ``words`` the displayed words, ``segments`` their segment (0 = text, 1 = text pair),
    ``relevance`` method -> one value per word, ``seconds`` method -> wall time. Saved as JSON
    (``save``/``load``, format ``headprune.Explanation``).
    """

    FORMAT: ClassVar[str] = FORMAT

    text: str
    text_pair: str | None
    words: list[str]
    segments: list[int]
    relevance: dict[str, list[float]]
    target: int
    target_name: str
    probability: float
    seconds: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    # ---- persistence (``Record``: to_dict/from_dict/save/load) ---------------------------------

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Explanation:
        if isinstance(data, dict) and "format_version" in data:  # written before Record's "version"
            data = {k: v for k, v in data.items() if k != "format_version"}
        return super().from_dict(data, where)

    # ---- display -------------------------------------------------------------------------------

    def normalized(self) -> dict[str, list[float]]:
        """Per method, word relevance divided by its largest absolute value (in [-1, 1])."""
        out = {}
        for name, values in self.relevance.items():
            peak = max((abs(v) for v in values), default=0.0)
            out[name] = [v / peak if peak > 0 else 0.0 for v in values]
        return out

    def to_html(self) -> str:
        """A complete, self-contained HTML page (inline CSS, no scripts, no external files)."""
        scaled = self.normalized()
        rows = []
        for name, values in scaled.items():
            spans = []
            for i, (word, value) in enumerate(zip(self.words, values, strict=True)):
                if i > 0 and self.segments[i] != self.segments[i - 1]:
                    spans.append('<span class="sep">‖</span>')
                raw = self.relevance[name][i]
                spans.append(
                    f'<span class="w" style="background:{_css_colour(value)}" '
                    f'title="{html.escape(name)}: {raw:.4g}">{html.escape(word)}</span>'
                )
            secs = self.seconds.get(name)
            timing = f'<div class="t">{secs:.3f} s</div>' if secs is not None else ""
            rows.append(
                f'<tr><th>{html.escape(name)}{timing}</th><td class="text">{" ".join(spans)}</td></tr>'
            )
        model = html.escape(str(self.provenance.get("model", "")))
        title = f"headprune explain: {html.escape(self.target_name)}"
        pair = f"<p><b>text pair:</b> {html.escape(self.text_pair)}</p>" if self.text_pair else ""
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
th {{ text-align: right; vertical-align: top; padding: 0.5em 1em 0.5em 0; font-weight: 600; white-space: nowrap; }}
td.text {{ padding: 0.5em 0; line-height: 2.1; max-width: 60em; }}
tr {{ border-bottom: 1px solid #eee; }}
span.w {{ padding: 0.15em 0.2em; border-radius: 0.25em; }}
span.sep {{ color: #999; margin: 0 0.4em; }}
div.t {{ font-weight: 400; font-size: 0.75em; color: #888; }}
.legend span {{ display: inline-block; width: 2.5em; height: 1em; vertical-align: middle; }}
p.meta {{ color: #555; }}
</style></head>
<body>
<h2>Why <i>{html.escape(self.target_name)}</i>? (p = {self.probability:.3f})</h2>
<p class="meta">model {model}; each row is one method, each word coloured by its relevance for the
explained class, scaled per method (hover for raw values). Word pieces are merged by summing.</p>
<p class="legend">against <span style="background:{_css_colour(-1.0)}"></span>
<span style="background:{_css_colour(-0.5)}"></span> <span style="background:{_css_colour(0.0)}"></span>
<span style="background:{_css_colour(0.5)}"></span> <span style="background:{_css_colour(1.0)}"></span> for</p>
<p><b>text:</b> {html.escape(self.text)}</p>{pair}
<table>
{chr(10).join(rows)}
</table>
</body></html>
"""

    def save_html(self, path: str | os.PathLike[str]) -> Path:
        atomic_write_text(path, self.to_html())
        return Path(path)

    def save_png(self, path: str | os.PathLike[str]) -> Path:
        """Methods in rows, words in columns, colour = scaled relevance (red for, blue against).
        Drawn on a matplotlib ``Figure`` (no pyplot state) and written atomically."""
        from matplotlib.figure import Figure

        scaled = self.normalized()
        names = list(scaled)
        grid = [scaled[n] for n in names]
        width = max(6.0, 0.45 * len(self.words) + 2.0)
        fig = Figure(figsize=(width, 0.5 * len(names) + 1.8))
        ax = fig.subplots()
        ax.imshow(grid or [[0.0]], cmap="bwr", vmin=-1, vmax=1, aspect="auto")
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(len(self.words)), self.words, rotation=60, ha="right", fontsize=8)
        for i, _ in enumerate(self.segments[1:], start=1):
            if self.segments[i] != self.segments[i - 1]:
                ax.axvline(i - 0.5, color="black", linewidth=1.5)
        ax.set_title(f"relevance for '{self.target_name}' (p = {self.probability:.3f})", fontsize=10)
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=120)
        return Path(path)


def _css_colour(value: float) -> str:
    """Scaled relevance in [-1, 1] -> a translucent red (positive) or blue (negative)."""
    value = max(-1.0, min(1.0, float(value)))
    rgb = "220,38,38" if value >= 0 else "37,99,235"
    return f"rgba({rgb},{abs(value) * 0.85:.3f})"


def merge_word_pieces(
    tokenizer: Any, encoding: Any, token_values: dict[str, list[float]], texts: list[str]
) -> tuple[list[str], list[int], dict[str, list[float]]]:
    """Sum token values into words of the original text(s).

    ``encoding`` is the tokenizer's output for one example (a fast tokenizer's ``BatchEncoding``
    with offsets); ``texts`` the strings it encoded (text, and text pair if any). Returns
    ``(words, segments, values per word)``; special tokens are dropped.
    """
    ids = encoding["input_ids"][0].tolist()
    if getattr(encoding, "is_fast", False) and "offset_mapping" in encoding:
        word_ids = encoding.word_ids(0)
        sequence_ids = encoding.sequence_ids(0)
        offsets = encoding["offset_mapping"][0].tolist()
        keys = [None if w is None or s is None else (s, w) for w, s in zip(word_ids, sequence_ids, strict=True)]
    else:  # slow tokenizer: a piece starting with "##" continues the previous word
        special = set(tokenizer.all_special_ids)
        tokens = tokenizer.convert_ids_to_tokens(ids)
        keys, word, segment, offsets, sequence_ids = [], -1, 0, [], []
        for i, (tok, tid) in enumerate(zip(tokens, ids, strict=True)):
            if tid in special:
                if i > 0 and tid == getattr(tokenizer, "sep_token_id", None):
                    segment += 1
                keys.append(None)
            else:
                word = word if tok.startswith("##") else word + 1
                keys.append((min(segment, len(texts) - 1), word))
            offsets.append((0, 0))
            sequence_ids.append(None)
    words: list[str] = []
    segments: list[int] = []
    values = {name: [] for name in token_values}
    spans: list[list[int]] = []  # per word [segment, start, end] in its text
    tokens = tokenizer.convert_ids_to_tokens(ids)
    previous = None
    for position, key in enumerate(keys):
        if key is None:
            continue
        start, end = offsets[position]
        if key != previous:
            words.append("")
            segments.append(int(key[0]))
            spans.append([int(key[0]), start, end])
            for name in values:
                values[name].append(0.0)
            previous = key
        spans[-1][2] = end
        piece = tokens[position]
        words[-1] += piece[2:] if piece.startswith("##") and words[-1] else piece
        for name, vals in token_values.items():
            values[name][-1] += float(vals[position])
    for i, (segment, start, end) in enumerate(spans):
        if end > start:  # the original spelling (case, accents) when offsets are known
            words[i] = texts[segment][start:end]
    return words, segments, values


def explain_text(
    model: PreTrainedModel,
    tokenizer: Any,
    text: str,
    text_pair: str | None = None,
    methods: str | list[str] = "all",
    *,
    target: int | str | None = None,
    max_length: int = 512,
    method_options: dict[str, dict[str, Any]] | None = None,
) -> Explanation:
    """Explain one input with each method; ``target`` is a class index or name (default: predicted).

    Returns an :class:`Explanation` with one relevance value per word per method.
    """
    if not isinstance(text, str) or not text.strip():
        raise HeadpruneError("the text to explain is empty")
    names = parse_methods(methods)
    target_id = class_index(target, model)
    encoding = tokenizer(
        text, text_pair, truncation=True, max_length=max_length, return_tensors="pt",
        return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)),
    )
    inputs = {k: v for k, v in encoding.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad():
        probs = torch.softmax(model(**inputs).logits.float(), dim=-1)[0]
    if target_id is None:
        target_id = int(probs.argmax())

    options = default_method_options(tokenizer, method_options)
    token_values: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    settings: dict[str, dict[str, Any]] = {}
    for name in names:
        explainer = make_relevance(name, model, **options.get(name, {}))
        settings[name] = explainer.options()
        tick = time.perf_counter()
        token_values[name] = explainer.attribute(inputs, target=target_id)[0].cpu().tolist()
        seconds[name] = time.perf_counter() - tick
    texts = [text] + ([text_pair] if text_pair else [])
    words, segments, values = merge_word_pieces(tokenizer, encoding, token_values, texts)
    return Explanation(
        text=text,
        text_pair=text_pair,
        words=words,
        segments=segments,
        relevance=values,
        target=target_id,
        target_name=label_names(model)[target_id],
        probability=float(probs[target_id]),
        seconds=seconds,
        provenance={
            "model": getattr(model.config, "_name_or_path", "") or model.config.model_type,
            "methods": settings,
        },
    )
