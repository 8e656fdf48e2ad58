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

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from fisherbound._lib import check_choice, check_logits, check_positive_int, device_of
from fisherbound._lib._collective import Collective, collective
from fisherbound._lib._progress import progress_bar
from fisherbound.families import KERNELS, Categorical, Family
from fisherbound.linalg import LinearOperator
from fisherbound.linearization import as_linearizations

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

REDUCTIONS = ("sum", "mean")
WHATS = ("diagonal", "trace", "blocks", "dense")

#: Default limit on D for ``fisher_dense`` (a D × D float64 matrix of 128 MiB).
DEFAULT_MAX_PARAMS = 4096


class Bounds(NamedTuple):
    """A certified bracket ``lower ⪯ F ⪯ upper`` (entrywise for diagonals)."""

    lower: Any
    upper: Any


# --------------------------------------------------------------------------- #
# validation


def _check_family(family: object) -> Family:
    if not isinstance(family, Family):
        msg = (
            "family must be a fisherbound.families family (Categorical(), Bernoulli(), "
            f"Gaussian()); got {type(family).__name__}."
        )
        raise TypeError(msg)
    return family


class _Signature(NamedTuple):
    """What every batch of one data set must share with the first."""

    library: str
    dtype: Any
    device: Any
    num_outputs: int
    blocks: tuple[Any, ...]


def _signature(lin: Any) -> _Signature:
    z = lin.logits
    return _Signature(
        type(z).__module__.split(".")[0],
        z.dtype,
        device_of(z),
        int(z.shape[-1]),
        tuple((b.name, tuple(b.shape)) for b in lin.blocks),
    )


def _check_batch(lin: Any, family: Family, index: int, ref: _Signature | None) -> _Signature:
    z = lin.logits
    name = f"the logits of batch {index}"
    if z.ndim != 2:
        msg = f"{name} must have shape (N, C); got shape {tuple(z.shape)}."
        raise ValueError(msg)
    min_classes = 2 if isinstance(family, Categorical) else 1
    if z.shape[-1] < min_classes:
        msg = (
            f"{name} have C = {z.shape[-1]} outputs, but the {type(family).__name__} family "
            f"needs at least {min_classes}; use Bernoulli() for one binary output."
        )
        raise ValueError(msg)
    check_logits(z, name=name)
    sig = _signature(lin)
    if ref is None:
        return sig
    if sig.library != ref.library:
        msg = (
            f"every batch must come from one array library; batch {index} holds "
            f"{sig.library} arrays, batch 0 held {ref.library} arrays."
        )
        raise TypeError(msg)
    if (sig.num_outputs, sig.blocks) != (ref.num_outputs, ref.blocks):
        msg = (
            f"every batch must come from the same model; batch {index} has C = "
            f"{sig.num_outputs} outputs and D = {lin.num_params} parameters in "
            f"{len(sig.blocks)} blocks, batch 0 had C = {ref.num_outputs} and a different "
            "parameter layout."
        )
        raise ValueError(msg)
    if (sig.dtype, sig.device) != (ref.dtype, ref.device):
        msg = (
            f"every batch must share one dtype and device; batch {index} is {sig.dtype} on "
            f"{sig.device}, batch 0 was {ref.dtype} on {ref.device}."
        )
        raise ValueError(msg)
    return ref


def _batches(
    source: Any,
    family: Family,
    *,
    desc: str,
    progress: bool | None,
    allow_empty: bool = False,
    limit: int | None = None,
) -> Iterator[Any]:
    """The batches of ``source`` (at most ``limit``), each validated against the first."""
    batches: Iterator[Any] = as_linearizations(source)
    if limit is not None:
        batches = itertools.islice(batches, limit)
    ref = None
    for i, lin in enumerate(progress_bar(batches, desc=desc, progress=progress)):
        ref = _check_batch(lin, family, i, ref)
        yield lin
    if ref is None and not allow_empty:
        msg = "source must contain at least one batch; got an empty iterable."
        raise ValueError(msg)


