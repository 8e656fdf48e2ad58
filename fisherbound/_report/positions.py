"""The positions of a report's batch: which count, and the labels the analysis sees.

A model whose logits have position axes, (N, ∗S, C) (a token classifier or a
language model (N, T, C), a segmentation model (N, H, W, C) once its class axis is
last), has P = prod(S) positions per example. A position counts unless the mask
says False there or its class label equals the ignore index. ``count`` turns the
host labels and mask into the counted positions (one host boolean array, handed
to every linearization and loss function of the analysis as their ``mask``) and
the labels the analysis uses: class labels at the positions that do not count are
replaced by 0 (a valid class), so that every function sees valid labels and the
mask alone decides what counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fisherbound._shell import masked_label_placeholder

#: What a stage of a model with positions may raise when the library refuses it.
REFUSALS = (ValueError, TypeError, NotImplementedError)


def not_run(err: BaseException) -> dict[str, Any]:
    """A stage the library refused: ``{"not_run": reason}``, the reason on one line."""
    text = " ".join(str(err).split())
    return {"not_run": f"{type(err).__name__}: {text}"}


@dataclass(frozen=True)
class Positions:
    """The position axes of a batch and how many positions count.

    Attributes
    ----------
    shape
        S, the position axes of the logits (N, ∗S, C); ``()`` for (N, C) logits
        with a mask.
    per_example
        P = prod(S), the positions of one example.
    total
        N P.
    counted
        The positions that count: mask True and label not the ignore index.
    masked
        total − counted.
    masked_by_mask
        The positions the mask sets False.
    ignored
        The positions the mask keeps whose label equals ``ignore_index``.
    ignore_index
        The ignored label value (None: none).
    mask
        The counted positions, a host boolean array (N, ∗S); None when all count.
    """

    shape: tuple[int, ...]
    per_example: int
    total: int
    counted: int
    masked: int
    masked_by_mask: int
    ignored: int
    ignore_index: int | None
    mask: Any

    def numbers(self) -> dict[str, Any]:
        """The JSON-ready ``analysed["positions"]`` entry."""
        return {
            "shape": list(self.shape),
            "per_example": self.per_example,
            "total": self.total,
            "counted": self.counted,
            "masked": self.masked,
            "masked_by_mask": self.masked_by_mask,
            "ignored_labels": self.ignored,
            "ignore_index": self.ignore_index,
        }


def label_rows(family: Any, labels: Any) -> bool:
    """Whether ``labels`` are rows (N, ∗S, C), not class indices (N, ∗S).

    Rows: every non-categorical family, and categorical target distributions
    (soft targets), which are floating; categorical class indices are integers.
    """
    import numpy as np

    from fisherbound.families import Categorical

    return not isinstance(family, Categorical) or np.issubdtype(
        np.asarray(labels).dtype, np.floating
    )


def position_shape(family: Any, labels: Any) -> tuple[int, ...]:
    """S from the labels: (N, ∗S) class indices, or (N, ∗S, C) rows (class axis last)."""
    import numpy as np

    shape = tuple(int(s) for s in np.shape(labels))
    return shape[1:-1] if label_rows(family, labels) else shape[1:]


def count(
    family: Any, labels: Any, mask: Any, ignore_index: int | None
) -> tuple[Positions | None, Any]:
    """The positions of the batch (None: no position axes, no mask) and the clean labels.

    ``labels`` and ``mask`` are host arrays: class indices (N, ∗S) (categorical,
    integers) or rows (N, ∗S, C) (``label_rows``), and None or a boolean / 0-1
    array (N, ∗S). ``ignore_index`` applies to class indices only. The labels of
    positions that do not count become a valid placeholder (0, or 1/C for rows).
    A batch with no counted position is a ValueError.
    """
    import numpy as np

    y = np.asarray(labels)
    shape = position_shape(family, y)
    indices = not label_rows(family, y)
    ignoring = indices and ignore_index is not None and shape != ()
    if mask is None and shape == () and not ignoring:
        return None, y
    n = int(y.shape[0])
    keep = np.ones((n, *shape), dtype=bool) if mask is None else np.asarray(mask) != 0
    if keep.shape != (n, *shape):
        msg = f"mask must have the shape (N, *S) = {(n, *shape)} of the labels; got {keep.shape}."
        raise ValueError(msg)
    hit = (y == ignore_index) if ignoring else np.zeros_like(keep)
    counted = keep & ~hit
    total = int(counted.size)
    number = int(np.sum(counted))
    if number == 0:
        msg = (
            f"no position counts: the mask and the ignore index {ignore_index} leave none of "
            f"the {total} positions."
        )
        raise ValueError(msg)
    y = masked_label_placeholder(y, counted, np)
    info = Positions(
        shape=shape,
        per_example=int(np.prod(shape, dtype=np.int64)),
        total=total,
        counted=number,
        masked=total - number,
        masked_by_mask=int(np.sum(~keep)),
        ignored=int(np.sum(keep & hit)),
        ignore_index=ignore_index if ignoring else None,
        mask=None if number == total else counted,
    )
    return info, y


def counted_rows(info: Positions | None, host_logits: Any) -> Any:
    """The host logits (N, ∗S, C) as rows (K, C) of the counted positions."""
    import numpy as np

    z = np.asarray(host_logits)
    rows = z.reshape(-1, z.shape[-1])
    if info is None or info.mask is None:
        return rows
    return rows[np.asarray(info.mask).reshape(-1)]
