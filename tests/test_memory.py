"""The memory budget of the exact quantities (``max_memory``): chunk sizes follow it.

A hook on the adapter's per-example products records the largest cotangent chunk
the library hands over (its bytes, not wall time or resident memory); the
results must not depend on the budget.
"""

from __future__ import annotations

import numpy as np
import pytest

from fisherbound._quantities import CHUNK_COPIES, DEFAULT_MAX_MEMORY, columns_per_chunk
from fisherbound.adapters.numpy import MLP, ReferenceLinearization, linearize
from fisherbound.fisher import (
    fisher_blocks,
    fisher_bounds,
    fisher_dense,
    fisher_diagonal,
    fisher_trace,
)
from fisherbound.variance import classical_variance, compare_estimators, detach_and_mix_variance

N, C = 8, 40  # one column of the batch: N · C · 8 bytes = 2,560 bytes


@pytest.fixture
def lin():
    model = MLP.random([5, 6, C], activation="tanh", rng=0, xp=np, dtype=np.float64)
    x = np.random.default_rng(1).standard_normal((N, 5))
    return linearize(model, x)


@pytest.fixture
def largest(monkeypatch):
    """The bytes of the largest cotangent array passed to a per-example product."""
    seen = [0]
    for name in ("per_example_vjp", "sum_squared_per_example_vjp"):
        original = getattr(ReferenceLinearization, name)

        def hook(self, U, /, *args, _original=original, **kwargs):
            seen[0] = max(seen[0], int(U.nbytes))
            return _original(self, U, *args, **kwargs)

        monkeypatch.setattr(ReferenceLinearization, name, hook)
    return seen


COLUMN = N * C * 8


@pytest.mark.parametrize("columns", [1, 3, 16])
def test_chunks_follow_the_budget_and_results_do_not_depend_on_it(lin, largest, columns):
    budget = CHUNK_COPIES * COLUMN * columns
    assert columns_per_chunk(lin, 256, budget) == columns
    reference = fisher_diagonal(lin, max_memory=2**40)
    largest[0] = 0
    diagonal = fisher_diagonal(lin, max_memory=budget)
    assert largest[0] == columns * COLUMN  # the chunk the budget allows, no larger
    assert CHUNK_COPIES * largest[0] <= budget
    np.testing.assert_allclose(diagonal, reference, rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        fisher_trace(lin, max_memory=budget), fisher_trace(lin), rtol=1e-12, atol=0
    )
    small, big = fisher_blocks(lin, max_memory=budget), fisher_blocks(lin, max_memory=2**40)
    for name in big:  # off-diagonal entries cancel: rounding relative to the block
        scale = float(np.max(np.abs(big[name])))
        np.testing.assert_allclose(small[name], big[name], rtol=0, atol=1e-13 * scale)
    for lo, hi in zip(fisher_bounds(lin, max_memory=budget), fisher_bounds(lin), strict=True):
        np.testing.assert_allclose(lo, hi, rtol=1e-12, atol=0)


def test_variance_formulas_follow_the_budget(lin, largest):
    budget = CHUNK_COPIES * COLUMN * 2
    reference = detach_and_mix_variance(lin, max_memory=2**40)
    largest[0] = 0
    chunked = detach_and_mix_variance(lin, max_memory=budget)
    assert largest[0] == 2 * COLUMN
    np.testing.assert_allclose(chunked, reference, rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        detach_and_mix_variance(lin, what="trace", max_memory=budget),
        detach_and_mix_variance(lin, what="trace"),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        classical_variance(lin, max_memory=budget), classical_variance(lin), rtol=1e-12
    )


def test_trace_variance_jvp_rows_follow_the_budget(lin, monkeypatch):
    """Each JVP row is an (N, C) array: the rows go through jvp_batch in groups."""
    rows = [0]
    original = ReferenceLinearization.jvp_batch

    def hook(self, V, /, *args, **kwargs):
        rows[0] = max(rows[0], int(V.shape[0]))
        return original(self, V, *args, **kwargs)

    monkeypatch.setattr(ReferenceLinearization, "jvp_batch", hook)
    reference = detach_and_mix_variance(lin, what="trace", max_memory=2**40)
    assert rows[0] > 3  # unlimited: all rows of a chunk of columns at once
    rows[0] = 0
    budget = CHUNK_COPIES * COLUMN * 3
    chunked = detach_and_mix_variance(lin, what="trace", max_memory=budget)
    assert rows[0] == 3
    np.testing.assert_allclose(chunked, reference, rtol=1e-12)
    np.testing.assert_allclose(
        detach_and_mix_variance(lin, what="trace", per_example=True, max_memory=budget),
        detach_and_mix_variance(lin, what="trace", per_example=True),
        rtol=1e-12,
    )


def test_a_budget_below_one_column_still_takes_one_column(lin, largest):
    assert columns_per_chunk(lin, 256, 1) == 1
    reference = fisher_diagonal(lin)
    largest[0] = 0
    np.testing.assert_allclose(fisher_diagonal(lin, max_memory=1), reference, rtol=1e-12, atol=0)
    assert largest[0] == COLUMN


def test_the_default_budget_caps_the_chunk(lin):
    # 128 MiB holds all 256 default columns of this small batch ...
    assert columns_per_chunk(lin, 256, DEFAULT_MAX_MEMORY) == 256
    # ... and at vocabulary scale the columns, not the D-vector count, set the chunk:
    # N = 32, C = 10,000 float32 logits: 128 MiB / (4 · 1.28 MB) = 26 columns.
    big = type("Lin", (), {"logits": np.zeros((32, 10_000), np.float32), "xp": np})()
    assert columns_per_chunk(big, 256, DEFAULT_MAX_MEMORY) == 2**27 // (4 * 32 * 10_000 * 4)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_max_memory_must_be_a_positive_int(lin, bad):
    fronts = (
        fisher_diagonal,
        fisher_trace,
        fisher_blocks,
        fisher_dense,
        fisher_bounds,
        detach_and_mix_variance,
        classical_variance,
        compare_estimators,
    )
    for fn in fronts:
        with pytest.raises(
            (ValueError, TypeError), match=r"max_memory must be an integer >= 1; got .*" + str(bad)
        ):
            fn(lin, max_memory=bad)