def _agree(
    coll: Collective | None, lin: Any, family: Family, *, where: str, **options: Any
) -> None:
    """With a collective: every rank has a batch, the same model, family and options.

    ``lin`` is this rank's first batch (None if its shard was empty: the error is
    then raised on every rank instead of leaving the others waiting).
    """
    if coll is None:
        return
    fields: dict[str, Any] = {"batches": 0 if lin is None else 1, "family": repr(family)}
    sig = None if lin is None else _signature(lin)
    # An empty shard sends placeholders (the same fields: one vector size everywhere).
    fields |= {
        "the number of parameters": -1 if lin is None else lin.num_params,
        "the parameter blocks": None if sig is None else sig.blocks,
        "the number of outputs": -1 if sig is None else sig.num_outputs,
        "the dtype": None if sig is None else str(sig.dtype),
        "the array library": None if sig is None else sig.library,
    }
    fields |= options
    coll.agree(fields, where=where)


def _cotangents(family: Family, z: Array, kernel: str, xp: Any) -> Array:
    """U (N, R, C) with U[n, r] = column r of B(z_n), B Bᵀ = K(z_n)."""
    b = family.sqrt_metric(z, kernel=kernel)
    return xp.permute_dims(b, (0, 2, 1))


# --------------------------------------------------------------------------- #
# one pass over the data for any set of kernels and quantities


def _accumulate(
    source: Any,
    family: Family,
    kernels: Sequence[str],
    what: str,
    *,
    reduction: str,
    max_vectors: int | None,
    blocks: Sequence[str] | None,
    max_size: int,
    progress: bool | None,
    process_group: Any = None,
) -> list[Any]:
    coll = collective(process_group)
    totals: list[Any] = [None] * len(kernels)
    count = 0
    selected: list[Any] = []
    first = None
    batches = _batches(
        source, family, desc=f"Fisher {what}", progress=progress, allow_empty=coll is not None
    )
    for lin in batches:
        xp = lin.xp
        if first is None:
            first = lin
            selected = _select_blocks(lin, what, blocks, max_size)
        count += int(lin.logits.shape[0])
        for j, kernel in enumerate(kernels):
            u = _cotangents(family, lin.logits, kernel, xp)
            if what in ("diagonal", "trace"):
                part = lin.sum_squared_per_example_vjp(
                    u, max_vectors=max_vectors, sum_cotangents=True
                )
            else:
                part = _outer_products(lin, u, selected, max_vectors, xp)
            totals[j] = part if totals[j] is None else _add(totals[j], part)
    _agree(
        coll,
        first,
        family,
        where=f"Fisher {what}",
        kernels=tuple(kernels),
        reduction=reduction,
        blocks=tuple(b.name for b in selected),
    )
    assert first is not None  # _batches raised, or _agree did, for an empty source
    if what == "trace":
        totals = [first.xp.sum(t) for t in totals]
    if coll is not None:
        totals = [coll.sum_tree(t) for t in totals]
        count = coll.sum_int(count)
    results = []
    for total in totals:
        if reduction == "mean":
            total = _scale(total, 1.0 / count)
        if what == "blocks":
            total = {blk.name: t for blk, t in zip(selected, total, strict=True)}
        elif what == "dense":
            total = total[0]
        results.append(total)
    return results


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, list):
        return [x + y for x, y in zip(a, b, strict=True)]
    return a + b


def _scale(a: Any, s: float) -> Any:
    if isinstance(a, list):
        return [x * s for x in a]
    return a * s


def _select_blocks(lin: Any, what: str, names: Sequence[str] | None, max_size: int) -> list[Any]:
    if what in ("diagonal", "trace"):
        return []
    if what == "dense":
        d = lin.num_params
        if d > max_size:
            msg = (
                f"fisher_dense refuses D = {d} parameters (a {d} × {d} matrix) above "
                f"max_params = {max_size}; raise max_params if you have the memory, or use "
                "fisher_blocks / fisher_diagonal / fisher_operator."
            )
            raise ValueError(msg)
        return [_WholeVector(d)]
    return _named_blocks(lin, names, max_size, owner="fisher_blocks")


