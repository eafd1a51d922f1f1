"""Rendering report blocks to Markdown (figures by relative path) and to one self-contained HTML
file (figures inlined as base64)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

Block = tuple  # ("h", level, text) | ("p", text) | ("table", headers, rows) | ("img", path, alt) | ("code", lang, text)


def md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], out: Path) -> str:
    """Markdown with images referenced by relative path (``figures/*.png``)."""
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            parts.append(block[1])
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
            parts.append("\n".join(lines))
        elif kind == "img":
            parts.append(f"![{block[2]}]({Path(block[1]).relative_to(out).as_posix()})")
        elif kind == "code":
            parts.append(f"```{block[1]}\n{block[2]}\n```")
    return "\n\n".join(parts) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d2330;line-height:1.5}
h1{font-size:1.6em;border-bottom:2px solid #e3e6ee;padding-bottom:.3em}h2{font-size:1.25em;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #d9dde7;padding:.3em .7em;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f5f9}tr:nth-child(even) td{background:#fafbfd}
pre{background:#f6f8fa;border:1px solid #e3e6ee;border-radius:6px;padding:.8em;overflow-x:auto;font-size:.88em}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
img{max-width:100%;border:1px solid #eceff5;border-radius:4px}
"""


def _inline(text: str) -> str:
    """Escape, then the two Markdown inline forms the report uses: **bold** and `code`."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def render_html(blocks: list[Block], title: str) -> str:
    """One HTML file with the figures inlined as base64 data URIs (no external files)."""
    body = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{_inline(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(str(h))}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(block[1]).read_bytes()).decode("ascii")
            body.append(f'<p><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}"></p>')
        elif kind == "code":
            body.append(f'<pre><code class="language-{block[1]}">{html.escape(block[2])}</code></pre>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
