"""The adapters' shared shell: the checks and the streams of batches every adapter uses.

Private; re-exported by ``fisherbound.linearization`` (the model contract), where
the adapters and the analyses import them: the loss functions' option, label and
mask checks, the per-batch mask of a ``mask=`` option, the operand check of an
array-API adapter, and the ``linearizations`` / ``loss_functions`` streams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple, TypeVar

from fisherbound._lib import (
    REDUCTIONS,
    array_namespace,
    check_choice,
    check_device,
    check_floating,
    device_of,
    is_array,
    is_traced,
    length_of,
)
from fisherbound.families import Categorical, Family

Array = Any
T = TypeVar("T")

__all__ = [
    "check_batches",
    "check_family",
    "check_loss_labels",
    "check_loss_mask",
    "check_loss_options",
    "check_mask_array",
    "check_mask_spec",
    "check_operand",
    "Lazy",
    "MaskWords",
    "mask_source",
    "masked_label_placeholder",
    "stream_inputs",
    "stream_linearizations",
    "stream_loss_functions",
    "stream_pairs",
]

# ---------------------------------------------------------------------------
# The checks of a loss function's options, labels and mask
# ---------------------------------------------------------------------------


def check_loss_options(family: Any, reduction: object) -> Any:
    """The output family of a loss function (``Categorical()`` for None), checked.

    Raises a TypeError when ``family`` is not a ``fisherbound.families`` family
    and a ValueError when ``reduction`` is not ``"sum"`` or ``"mean"`` (``"mean"``
    divides by the number of counted positions).
    """
    family = check_family(Categorical() if family is None else family)
    check_choice(reduction, "reduction", REDUCTIONS)
    return family


def check_family(family: object) -> Family:
    """``family`` if it is a fisherbound family, else a TypeError."""
    if not isinstance(family, Family):
        msg = (
            "family must be a fisherbound.families family (Categorical(), Bernoulli(), "
            f"Gaussian()); got {type(family).__name__}."
        )
        raise TypeError(msg)
    return family


def check_loss_labels(family: Any, z: Array, labels: Array, *, where: str = "") -> None:
    """``family.check_labels(z, labels)``, its message written for the argument ``labels``.

    z (N, ∗S, C): categorical labels are class indices (N, ∗S), Bernoulli and
    Gaussian labels (N, ∗S, C) (the family's check says which it got). The
    message names ``labels`` and ``logits``, as the caller wrote them, and
    ``where`` (e.g. " of batch 2") says which logits.
    """
    try:
        family.check_labels(z, labels, names=("logits", "labels"))
    except (TypeError, ValueError) as err:
        msg = f"labels do not fit the logits{where} for the {family!r} family: {err}"
        raise type(err)(msg) from err


def check_loss_mask(mask: Any, z: Array, /, *, name: str = "mask") -> Array:
    """``mask`` checked against logits z (N, ∗S, C): a boolean array (N, ∗S) of z's device.

    A TypeError for a non-array or another namespace, a ValueError for another
    dtype or shape or device. Cost: O(1), no data is read.
    """
    xp, want = _mask_namespace(mask, name, z, is_array=is_array, what="None or a boolean array")
    if not xp.isdtype(mask.dtype, "bool") or tuple(int(s) for s in mask.shape) != want:
        msg = (
            f"{name} must be a boolean array of shape (N, *S) = {want} (the logits' shape "
            f"without the class axis); got {mask.dtype} of shape {tuple(mask.shape)}."
        )
        raise ValueError(msg)
    check_device(
        mask,
        name,
        device_of(z),
        owner="the logits' device",
        remedy=f"Move it with xp.asarray({name}, device=...).",
    )
    return mask


# ---------------------------------------------------------------------------
# The adapter shell: operand checks and the streams of batches
# ---------------------------------------------------------------------------


def mask_source(
    mask: Any, inputs: object, *, is_array: Callable[[object], bool]
) -> tuple[Any, str]:
    """What a ``mask=`` option names for one batch, and how messages call it.

    ``mask`` is a key of dict ``inputs`` (that entry: "mask (inputs['key'])"), a
    callable of the inputs (its result: "mask (the callable's result)") or
    anything else, returned as it is ("mask"); ``is_array`` tells the adapter's
    arrays from callables. A key that the inputs lack is a ValueError listing
    what they have. The adapters then check and convert the value.
    """
    if isinstance(mask, str):
        if not isinstance(inputs, Mapping) or mask not in inputs:
            keys = (
                f"keys [{', '.join(repr(k) for k in inputs)}]"
                if isinstance(inputs, Mapping)
                else f"{type(inputs).__name__} inputs, not a dict"
            )
            msg = f"mask={mask!r} names no entry of the inputs: got {keys}."
            raise ValueError(msg)
        return inputs[mask], f"mask (inputs[{mask!r}])"
    if callable(mask) and not is_array(mask):
        return mask(inputs), "mask (the callable's result)"
    return mask, "mask"


def _mask_namespace(
    mask: Any,
    name: str,
    z: Array,
    /,
    *,
    is_array: Callable[[object], bool],
    what: str,
    letters: str = "(N, *S)",
) -> tuple[Any, tuple[int, ...]]:
    """The namespace of ``mask`` (z's) and the shape (N, ∗S) it must have.

    A TypeError "{name} must be {what} of shape {letters} = (sizes) (True where a
    position counts); got {type}." when ``is_array`` refuses ``mask``, and the
    namespace check's TypeError for another array library.
    """
    want = tuple(int(s) for s in z.shape[:-1])
    if not is_array(mask):
        msg = (
            f"{name} must be {what} of shape {letters} = {want} (True where a position "
            f"counts); got {type(mask).__module__}.{type(mask).__name__}."
        )
        raise TypeError(msg)
    return array_namespace(mask, z, names=(name, "the logits")), want


class MaskWords(NamedTuple):
    """An adapter's mask type, and how the shared mask messages name it and its remedies.

    ``is_array`` tells the adapter's arrays from other values (callables, keys),
    ``kind`` names the type asked for ("torch.Tensor"), ``convert`` is the
    conversion to booleans ("mask.bool() or mask != 0") and ``move`` the remedy
    for another device, with ``{device}`` the logits' device.
    """

    is_array: Callable[[object], bool]
    kind: str
    convert: str
    move: str


def check_mask_spec(mask: object, words: MaskWords, *, stream: bool = False) -> Any:
    """A ``mask=`` option: ``mask`` if it is None, an array, a str or a callable.

    Else a TypeError. A stream of batches (``stream=True``) takes a str (a key of
    dict inputs) or a callable only: an array fits one batch.
    """
    array = words.is_array(mask)
    if mask is None or array or isinstance(mask, str) or callable(mask):
        if stream and array:
            msg = (
                "mask of a stream of batches must be a str (a key of dict inputs, e.g. "
                "'attention_mask') or a callable inputs -> mask; got a mask of type "
                f"{words.kind}, which fits one batch only. Use linearize(..., mask=mask) "
                "for one batch."
            )
            raise TypeError(msg)
        return mask
    msg = (
        f"mask must be None, a boolean {words.kind} (N, *S), a str (a key of dict inputs) "
        f"or a callable inputs -> mask; got {type(mask).__module__}.{type(mask).__name__}."
    )
    raise TypeError(msg)


def check_mask_array(
    value: Any,
    where: str,
    z: Array,
    /,
    *,
    nonzero: bool,
    words: MaskWords,
    letters: str = "(N, *S)",
) -> Array:
    """The boolean (N, ∗S) mask ``value`` of logits z (N, ∗S, C), checked and converted.

    ``value`` is what ``mask_source`` found, named ``where`` in messages; with
    ``nonzero`` (a key's entry or a callable's result) any nonzero value counts.
    A mask given as it is may hold 0/1 integers (as Hugging Face's
    ``attention_mask``), read as booleans. Refused: a value that ``words.is_array``
    (the adapter's array type) rejects or a non-boolean dtype (TypeError), integers
    other than 0 and 1, another shape than z's without the class axis, another
    device, a mask with no True entry (ValueError). Traced JAX values (inside
    ``jit`` / ``shard_map``) have no values to read: their value checks pass.
    Cost: a reduction for the 0/1 check of integers and one for the True entry.
    """
    xp, want = _mask_namespace(
        value, where, z, is_array=words.is_array, what=f"a boolean {words.kind}", letters=letters
    )
    if not nonzero and xp.isdtype(value.dtype, "integral"):
        # 0/1 integers, as Hugging Face's attention_mask: read as booleans.
        if not is_traced(value) and bool(xp.any((value != 0) & (value != 1))):
            msg = (
                f"{where} must be boolean or hold only 0 and 1 (True where a position "
                f"counts); got {value.dtype} values outside {{0, 1}}. Convert with mask != 0."
            )
            raise ValueError(msg)
        nonzero = True
    if nonzero and not xp.isdtype(value.dtype, "bool"):
        value = value != 0
    if not xp.isdtype(value.dtype, "bool"):
        msg = (
            f"{where} must be a boolean {words.kind} (True where a position counts); got "
            f"dtype {value.dtype}. Convert with {words.convert}."
        )
        raise TypeError(msg)
    if tuple(int(s) for s in value.shape) != want:
        msg = (
            f"{where} must have the logits' shape without the class axis, {letters} = "
            f"{want}; got shape {tuple(value.shape)} (logits {tuple(z.shape)})."
        )
        raise ValueError(msg)
    device = device_of(z)
    check_device(
        value,
        where,
        device,
        owner="the logits' device",
        remedy=words.move.format(device=str(device)),
    )
    anything = xp.any(value)
    if not is_traced(anything) and not bool(anything):  # traced inside jax.jit: unknown
        msg = (
            f"{where} must keep at least one position; {where} masks every position of the "
            f"batch (a mask of shape {want} with no True entry), so nothing would count."
        )
        raise ValueError(msg)
    return value


def check_operand(
    x: Array,
    name: str,
    shape: tuple[int | None, ...],
    what: str,
    /,
    *,
    like: Array,
    like_name: str,
    owner: str,
    remedy: str,
    free: str | None = None,
) -> Array:
    """``x`` checked as an operand of an array-API adapter, cast to ``like``'s dtype.

    ``x`` must share ``like``'s namespace (a TypeError naming ``like_name``
    otherwise), be real floating, have ``shape`` (None: any size) and be on
    ``like``'s device (a ValueError naming ``owner``, with ``remedy``). The shape
    message reads "{name} must have shape {what} = (sizes); got shape (...)."
    with each free axis written as its letter in ``what`` or as ``free``.
    Cost: O(1), no data is read.
    """
    xp = array_namespace(x, like, names=(name, like_name))
    check_floating(x, name, xp=xp)
    got = tuple(int(s) for s in x.shape)
    if len(got) != len(shape) or any(
        s is not None and g != s for g, s in zip(got, shape, strict=False)
    ):
        letters = what.strip("()").rstrip(",").split(", ")
        want = ", ".join(
            (letter if free is None else free) if s is None else str(s)
            for letter, s in zip(letters, shape, strict=True)
        )
        comma = "," if len(shape) == 1 else ""  # a 1-tuple reads (67,)
        msg = f"{name} must have shape {what} = ({want}{comma}); got shape {got}."
        raise ValueError(msg)
    check_device(x, name, device_of(like), owner=owner, remedy=remedy)
    return xp.astype(x, like.dtype) if x.dtype != like.dtype else x


def check_batches(
    batches: object, /, *, what: str, remedy: str, single: Callable[[object], bool] | None = None
) -> Iterable[Any]:
    """``batches`` if it is an iterable of batches, not one batch; else a TypeError.

    Strings, bytes and arrays (or what ``single`` recognises as one batch) are
    refused with "batches must be an iterable of {what}; got {type}. {remedy}".
    """
    one = single if single is not None else is_array
    if not isinstance(batches, Iterable) or isinstance(batches, str | bytes) or one(batches):
        msg = f"batches must be an iterable of {what}; got {type(batches).__name__}. {remedy}"
        raise TypeError(msg)
    return batches


class Lazy(Iterator[T]):
    """A lazy stream over ``batches`` that knows how many items are left when they do.

    ``operator.length_hint`` of the stream is that of ``batches`` when the stream
    was made (a list, a ``DataLoader``: its ``len``) less the items taken, so a
    progress bar over the stream has a total, a percentage and an ETA; 0 where
    ``batches`` cannot say (a generator). Items come from ``items``, an iterator
    over ``batches``.
    """

    __slots__ = ("_items", "_taken", "_total")

    def __init__(self, items: Iterator[T], batches: Iterable[Any]) -> None:
        self._items, self._taken = items, 0
        # once, now: an iterator's own hint shrinks as it is consumed
        self._total = length_of(batches) or 0

    def __next__(self) -> T:
        item = next(self._items)
        self._taken += 1
        return item

    def __length_hint__(self) -> int:
        return max(0, self._total - self._taken)


def stream_inputs(
    batches: Iterable[Any], build: Callable[[int, Any], T], /, *, single: str
) -> Iterator[T]:
    """``build(i, inputs)`` for each batch i, lazily; a tuple or list gives its first item.

    A DataLoader's ``(x, y)`` batch contributes ``x``; any other batch is the
    inputs itself. An empty tuple is refused (ValueError): "batch {i} must be
    {single} or a non-empty tuple (inputs, ...); got ()." The stream is ``Lazy``:
    it has the length hint of ``batches``.
    """
    return Lazy(_inputs(batches, build, single), batches)


def _inputs(batches: Iterable[Any], build: Callable[[int, Any], T], single: str) -> Iterator[T]:
    for i, batch in enumerate(batches):
        if isinstance(batch, tuple | list):
            if len(batch) == 0:
                msg = f"batch {i} must be {single} or a non-empty tuple (inputs, ...); got ()."
                raise ValueError(msg)
            batch = batch[0]
        yield build(i, batch)


def stream_pairs(
    batches: Iterable[Any],
    build: Callable[[int, Any, Any], T],
    /,
    *,
    say_length: bool = False,
) -> Iterator[T]:
    """``build(i, inputs, labels)`` for each ``(inputs, labels, ...)`` batch i, lazily.

    Anything else is refused (TypeError): "batch {i} must be a pair (inputs,
    labels); got {type}." (with its length when ``say_length``). The stream is
    ``Lazy``: it has the length hint of ``batches``.
    """
    return Lazy(_pairs(batches, build, say_length), batches)


def _pairs(
    batches: Iterable[Any], build: Callable[[int, Any, Any], T], say_length: bool
) -> Iterator[T]:
    for i, batch in enumerate(batches):
        if not isinstance(batch, tuple | list) or len(batch) < 2:
            length = (
                f" of length {len(batch)}" if say_length and isinstance(batch, tuple | list) else ""
            )
            msg = f"batch {i} must be a pair (inputs, labels); got {type(batch).__name__}{length}."
            raise TypeError(msg)
        yield build(i, batch[0], batch[1])


def stream_linearizations(
    batches: object,
    build: Callable[[int, Any], T],
    /,
    *,
    remedy: str,
    single: str,
    what: str = "batches (arrays, or tuples whose first element is the inputs)",
    one_batch: Callable[[object], bool] | None = None,
) -> Iterator[T]:
    """An adapter's ``linearizations``: ``batches`` checked now, then ``stream_inputs``.

    ``check_batches(batches, what=what, remedy=remedy, single=one_batch)`` runs at
    the call (not at the first batch); ``single`` names one batch in the message
    of an empty tuple.
    """
    checked = check_batches(batches, what=what, remedy=remedy, single=one_batch)
    return stream_inputs(checked, build, single=single)


def stream_loss_functions(
    batches: object,
    build: Callable[[int, Any, Any], T],
    /,
    *,
    remedy: str,
    what: str = "(inputs, labels) pairs",
    one_batch: Callable[[object], bool] | None = None,
    say_length: bool = False,
) -> Iterator[T]:
    """An adapter's ``loss_functions``: ``batches`` checked now, then ``stream_pairs``."""
    checked = check_batches(batches, what=what, remedy=remedy, single=one_batch)
    return stream_pairs(checked, build, say_length=say_length)


def masked_label_placeholder(y: Array, counted: Array, xp: Any) -> Array:
    """``y`` with the labels of positions where ``counted`` (N, ∗S) is False replaced.

    By 0 (a class index, a binary label, a regression target), or for floating
    labels with a class axis (N, ∗S, C) by 1/C: a valid label of every family,
    a categorical target distribution included. Those positions count nowhere.
    Cost: one elementwise select over ``y``.
    """
    extra = int(y.ndim) - int(counted.ndim)
    keep = xp.reshape(counted, (*counted.shape, *((1,) * extra)))
    if extra == 1 and xp.isdtype(y.dtype, "real floating"):
        fill = xp.full_like(y, 1.0 / int(y.shape[-1]))
    else:
        fill = xp.zeros_like(y)
    return xp.where(keep, y, fill)
