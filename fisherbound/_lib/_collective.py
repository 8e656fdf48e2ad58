"""Reductions across processes and devices, with the framework's own collectives.

Every streamed computation of fisherbound is a sum over batches, so data-parallel
use needs one thing: after each process (or device) has summed its own shard,
all-reduce the sums. ``collective(process_group)`` turns the user's
``process_group=`` argument into a ``Collective``:

* a ``torch.distributed`` process group (``torch.distributed.group.WORLD`` or one
  from ``new_group``): ``torch.distributed.all_reduce`` / ``all_gather`` on the
  group, eagerly, one process per rank. NumPy and CuPy operands travel through
  DLPack (zero-copy) as torch tensors; the backend decides the device (gloo: CPU,
  nccl: CUDA).
* a string, the name of a JAX mapped axis: ``jax.lax.psum`` / ``all_gather`` over
  that axis, for code traced inside ``jax.shard_map`` or ``jax.pmap``
  (single-program, multiple-data: every device runs the same program on its
  shard, so shapes and batch counts agree by construction).

Output-space probes (detach-and-mix signs, sampled labels) must be independent
across ranks: ``Collective.generator`` derives a per-rank stream from the user's
generator. Parameter-space probes (Lanczos, Hutchinson, landscape directions)
must be the SAME on every rank, because the operator they hit is all-reduced:
those keep the user's generator (seed every rank alike).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from fisherbound._lib._namespace import array_namespace
from fisherbound._lib._random import RankedGenerator, as_generator
from fisherbound._lib._validation import is_traced

Array = Any

#: The length of the vector ``Collective.agree`` reduces (fields + 1).
AGREE_SLOTS = 16


class Collective:
    """The reductions fisherbound needs; see the module docstring."""

    #: True when the code is traced (JAX SPMD): no host-side decisions on values.
    spmd: bool = False
    world_size: int = 1
    rank: int = 0
    description: str = ""

    def sum(self, x: Array) -> Array:  # pragma: no cover - interface
        raise NotImplementedError

    def sum_int(self, n: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def sum_floats(self, values: list[float]) -> list[float]:  # pragma: no cover
        raise NotImplementedError

    def gather_rows(self, x: Array) -> Array:  # pragma: no cover - interface
        raise NotImplementedError

    def extrema(self, values: list[int]) -> tuple[list[int], list[int]]:  # pragma: no cover
        raise NotImplementedError

    def generator(self, gen: np.random.Generator) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------
    def sum_tree(self, tree: Any) -> Any:
        """All-reduce an array, a list of arrays or a dict of arrays (sum)."""
        if tree is None:
            return None
        if isinstance(tree, dict):  # sorted keys: one order of collectives on every rank
            return {k: self.sum(tree[k]) for k in sorted(tree)}
        if isinstance(tree, list):
            return [self.sum(v) for v in tree]
        return self.sum(tree)

    def agree(self, fields: Mapping[str, Any], *, where: str) -> None:
        """Raise the same ValueError on every rank unless all ranks hold equal ``fields``.

        Values are ints (compared as they are) or anything else (compared by the
        CRC-32 of its ``repr``). The field ``"batches"``, when present, must also
        be at least 1 on every rank.
        """
        names = list(fields)
        if len(names) >= AGREE_SLOTS:
            msg = f"agree compares at most {AGREE_SLOTS - 1} fields; got {len(names)}."
            raise ValueError(msg)
        # A fixed-length vector (the collective needs one size on every rank): the
        # field names first, then one code per field, zero-padded.
        codes = [_code(tuple(names))] + [_code(fields[name]) for name in names]
        codes += [0] * (AGREE_SLOTS - len(codes))
        lows, highs = self.extrema(codes)
        if lows[0] != highs[0]:
            msg = (
                f"{where}: the ranks of {self.description} are not running the same call "
                f"(this rank compares {names}). Every rank must make the same fisherbound "
                "calls, in the same order."
            )
            raise ValueError(msg)
        lows, highs = lows[1:], highs[1:]
        bad = [
            n for n, lo, hi in zip(names, lows, highs, strict=False) if lo != hi and n != "batches"
        ]
        if "batches" in fields and lows[names.index("batches")] < 1:
            msg = (
                f"{where}: every rank of {self.description} must hold at least one batch; "
                "some rank's source was empty. Shard the data so that every rank gets one."
            )
            raise ValueError(msg)
        if bad:
            mine = ", ".join(f"{n} = {fields[n]!r}" for n in bad)
            msg = (
                f"{where}: the ranks of {self.description} disagree on {', '.join(bad)} "
                f"(this rank: {mine}). Every rank must run the same call on the same model "
                "(same parameters, family and options); only the data may differ."
            )
            raise ValueError(msg)


def _code(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | np.integer):
        return int(value)
    return zlib.crc32(repr(value).encode())


# --------------------------------------------------------------------------- #
# torch.distributed


class _TorchGroup(Collective):
    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.description = (
            f"the torch.distributed process group ({self.backend}, {self.world_size} ranks)"
        )

    def _tensor(self, x: Array) -> tuple[Any, Any]:
        """A torch tensor holding a copy of ``x``, and how to turn it back."""
        import torch

        if isinstance(x, torch.Tensor):
            t, back = x.detach().clone(), None
        else:
            if isinstance(x, np.generic | float | int):
                x = np.asarray(x)
            if not hasattr(x, "__dlpack__"):
                msg = (
                    f"cannot all-reduce a {type(x).__module__}.{type(x).__name__} over "
                    f"{self.description}: it does not support DLPack."
                )
                raise TypeError(msg)
            t = torch.from_dlpack(x).clone()
            back = type(x)
        on_cuda = t.device.type == "cuda"
        if self.backend == "nccl" and not on_cuda:
            msg = (
                f"{self.description} reduces CUDA tensors only, but the operands are on the CPU; "
                "put the model and data on each rank's GPU, or use a gloo group."
            )
            raise ValueError(msg)
        return t, back

    @staticmethod
    def _back(t: Any, like: Array, back: Any) -> Array:
        if back is None:
            return t
        if isinstance(like, np.ndarray):
            return t.numpy()
        import array_api_compat

        return array_api_compat.array_namespace(like).from_dlpack(t)

    def sum(self, x: Array) -> Array:
        t, back = self._tensor(x)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM, group=self.group)
        return self._back(t, x, back)

    def _ints(self, values: list[int], op: Any) -> list[int]:
        import torch

        device = "cuda" if self.backend == "nccl" else "cpu"
        if device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
        t = torch.tensor(values, dtype=torch.int64, device=device)
        self.dist.all_reduce(t, op=op, group=self.group)
        return [int(v) for v in t.tolist()]

    def sum_int(self, n: int) -> int:
        return self._ints([int(n)], self.dist.ReduceOp.SUM)[0]

    def sum_floats(self, values: list[float]) -> list[float]:
        """All-reduce a few host floats (on the group's device: nccl needs CUDA)."""
        import torch

        device = f"cuda:{torch.cuda.current_device()}" if self.backend == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM, group=self.group)
        return [float(v) for v in t.tolist()]

    def extrema(self, values: list[int]) -> tuple[list[int], list[int]]:
        lows = self._ints(values, self.dist.ReduceOp.MIN)
        highs = self._ints(values, self.dist.ReduceOp.MAX)
        return lows, highs

    def gather_rows(self, x: Array) -> Array:
        """Concatenate along axis 0 the arrays of all ranks, in rank order."""
        import torch

        t, back = self._tensor(x)
        sizes = self._gather_sizes(int(t.shape[0]), t.device)
        pad = max(sizes) - int(t.shape[0])
        if pad:
            t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self.dist.all_gather(parts, t, group=self.group)
        out = torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])
        return self._back(out, x, back)

    def _gather_sizes(self, n: int, device: Any) -> list[int]:
        import torch

        mine = torch.tensor([n], dtype=torch.int64, device=device)
        sizes = [torch.empty_like(mine) for _ in range(self.world_size)]
        self.dist.all_gather(sizes, mine, group=self.group)
        return [int(s.item()) for s in sizes]

    def generator(self, gen: np.random.Generator) -> np.random.Generator:
        """An independent stream for this rank.

        The same user seed gives a different but reproducible stream on every rank.
        """
        base = int(gen.integers(0, 2**63))
        return np.random.default_rng([base, self.rank, self.world_size])


