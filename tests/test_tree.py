"""Attribution trees: a hand-made tensor gives exactly the expected tree; real (tiny) trees are trees;
word merging, sentence pairs, JSON round trips, renderers and the CLI."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest
import torch
from transformers import BertTokenizer

from attribution import AttAttr
from attribution.core.errors import HeadpruneError
from attribution.core.inputs import class_index, label_names
from attribution.tree import (
    AttributionTree,
    TokenInfo,
    attribution_tree,
    build_tree,
    merge_units,
    tree_from_attributions,
)
from attribution.tree_render import layout, render_html, render_svg, save_tree
from tests.conftest import sharp_model, tiny_model

TOKENS = ["[CLS]", "a", "b", "c", "d", "[SEP]"]
SPECIAL = [True, False, False, False, False, True]
CLS, A, B, C, D, SEP = range(6)


def hand_made() -> torch.Tensor:
    """[L=3, N=6, N=6] with a known structure (values chosen so every rule matters).

    Layer 2 (top): b reads a (4.0, the layer max -> 1.0), c (0.45), d (0.35); the [CLS] row (50) and
      [SEP] row (4.0 -> 1.0) are there too; the diagonal b->b (1.0) is neither an edge nor the scale.
    Layer 1: a reads d (4.0 -> 1.0), c reads d (0.75, loses: d is taken by the stronger edge),
      c reads [SEP] (0.5), d reads b (0.975, but d is not in the tree before layer 1), [SEP] reads c.
    Layer 0: d reads [CLS] (1.0), a reads c (0.3), b reads c (negative), [CLS] row 10 (ignored).
    Root totals (positive, off-diagonal, [CLS] row excluded): b 7.2, [SEP] 7.9 (special: not a root),
    c 5.0, d 4.9, a 4.3.
    """
    s = torch.zeros(3, 6, 6, dtype=torch.float64)
    s[2, CLS, C] = 50.0
    s[2, B, A], s[2, B, C], s[2, B, D], s[2, B, B] = 4.0, 1.8, 1.4, 1.0
    s[2, SEP, D] = 4.0
    s[1, A, D], s[1, C, D], s[1, C, SEP], s[1, D, B], s[1, SEP, C] = 4.0, 3.0, 2.0, 3.9, 3.9
    s[0, D, CLS], s[0, A, C], s[0, B, C], s[0, CLS, B] = 1.0, 0.3, -5.0, 10.0
    return s


def edges_of(tree: AttributionTree) -> list[tuple[int, int, int, float]]:
    return [(e.parent, e.child, e.layer, round(e.score, 6)) for e in tree.edges]


def test_hand_made_tensor_gives_expected_tree():
    tree = build_tree(hand_made(), TOKENS, special=SPECIAL, tau=0.4)
    assert tree.root == B
    assert edges_of(tree) == [(B, A, 2, 1.0), (B, C, 2, 0.45), (A, D, 1, 1.0), (C, SEP, 1, 0.5), (D, CLS, 0, 1.0)]
    raw = {(e.parent, e.child): e.raw for e in tree.edges}
    assert raw[(B, C)] == 1.8 and raw[(D, CLS)] == 1.0
    assert [tree.level(i) for i in range(6)] == [0, 2, 3, 2, 1, 1]
    assert tree.parent(D) == A and tree.parent(B) is None
    totals = [n.total for n in tree.nodes]
    assert totals[1:] == pytest.approx([4.3, 7.2, 5.0, 4.9, 7.9])


def test_tau_is_respected_strictly():
    # tau 0.3: b->d (0.35) now clears it at layer 2, so a->d is no longer possible in layer 1,
    # and a->c (exactly 0.3) does not clear it (strictly above)
    tree = build_tree(hand_made(), TOKENS, special=SPECIAL, tau=0.3)
    assert edges_of(tree) == [(B, A, 2, 1.0), (B, C, 2, 0.45), (B, D, 2, 0.35), (C, SEP, 1, 0.5), (D, CLS, 0, 1.0)]
    # tau 0.5: only edges above 0.5 (c->[SEP] at exactly 0.5 is out)
    tree = build_tree(hand_made(), TOKENS, special=SPECIAL, tau=0.5)
    assert edges_of(tree) == [(B, A, 2, 1.0), (A, D, 1, 1.0), (D, CLS, 0, 1.0)]
    for tau in (0.0, 0.2, 0.45, 0.8, 1.0):
        tree = build_tree(hand_made(), TOKENS, special=SPECIAL, tau=tau)
        assert all(e.score > tau for e in tree.edges)
    assert build_tree(hand_made(), TOKENS, special=SPECIAL, tau=1.0).edges == []


def test_diagonal_does_not_set_the_scale():
    # a huge self-interaction (with words merged: the pieces of one word) must not drown real edges
    scores = hand_made()
    scores[2, A, A] = 100.0
    scores[1, D, D] = 100.0
    assert edges_of(build_tree(scores, TOKENS, special=SPECIAL)) == edges_of(build_tree(hand_made(), TOKENS,
                                                                                         special=SPECIAL))


def test_special_tokens_dropped_and_heads_summed():
    tree = build_tree(hand_made(), TOKENS, special=SPECIAL, special_tokens="drop")
    # no [SEP]/[CLS] rows or columns: layer 0's scale becomes a->c (0.3), and c is already in
    assert tree.root == B
    assert edges_of(tree) == [(B, A, 2, 1.0), (B, C, 2, 0.45), (A, D, 1, 1.0)]
    # [L, H, N, N] is summed over heads: the same tree as the pre-summed tensor
    split = torch.stack([hand_made() * 0.25, hand_made() * 0.75], dim=1)
    assert edges_of(build_tree(split, TOKENS, special=SPECIAL)) == edges_of(
        build_tree(hand_made(), TOKENS, special=SPECIAL)
    )


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(HeadpruneError, match="tokens"):
        build_tree(hand_made(), TOKENS[:4])
    with pytest.raises(HeadpruneError, match="tau"):
        build_tree(hand_made(), TOKENS, tau=1.5)
    with pytest.raises(HeadpruneError, match="special_tokens"):
        build_tree(hand_made(), TOKENS, special_tokens="maybe")
    with pytest.raises(HeadpruneError, match=r"\[L, N, N\]"):
        build_tree(torch.zeros(3, 6), TOKENS)


def test_merge_units_sums_pieces():
    scores = torch.arange(16, dtype=torch.float64).view(1, 4, 4)
    merged = merge_units(scores, [[0], [1, 2], [3]])
    expected = torch.tensor([[0, 1 + 2, 3], [4 + 8, 5 + 6 + 9 + 10, 7 + 11], [12, 13 + 14, 15]], dtype=torch.float64)
    torch.testing.assert_close(merged[0], expected)


# --------------------------------------------------------------------------------------------
# real (tiny) models

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "alpha", "beta", "play", "##ing", "##ed"] + [
    f"w{i}" for i in range(40)
]


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


def assert_is_tree(tree: AttributionTree) -> None:
    """Independent of AttributionTree.validate: a rooted tree over tree.members."""
    members = set(tree.members)
    assert len(members) == len(tree.members), "a node joined twice"
    assert len(tree.edges) == len(members) - 1
    parents: dict[int, int] = {}
    for edge in tree.edges:
        assert edge.child not in parents, "two parents"
        assert edge.child != tree.root
        parents[edge.child] = edge.parent
        assert edge.score > tree.tau
    for node in members:  # walking up always reaches the root without revisiting: connected, acyclic
        seen, current = set(), node
        while current != tree.root:
            assert current not in seen, "cycle"
            seen.add(current)
            current = parents[current]
    assert tree.root is not None and not tree.nodes[tree.root].special


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trees_from_real_attattr_are_trees(tokenizer, seed):
    model = sharp_model(seed=seed + 3)
    texts = [("w1 alpha playing w2 beta w7 w3", None), ("w4 played w5 w6", "w8 alpha w9 playing")]
    sizes = []
    for text, pair in texts:
        for tau in (0.05, 0.2, 0.4):
            for word_level in (True, False):
                tree = attribution_tree(model, tokenizer, text, pair, tau=tau, n_steps=4, integration="gausslegendre",
                                        word_level=word_level)
                assert_is_tree(tree)
                sizes.append(len(tree.members))
                # padding-free node list: every real token appears in exactly one node
                covered = sorted(p for n in tree.nodes for p in n.positions)
                assert covered == list(range(len(tree.provenance["tokens"])))
    assert max(sizes) >= 4  # not trivially a lone root


def test_tree_of_a_batch_row_ignores_padding(tokenizer):
    """The same example attributed alone and as a padded batch row gives the same tree."""
    model = sharp_model()
    texts = ["w1 alpha playing w2", "w3 w4 w5 beta w6 w7 w8 w9"]
    encoding = tokenizer(texts, padding=True, return_tensors="pt")
    batch = {k: v for k, v in encoding.items()}
    attributions = AttAttr(model).attribute(batch, n_steps=4, integration="gausslegendre")
    info = TokenInfo.from_encoding(encoding, tokenizer, row=0)
    assert info.tokens == ["[CLS]", "w1", "alpha", "play", "##ing", "w2", "[SEP]"]
    from_batch = tree_from_attributions(attributions[0], info, tau=0.1, tokenizer=tokenizer)
    alone = attribution_tree(model, tokenizer, texts[0], tau=0.1, n_steps=4, integration="gausslegendre")
    structure = [(e.parent, e.child, e.layer) for e in from_batch.edges]
    assert structure == [(e.parent, e.child, e.layer) for e in alone.edges]
    assert [e.score for e in from_batch.edges] == pytest.approx([e.score for e in alone.edges], abs=1e-4)
    assert [n.text for n in from_batch.nodes] == ["[CLS]", "w1", "alpha", "playing", "w2", "[SEP]"]
    assert from_batch.nodes[3].positions == [3, 4]


def test_sentence_pair_segments_and_word_merging(tokenizer):
    model = tiny_model("bert", seed=4)
    tree = attribution_tree(
        model, tokenizer, "w1 playing", "played w2", tau=0.0, n_steps=3, integration="gausslegendre"
    )
    assert [(n.text, n.segment, n.special) for n in tree.nodes] == [
        ("[CLS]", None, True), ("w1", 0, False), ("playing", 0, False), ("[SEP]", None, True),
        ("played", 1, False), ("w2", 1, False), ("[SEP]", None, True),
    ]
    assert tree.nodes[2].positions == [2, 3] and tree.nodes[4].positions == [5, 6]
    if any(tree.nodes[i].segment == 1 for i in tree.members):
        assert "(text 2)" in tree.to_text()
    tokens = attribution_tree(model, tokenizer, "w1 playing", "played w2", tau=0.0, n_steps=3,
                              integration="gausslegendre", word_level=False)
    assert [n.text for n in tokens.nodes][2:4] == ["play", "##ing"] and tokens.provenance["unit"] == "token"
    with pytest.raises(HeadpruneError, match="empty"):
        attribution_tree(model, tokenizer, "  ")


def test_json_round_trip_and_renderers(tmp_path, tokenizer):
    tree = attribution_tree(sharp_model(), tokenizer, "w1 alpha playing w2 beta w7", "w4 w5", tau=0.1, n_steps=3,
                            integration="gausslegendre")
    path = tmp_path / "tree.json"
    tree.save(path)
    loaded = AttributionTree.load(path)
    assert loaded == tree
    assert loaded.to_dict() == json.loads(path.read_text())

    svg = render_svg(tree)
    root = ET.fromstring(svg)  # well-formed, standalone
    assert root.tag.endswith("svg")
    assert len([e for e in root.iter() if e.tag.endswith("line") and e.find("{*}title") is not None]) == len(tree.edges)
    html = render_html(tree)
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html and "http://" not in html.replace(
        "http://www.w3.org/2000/svg", "")
    positions = layout(tree)
    assert set(positions) == set(tree.members) and positions[tree.root][1] == tree.num_layers

    for suffix in ("png", "svg", "html", "txt", "json"):
        assert save_tree(tree, tmp_path / f"t.{suffix}") == suffix
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "t.txt").read_text().strip() == tree.to_text()
    with pytest.raises(HeadpruneError, match="unsupported"):
        save_tree(tree, tmp_path / "t.doc")


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(HeadpruneError, match="expected a headprune.attribution_tree file"):
        AttributionTree.load(bad)
    data = build_tree(hand_made(), TOKENS, special=SPECIAL).to_dict()
    data["edges"].append(dict(data["edges"][0]))  # a second parent for the same child
    bad.write_text(json.dumps(data))
    with pytest.raises(HeadpruneError, match=f"^{re.escape(str(bad))}: node .* has two parents"):
        AttributionTree.load(bad)


def test_text_form_lists_edges_with_one_based_layers():
    tree = build_tree(hand_made(), TOKENS, special=SPECIAL)
    text = tree.to_text().splitlines()
    assert text[1] == "b"
    assert text[2:] == [
        "├── [L3 1.00] a",
        "│   └── [L2 1.00] d",
        "│       └── [L1 1.00] [CLS]",
        "└── [L3 0.45] c",
        "    └── [L2 0.50] [SEP]",
    ]


def test_cli_tree(tmp_path, monkeypatch, capsys, tokenizer):
    from prune import cli

    model = sharp_model()
    model.config.id2label = {0: "neg", 1: "neu", 2: "pos"}
    monkeypatch.setattr("prune.checkpoints.load_model", lambda name, **kw: (model, tokenizer))
    out, saved = tmp_path / "t.html", tmp_path / "t.json"
    code = cli.main(["tree", "--model", "x", "--text", "w1 alpha playing w2", "--n-steps", "3",
                     "--integration", "gausslegendre", "--tau", "0.1", "--target", "pos", "--out", str(out),
                     "--out", str(saved)])
    assert code == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert printed.startswith("attribution tree: tau 0.1") and f"wrote {out}" in printed
    loaded = AttributionTree.load(saved)
    assert loaded.provenance["target_label"] == "pos" and loaded.provenance["n_steps"] == 3
    assert loaded.provenance["integration"] == "gausslegendre"
    assert cli.main(["tree", "--model", "x", "--text", "w1", "--target", "nope"]) == 2
    assert "unknown class 'nope'; the model's classes: neg, neu, pos" in capsys.readouterr().err
    # the one class parser: names first, then indices; None is the predicted class
    assert [class_index(t, model) for t in ("pos", "1", 0, None)] == [2, 1, 0, None]
    assert label_names(model) == ["neg", "neu", "pos"]
    with pytest.raises(HeadpruneError, match=r"class index 3 outside 0\.\.2"):
        class_index("3", model)
    assert cli.main(["tree", "--model", "x", "--text", "w1", "--out", str(tmp_path / "t.doc")]) == 2
    assert "unsupported tree output" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_tree_is_a_tree():
    from prune.checkpoints import load_model

    model, tokenizer = load_model("minilm")
    tree = attribution_tree(model, tokenizer, "the flight was delayed again, unbelievable", tau=0.2, n_steps=3,
                            integration="gausslegendre")
    assert_is_tree(tree)
    assert len(tree.members) >= 3
    assert any(n.text == "unbelievable" for n in tree.nodes)  # WordPiece pieces merged back into words
