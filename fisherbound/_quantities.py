"""The quantities of the Fisher metric an analysis accumulates: one object per ``what=``.

A quantity knows, for one batch,

- the exact sum over the batch (``exact``): Σ_n Σ_r of its function of the
  per-example products g_nr = J_nᵀ u_nr, for cotangents u (N, R, ∗S, C)
  (``fisher``; with position axes S the columns of ``factor_columns``);
- the per-probe samples of an estimator, from the M probe gradients g (M, D)
  (``from_gradients``: detach-and-mix) or from per-example cotangents
  u (M, N, ∗S, C) summed per input (``from_squares``: per-example squares,
  Monte-Carlo and empirical Fisher; a per-example product sums over the
  positions of its example);
- the per-probe trace samples behind ``target_relative_error`` (``trace``);
- how the samples accumulate over batches (``running``),

and what to do once, on the first batch (``select``: the parameter blocks, the
size limits), before the all-reduce (``local``) and for the public result
(``present``). ``quantity(what, ...)`` builds one from the public options; the
fronts validate ``what`` before.

==============  ==================  =========================================
``what``        exact (fisher)      samples (estimators)
==============  ==================  =========================================
``"diagonal"``  Σ (J_nᵀ u)² (D,)    g ⊙ g (M, D), or Σ_n (J_nᵀ u_mn)²
``"trace"``     Σ ‖J_nᵀ u‖² (0-d)   ‖g‖² (M,)
``"blocks"``    Σ g_b g_bᵀ (dict)   g_b g_bᵀ (M, s, s) per block
``"dense"``     Σ g gᵀ (D, D)       (not an estimator quantity)
``"full"``      (not exact)         the factor rows: g (M, D), or per-example
==============  ==================  =========================================
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

from fisherbound._accumulator import FactorSum, PerExampleRows, RowStack, SampleSum
from fisherbound._lib import (
    check_finite,
    device_of,
    fingerprint,
    first_indices,
    index_dtype,
    is_array,
    is_traced,
    known_false,
)
from fisherbound._stream import named_blocks

Array = Any

__all__ = [
    "Blocks",
    "Dense",
    "Diagonal",
    "Factor",
    "Quantity",
    "Trace",
    "DEFAULT_MAX_MEMORY",
    "check_cotangents",
    "columns_per_chunk",
    "cotangent_chunks",
    "counted_positions",
    "factor_columns",
    "most_slots",
    "position_chunks",
    "position_slots",
    "quantity",
    "total_counted",
]


def factor_columns(
    b: Array, xp: Any, start: int = 0, stop: int | None = None, *, mask: Array | None = None
) -> Array:
    """Per-example cotangents from a core factor b (N, ∗S, C, R), B Bᵀ = K per position.

    The kernel of an example x with positions is block diagonal over them,
    K_x = ⊕_t K(z_xt), so its factor has one column per (position t, column r),
    supported on position t alone. Returns those columns for the flattened
    positions ``start`` … ``stop`` − 1 (default all P): U of shape
    (N, (stop − start)·R, ∗S, C), column (t, r) = b[x, t, :, r] at position t and
    zero elsewhere. Without position axes (b of shape (N, C, R)) it is the
    familiar (N, R, C). Memory: N · (stop − start) · R · P · C numbers.

    With ``mask`` (boolean (N, ∗S)) only the counted positions get columns:
    ``start`` … ``stop`` − 1 index the *slots* of each example, slot k being its
    k-th counted position in row-major order (default stop: the largest count
    over the examples, ``counted_positions``); an example with fewer counted
    positions gets zero columns there. So masked positions cost no backward pass
    (the columns of a batch are as many as its longest unmasked example needs).
    Without position axes the mask (N,) zeroes the columns of masked examples.
    """
    n, c, r = int(b.shape[0]), int(b.shape[-2]), int(b.shape[-1])
    spatial = tuple(int(s) for s in b.shape[1:-2])
    if not spatial:
        u = xp.permute_dims(b, (0, 2, 1))
        if mask is not None:
            u = u * xp.astype(mask, b.dtype)[:, None, None]
        return u
    p = math.prod(spatial)
    bt = xp.permute_dims(xp.reshape(b, (n, p, c, r)), (0, 3, 1, 2))  # (N, R, P, C)
    pos = xp.arange(p, device=device_of(b))
    if mask is None:
        stop = p if stop is None else stop
        hot = xp.astype(pos[start:stop, None] == pos[None, :], b.dtype)[None, ...]  # (1, Pc, P)
    else:
        slots = position_slots(mask, xp)  # (N, P): the slot of each counted position, −1 elsewhere
        stop = most_slots(slots, xp) if stop is None else stop
        k = xp.arange(start, stop, device=device_of(b))
        hot = xp.astype(slots[:, None, :] == k[None, :, None], b.dtype)  # (N, Pc, P)
    u = hot[:, :, None, :, None] * bt[:, None, :, :, :]  # (N, Pc, R, P, C)
    return xp.reshape(u, (n, (stop - start) * r, *spatial, c))


def position_slots(mask: Array, xp: Any) -> Array:
    """(N, P) indices (the indexing dtype): k for the k-th counted position, −1 where masked."""
    n = int(mask.shape[0])
    m = xp.reshape(mask, (n, -1))
    rank = xp.cumulative_sum(xp.astype(m, index_dtype(xp, mask)), axis=1) - 1
    return xp.where(m, rank, xp.asarray(-1, dtype=rank.dtype, device=device_of(mask)))


def most_slots(slots: Array, xp: Any) -> int:
    """The most counted positions of one example (one host read); 0 for an empty batch."""
    return int(xp.max(slots)) + 1 if int(slots.shape[0]) * int(slots.shape[1]) else 0


def counted_positions(lin: Any) -> int:
    """The columns per factor column an example needs: P, or its most counted positions.

    P = ``lin.num_positions`` without a mask; with ``lin.mask`` the largest number
    of unmasked positions of one example of the batch (what ``factor_columns``
    with ``mask=`` builds). 1 without position axes.
    """
    mask = getattr(lin, "mask", None)
    if mask is None or len(lin.output_shape) == 2 or is_traced(mask):
        return int(lin.num_positions)  # traced (JAX jit): no host-side count
    xp = lin.xp
    n = int(mask.shape[0])
    per_example = xp.sum(xp.astype(xp.reshape(mask, (n, -1)), index_dtype(xp, mask)), axis=1)
    return int(xp.max(per_example)) if n else 0


def total_counted(lin: Any) -> int:
    """The positions of a batch that count: N · P, less those masked by ``lin.mask``.

    One host read with a mask; a traced mask (JAX jit) counts every position.
    """
    mask = getattr(lin, "mask", None)
    if mask is None or is_traced(mask):
        return int(lin.num_inputs) * int(lin.num_positions)
    xp = lin.xp
    return int(xp.sum(xp.astype(mask, index_dtype(xp, mask))))


def position_chunks(num_positions: int, columns: int, size: int) -> list[tuple[int, int]]:
    """Ranges of positions whose ``factor_columns`` hold at most ``size`` columns each.

    ``columns`` is R, the factor's columns per position; every range holds at
    least one position.
    """
    step = max(1, size // max(columns, 1))
    return [(s, min(num_positions, s + step)) for s in range(0, num_positions, step)]


def chunk_groups(num_positions: int, columns: int, size: int) -> list[tuple[int, int, int, int]]:
    """The chunks of ``cotangent_chunks``: (first position, end, first column, end) each.

    Whole positions (all R = ``columns`` factor columns) while R fits ``size``, else
    one position at a time in pieces of ``size`` columns.
    """
    size = max(1, size)
    if columns <= size:
        return [(k0, k1, 0, columns) for k0, k1 in position_chunks(num_positions, columns, size)]
    return [
        (k, k + 1, j, min(columns, j + size))
        for k in range(num_positions)
        for j in range(0, columns, size)
    ]


#: Default ``max_memory`` of the exact quantities, in bytes (128 MiB): the output-space
#: arrays of one chunk of factor columns (see ``columns_per_chunk``).
DEFAULT_MAX_MEMORY = 2**27

#: Arrays of one chunk's size alive at once: the columns u (N, K_c, ∗S, C), the core
#: factor they are cut from, and the adapter's batched cotangent and logit gradient.
CHUNK_COPIES = 4


def columns_per_chunk(lin: Any, size: int, max_memory: int) -> int:
    """Factor columns per example in one chunk: at most ``size``, and what ``max_memory`` holds.

    One column of every example is an (N, ∗S, C) array, N · P · C entries of the
    logits' dtype; a chunk of K_c columns keeps ``CHUNK_COPIES`` such arrays of
    K_c columns alive, so K_c = max(1, min(size, max_memory // (4 · N · P · C ·
    itemsize))). The peak of the output-space work is then about ``max_memory``
    (more only when a single column exceeds it), whatever C and N: no
    (N, C, C) object. The result does not depend on K_c (up to the rounding of
    the summation order).
    """
    z = lin.logits
    entries = math.prod(int(s) for s in z.shape)
    itemsize = int(lin.xp.finfo(z.dtype).bits) // 8
    fits = max_memory // max(1, CHUNK_COPIES * entries * itemsize)
    return max(1, min(size, fits))


def cotangent_chunks(lin: Any, family: Any, kernel: str, size: int) -> Iterator[Array]:
    """The per-example factor columns of K_x = ⊕_t K(z_xt), at most ``size`` per chunk.

    The exact quantities are Σ_x Σ_(t, r) of a function of J_xᵀ u_x,(t,r) over the
    columns u_x,(t,r) of ``factor_columns``; this yields them chunk by chunk,
    (N, K_c, ∗S, C) with K_c ≤ max(size, 1) columns per example, built from the
    logits without the factor of the whole batch: each chunk evaluates the core
    factor only at its own positions (``family.sqrt_metric`` there, or, when one
    position has more than ``size`` columns, ``family.sqrt_metric_matvec`` with
    basis vectors for a range of them), so no (N, C, C) object is formed when
    R = C exceeds ``size``. With ``lin.mask`` only counted positions get columns
    (the slots of ``factor_columns``). Core work O(N · P · R · C) in all, memory
    O(N · size · P · C) per chunk.
    """
    xp = lin.xp
    z = lin.logits
    shape = tuple(int(s) for s in z.shape)
    n, c, spatial = shape[0], shape[-1], shape[1:-1]
    p = math.prod(spatial)
    r = family.sqrt_rank(c, kernel=kernel)
    mask = getattr(lin, "mask", None)
    device = device_of(z)
    # A traced mask (JAX jit) cannot be counted on the host: every position gets
    # columns, zero where masked.
    traced = mask is not None and is_traced(mask)
    slots = None if mask is None or traced else position_slots(mask, xp)
    count = p if slots is None else max(1, most_slots(slots, xp))
    zf = xp.reshape(z, (n, p, c))
    pos = xp.arange(p, device=device)
    for k0, k1, r0, r1 in chunk_groups(count, r, size):
        ks = xp.arange(k0, k1, device=device)
        if slots is None:
            hot = xp.broadcast_to(pos[None, None, :] == ks[None, :, None], (n, k1 - k0, p))
        else:
            hot = slots[:, None, :] == ks[None, :, None]
        hot = xp.astype(hot, z.dtype)  # (N, K_c, P): slot k of example x is at position t
        if traced:
            hot = hot * xp.astype(xp.reshape(mask, (n, 1, p)), z.dtype)
        z_at = xp.matmul(hot, zf)  # (N, K_c, C): the logits there (0 for an empty slot)
        if r1 - r0 == r:
            core = xp.permute_dims(family.sqrt_metric(z_at, kernel=kernel), (0, 1, 3, 2))
        else:
            rows = xp.arange(r0, r1, device=device)[:, None] == xp.arange(r, device=device)
            basis = xp.astype(rows, z.dtype)  # (R_c, R): basis vectors r0..r1-1, O(R_c · R)
            core = family.unchecked_sqrt_metric_matvec(
                z_at[:, :, None, :], basis, kernel=kernel, xp=xp
            )
        u = hot[:, :, None, :, None] * core[:, :, :, None, :]  # (N, K_c, R_c, P, C)
        yield xp.reshape(u, (n, (k1 - k0) * (r1 - r0), *spatial, c))


def check_cotangents(lin: Any, r: int, max_cotangents: int, *, owner: str, kernel: str) -> int:
    """P · R, the per-example backward passes of an exact quantity, refused above the limit.

    P is ``counted_positions(lin)`` and R the factor's columns per position
    (``family.sqrt_rank``). Above ``max_cotangents`` a ValueError gives P, R, the
    backward passes the batch would take, and names ``detach_and_mix`` (one
    backward pass per probe whatever P and C) and the option that raises the limit.
    Returns P.
    """
    p = counted_positions(lin)
    if p * r <= max_cotangents:
        return p
    n = int(lin.num_inputs)
    where = "positions" if p == lin.num_positions else "counted (unmasked) positions"
    msg = (
        f"{owner} needs P · R = {p} · {r} = {p * r} per-example backward passes per "
        f"example (P = {p} {where} per example, R = {r} factor columns per position for "
        f"kernel={kernel!r}), {n * p * r} for this batch of N = {n} examples: above "
        f"max_cotangents = {max_cotangents}. Estimate it with "
        "fisherbound.estimators.detach_and_mix (one backward pass per probe, whatever the "
        "number of positions and classes), or raise max_cotangents= if you have the time."
    )
    raise ValueError(msg)


def _examples_first(u: Array, xp: Any) -> Array:
    """(M, N, ∗S, C) → (N, M, ∗S, C): the per-example layout of the adapters."""
    return xp.permute_dims(u, (1, 0, *range(2, u.ndim)))


class _WholeVector(NamedTuple):
    size: int
    name: str = "all"
    offset: int = 0


class Quantity:
    """A quantity of F; see the module docstring. Subclasses override what differs."""

    what = ""

    def __init__(self) -> None:
        #: The parameter blocks it covers (set by ``select`` on the first batch).
        self.selected: list[Any] = []

    @property
    def block_names(self) -> tuple[str, ...]:
        """The selected blocks' names (the ranks compare them)."""
        return tuple(b.name for b in self.selected)

    def select(self, lin: Any) -> None:
        """Once, on the first batch: choose the blocks and check the size limits."""

    def agreement(self) -> dict[str, Any]:
        """Options the ranks of a process group must agree on besides ``what``."""
        return {}

    # -- exact sums over a batch (fisher) -----------------------------------------
    def exact(self, lin: Any, u: Array, max_vectors: int | None) -> Any:
        """Σ_n Σ_r of the quantity of g_nr = J_nᵀ u[n, r], cotangents u (N, R, ∗S, C)."""
        return _outer_products(lin, u, self.selected, max_vectors, lin.xp)

    def local(self, total: Any, xp: Any) -> Any:
        """The total of this rank, before the all-reduce."""
        del xp  # the interface's: Trace sums with it
        return total

    def present(self, total: Any) -> Any:
        """The public form of the total."""
        return total

    # -- per-probe samples (estimators) ---------------------------------------------
    def from_gradients(self, g: Array, xp: Any) -> Any:  # pragma: no cover - interface
        """Per-probe samples from the M probe gradients g (M, D)."""
        raise NotImplementedError

    def from_squares(self, lin: Any, u: Array, max_vectors: int | None) -> Any:
        """Per-probe samples Σ_n of the quantity of J_nᵀ u[m, n], cotangents u (M, N, ∗S, C)."""
        xp = lin.xp
        ut = _examples_first(u, xp)  # (N, M, *S, C)
        return self._squares(lin.sum_squared_per_example_vjp(ut, max_vectors=max_vectors), xp)

    def _squares(self, sq: Array, xp: Any) -> Any:
        del xp  # the interface's: Trace sums with it
        return sq

    def trace(self, samples: Any, xp: Any) -> Array:  # pragma: no cover - interface
        """The per-probe trace samples (M,) implied by per-probe samples."""
        raise NotImplementedError

    def running(self, *, per_example: bool) -> Any:
        """The running sum of the samples over batches."""
        del per_example  # the interface's: only the factor's rows depend on it
        return SampleSum(self)


