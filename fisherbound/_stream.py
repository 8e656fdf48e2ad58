"""The data stream under every analysis: one loop over a data set.

Every analysis of fisherbound is a sum over the batches of a data set, of
linearizations (``fisher``, ``estimators``, ``variance``, ``dimension``) or of
loss functions (``landscape``). This module is that loop, written once:

- ``Stream`` iterates a source of linearizations, validating every batch against
  the first (one array library, model, dtype and device; one number of position
  axes, though their sizes, e.g. sequence lengths, may differ; finite logits with
  enough classes for the family; a mask, if any, boolean of the logits' shape
  without C), shows the progress bar, counts the inputs, and at its
  end (``finish``) makes the ranks of a ``process_group`` agree on the model, the
  family and the call's options before all-reducing the input count;
- ``LossStream`` does the same for loss functions (same parameters θ, one
  reduction);
- ``total`` all-reduces a per-rank sum and applies the reduction scale (1/N for
  ``reduction="mean"``, N the all-reduced number of inputs);
- ``Objective`` is the total loss of a list of loss functions, whose matvecs
  (gradients, Hessian-vector products) are combined with the batch weights;
- ``LabelSource`` hands out observed labels batch by batch (rows of one array in
  the stream's order, or one array per batch) and checks at the end that they
  were used up; ``ignored_labels`` and ``check_counted`` apply ``ignore_index``.

An analysis then reads "loop + math"::

    stream = Stream(source, family, desc="Fisher diagonal", progress=progress,
                    process_group=process_group)
    total = None
    for lin in stream:
        total = add(total, per_batch_math(lin))
    stream.finish(kernel=kernel, reduction=reduction)
    return stream.total(total, reduction)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from fisherbound._finite import flush
from fisherbound._lib import (
    Collective,
    array_namespace,
    check_logits,
    collective,
    device_of,
    fingerprint,
    is_array,
    is_traced,
    known_false,
    length_of,
    progress_bar,
)
from fisherbound._shell import masked_label_placeholder
from fisherbound.families import Family
from fisherbound.linearization import (
    Linearization,
    LossFunction,
    as_linearizations,
    check_family,
)

Array = Any

__all__ = [
    "LabelSource",
    "LossStream",
    "Objective",
    "Signature",
    "Stream",
    "check_batch",
    "check_counted",
    "check_family",
    "conform_labels",
    "check_loss",
    "ignored_labels",
    "named_blocks",
    "signature",
]


# --------------------------------------------------------------------------- #
# validation of one item


def conform_labels(lin: Any, y: Array) -> Array:
    """Observed labels in the linearization's classes-last layout, masked ones replaced.

    Labels with the logits' number of axes (Bernoulli / Gaussian targets
    (N, ∗S, C)) are given in the model output's layout: their axis
    ``lin.class_axis`` (when the adapter has one) moves last, as the logits'
    did. The labels of positions masked by ``lin.mask`` become a valid placeholder
    (``masked_label_placeholder``: 0, or 1/C for label rows), so padding may hold
    anything (e.g. −100). Cost: O(size of y), no host read.
    """
    xp = lin.xp
    if not is_array(y) or array_namespace(y) is not xp:
        return y  # the family's label check names what came
    axis = getattr(lin, "class_axis", -1)
    ndim = int(y.ndim)
    if ndim == int(lin.logits.ndim) and ndim >= 3 and isinstance(axis, int):
        axis = axis % ndim
        if axis != ndim - 1:
            order = tuple(i for i in range(ndim) if i != axis) + (axis,)
            y = xp.permute_dims(y, order)
    mask = getattr(lin, "mask", None)
    if mask is not None and tuple(y.shape[: mask.ndim]) == tuple(mask.shape):
        y = masked_label_placeholder(y, mask, xp)
    return y


class Signature(NamedTuple):
    """What every batch of one data set must share with the first.

    Not the number of examples N nor the sizes of the position axes (sequences
    of different lengths T), but their number: logits (N, ∗S, C) with one ``len(S)``.
    """

    library: str
    dtype: Any
    device: Any
    num_outputs: int
    blocks: tuple[Any, ...]
    num_position_axes: int = 0


def signature(lin: Any) -> Signature:
    """The ``Signature`` of a linearization."""
    z = lin.logits
    return Signature(
        type(z).__module__.split(".")[0],
        z.dtype,
        device_of(z),
        int(z.shape[-1]),
        tuple((b.name, tuple(b.shape)) for b in lin.blocks),
        int(z.ndim) - 2,
    )


def check_batch(
    lin: Any, family: Family, index: int, ref: Signature | None, *, outputs: bool = True
) -> Signature:
    """Validate batch ``index`` (its logits, and against batch 0's ``ref``).

    ``outputs=False`` leaves the family's check of the logits (``_check_outputs``,
    one host read) to the caller.
    """
    z = lin.logits
    name = f"the logits of batch {index}"
    if z.ndim < 2:
        msg = (
            f"{name} must have shape (N, C), or (N, *S, C) with position axes S; got "
            f"shape {tuple(z.shape)}."
        )
        raise ValueError(msg)
    min_classes = family.min_classes
    if z.shape[-1] < min_classes:
        msg = (
            f"{name} have C = {z.shape[-1]} outputs, but the {type(family).__name__} family "
            f"needs at least {min_classes}; use Bernoulli() for one binary output."
        )
        raise ValueError(msg)
    if not getattr(lin, "logits_checked", False):  # the built-in adapters check on build
        check_logits(z, name=name)
    if outputs and not is_traced(z):  # traced JAX values have nothing to read on the host
        family._check_outputs(z, array_namespace(z, names=(name,)), name)
    _check_mask(lin, index)
    sig = signature(lin)
    if ref is None:
        return sig
    _check_like_first(sig, ref, index, lin.num_params)
    return ref


def _check_mask(lin: Any, index: int) -> None:
    """``lin.mask``, if any, must be a boolean array of the logits' shape without C."""
    mask = getattr(lin, "mask", None)
    if mask is None:
        return
    want = tuple(int(s) for s in lin.logits.shape[:-1])
    xp = array_namespace(mask, lin.logits, names=(f"the mask of batch {index}", "the logits"))
    if not xp.isdtype(mask.dtype, "bool") or tuple(int(s) for s in mask.shape) != want:
        msg = (
            f"the mask of batch {index} must be a boolean array of shape (N, *S) = {want} "
            f"(the logits' shape without the class axis); got {mask.dtype} of shape "
            f"{tuple(mask.shape)}."
        )
        raise ValueError(msg)