def _named_blocks(lin: Any, names: Sequence[str] | None, max_size: int, *, owner: str) -> list[Any]:
    """The parameter blocks named by ``names`` (all if None), each at most ``max_size``.

    Shared by ``fisher_blocks`` and the estimators' ``what="blocks"``; ``owner``
    names the caller in the size error.
    """
    available = {blk.name: blk for blk in lin.blocks}
    if names is None:
        chosen = list(lin.blocks)
    else:
        if isinstance(names, str):
            msg = (
                f"blocks must be a list of block names; got the string {names!r}. "
                f"Write [{names!r}]."
            )
            raise TypeError(msg)
        unknown = [n for n in names if n not in available]
        if unknown:
            msg = (
                f"blocks must name parameter blocks of the model; got unknown {unknown}. "
                f"Available: {list(available)}."
            )
            raise ValueError(msg)
        chosen = [available[n] for n in names]
    too_big = [(b.name, b.size) for b in chosen if b.size > max_size]
    if too_big:
        msg = (
            f"{owner} refuses blocks larger than max_block_size = {max_size} "
            f"parameters; got {too_big}. Raise max_block_size if you have the memory, "
            "or select smaller blocks with blocks=[...]."
        )
        raise ValueError(msg)
    return chosen


class _WholeVector(NamedTuple):
    size: int
    name: str = "all"
    offset: int = 0


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


def _front(family: Any, kernel: str, reduction: str, max_vectors: int | None) -> Family:
    fam = _check_family(family)
    check_choice(kernel, "kernel", KERNELS)
    check_choice(reduction, "reduction", REDUCTIONS)
    if max_vectors is not None:
        check_positive_int(max_vectors, "max_vectors")
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
    (out,) = _accumulate(
        source,
        fam,
        [kernel],
        "diagonal",
        reduction=reduction,
        max_vectors=max_vectors,
        blocks=None,
        max_size=0,
        progress=progress,
        process_group=process_group,
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
    """tr F_K = Σ_x Σ_r ‖J_xᵀ b_xr‖², exactly (a 0-d array).

    Same cost and options as ``fisher_diagonal`` (it is the sum of the diagonal).
    For an unbiased estimate at the cost of one gradient step use
    ``fisherbound.estimators``. ``process_group``: see ``fisher_diagonal``.
    """
    fam = _front(family, kernel, reduction, max_vectors)
    (out,) = _accumulate(
        source,
        fam,
        [kernel],
        "trace",
        reduction=reduction,
        max_vectors=max_vectors,
        blocks=None,
        max_size=0,
        progress=progress,
        process_group=process_group,
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
    (out,) = _accumulate(
        source,
        fam,
        [kernel],
        "blocks",
        reduction=reduction,
        max_vectors=max_vectors,
        blocks=blocks,
        max_size=max_block_size,
        progress=progress,
        process_group=process_group,
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
    (out,) = _accumulate(
        source,
        fam,
        [kernel],
        "dense",
        reduction=reduction,
        max_vectors=max_vectors,
        blocks=None,
        max_size=max_params,
        progress=progress,
        process_group=process_group,
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
    lower, upper = _accumulate(
        source,
        fam,
        kernels,
        what,
        reduction=reduction,
        max_vectors=max_vectors,
        blocks=blocks,
        max_size=max_size,
        progress=progress,
        process_group=process_group,
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
    coll = collective(process_group)
    lins = list(
        _batches(source, fam, desc="Fisher operator", progress=False, allow_empty=coll is not None)
    )
    _agree(
        coll,
        lins[0] if lins else None,
        fam,
        where="fisher_operator",
        kernel=kernel,
        reduction=reduction,
    )
    first = lins[0]
    xp = first.xp
    d = first.num_params
    count = sum(int(lin.logits.shape[0]) for lin in lins)
    if coll is not None:
        count = coll.sum_int(count)
    scale = 1.0 / count if reduction == "mean" else 1.0

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
