"""Every HTML page headprune writes, opened in a real headless Chromium through Playwright: the run
report (``report.html``: a full tiny recipe with trees, and a compression recipe), ``headprune explain``
and the attribution-tree pages (HTML and standalone SVG, from the CLI, from a recipe's analysis stage,
and from a hand-made tree with wide labels).

Each page: no console error, page error or failed request, and nothing fetched but the file itself
(``file:`` and ``data:`` URLs: the pages are self-contained); every ``<img>`` decodes to the size of the
PNG it inlines; tables and token rows hold what the run files say (the report's tables cell by cell
against ``report.md``, one explain row per method with one span per word, one edge-table row per tree
edge); no SVG node label leaves its box, and node boxes neither overlap nor leave the drawing.

The browser is Debian's ``chromium-headless-shell`` (or ``HEADPRUNE_CHROMIUM``, or Playwright's own
download). Without it these tests skip locally and FAIL when ``CI`` is set: CI installs it (``.ci/run``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from attribution.explain_html import Explanation
from attribution.relevance import parse_methods
from attribution.tree import AttributionTree, build_tree
from attribution.tree_render import render_html, render_svg
from prune.cli import main
from prune.pipeline import run_recipe
from prune.recipe import load_recipe
from tests.tiny_recipe import tiny_model_dir, tiny_recipe

BROWSER_CANDIDATES = (
    "/usr/bin/chromium-headless-shell",
    "/usr/lib/chromium/chromium-headless-shell",
    "/usr/bin/chromium",
    "/usr/bin/chromium-browser",
)


def _missing(reason: str) -> None:
    """Without a browser: a failure in CI (it installs one), a skip with the reason elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}; .ci/run installs Debian's chromium-headless-shell", pytrace=False)
    pytest.skip(f"{reason} (apt-get install chromium-headless-shell; set CI=1 to make this a failure)")


