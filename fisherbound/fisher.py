"""The exact Fisher metric on the neuromanifold and its deterministic bounds.

Every function here evaluates a pull-back

    F_K(θ) = Σ_x J_xᵀ K(z_x) J_x

of a core kernel K of the output family (``fisherbound.families``) through the
network Jacobian J_x = ∂z_x/∂θ, supplied matrix-free by a linearization
(``fisherbound.linearization``). The kernel selects the quantity (THEORY §2):

================== ==============================================  ==========
``kernel``         K(z)                                            relation
================== ==============================================  ==========
``"exact"``        I(z) (categorical: diag(p) − p pᵀ)              F
``"upper"``        the DG envelope (categorical: diag(p))          F_DG ⪰ F
``"lower"``        the LR envelope λ_C v_C v_Cᵀ                    F_LR ⪯ F
``"scalar_upper"`` λ_C · P (P = I − 11ᵀ/C for the categorical)      ⪰ F
``"scalar_lower"`` p_(1) · P                                       ⪯ F
================== ==============================================  ==========

Löwner order carries over to diagonals, blocks and traces, so
``diag F_LR ≤ diag F ≤ diag F_DG`` entrywise: these are certified bounds at the
cost of the exact quantity's path, and ``fisher_bounds`` returns both at once.

Conventions: results are SUMS over the inputs (the papers' convention) unless
``reduction="mean"``, which divides by the total number of inputs N. Flat
parameter vectors follow the linearization's block order.

``source`` is one linearization or an iterable of them (a data set streamed
batch by batch, with a progress bar on long runs; ``progress=False`` turns it
off). ``fisher_operator`` applies the data set at every matvec, so it keeps the
linearizations: give it one or a list of them, not a one-shot generator.

Data parallel: with ``process_group=`` (a ``torch.distributed`` process group, or
the name of a JAX mapped axis inside ``jax.shard_map``), each rank passes its own
shard of the data and every rank receives the result over the union of the
shards: the per-rank sums (and the input count behind ``reduction="mean"``) are
all-reduced with the framework's collective. The ranks must run the same call on
the same model; a disagreement in the number of parameters, the family or the
options, or an empty shard, raises a ValueError on every rank. The operator
all-reduces every matvec, so Lanczos / Hutchinson vectors must be the same on
every rank (seed every rank alike). See docs/distributed.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from fisherbound._lib import (
    REDUCTIONS,
    check_choice,
    check_optional_int,
    check_positive_int,
    progress_bar,
)
from fisherbound._quantities import Quantity, quantity
from fisherbound._stream import Stream, check_family
from fisherbound.families import KERNELS, Categorical, Family
from fisherbound.linalg import LinearOperator

Array = Any

__all__ = [
    "Bounds",
    "fisher_blocks",
    "fisher_bounds",
    "fisher_dense",
    "fisher_diagonal",
    "fisher_operator",
    "fisher_trace",
]

WHATS = ("diagonal", "trace", "blocks", "dense")

#: Default limit on D for ``fisher_dense`` (a D × D float64 matrix of 128 MiB).
DEFAULT_MAX_PARAMS = 4096


class Bounds(NamedTuple):
    """A certified bracket ``lower ⪯ F ⪯ upper`` (entrywise for diagonals)."""

    lower: Any
    upper: Any


# --------------------------------------------------------------------------- #
# one pass over the data for any set of kernels and quantities


def _cotangents(family: Family, z: Array, kernel: str, xp: Any) -> Array:
    """U (N, R, C) with U[n, r] = column r of B(z_n), B Bᵀ = K(z_n)."""
    b = family.sqrt_metric(z, kernel=kernel)
    return xp.permute_dims(b, (0, 2, 1))


def _accumulate(
    source: Any,
    family: Family,
    kernels: Sequence[str],
    quantity: Quantity,
    reduction: str,
    max_vectors: int | None,
    progress: bool | None,
    process_group: Any,
) -> list[Any]:
    """Σ_x of ``quantity`` of J_xᵀ K(z_x) J_x for each kernel, in one pass."""
    stream = Stream(
        source, family, desc=f"Fisher {quantity.what}", progress=progress,
        process_group=process_group,
    )  # fmt: skip
    totals: list[Any] = [None] * len(kernels)
    for lin in stream:
        if stream.num_batches == 1:
            quantity.select(lin)
        for j, kernel in enumerate(kernels):
            part = quantity.exact(lin, _cotangents(family, lin.logits, kernel, lin.xp), max_vectors)
            totals[j] = part if totals[j] is None else _add(totals[j], part)
    stream.finish(kernels=tuple(kernels), reduction=reduction, blocks=quantity.block_names)
    xp = stream.first.xp
    return [quantity.present(stream.total(quantity.local(t, xp), reduction)) for t in totals]


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, list):
        return [x + y for x, y in zip(a, b, strict=True)]
    return a + b


def _front(family: Any, kernel: str, reduction: str, max_vectors: int | None) -> Family:
    fam = check_family(family)
    check_choice(kernel, "kernel", KERNELS)
    check_choice(reduction, "reduction", REDUCTIONS)
    check_optional_int(max_vectors, "max_vectors")
    return fam


# --------------------------------------------------------------------------- #
# public functions


def fisher_diagonal(
    source: Any,
    family: Family = Categorical(),  # noqa: B008 - families are immutable
    *,
    kernel: str = "exact",
    reduction: str = "sum",
    max_vectors: int | None = None,
    progress: bool | None = None,
    process_group: Any = None,
) -> Array:
    """The diagonal of the Fisher metric F_K = Σ_x J_xᵀ K(z_x) J_x, exactly.

    diag F_K = Σ_x Σ_r (J_xᵀ b_xr)², with b_xr the columns of the factor
    B(z_x) Bᵀ(z_x) = K(z_x) (``family.sqrt_metric``): a sum of squared
    per-example VJPs, R = C cotangents per input (R = 1 for ``kernel="lower"``).

    Parameters
    ----------
    source
        A linearization, or an iterable of them (streamed once).
    family
        The output family; ``Categorical()`` by default.
    kernel
        ``"exact"`` (F), ``"upper"`` (F_DG), ``"lower"`` (F_LR), ``"scalar_upper"``
        or ``"scalar_lower"`` (see the module docstring).
    reduction
        ``"sum"`` over inputs (default, the papers' convention) or ``"mean"``.
    max_vectors
        At most this many D-vectors are alive at once in the per-example products
        (default: the adapter's ``default_max_vectors``).
    progress
        Show a progress bar: None (on a terminal, after 2 s), True or False.
    process_group
        None (default), a ``torch.distributed`` process group or a JAX axis name:
        ``source`` is this rank's shard and the result covers all ranks' data
        (see the module docstring).

    Returns
    -------
    array (D,)
        In the linearization's namespace, on its device, parameter order of
        ``lin.blocks``.

    Notes
    -----
    Cost: R per-example VJPs per input. The torch adapter accumulates the squares
    inside one batched backward pass for Linear / Conv / Embedding / norm layers;
    other adapters and layers use vmap over examples (chunked).

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, linearize
    >>> model = LinearSoftmax(np.zeros((3, 2)))
    >>> lin = linearize(model, np.array([[1.0, 2.0]]))
    >>> np.round(fisher_diagonal(lin), 4)  # diag(I_Δ) ⊗ (x ⊙ x), p uniform
    array([0.2222, 0.8889, 0.2222, 0.8889, 0.2222, 0.8889])
    """
    fam = _front(family, kernel, reduction, max_vectors)
    qty = quantity("diagonal")
    (out,) = _accumulate(
        source, fam, [kernel], qty, reduction, max_vectors, progress, process_group
    )
    return out


def fisher_trace(
    source: Any,
    family: Family = Categorical(),  # noqa: B008
    *,
    kernel: str = "exact",
    reduction: str = "sum",
    max_vectors: int | None = None,
    progress: bool | None = None,
    process_group: Any = None,
) -> Array:
    """The trace tr F_K = Σ_x Σ_r ‖J_xᵀ b_xr‖², exactly (a 0-d array).

    Same cost and options as ``fisher_diagonal`` (it is the sum of the diagonal).
    For an unbiased estimate at the cost of one gradient step use
    ``fisherbound.estimators``. ``process_group``: see ``fisher_diagonal``.
    """
    fam = _front(family, kernel, reduction, max_vectors)
    qty = quantity("trace")
    (out,) = _accumulate(
        source, fam, [kernel], qty, reduction, max_vectors, progress, process_group
    )
    return out


def fisher_blocks(
    source: Any,
    family: Family = Categorical(),  # noqa: B008
    *,
    kernel: str = "exact",
    blocks: Sequence[str] | None = None,
    reduction: str = "sum",
    max_block_size: int = DEFAULT_MAX_PARAMS,
    max_vectors: int | None = None,
    progress: bool | None = None,
    process_group: Any = None,
) -> dict[str, Array]:
    """The dense diagonal blocks F_bb, one per parameter tensor.

    F_bb = Σ_x Σ_r g_xr[b] g_xr[b]ᵀ with g_xr = J_xᵀ b_xr, from per-example VJPs
    (chunked: at most ``max_vectors`` D-vectors at once). Returns a dict from block
    name to a (size_b, size_b) array (flattened row-major, as in the flat vector).
    ``blocks`` selects block names (default all); blocks larger than
    ``max_block_size`` parameters are refused with a ValueError (raise the limit
    if you have the memory). Cost: R per-example VJPs per input and
    O(N R s_b²) per block for the outer products; memory Σ_b s_b².
    ``process_group``: see ``fisher_diagonal``.
    """
    fam = _front(family, kernel, reduction, max_vectors)
    check_positive_int(max_block_size, "max_block_size")
    qty = quantity("blocks", blocks=blocks, max_size=max_block_size, owner="fisher_blocks")
    (out,) = _accumulate(
        source, fam, [kernel], qty, reduction, max_vectors, progress, process_group
    )
    return out


def fisher_dense(
    source: Any,
    family: Family = Categorical(),  # noqa: B008
    *,
    kernel: str = "exact",
    reduction: str = "sum",
    max_params: int = DEFAULT_MAX_PARAMS,
    max_vectors: int | None = None,
    progress: bool | None = None,
    process_group: Any = None,
) -> Array:
    """The dense D × D matrix F_K, for small models only.

    Refuses D > ``max_params`` (default 4096) with a ValueError naming the limit;
    raise it if you have the memory. Cost: R per-example VJPs per input and
    O(N R D²) for the outer products. ``process_group``: see ``fisher_diagonal``.
    """
    fam = _front(family, kernel, reduction, max_vectors)
    check_positive_int(max_params, "max_params")
    qty = quantity("dense", max_size=max_params)
    (out,) = _accumulate(
        source, fam, [kernel], qty, reduction, max_vectors, progress, process_group
    )
    return out


def fisher_bounds(
    source: Any,
    family: Family = Categorical(),  # noqa: B008
    *,
    what: str = "diagonal",
    scalar: bool = False,
    reduction: str = "sum",
    blocks: Sequence[str] | None = None,
    max_size: int = DEFAULT_MAX_PARAMS,
    max_vectors: int | None = None,
    progress: bool | None = None,
    process_group: Any = None,
) -> Bounds:
    """Deterministic lower and upper bounds of F, in one pass over the data.

    ``scalar=False``: F_LR ⪯ F ⪯ F_DG (THEORY §2). ``scalar=True``: the scalar
    envelope Σ_x p_(1)(x) J_xᵀ P J_x ⪯ F ⪯ Σ_x λ_C(x) J_xᵀ P J_x (categorical;
    other families use their smallest and largest metric eigenvalue and P = I).
    ``what`` is ``"diagonal"`` (entrywise bounds), ``"trace"``, ``"blocks"`` or
    ``"dense"``, with the options of the corresponding function. Cost: both
    kernels in one pass over the data; the LR kernel needs one per-example VJP
    per input (R = 1), the DG kernel C, as for the exact quantity.
    ``process_group``: see ``fisher_diagonal``.

    Returns
    -------
    Bounds
        ``(lower, upper)``. For diagonals and traces ``lower ≤ exact ≤ upper``
        entrywise; for blocks and dense matrices in Löwner order.
    """
    kernels = ["scalar_lower", "scalar_upper"] if scalar else ["lower", "upper"]
    fam = _front(family, kernels[0], reduction, max_vectors)
    check_choice(what, "what", WHATS)
    check_positive_int(max_size, "max_size")
    qty = quantity(what, blocks=blocks, max_size=max_size, owner="fisher_blocks")
    lower, upper = _accumulate(
        source, fam, kernels, qty, reduction, max_vectors, progress, process_group
    )
    return Bounds(lower, upper)


def fisher_operator(
    source: Any,
    family: Family = Categorical(),  # noqa: B008
    *,
    kernel: str = "exact",
    reduction: str = "sum",
    progress: bool | None = False,
    process_group: Any = None,
) -> LinearOperator:
    """F_K as a matrix-free ``LinearOperator`` (D × D).

    matvec: v ↦ Σ_x J_xᵀ K(z_x) (J_x v), one JVP and one VJP per batch;
    matmat: the same with a batched JVP and VJP over the columns. Nothing D × D
    is formed. ``source`` is a linearization or a list of them, kept for the
    operator's lifetime (each holds its batch's forward pass) and applied at every
    matvec. Use it with ``fisherbound.linalg`` (Lanczos, Hutchinson, SLQ).
    With ``process_group`` every matvec all-reduces the ranks' partial products
    (one all-reduce of D·k numbers per matmat), so all ranks must apply it to the
    same vectors: seed Lanczos and Hutchinson alike on every rank.
    """
    fam = _front(family, kernel, reduction, None)
    if isinstance(source, Iterator):
        msg = (
            "fisher_operator needs a re-iterable source (a Linearization or a list of "
            "them): it keeps the linearizations (their forward passes) and applies every "
            f"batch at each matvec; got a one-shot iterator ({type(source).__name__}). "
            "Wrap it in list(...) if the data set fits in memory."
        )
        raise TypeError(msg)
    stream = Stream(
        source, fam, desc="Fisher operator", progress=False, process_group=process_group
    )
    lins = list(stream)
    stream.finish(where="fisher_operator", kernel=kernel, reduction=reduction)
    first = lins[0]
    xp = first.xp
    d = first.num_params
    coll = stream.coll
    scale = stream.scale(reduction)

    def matmat(v: Array) -> Array:
        vt = xp.matrix_transpose(v)  # (k, D)
        total: Array = None
        for lin in progress_bar(lins, desc="Fisher matmat", progress=progress):
            jv = lin.jvp_batch(vt)  # (k, N, C)
            # The logits (N, C) broadcast against (k, N, C): the core quantities
            # (e.g. the top eigenpair of the "lower" kernel) are solved once per batch.
            part = lin.vjp_batch(fam.metric_matvec(lin.logits, jv, kernel=kernel))  # (k, D)
            total = part if total is None else total + part
        if coll is not None:
            total = coll.sum(total)
        return xp.matrix_transpose(total) * scale

    def matvec(v: Array) -> Array:
        total: Array = None
        for lin in progress_bar(lins, desc="Fisher matvec", progress=progress):
            part = lin.vjp(fam.metric_matvec(lin.logits, lin.jvp(v), kernel=kernel))
            total = part if total is None else total + part
        if coll is not None:
            total = coll.sum(total)
        return total * scale

    return LinearOperator(
        (d, d),
        matvec=matvec,
        matmat=matmat,
        dtype=first.logits.dtype,
        device=first.device,
        xp=xp,
    )
