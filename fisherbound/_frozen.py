"""What linearizations and loss functions share: the parameter layout and the frozen base.

``ParameterBlock`` / ``make_blocks`` lay the parameter tensors out in the flat vector,
``example_range`` reads an ``examples=`` slice, ``ReadOnly`` is a documented read-only
attribute, and ``FrozenBase`` is the base of ``LinearizationBase`` and
``LossFunctionBase`` (frozen at θ on one batch: the blocks, the namespace, the
reference array every operand is checked against, ``ravel`` / ``unravel``). All are
re-exported by ``fisherbound.linearization``, the model contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, NamedTuple, TypeVar, overload

from fisherbound._finite import Product, guard_class
from fisherbound._lib import device_of, is_array
from fisherbound._shell import check_operand

Array = Any
T = TypeVar("T")

__all__ = ["FrozenBase", "ParameterBlock", "ReadOnly", "example_range", "make_blocks"]


class ParameterBlock(NamedTuple):
    """One parameter tensor inside the flat parameter vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int


def make_blocks(named_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> tuple[ParameterBlock, ...]:
    """Lay out named tensor shapes one after another in a flat vector."""
    blocks = []
    offset = 0
    for name, shape in named_shapes:
        size = math.prod(shape)
        blocks.append(ParameterBlock(name, tuple(int(s) for s in shape), offset, size))
        offset += size
    return tuple(blocks)


def example_range(examples: slice | None, num_inputs: int) -> tuple[int, int]:
    """(start, stop) of a contiguous slice of the batch; None means all examples."""
    if examples is None:
        return 0, num_inputs
    if not isinstance(examples, slice) or examples.step not in (None, 1):
        msg = f"examples must be a contiguous slice(start, stop) or None; got {examples!r}."
        raise TypeError(msg)
    start, stop, _ = examples.indices(num_inputs)
    if stop <= start:
        msg = f"examples must select at least one of the {num_inputs} examples; got {examples!r}."
        raise ValueError(msg)
    return start, stop


class ReadOnly(Generic[T]):
    """A documented read-only attribute: ``obj.name`` returns ``obj._name``.

    The one-line form of a property that only returns a private field, for the
    descriptive attributes of linearizations, loss functions and models::

        logits = ReadOnly[Array]("The logits z of the batch, shape (N, C).")

    Setting it raises an AttributeError, as for a property without a setter.
    """

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> ReadOnly[T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj, f"_{self._name}")

    def __set__(self, obj: object, value: object) -> None:
        msg = f"{type(obj).__name__}.{self._name} is read-only."
        raise AttributeError(msg)


class FrozenBase:
    """What linearizations and loss functions share: frozen at θ on one batch.

    The parameter blocks, the array namespace, and the dtype and device of the
    array every operand is checked against (the logits of a linearization, θ of a
    loss function; see ``_reference``).
    """

    _blocks: tuple[ParameterBlock, ...]
    _xp: Any

    # How ``_operand`` names the reference array and how to move an operand to it.
    _role: str = "linearization"
    _reference_name: str = "logits"
    _operand_remedy: str = "Move it with xp.asarray({name}, device=lin.device)."
    _operand_free: str | None = None

    #: The products whose results are checked finite (``fisherbound._finite``):
    #: method name -> how to name it and where its examples and parameters are.
    checked_products: dict[str, Product] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        guard_class(cls, cls.checked_products)

    def _check_current(self) -> None:
        """Refuse a product of state that changed since this object was built.

        Called before every outermost product; adapters whose state can change in
        place override it (with ``_mark_current``). A no-op here.
        """

    def _mark_current(self) -> None:
        """Take the state as current: after every outermost product. A no-op here."""

    def _suspects(self) -> tuple[Array | None, list[tuple[str, Array]]]:
        """(flat θ or None, [(name, input array)]): what a failed finite check reads.

        Adapters override it so that the message of a non-finite product can name
        a non-finite parameter block or input rows; the default knows neither.
        """
        return None, []

    blocks = ReadOnly[tuple[ParameterBlock, ...]](
        "The parameter blocks (name, shape, offset, size), in flat-vector order."
    )
    xp = ReadOnly[Any]("The array namespace of every array in or out.")

    def _reference(self) -> Array:
        """The array whose namespace, dtype and device every operand must share."""
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        """D, the length of the flat parameter vector."""
        last = self._blocks[-1]
        return last.offset + last.size

    @property
    def dtype(self) -> Any:
        """The dtype of every vector in or out (the logits' or θ's)."""
        return self._reference().dtype

    @property
    def device(self) -> Any:
        """The device of every vector in or out; operands must be on it."""
        return device_of(self._reference())

    def _row_by_row(self, product: Callable[[Array], Array], X: Array) -> Array:
        """``product(X[m])`` for each row m of ``X``, stacked: a generic batched product."""
        return self._xp.stack([product(X[m, ...]) for m in range(X.shape[0])], axis=0)

    def unravel(self, v: Array, /) -> Any:
        """A flat vector ``v`` (..., D) as a dict name -> array shaped like that parameter.

        Each block's entries of the last axis become (..., ∗shape) (leading axes
        kept: a (k, D) stack of vectors gives (k, ∗shape) per parameter); names
        and order are ``blocks``'. The form EWC, Fisher merging and pruning code
        consumes: ``lin.unravel(fisher_diagonal(lin))``. Eigenvectors are columns
        (D, k): ``lin.unravel(vectors.T)``; a loss function's Hessian directions
        likewise (rows (k, D)): ``loss.unravel(hd.directions)``. The inverse of
        ``ravel``. Cost: one reshape of a slice per block (views where the
        namespace makes them).
        """
        v = self._flat_operand(v)
        lead = tuple(int(s) for s in v.shape[:-1])
        xp = self._xp
        return {
            b.name: xp.reshape(v[..., b.offset : b.offset + b.size], (*lead, *b.shape))
            for b in self._blocks
        }

    def _flat_operand(self, v: Array) -> Array:
        """``v`` checked as a stack of flat vectors (..., D) (``_operand`` otherwise)."""
        d = self.num_params
        if not is_array(v):
            msg = f"v must be an array of shape (..., D) with D = {d}; got {type(v).__name__}."
            raise TypeError(msg)
        if int(v.ndim) < 1:
            msg = f"v must have shape (..., D) with D = {d}; got a 0-d array."
            raise ValueError(msg)
        k = int(v.ndim) - 1  # the leading axes' letters, then D
        lead = ["K"] if k == 1 else [f"K{i + 1}" for i in range(k)]
        what = "(D,)" if k == 0 else "(" + ", ".join([*lead, "D"]) + ")"
        return self._operand(v, "v", (*(None,) * k, d), what)

    def ravel(self, tree: Any, /) -> Array:
        """The inverse of ``unravel``: a dict name -> (..., ∗shape) as one flat (..., D).

        Every block's name once (no other key), each array with that parameter's
        shape after the same leading axes, of the linearization's namespace,
        device and dtype; concatenated in ``blocks`` order. Cost: one copy.
        """
        names = [b.name for b in self._blocks]
        if not isinstance(tree, Mapping):
            msg = (
                "tree must be a dict from parameter names to arrays (as unravel gives); got "
                f"{type(tree).__name__}."
            )
            raise TypeError(msg)
        missing = [n for n in names if n not in tree]
        extra = [k for k in tree if k not in names]
        if missing or extra:
            msg = (
                f"tree must hold exactly the parameter names {names}; missing {missing}, "
                f"unknown {extra}."
            )
            raise ValueError(msg)
        return self._ravel_leaves([tree[n] for n in names], [f"tree[{n!r}]" for n in names])

    def _ravel_leaves(self, leaves: list[Any], labels: list[str]) -> Array:
        """One array per block, in ``blocks`` order, (..., ∗shape) each, as (..., D).

        The leading axes are the first leaf's; ``labels`` name the leaves in messages.
        """
        first, head = self._blocks[0], leaves[0]
        if not is_array(head):
            msg = (
                f"{labels[0]} must be an array of shape (..., ∗{first.shape}); got "
                f"{type(head).__name__}."
            )
            raise TypeError(msg)
        lead_ndim = int(head.ndim) - len(first.shape)
        if lead_ndim < 0:
            msg = (
                f"{labels[0]} must have shape (..., ∗{first.shape}); got shape {tuple(head.shape)}."
            )
            raise ValueError(msg)
        lead = tuple(int(s) for s in head.shape[:lead_ndim])
        parts = []
        for b, leaf, label in zip(self._blocks, leaves, labels, strict=True):
            shape = (*lead, *b.shape)
            t = self._operand(leaf, label, shape, str(shape))
            parts.append(self._xp.reshape(t, (*lead, b.size)))
        return self._xp.concat(parts, axis=-1)

    def _operand(self, x: Array, name: str, shape: tuple[int | None, ...], what: str) -> Array:
        """``x`` checked against the reference (namespace, floating, shape, device), cast."""
        return check_operand(
            x,
            name,
            shape,
            what,
            like=self._reference(),
            like_name=f"the {self._role}'s {self._reference_name}",
            owner=f"the {self._role}'s device",
            remedy=self._operand_remedy.format(name=name),
            free=self._operand_free,
        )