def _check_like_first(sig: Signature, ref: Signature, index: int, num_params: int) -> None:
    """Batch ``index`` (signature ``sig``) must come from batch 0's library, model and device."""
    _require_like_first(
        (
            sig.library == ref.library,
            TypeError,
            f"every batch must come from one array library; batch {index} holds "
            f"{sig.library} arrays, batch 0 held {ref.library} arrays.",
        ),
        (
            sig.num_position_axes == ref.num_position_axes,
            ValueError,
            f"every batch must have the same number of position axes; the logits of batch "
            f"{index} are {_layout(sig)}, batch 0's were {_layout(ref)}. Batches may differ "
            "in N and in the sizes of the position axes (sequence length), not in their number.",
        ),
        (
            (sig.num_outputs, sig.blocks) == (ref.num_outputs, ref.blocks),
            ValueError,
            f"every batch must come from the same model; batch {index} has C = "
            f"{sig.num_outputs} outputs and D = {num_params} parameters in "
            f"{len(sig.blocks)} blocks, batch 0 had C = {ref.num_outputs} and a different "
            "parameter layout.",
        ),
        (
            (sig.dtype, sig.device) == (ref.dtype, ref.device),
            ValueError,
            f"every batch must share one dtype and device; batch {index} is {sig.dtype} on "
            f"{sig.device}, batch 0 was {ref.dtype} on {ref.device}.",
        ),
    )


def _require_like_first(*checks: tuple[bool, type[Exception], str]) -> None:
    """Item i must match item 0: raise the first check that fails, with its message.

    Each check is ``(same, error type, message)``, in the order they are tested;
    every message is O(1) to build.
    """
    for same, error, message in checks:
        if not same:
            raise error(message)


def _layout(sig: Signature) -> str:
    """The letters of a signature's logits, e.g. "(N, T, C)"."""
    s = sig.num_position_axes
    positions = ["T"] if s == 1 else [f"T{i + 1}" for i in range(s)]
    return "(" + ", ".join(["N", *positions, "C"]) + ")"