# --------------------------------------------------------------------------- #
# JAX mapped axes


class _JaxAxis(Collective):
    spmd = True

    def __init__(self, name: str) -> None:
        import jax

        self.lax = jax.lax
        self.name = name
        try:
            self.world_size = int(jax.lax.axis_size(name))
        except NameError as err:
            msg = (
                f"process_group = {name!r} names a JAX mapped axis, but no axis of that name "
                "is bound here: call fisherbound inside jax.shard_map (or jax.pmap) over a "
                f"mesh axis named {name!r}, or pass process_group=None."
            )
            raise ValueError(msg) from err
        self.description = f"the JAX mapped axis {name!r} ({self.world_size} devices)"

    def sum(self, x: Array) -> Array:
        return self.lax.psum(x, self.name)

    def sum_int(self, n: int) -> int:
        # Single program, multiple data: every device has the same static shapes.
        return int(n) * self.world_size

    def extrema(self, values: list[int]) -> tuple[list[int], list[int]]:
        # The same traced program runs on every device: its static values agree.
        return list(values), list(values)

    def gather_rows(self, x: Array) -> Array:
        return self.lax.all_gather(x, self.name, axis=0, tiled=True)

    def generator(self, gen: np.random.Generator) -> RankedGenerator:
        index = self.lax.axis_index(self.name)
        return RankedGenerator(gen, self.world_size, lambda a: a[index, ...])


