"""The quantities of the Fisher metric an analysis accumulates: one object per ``what=``.

A quantity knows, for one batch,

- the exact sum over the batch (``exact``): Σ_n Σ_r of its function of the
  per-example products g_nr = J_nᵀ u_nr, for cotangents u (N, R, C)
  (``fisher``);
- the per-probe samples of an estimator, from the M probe gradients g (M, D)
  (``from_gradients``: detach-and-mix) or from per-example cotangents u (M, N, C)
  summed per input (``from_squares``: per-example squares, Monte-Carlo and
  empirical Fisher);
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

from typing import Any, NamedTuple

from fisherbound._accumulator import FactorSum, PerExampleRows, RowStack, SampleSum
from fisherbound._lib import device_of
from fisherbound._stream import named_blocks

Array = Any

__all__ = [
    "Blocks",
    "Dense",
    "Diagonal",
    "Factor",
    "Quantity",
    "Trace",
    "factor_columns",
    "position_chunks",
    "quantity",
]


def factor_columns(b: Array, xp: Any, start: int = 0, stop: int | None = None) -> Array:
    """Per-example cotangents from a core factor b (N, *S, C, R), B Bᵀ = K per position.

    The kernel of an example x with positions is block diagonal over them,
    K_x = ⊕_t K(z_xt), so its factor has one column per (position t, column r),
    supported on position t alone. Returns those columns for the flattened
    positions ``start`` … ``stop`` − 1 (default all P): U of shape
    (N, (stop − start)·R, *S, C), column (t, r) = b[x, t, :, r] at position t and
    zero elsewhere. Without position axes (b of shape (N, C, R)) it is the
    familiar (N, R, C). Memory: N · (stop − start) · R · P · C numbers.
    """
    n, c, r = int(b.shape[0]), int(b.shape[-2]), int(b.shape[-1])
    spatial = tuple(int(s) for s in b.shape[1:-2])
    if not spatial:
        return xp.permute_dims(b, (0, 2, 1))
    p = 1
    for size in spatial:
        p *= size
    stop = p if stop is None else stop
    bt = xp.permute_dims(xp.reshape(b, (n, p, c, r)), (0, 3, 1, 2))  # (N, R, P, C)
    pos = xp.arange(p, device=device_of(b))
    hot = xp.astype(pos[start:stop, None] == pos[None, :], b.dtype)  # (P_c, P)
    u = hot[None, :, None, :, None] * bt[:, None, :, :, :]  # (N, P_c, R, P, C)
    return xp.reshape(u, (n, (stop - start) * r, *spatial, c))


def position_chunks(num_positions: int, columns: int, size: int) -> list[tuple[int, int]]:
    """Ranges of positions whose ``factor_columns`` hold at most ``size`` columns each.

    ``columns`` is R, the factor's columns per position; every range holds at
    least one position.
    """
    step = max(1, size // max(columns, 1))
    return [(s, min(num_positions, s + step)) for s in range(0, num_positions, step)]


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

    # -- exact sums over a batch (fisher) -----------------------------------------
    def exact(self, lin: Any, u: Array, max_vectors: int | None) -> Any:
        """Σ_n Σ_r of the quantity of g_nr = J_nᵀ u[n, r], cotangents u (N, R, C)."""
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
        """Per-probe samples Σ_n of the quantity of J_nᵀ u[m, n], cotangents u (M, N, C)."""
        xp = lin.xp
        ut = xp.permute_dims(u, (1, 0, 2))  # (N, M, C)
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
    """tr F (0-d): the sum of the diagonal."""

    what = "trace"

    def local(self, total: Any, xp: Any) -> Any:
        return xp.sum(total)

    def from_gradients(self, g: Array, xp: Any) -> Any:
        return xp.sum(g * g, axis=1)

    def _squares(self, sq: Array, xp: Any) -> Any:
        return xp.sum(sq, axis=1)

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
        ut = xp.permute_dims(u, (1, 0, 2))  # (N, M, C)
        n, m, _ = ut.shape
        budget = lin.default_max_vectors if max_vectors is None else max_vectors
        chunk = max(1, budget // max(n, 1))
        parts: dict[str, list[Array]] = {blk.name: [] for blk in self.selected}
        for start in range(0, m, chunk):
            g = lin.per_example_vjp(ut[:, start : min(m, start + chunk), :])  # (N, m_c, D)
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
        k, n, _ = u.shape
        g = lin.per_example_vjp(xp.permute_dims(u, (1, 0, 2)))  # (N, k, D)
        return PerExampleRows(xp.reshape(g, (n * k, -1)), xp.sum(g * g, axis=0))

    def running(self, *, per_example: bool) -> Any:
        return RowStack(Diagonal()) if per_example else FactorSum()


def quantity(what: str, *, blocks: Any = None, max_size: int = 0, owner: str = "") -> Quantity:
    """The quantity of a validated ``what=`` (``blocks``/``max_size`` for blocks, dense)."""
    if what == "diagonal":
        return Diagonal()
    if what == "trace":
        return Trace()
    if what == "blocks":
        return Blocks(blocks, max_size, owner=owner)
    if what == "dense":
        return Dense(max_size)
    return Factor()


def _outer_products(
    lin: Any, u: Array, selected: list[Any], max_vectors: int | None, xp: Any
) -> list[Array]:
    """Σ_n Σ_r g_nr[b] g_nr[b]ᵀ for each selected block b, g_nr = J_nᵀ U[n, r]."""
    n, r, _ = u.shape
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