def check_loss(item: object, index: int, ref: Any) -> Any:
    """Item ``index`` of a source: a LossFunction at the parameters of item 0."""
    if not isinstance(item, LossFunction):
        what = "source" if index < 0 else f"item {index} of source"
        msg = (
            f"{what} must be a LossFunction (or an iterable of them); got "
            f"{type(item).__module__}.{type(item).__name__}. Build one with an adapter's "
            "loss_function(model, inputs, labels) (fisherbound.adapters.numpy, .torch, .jax)."
        )
        raise TypeError(msg)
    if ref is None:
        return item
    if item.num_params != ref.num_params:
        msg = (
            f"every loss function must have the same parameters; batch {index} has "
            f"D = {item.num_params}, batch 0 has D = {ref.num_params}."
        )
        raise ValueError(msg)
    if item.reduction != ref.reduction:
        msg = (
            f"every loss function must use the same reduction; batch {index} uses "
            f"{item.reduction!r}, batch 0 uses {ref.reduction!r}. Build them with one "
            "reduction= value."
        )
        raise ValueError(msg)
    xp = array_namespace(
        ref.params, item.params, names=("the params of batch 0", f"the params of batch {index}")
    )
    if known_false(xp.all(item.params == ref.params)):
        msg = (
            f"every loss function must be frozen at the same parameters θ; batch {index} "
            "differs from batch 0. Build all of them from one model state."
        )
        raise ValueError(msg)
    return item


def named_blocks(lin: Any, names: Any, max_size: int, *, owner: str) -> list[Any]:
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


# --------------------------------------------------------------------------- #
# the stream