def fingerprint(x: Array) -> Any:
    """A cheap summary of an array's values, equal on ranks that hold equal arrays.

    (shape, Σx, Σx²) as host floats; None for values traced by JAX (one program).
    """
    if x is None:
        return None
    if is_traced(x):
        return None
    xp = array_namespace(x, names=("x",))
    return (tuple(x.shape), float(xp.sum(x)), float(xp.sum(x * x)))


def shared_generator(coll: Collective | None, rng: Any, *, where: str, lanczos: bool = True) -> Any:
    """The generator of parameter-space random vectors: the same on every rank.

    Lanczos starts, Hutchinson and SLQ probes and landscape directions meet an
    all-reduced operator, so they must be equal on every rank. ``rng=None`` under
    a torch process group draws a fresh seed on rank 0 and shares it; otherwise
    the ranks' generators must be in one state (the same seed), or every rank
    raises a ValueError: a different seed per rank would be silently wrong.
    ``lanczos=True`` (the callers that run Lanczos or SLQ on the host) refuses
    traced JAX code with a clear ValueError.
    """
    if coll is not None and coll.spmd and lanczos:
        msg = (
            f"{where} runs Lanczos on the host, which traced JAX code cannot do "
            f"(process_group = {coll.description}); call it outside jax.shard_map, on one "
            "device or with a torch process group."
        )
        raise ValueError(msg)
    if coll is None or coll.spmd:  # one process, or one traced program: one generator
        return as_generator(rng)
    if rng is None:
        rank0 = int(np.random.default_rng().integers(0, 2**62)) if coll.rank == 0 else -1
        _, highs = coll.extrema([rank0])
        return np.random.default_rng(highs[0])
    gen = as_generator(rng)
    try:
        coll.agree({"rng": repr(gen.bit_generator.state)}, where=where)
    except ValueError as err:
        msg = (
            f"{where}: the random generators differ between the ranks of {coll.description}. "
            "Its random vectors multiply an all-reduced operator, so every rank needs the "
            "same ones: pass the same rng seed (an int) on every rank, or rng=None."
        )
        raise ValueError(msg) from err
    return gen


# --------------------------------------------------------------------------- #
# entry point


def collective(process_group: Any) -> Collective | None:
    """The ``Collective`` of a ``process_group=`` argument (None: no reduction).

    Raises a clear error for a torch group whose default process group is not
    initialised, or for anything that is neither a torch process group nor a
    JAX axis name.
    """
    if process_group is None:
        return None
    if isinstance(process_group, str):
        return _JaxAxis(process_group)
    module = type(process_group).__module__.split(".")[0]
    if module == "torch":
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            msg = (
                "process_group is a torch.distributed group, but torch.distributed is not "
                "initialised in this process: call torch.distributed.init_process_group(...) "
                "first (torchrun sets up the environment for it)."
            )
            raise RuntimeError(msg)
        if not isinstance(process_group, dist.ProcessGroup):
            msg = (
                "process_group must be a torch.distributed.ProcessGroup (e.g. "
                f"torch.distributed.group.WORLD); got {type(process_group).__name__}."
            )
            raise TypeError(msg)
        return _TorchGroup(process_group)
    msg = (
        "process_group must be None, a torch.distributed.ProcessGroup (e.g. "
        "torch.distributed.group.WORLD) or the name (a str) of a JAX mapped axis inside "
        f"jax.shard_map / jax.pmap; got {type(process_group).__module__}."
        f"{type(process_group).__name__}."
    )
    raise TypeError(msg)