def browser_executable() -> str | None:
    """``HEADPRUNE_CHROMIUM``, else the first Debian Chromium found; None: Playwright's own download."""
    chosen = os.environ.get("HEADPRUNE_CHROMIUM")
    if chosen:
        return chosen
    found = shutil.which("chromium-headless-shell")
    return found or next((c for c in BROWSER_CANDIDATES if os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the Python package playwright is not installed (it is in the test extra)")
    executable = browser_executable()
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable, args=args, headless=True)
        except PlaywrightError as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            _missing(f"no Chromium could be launched ({executable or 'Playwright download'}: {first})")
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Opened:
    """A page loaded from a file, and everything that went wrong while loading it."""

    page: Any
    problems: list[str] = field(default_factory=list)

    def run(self, script: str, arg: Any = None) -> Any:
        return self.page.evaluate(script, arg)


@pytest.fixture
def open_page(browser) -> Iterator[Any]:
    contexts = []

    def opener(path: Path) -> Opened:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        opened = Opened(page)
        page.on("console", lambda m: m.type == "error" and opened.problems.append(f"console error: {m.text}"))
        page.on("pageerror", lambda e: opened.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: opened.problems.append(f"request failed: {r.url[:80]}"))
        page.on(
            "request",
            lambda r: r.url != path.resolve().as_uri() and not r.url.startswith("data:")
            and opened.problems.append(f"external request: {r.url[:80]}"),
        )
        page.goto(path.resolve().as_uri(), wait_until="load")
        return opened

    yield opener
    for context in contexts:
        context.close()


def assert_clean(opened: Opened) -> None:
    opened.page.wait_for_timeout(50)  # late console messages
    assert opened.problems == []


# ---- what the checks read from a page ------------------------------------------------------------

IMAGES = """async () => Promise.all([...document.images].map(async (img) => {
    let decoded = true;
    try { await img.decode(); } catch (error) { decoded = false; }
    const box = img.getBoundingClientRect();
    return {alt: img.alt, decoded, width: img.naturalWidth, height: img.naturalHeight,
            shown: box.width * box.height, png: img.src.startsWith("data:image/png;base64,")};
}))"""

TABLES = """() => [...document.querySelectorAll("table")].map((table) => ({
    rows: [...table.rows].map((row) => [...row.cells].map((cell) => cell.textContent.trim())),
    area: table.getBoundingClientRect().width * table.getBoundingClientRect().height,
}))"""

# every node of every SVG: a <g> holding a <rect> (the box) and a <text> (its label)
SVG_NODES = """() => [...document.querySelectorAll("svg")].map((svg) => {
    const view = svg.viewBox.baseVal;
    const box = (b) => [b.x, b.y, b.width, b.height];
    const nodes = [...svg.querySelectorAll("g")].filter((g) => g.querySelector("rect") && g.querySelector("text"))
        .map((g) => {
            const text = g.querySelector("text");
            const natural = text.cloneNode(true);  // the label's own width, without any textLength fitting
            natural.removeAttribute("textLength");
            natural.removeAttribute("lengthAdjust");
            svg.appendChild(natural);
            const width = natural.getComputedTextLength();
            natural.remove();
            return {label: text.textContent, rect: box(g.querySelector("rect").getBBox()),
                    text: box(text.getBBox()), natural: width};
        });
    const others = [...svg.querySelectorAll("text")].filter((t) => !t.closest("g")).map((t) => ({
        label: t.textContent, text: box(t.getBBox())}));
    return {view: [view.x, view.y, view.width, view.height], nodes, others};
})"""


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (independent of the browser)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def inside(inner: list[float], outer: list[float], margin: float = 0.0) -> bool:
    x, y, w, h = inner
    ox, oy, ow, oh = outer
    return x >= ox + margin and y >= oy and x + w <= ox + ow - margin and y + h <= oy + oh


def overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def assert_images_decode(opened: Opened, files: list[Path]) -> None:
    """The page's images, in order, are the PNG files, decoded at their own pixel size and shown."""
    images = opened.run(IMAGES)
    assert len(images) == len(files)
    for image, path in zip(images, files, strict=True):
        assert image["decoded"] and image["png"], image["alt"]
        assert (image["width"], image["height"]) == png_size(path.read_bytes()) != (0, 0)
        assert image["shown"] > 0


def assert_tree_svg_fits(opened: Opened, labels: list[list[str]]) -> None:
    """Per SVG of the page: its node labels (in order) are ``labels[k]``, each inside its box with
    a margin even at its natural width; boxes pairwise apart and inside the viewBox; the other
    texts (level names, legend) overlap no box."""
    svgs = opened.run(SVG_NODES)
    assert [[n["label"] for n in svg["nodes"]] for svg in svgs] == labels
    for svg in svgs:
        nodes = svg["nodes"]
        for node in nodes:
            label, rect, text = node["label"], node["rect"], node["text"]
            assert text[2] > 0 and text[3] > 0, f"label {label!r} has no glyphs"
            assert inside(text, rect, margin=2.0), f"label {label!r} {text} overflows its box {rect}"
            # the renderer's width is the font's: the label fits without being squeezed
            assert node["natural"] <= rect[2] - 4.0, f"label {label!r} is {node['natural']:.1f} px wide, box {rect}"
            assert inside(rect, svg["view"]), f"box of {label!r} leaves the drawing"
        for i, a in enumerate(nodes):
            for b in nodes[i + 1 :]:
                assert not overlap(a["rect"], b["rect"]), f"boxes of {a['label']!r} and {b['label']!r} overlap"
        for other in svg["others"]:
            assert inside(other["text"], svg["view"]), f"{other['label']!r} leaves the drawing"
            for node in nodes:
                assert not overlap(other["text"], node["rect"]), f"{other['label']!r} covers {node['label']!r}"


def tree_labels(tree: AttributionTree) -> list[str]:
    """Node labels in the SVG's drawing order (the layout's sentence order)."""
    members = sorted(tree.members, key=lambda i: (tree.nodes[i].positions[0], i))
    return [tree.nodes[i].text for i in members]


# ---- the report ----------------------------------------------------------------------------------

TREE_TEXTS = ["really good food and great service", "the day was awful"]
ANALYSIS = (
    "analysis:\n  tree:\n"
    f"    texts: {json.dumps(TREE_TEXTS)}\n"
    "    tau: 0.2\n    n_steps: 3\n    integration: gausslegendre\n    formats: [html, svg, json]\n"
)
COMPRESS = {
    "score": "score: null\n",
    "sweep": "sweep: null\n",
    "prune": "prune: null\n",
    "repair": "",
    "export": "export: null\n",
    "compress": (
        "compress:\n  criterion: fisher\n  split: train\n  examples: 16\n  batch_size: 4\n"
        "  target: {flops: 0.6}\n  latency_batch_size: 4\n  frontier: [0.7]\n"
        "  calibration_examples: 16\n  held_out_examples: 8\n"
    ),
}


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Tables of a Markdown file as rows of cell texts (the separator row dropped, ``\\|`` unescaped,
    the inline ``**bold**`` and ``code`` marks removed): what the HTML tables must show."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if all(re.fullmatch(r"-+", c) for c in cells):
                continue
            cells = [re.sub(r"\*\*(.+?)\*\*", r"\1", re.sub(r"`(.+?)`", r"\1", c)) for c in cells]
            if current is None:
                current = []
                tables.append(current)
            current.append(cells)
        else:
            current = None
    return tables


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A full tiny recipe (every pruning stage, plus trees) and a compression recipe."""
    tmp = tmp_path_factory.mktemp("report")
    full = run_recipe(load_recipe(tiny_recipe(tmp / "full", analysis=ANALYSIS)), tmp / "full" / "out", progress=False)
    assert "report" in full.ran
    compressed = run_recipe(load_recipe(tiny_recipe(tmp / "compress", **COMPRESS)), tmp / "compress" / "out",
                            progress=False)
    assert "report" in compressed.ran
    return {"full": tmp / "full" / "out", "compress": tmp / "compress" / "out"}


@pytest.mark.parametrize("run", ["full", "compress"])
def test_report_page_renders_its_figures_and_tables(runs, open_page, run):
    out = runs[run]
    opened = open_page(out / "report.html")
    markdown = (out / "report.md").read_text()
    figures = [out / m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)]
    assert len(figures) == (2 if run == "full" else 1)
    assert_images_decode(opened, figures)
    alts = opened.run("() => [...document.images].map((img) => img.alt)")
    assert alts == re.findall(r"!\[([^\]]*)\]", markdown)

    tables = opened.run(TABLES)
    expected = markdown_tables(markdown)
    assert len(tables) == len(expected) >= (4 if run == "full" else 2)
    for shown, written in zip(tables, expected, strict=True):
        assert shown["rows"] == written and shown["area"] > 0
    headings = opened.run("() => [...document.querySelectorAll('h1, h2, h3')].map((h) => h.textContent.trim())")
    assert headings == [re.sub(r"\*\*|`", "", h) for h in re.findall(r"^#{1,3} (.+)$", markdown, re.M)]
    assert_clean(opened)


def test_tree_pages_of_a_recipe_render(runs, open_page):
    trees = runs["full"] / "analysis" / "trees"
    for index in range(len(TREE_TEXTS)):
        tree = AttributionTree.load(trees / f"tree-{index}.json")
        for suffix in ("html", "svg"):
            opened = open_page(trees / f"tree-{index}.{suffix}")
            assert_tree_svg_fits(opened, [tree_labels(tree)])
            if suffix == "html":
                rows = opened.run(TABLES)
                assert len(rows) == 1 and len(rows[0]["rows"]) == 1 + len(tree.edges)
            assert_clean(opened)


# ---- headprune explain and headprune tree on a tiny model ---------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def test_explain_page_has_one_row_per_method_and_one_span_per_word(tiny_dir, tmp_path, open_page, capsys):
    page, saved = tmp_path / "explain.html", tmp_path / "explain.json"
    code = main(["explain", "--model", str(tiny_dir), "--text", "really good food, <b>not</b> bad",
                 "--text-pair", "the service", "--methods", "all", "--n-steps", "3", "--out", str(page),
                 "--json", str(saved)])
    assert code == 0, capsys.readouterr().err
    explanation = Explanation.load(saved)
    assert list(explanation.relevance) == parse_methods("all")  # integrated gradients (captum) too
    opened = open_page(page)
    rows = opened.run("""() => [...document.querySelectorAll("tr")].map((tr) => ({
        method: tr.querySelector("th").firstChild.textContent.trim(),
        words: [...tr.querySelectorAll("span.w")].map((s) => s.textContent),
        shown: [...tr.querySelectorAll("span.w")].every((s) => s.getBoundingClientRect().width > 0),
        separators: tr.querySelectorAll("span.sep").length,
    }))""")
    assert [r["method"] for r in rows] == list(explanation.relevance)
    for row in rows:
        assert row["words"] == explanation.words and row["shown"]
        assert row["separators"] == 1  # text | text pair
    assert "<" in explanation.words  # the markup is shown as text, not parsed as HTML
    assert opened.run("() => document.querySelectorAll('td b').length") == 0
    assert_clean(opened)
    # the PNG beside it decodes too
    picture = open_page(page.with_suffix(".png"))
    size = picture.run("() => [document.images[0].naturalWidth, document.images[0].naturalHeight]")
    assert tuple(size) == png_size(page.with_suffix(".png").read_bytes()) and size[0] > 0
    assert_clean(picture)


def test_cli_tree_pages_render(tiny_dir, tmp_path, open_page, capsys):
    outputs = [tmp_path / f"tree.{suffix}" for suffix in ("html", "svg", "json", "png")]
    code = main(["tree", "--model", str(tiny_dir), "--text", "really good food but awful service",
                 "--text-pair", "the place was fine", "--n-steps", "3", "--integration", "gausslegendre",
                 "--tau", "0.1", *[a for path in outputs for a in ("--out", str(path))]])
    assert code == 0, capsys.readouterr().err
    tree = AttributionTree.load(tmp_path / "tree.json")
    assert len(tree.members) >= 3
    for path in outputs[:2]:
        opened = open_page(path)
        assert_tree_svg_fits(opened, [tree_labels(tree)])
        assert_clean(opened)
    picture = open_page(outputs[3])
    assert picture.run("() => document.images[0].naturalWidth") == png_size(outputs[3].read_bytes())[0]


# wide glyphs (m, W), capitals, CJK and emoji (fallback fonts), markup, and a one-letter label
WIDE = ["[CLS]", "mmmmmmmmmm", "WWWWWWW", "日本語のテキスト", "i", "😀🔥 <b>", "[SEP]"]


def wide_tree() -> AttributionTree:
    """A hand-made tree whose 7 labels are all members (a chain plus the root's children)."""
    n = len(WIDE)
    scores = torch.zeros(2, n, n, dtype=torch.float64)
    root = 3
    for layer, (parent, children) in enumerate([(1, [0, 2]), (root, [1, 4, 5, 6])]):
        for child in children:
            scores[layer, parent, child] = 1.0
    scores[1, root, root] = 0.5
    return build_tree(scores, WIDE, special=[True, False, False, False, False, False, True], tau=0.1,
                      segments=[None, 0, 0, 0, 1, 1, None], provenance={"text": " ".join(WIDE)})


def test_wide_labels_stay_inside_their_boxes(tmp_path, open_page):
    tree = wide_tree()
    assert sorted(tree.members) == list(range(len(WIDE)))
    (tmp_path / "wide.html").write_text(render_html(tree), encoding="utf-8")
    (tmp_path / "wide.svg").write_text(render_svg(tree), encoding="utf-8")
    for name in ("wide.html", "wide.svg"):
        opened = open_page(tmp_path / name)
        assert_tree_svg_fits(opened, [WIDE])
        assert_clean(opened)