class _Base:
    """What both streams share: the collective, the count, the agreement, the scale."""

    #: The message for a source without items (and no process group).
    empty_message = ""

    def __init__(
        self,
        source: Any,
        *,
        desc: str,
        progress: bool | None,
        process_group: Any = None,
        coll: Collective | None = None,
    ) -> None:
        self.source = source
        self.desc = desc
        self.progress = progress
        self.coll = coll if coll is not None else collective(process_group)
        #: The first item (None until the stream has started, or for an empty shard).
        self.first: Any = None
        #: Inputs seen on this rank; after ``finish``, on all ranks.
        self.num_inputs = 0
        #: Items yielded on this rank.
        self.num_batches = 0
        self._finished = False

    # -- to override ------------------------------------------------------------
    def _items(self) -> Iterator[Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def _fields(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    # -- the loop ----------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        for item in self._items():
            if self.first is None:
                self.first = item
            self.num_inputs += int(item.num_inputs)
            self.num_batches += 1
            yield item
            flush(item)  # the deferred finite checks of its products (accelerators)
        if self.first is None and self.coll is None:
            raise ValueError(self.empty_message)

    def agree_options(self, *, where: str | None = None, **options: Any) -> None:
        """Before any data-dependent collective: every rank runs the same call."""
        if self.coll is not None:
            self.coll.agree(options, where=self.desc if where is None else where)

    def finish(self, *, where: str | None = None, **options: Any) -> None:
        """After the loop: the ranks agree on the model and ``options``; N all-reduced.

        Without a process group this only marks the stream finished. An empty shard
        raises the same ValueError on every rank (instead of leaving the others
        waiting).
        """
        if self._finished:
            return
        self._finished = True
        if self.coll is None:
            return
        self.coll.agree(self._fields() | options, where=self.desc if where is None else where)
        self.num_inputs = self.coll.sum_int(self.num_inputs)

    def sum(self, tree: Any) -> Any:
        """All-reduce a per-rank sum (an array, a list or a dict of them)."""
        return tree if self.coll is None else self.coll.sum_tree(tree)


class Stream(_Base):
    """One pass over a data set of linearizations, every batch checked against the first.

    Iterate it for the batches; ``num_inputs`` counts the inputs. ``limit`` stops
    after that many batches. After the loop, ``finish(**options)`` (every rank
    agrees) and ``total(tree, reduction)`` (all-reduce and scale).
    """

    empty_message = "source must contain at least one batch; got an empty iterable."

    def __init__(
        self,
        source: Any,
        family: Family,
        *,
        desc: str,
        progress: bool | None,
        process_group: Any = None,
        coll: Collective | None = None,
        limit: int | None = None,
        check_outputs: bool = True,
    ) -> None:
        super().__init__(
            source, desc=desc, progress=progress, process_group=process_group, coll=coll
        )
        self.family = family
        self.limit = limit
        #: False: the caller checks each batch's logits with the family (``outputs`` of
        #: ``check_batch``), e.g. from a flag its own compiled pass returns.
        self.check_outputs = check_outputs

    def _items(self) -> Iterator[Any]:
        batches: Iterator[Any] = as_linearizations(self.source)
        total = 1 if isinstance(self.source, Linearization) else length_of(self.source)
        if self.limit is not None:
            batches = itertools.islice(batches, self.limit)
            total = self.limit if total is None else min(total, self.limit)
        ref = None
        bar = progress_bar(batches, desc=self.desc, progress=self.progress, total=total)
        for i, lin in enumerate(bar):
            ref = check_batch(lin, self.family, i, ref, outputs=self.check_outputs)
            yield lin

    def _fields(self) -> dict[str, Any]:
        lin = self.first
        fields: dict[str, Any] = {"batches": 0 if lin is None else 1, "family": repr(self.family)}
        sig = None if lin is None else signature(lin)
        # An empty shard sends placeholders (the same fields: one vector size everywhere).
        fields |= {
            "the number of parameters": -1 if lin is None else lin.num_params,
            "the parameter blocks": None if sig is None else sig.blocks,
            "the number of outputs": -1 if sig is None else sig.num_outputs,
            "the number of position axes": -1 if sig is None else sig.num_position_axes,
            "the dtype": None if sig is None else str(sig.dtype),
            "the array library": None if sig is None else sig.library,
        }
        return fields

    def scale(self, reduction: str) -> float:
        """The reduction scale: 1/N for ``"mean"`` (N after ``finish``), else 1."""
        return 1.0 / self.num_inputs if reduction == "mean" else 1.0

    def total(self, tree: Any, reduction: str) -> Any:
        """``tree`` (this rank's sum) all-reduced and scaled by ``scale(reduction)``."""
        tree = self.sum(tree)
        if reduction != "mean":
            return tree
        s = self.scale(reduction)
        if isinstance(tree, list):
            return [x * s for x in tree]
        if isinstance(tree, dict):
            return {k: x * s for k, x in tree.items()}
        return tree * s


class LossStream(_Base):
    """One pass over loss functions, all at the parameters θ of the first."""

    empty_message = "source must contain at least one loss function; got an empty iterable."

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Counted (unmasked) positions seen on this rank; after ``finish``, on all ranks.
        self.num_counted = 0

    def _items(self) -> Iterator[Any]:
        source = self.source
        if isinstance(source, LossFunction):
            yield source
            return
        if not isinstance(source, Iterable) or isinstance(source, str | bytes) or is_array(source):
            check_loss(source, -1, None)
        ref = None
        for i, item in enumerate(progress_bar(source, desc=self.desc, progress=self.progress)):
            check_loss(item, i, ref)
            if ref is None:
                ref = item
            yield item

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            self.num_counted += counted(item)
            yield item

    def finish(self, *, where: str | None = None, **options: Any) -> None:
        """As ``_Base.finish``; the counted positions are all-reduced too."""
        done = self._finished
        super().finish(where=where, **options)
        if not done and self.coll is not None:
            self.num_counted = self.coll.sum_int(self.num_counted)

    def _fields(self) -> dict[str, Any]:
        first = self.first
        empty = first is None  # placeholders: one vector size on every rank
        return {
            "batches": 0 if empty else 1,
            "the parameter values θ": None if empty else fingerprint(first.params),
            "the number of parameters": -1 if empty else int(first.num_params),
            "the loss reduction": None if empty else first.reduction,
            "the family": None if empty else repr(first.family),
            "the dtype": None if empty else str(first.params.dtype),
        }

    @property
    def reduction(self) -> str:
        """The loss functions' reduction (``"sum"`` before the first item)."""
        return "sum" if self.first is None else str(self.first.reduction)

    def as_sum(self, item: Any, part: Array) -> Array:
        """``part`` of the batch ``item`` as a sum over its counted positions.

        A mean loss is multiplied by its count n_b (``counted``: the unmasked
        positions, N_b without position axes).
        """
        return part * float(counted(item)) if item.reduction == "mean" else part

    def total(self, tree: Array) -> Array:
        """The all-reduced sum of this rank's ``as_sum`` parts; ÷ n for mean losses."""
        tree = self.sum(tree)
        return tree / float(self.num_counted) if self.reduction == "mean" else tree


def counted(item: Any) -> int:
    """The positions a loss function's mean divides by: ``num_counted``, else N."""
    return int(getattr(item, "num_counted", item.num_inputs))


class Objective:
    """The total loss of a list of loss functions at one θ (sum, or mean over examples).

    It reads ``stream`` to its end (the ranks agree on θ and ``options``).
    ``value``, ``gradient``, ``hvp`` and ``hvp_batch`` combine the batches' parts
    with the weights n_b / n (mean losses: n_b the counted positions of batch b, N_b
    without position axes) or 1 (sum losses) and all-reduce them.
    """

    def __init__(self, stream: LossStream, **options: Any) -> None:
        items = list(stream)
        stream.finish(**options)
        first = items[0]
        self.items = items
        self.coll = stream.coll
        self.params = first.params
        self.blocks = tuple(first.blocks)
        self.num_params = int(first.num_params)
        self.reduction = first.reduction
        self.xp = array_namespace(first.params, names=("params",))
        self.dtype = first.params.dtype
        self.device = device_of(first.params)
        total = stream.num_counted
        if self.reduction == "mean":
            self.weights = [counted(item) / total for item in items]
        else:
            self.weights = [1.0] * len(items)

    def _combine(self, parts: Iterable[Array]) -> Array:
        out = None
        for w, part in zip(self.weights, parts, strict=True):
            term = part if w == 1.0 else part * w
            out = term if out is None else out + term
        return out if self.coll is None else self.coll.sum(out)

    def value(self, shifts: Array) -> Array:
        return self._combine(item.value(shifts) for item in self.items)

    def gradient(self) -> Array:
        return self._combine(item.gradient() for item in self.items)

    def hvp(self, v: Array) -> Array:
        return self._combine(item.hvp(v) for item in self.items)

    def hvp_batch(self, V: Array) -> Array:
        return self._combine(item.hvp_batch(V) for item in self.items)


# --------------------------------------------------------------------------- #
# observed labels that travel with the stream


def ignored_labels(lin: Any, y: Array, ignore_index: int | None) -> tuple[Array, Any]:
    """Labels with ``ignore_index`` replaced by 0, and where they count (None: all).

    Only integer labels are compared with ``ignore_index``.
    """
    xp = lin.xp
    if ignore_index is None or not xp.isdtype(y.dtype, "integral"):
        return y, None
    keep = y != ignore_index
    return xp.where(keep, y, xp.zeros_like(y)), keep


def check_counted(lin: Any, keep: Array, ignore_index: int | None, index: int) -> None:
    """A ValueError when no position of batch ``index`` counts (ignored or masked)."""
    xp = lin.xp
    mask = getattr(lin, "mask", None)
    counted = keep if mask is None else keep & mask
    if known_false(xp.any(counted)):
        msg = (
            f"the labels of batch {index} leave no position to count: every label equals "
            f"ignore_index = {ignore_index} (or its position is masked). Check the labels, "
            "or pass ignore_index=None."
        )
        raise ValueError(msg)


class LabelSource:
    """Labels for each batch: slices of one array, or one array per batch."""

    def __init__(self, labels: Any) -> None:
        self.whole: Any = None
        self.parts: Iterator[Any] | None = None
        if isinstance(labels, list | tuple):
            self.parts = iter(labels)
            self.total = len(labels)
        else:
            if not is_array(labels):
                msg = (
                    "labels must be an array of observed labels (N, ...) or a list of one "
                    f"array per batch; got {type(labels).__name__}. The empirical Fisher "
                    "needs the observed labels; the true Fisher (fisher_diagonal, "
                    "monte_carlo, detach_and_mix) needs none."
                )
                raise TypeError(msg)
            array_namespace(labels, names=("labels",))
            self.whole = labels
            self.total = int(labels.shape[0]) if labels.ndim >= 1 else 0
        self.offset = 0
        self.batches = 0

    def take(self, lin: Any) -> Any:
        n = lin.num_inputs
        i = self.batches
        self.batches += 1
        if self.parts is not None:
            y = next(self.parts, None)
            if y is None:
                msg = (
                    f"labels must hold one array per batch; got {self.total} arrays but the "
                    f"source has more batches (batch {i} has no labels)."
                )
                raise ValueError(msg)
            array_namespace(y, lin.logits, names=(f"labels[{i}]", "the logits"))
            if y.ndim < 1 or int(y.shape[0]) != n:
                msg = (
                    f"labels[{i}] must have one row per input of batch {i} ({n}); got shape "
                    f"{tuple(y.shape)}."
                )
                raise ValueError(msg)
            return y
        y_all = self.whole
        array_namespace(y_all, lin.logits, names=("labels", "the logits"))
        if self.offset + n > self.total:
            msg = (
                f"labels must have one row per input of the source; got {self.total} rows but "
                f"the source has more inputs (batch {i} needs rows {self.offset}.."
                f"{self.offset + n - 1})."
            )
            raise ValueError(msg)
        y = y_all[self.offset : self.offset + n, ...]
        self.offset += n
        return y

    def finish(self) -> None:
        if self.whole is not None and self.offset != self.total:
            msg = (
                f"labels must have one row per input of the source; got {self.total} rows but "
                f"the source has {self.offset} inputs."
            )
            raise ValueError(msg)
        if self.parts is not None and self.batches != self.total:
            msg = (
                f"labels must hold one array per batch; got {self.total} arrays for "
                f"{self.batches} batches."
            )
            raise ValueError(msg)
