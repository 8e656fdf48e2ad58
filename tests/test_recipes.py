"""docs/recipes.md: every recipe has its peer, and the peer agrees (tests/test_docs.py
runs every block alone and checks it prints what the page says).

Each section of the page holds a fisherbound block and a peer block (first line
``# needs: backpack`` / ``curvlinops`` / ``laplace``), each followed by its printed
output. The fisherbound blocks always run; a peer block runs where its module is
installed and must (1) print what the page says and (2) agree with fisherbound on
every line the two print alike, within one unit of the last printed digit. No scale
factor is applied in the tests: the blocks are written in one convention each, the
mean Fisher (BackPACK and curvlinops on ``nn.CrossEntropyLoss()``, fisherbound with
``reduction="mean"``) for EWC, merging and sharpness, the summed Fisher
(``reduction="sum"`` on both sides) for pruning and for the evidence, where
laplace-torch's prior precision is 1/σ² for fisherbound's ``prior_variance`` σ². The
one number printed differently, curvlinops' exact tr H, must lie in fisherbound's
95% interval of its Hutchinson estimate.
"""

from __future__ import annotations

import re

import pytest
from _docs_blocks import (
    DOCS,
    Block,
    code_lines,
    page_blocks,
    page_runs,
    python_blocks,
    same_line,
    same_output,
    skeleton,
)

pytest.importorskip("torch")

BLOCKS = python_blocks("recipes")
# section title -> (peer module, lines both blocks must print alike); test ids below
RECIPES = {
    "An EWC penalty from the Fisher diagonal, with its error bar": ("backpack", 3),
    "Fisher-weighted merging of two fine-tuned models": ("backpack", 4),
    "Fisher pruning scores": ("backpack", 2),
    "Sharpness: λ_max and the trace, of the Hessian and of the Fisher": ("curvlinops", 2),
    "The Laplace log evidence for model selection": ("laplace", 3),
}
IDS = ["ewc", "merging", "pruning", "sharpness", "evidence"]


def _pair(section: str) -> tuple[Block, Block]:
    ours = [b for b in BLOCKS if b.section == section and b.needs is None]
    peers = [b for b in BLOCKS if b.section == section and b.needs is not None]
    assert len(ours) == 1, f"{section!r}: one fisherbound block"
    assert len(peers) == 1, f"{section!r}: one peer block"
    return ours[0], peers[0]


def _output(section: str, peer: bool) -> str:
    """What the block printed, run alone in a fresh interpreter (``page_runs``, shared
    with tests/test_docs.py, which checks each block's output against the page)."""
    block = _pair(section)[peer]
    run = page_runs("recipes")[page_blocks("recipes").index(block)]
    assert run is not None
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_page_has_the_recipes_with_marked_peers() -> None:
    assert {b.section for b in BLOCKS} == set(RECIPES)
    for section, (module, _) in RECIPES.items():
        ours, peer = _pair(section)
        assert peer.needs == module
        assert "fisherbound" in ours.code
        assert "fisherbound" not in peer.code


def _interval(text: str) -> tuple[float, float]:
    m = re.search(r"95% interval \[([-\d.]+), ([-\d.]+)\]", text)
    assert m is not None
    return float(m[1]), float(m[2])


@pytest.mark.parametrize("section", list(RECIPES), ids=IDS)
def test_peer_prints_what_the_page_says_and_agrees(section: str) -> None:
    module, min_shared = RECIPES[section]
    pytest.importorskip(module)
    peer, ours = _output(section, True), _output(section, False)
    expected = _pair(section)[1].expected
    assert same_output(peer, expected), f"{section!r}: the peer prints\n{peer}\nnot\n{expected}"
    shared = 0
    for line in peer.strip().splitlines():
        alike = [o for o in ours.strip().splitlines() if skeleton(o) == skeleton(line)]
        if alike:
            assert any(same_line(line, o) for o in alike), f"peer {line!r} against ours {alike}"
            shared += 1
        elif line.startswith("tr H = "):  # exact (curvlinops) in our 95% interval
            low, high = _interval(ours)
            assert low <= float(line.split()[3]) <= high, (line, low, high)
        else:
            pytest.fail(f"{section!r}: peer line {line!r} has no counterpart in\n{ours}")
    assert shared >= min_shared


def test_line_counts_on_the_page() -> None:
    page = (DOCS / "recipes.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| ([^|]+) \| (\d+) \| (\d+) \([^)]+\) \| (\d+) \| (\d+) \|$", page, re.M)
    assert len(rows) == len(RECIPES)
    for (_, *counts), section in zip(rows, RECIPES):
        ours, peer = (code_lines(b.code) for b in _pair(section))
        only_ours = [line for line in ours if line not in peer]
        only_peer = [line for line in peer if line not in ours]
        assert [int(c) for c in counts] == [len(ours), len(peer), len(only_ours), len(only_peer)], (
            section
        )