class Diagonal(Quantity):
    """diag F (D,)."""

    what = "diagonal"

    def exact(self, lin: Any, u: Array, max_vectors: int | None) -> Any:
        return lin.sum_squared_per_example_vjp(u, max_vectors=max_vectors, sum_cotangents=True)

    def from_gradients(self, g: Array, xp: Any) -> Any:
        del xp  # the interface's: Trace sums with it
        return g * g

    def trace(self, samples: Any, xp: Any) -> Array:
        return xp.sum(samples, axis=1)


class Trace(Diagonal):
    """tr F (0-d): the sum of the diagonal; with ``weights`` w (D,), Σ_i w_i F_ii.

    The weighted trace (an EWC penalty λ/2 Σ_i F_ii (θ_i − θ*_i)², a summed
    pruning score) is estimated per probe as Σ_i w_i g_i², so its standard error
    accounts for the probes every entry shares; ``weights`` are checked against
    the first batch (``select``): finite and non-negative (so every per-probe
    sample is ≥ 0 and the interval's floor 0 holds), shape (D,), the
    linearization's namespace, device and dtype (NumPy and JAX cast; torch
    refuses another dtype, as for every operand).
    """

    what = "trace"

    def __init__(self, weights: Any = None) -> None:
        super().__init__()
        self.weights = weights
        self._w: Any = None  # the checked weights (D,), set by ``select``

    def select(self, lin: Any) -> None:
        if self.weights is not None:
            w = lin._operand(self.weights, "weights", (lin.num_params,), "(D,)")
            check_finite(w, "weights", xp=lin.xp, what="entries")
            ok = lin.xp.all(w >= 0)
            if known_false(ok):  # traced (inside jit): nothing to read
                count = int(lin.xp.sum(lin.xp.astype(w < 0, index_dtype(lin.xp, w))))
                shown = first_indices(w < 0, lin.xp)
                msg = (
                    "weights must be non-negative (Σ_i w_i F_ii with w ≥ 0, as an EWC "
                    "penalty or a pruning score; each probe's sample is then ≥ 0); got "
                    f"{count} negative entries, at positions {shown}"
                    f"{' ...' if count > len(shown) else ''}. For signed weights "
                    "estimate Σ w⁺F and Σ w⁻F (w = w⁺ − w⁻) with independent seeds; the standard "
                    "error of their difference is √(SE₊² + SE₋²)."
                )
                raise ValueError(msg)
            self._w = w

    def agreement(self) -> dict[str, Any]:
        """The weights' fingerprint (shape, Σw, Σw²): one weighted trace on every rank."""
        if self.weights is None:
            return {}
        w = self.weights
        return {"weights": fingerprint(w) if is_array(w) else type(w).__name__}

    def local(self, total: Any, xp: Any) -> Any:
        return xp.sum(total if self._w is None else self._w * total)

    def from_gradients(self, g: Array, xp: Any) -> Any:
        sq = g * g
        return xp.sum(sq if self._w is None else sq * self._w, axis=1)

    def _squares(self, sq: Array, xp: Any) -> Any:
        return xp.sum(sq if self._w is None else sq * self._w, axis=1)

    def trace(self, samples: Any, xp: Any) -> Array:
        del xp  # the interface's: the other quantities sum with it
        return samples


class Blocks(Quantity):
    """The dense diagonal blocks F_bb, a dict from block name to (s_b, s_b)."""

    what = "blocks"

    def __init__(self, names: Any, max_size: int, *, owner: str) -> None:
        super().__init__()
        self.names = names
        self.max_size = max_size
        self.owner = owner

    def select(self, lin: Any) -> None:
        self.selected = named_blocks(lin, self.names, self.max_size, owner=self.owner)

    def present(self, total: Any) -> Any:
        return {blk.name: t for blk, t in zip(self.selected, total, strict=True)}

    def from_gradients(self, g: Array, xp: Any) -> Any:
        del xp  # the interface's: Trace sums with it
        out = {}
        for blk in self.selected:
            gb = g[:, blk.offset : blk.offset + blk.size]
            out[blk.name] = gb[:, :, None] * gb[:, None, :]
        return out

    def from_squares(self, lin: Any, u: Array, max_vectors: int | None) -> Any:
        """Σ_n g_nm[b] g_nm[b]ᵀ for per-example gradients g_nm = J_nᵀ u[m, n]; (M, s, s).

        The per-example products are taken for chunks of probes (the adapter's
        ``per_example_vjp`` covers every input of the batch), N · chunk D-vectors at a
        time, chunk = max(1, max_vectors // N).
        """
        xp = lin.xp
        ut = _examples_first(u, xp)  # (N, M, *S, C)
        n, m = int(ut.shape[0]), int(ut.shape[1])
        budget = lin.default_max_vectors if max_vectors is None else max_vectors
        chunk = max(1, budget // max(n, 1))
        parts: dict[str, list[Array]] = {blk.name: [] for blk in self.selected}
        for start in range(0, m, chunk):
            g = lin.per_example_vjp(ut[:, start : min(m, start + chunk), ...])  # (N, m_c, D)
            g = xp.permute_dims(g, (1, 0, 2))  # (m_c, N, D)
            for blk in self.selected:
                gb = g[:, :, blk.offset : blk.offset + blk.size]
                parts[blk.name].append(xp.matmul(xp.matrix_transpose(gb), gb))
        return {k: v[0] if len(v) == 1 else xp.concat(v, axis=0) for k, v in parts.items()}

    def trace(self, samples: Any, xp: Any) -> Array:
        total = None
        for s in samples.values():
            t = xp.sum(xp.linalg.diagonal(s), axis=1)
            total = t if total is None else total + t
        return total


class Dense(Quantity):
    """The dense D × D matrix F (``fisher_dense``), refused above ``max_size``."""

    what = "dense"

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self.max_size = max_size

    def select(self, lin: Any) -> None:
        d = lin.num_params
        if d > self.max_size:
            msg = (
                f"fisher_dense refuses D = {d} parameters (a {d} × {d} matrix) above "
                f"max_params = {self.max_size}; raise max_params if you have the memory, or "
                "use fisher_blocks / fisher_diagonal / fisher_operator."
            )
            raise ValueError(msg)
        self.selected = [_WholeVector(d)]

    def present(self, total: Any) -> Any:
        return total[0]


class Factor(Quantity):
    """The low-rank factor V with F̂ = Vᵀ V (``what="full"`` of the estimators)."""

    what = "full"

    def from_gradients(self, g: Array, xp: Any) -> Any:
        del xp  # the interface's: Trace sums with it
        return g

    def from_squares(self, lin: Any, u: Array, max_vectors: int | None) -> Any:
        """The per-example score rows (N·k, D) and the k per-draw diagonal samples."""
        del max_vectors  # the interface's: the rows are all kept, N·k D-vectors
        xp = lin.xp
        k, n = int(u.shape[0]), int(u.shape[1])
        g = lin.per_example_vjp(_examples_first(u, xp))  # (N, k, D)
        return PerExampleRows(xp.reshape(g, (n * k, -1)), xp.sum(g * g, axis=0))

    def running(self, *, per_example: bool) -> Any:
        return RowStack(Diagonal()) if per_example else FactorSum()


def quantity(
    what: str, *, blocks: Any = None, max_size: int = 0, owner: str = "", weights: Any = None
) -> Quantity:
    """The quantity of a validated ``what=``.

    ``blocks`` / ``max_size`` for blocks and dense; ``weights`` for the trace only
    (a ValueError otherwise).
    """
    if weights is not None and what != "trace":
        msg = (
            "weights are for what='trace' (the weighted trace Σ_i w_i F_ii with its "
            f"standard error); got what={what!r}. Multiply a diagonal by them instead."
        )
        raise ValueError(msg)
    if what == "diagonal":
        return Diagonal()
    if what == "trace":
        return Trace(weights)
    if what == "blocks":
        return Blocks(blocks, max_size, owner=owner)
    if what == "dense":
        return Dense(max_size)
    return Factor()


def _outer_products(
    lin: Any, u: Array, selected: list[Any], max_vectors: int | None, xp: Any
) -> list[Array]:
    """Σ_n Σ_r g_nr[b] g_nr[b]ᵀ for each selected block b, g_nr = J_nᵀ U[n, r]."""
    n, r = int(u.shape[0]), int(u.shape[1])
    budget = lin.default_max_vectors if max_vectors is None else max_vectors
    chunk = max(1, budget // max(r, 1))
    out = [xp.zeros((blk.size, blk.size), dtype=u.dtype, device=lin.device) for blk in selected]
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        g = lin.per_example_vjp(u[start:stop, ...], examples=slice(start, stop))
        g = xp.reshape(g, (-1, g.shape[-1]))
        for i, blk in enumerate(selected):
            gb = g[:, blk.offset : blk.offset + blk.size]
            out[i] = out[i] + xp.matmul(xp.matrix_transpose(gb), gb)
    return out
