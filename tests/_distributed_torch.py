"""Worker of tests/test_distributed.py: 2 CPU processes on the gloo backend.

``python tests/_distributed_torch.py OUT PORT`` starts two ranks with
torch.multiprocessing. Each rank holds a shard of one data set (rank 0: two
batches, rank 1: one batch, so the shards are uneven), runs every streamed
computation of fisherbound with ``process_group=torch.distributed.group.WORLD``
and saves what it got to OUT/rank{r}.npz (numbers) and OUT/rank{r}.json (the
messages of the bad-input cases). The test compares them with one process over
the union of the data.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
N, IN, HIDDEN, C = 30, 5, 6, 3
SHARDS = {0: [(0, 10), (10, 18)], 1: [(18, 30)]}
SEED = 7
PROBES = 32
TARGET = 0.1


def model(seed: int = 0, hidden: int = HIDDEN) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(IN, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, C)
    )
    return net.double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((N, IN)))
    y = torch.from_numpy(rng.integers(0, C, size=N))
    return x, y


def batches(rank: int) -> list[tuple[int, int]]:
    return SHARDS[rank]


def computations(lins: list, losses: list, labels: list, group: object) -> dict[str, object]:
    """Everything a rank computes (``group=None`` on one process gives the reference)."""
    from fisherbound.dimension import local_dimension, rank_bound, razor, top_eigenpairs
    from fisherbound.estimators import detach_and_mix, empirical, monte_carlo
    from fisherbound.families import Categorical
    from fisherbound.fisher import (
        fisher_blocks,
        fisher_bounds,
        fisher_dense,
        fisher_diagonal,
        fisher_operator,
        fisher_trace,
    )
    from fisherbound.landscape import (
        hessian_directions,
        hessian_operator,
        loss_trace,
        projected_curvature,
        random_directions,
        surface,
    )

    pg = {"process_group": group}
    out: dict[str, object] = {}
    out["diagonal"] = fisher_diagonal(lins, progress=False, **pg)
    out["diagonal_mean"] = fisher_diagonal(lins, reduction="mean", progress=False, **pg)
    out["trace"] = fisher_trace(lins, progress=False, **pg)
    blocks = fisher_blocks(lins, progress=False, **pg)
    out |= {f"block:{k}": v for k, v in blocks.items()}
    out["dense"] = fisher_dense(lins, progress=False, **pg)
    low, up = fisher_bounds(lins, progress=False, **pg)
    out["lower"], out["upper"] = low, up
    op = fisher_operator(lins, reduction="mean", **pg)
    v = torch.from_numpy(np.random.default_rng(3).standard_normal((op.shape[0], 2)))
    out["matmat"] = op.matmat(v)
    out["top"] = top_eigenpairs(lins, k=3, rng=0, **pg).eigenvalues
    out["local_dimension"] = local_dimension(lins, eps=1e-3, rng=0, **pg).value
    out["rank_bound"] = rank_bound(lins, **pg).value
    theta = losses[0].params
    out["razor"] = razor(
        lins, Categorical(), prior_variance=1.0, labels=labels, theta=theta, **pg
    ).value
    # Estimators: the SAME seed on every rank; the ranks' probes are made independent.
    for what in ("diagonal", "trace"):
        est = detach_and_mix(lins, what=what, num_probes=PROBES, rng=SEED, progress=False, **pg)
        out[f"dm_{what}"], out[f"dm_{what}_se"] = est.value, est.std_error
    est = detach_and_mix(lins, num_probes=8, per_example=True, rng=SEED, progress=False, **pg)
    out["dm_pe"], out["dm_pe_se"] = est.value, est.std_error
    est = detach_and_mix(lins, what="full", num_probes=8, rng=SEED, progress=False, **pg)
    out["dm_full"] = est.value
    est = monte_carlo(lins, num_samples=8, rng=SEED, progress=False, **pg)
    out["mc"], out["mc_se"] = est.value, est.std_error
    out["mc_full"] = monte_carlo(lins, what="full", num_samples=2, rng=SEED, **pg).value
    out["emp"] = empirical(lins, labels, progress=False, **pg).value
    if group is not None:
        # Rounds of new probes on each rank's first batch, in lockstep, to a target.
        est = detach_and_mix(
            lins[0], what="trace", num_probes=4, rng=SEED, target_relative_error=TARGET, **pg
        )
        out["dm_target"], out["dm_target_se"] = est.value, est.std_error
        # Streaming in lockstep over uneven shards (rank 0: 2 batches, rank 1: 1) to an
        # unreachable target: every batch is used, as without a target.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = detach_and_mix(
                lins, what="trace", num_probes=4, rng=SEED, **pg, target_relative_error=1e-9
            )
        out["dm_lockstep"] = est.value
        out["dm_lockstep_warned"] = any("was not reached" in str(w.message) for w in caught)
        out["dm_no_target"] = detach_and_mix(lins, what="trace", num_probes=4, rng=SEED, **pg).value
    # Landscape: directions from one seed (the same on every rank).
    dirs = random_directions(losses[0].params, num_directions=2, rng=5)
    out["surface"] = surface(losses, dirs, num_points=5, progress=False, **pg).values
    out["hvp"] = hessian_operator(losses, **pg).matmat(v)
    out["loss_trace"] = loss_trace(losses, num_probes=8, rng=4, progress=False, **pg).value
    out["loss_trace_loss_only"] = loss_trace(
        losses, method="loss", num_probes=8, rng=4, progress=False, **pg
    ).value
    out["curvature"] = projected_curvature(losses, dirs, **pg).hessian
    out["hessian_eigenvalues"] = hessian_directions(losses, rng=6, **pg).eigenvalues
    return {k: np.asarray(v) for k, v in out.items()}


def shard(rank: int | None) -> tuple[list, list, list]:
    from fisherbound.adapters.torch import linearize, loss_function

    net = model()
    x, y = data()
    ranges = [r for k in sorted(SHARDS) for r in SHARDS[k]] if rank is None else SHARDS[rank]
    lins = [linearize(net, x[a:b]) for a, b in ranges]
    losses = [loss_function(net, x[a:b], y[a:b]) for a, b in ranges]
    labels = [y[a:b] for a, b in ranges]
    return lins, losses, labels


def _expect_error(messages: dict[str, str], name: str, fn: object) -> None:
    try:
        fn()  # type: ignore[operator]
    except (ValueError, TypeError, RuntimeError) as err:
        messages[name] = f"{type(err).__name__}: {err}"
    else:
        messages[name] = "no error"


def bad_inputs(rank: int, group: object) -> dict[str, str]:
    from fisherbound.adapters.numpy import MLP
    from fisherbound.adapters.numpy import linearize as np_linearize
    from fisherbound.adapters.torch import linearize
    from fisherbound.dimension import top_eigenpairs
    from fisherbound.estimators import Accumulator, detach_and_mix
    from fisherbound.families import Bernoulli, Categorical
    from fisherbound.fisher import fisher_diagonal, fisher_trace

    x, _ = data()
    messages: dict[str, str] = {}
    # Ranks disagree on the parameter count.
    other = linearize(model(hidden=HIDDEN + rank), x[:8])
    _expect_error(
        messages, "params", lambda: fisher_diagonal(other, progress=False, process_group=group)
    )
    # Ranks disagree on the family.
    lin = linearize(model(), x[:8])
    family = Categorical() if rank == 0 else Bernoulli()
    _expect_error(
        messages, "family", lambda: fisher_trace(lin, family, progress=False, process_group=group)
    )
    # One rank's shard is empty.
    source = [lin] if rank == 0 else []
    _expect_error(
        messages,
        "empty",
        lambda: detach_and_mix(source, num_probes=2, rng=0, progress=False, process_group=group),
    )
    # Different Lanczos seeds on the ranks (an all-reduced operator needs equal vectors).
    _expect_error(messages, "rng", lambda: top_eigenpairs(lin, k=1, rng=rank, process_group=group))
    # Ranks disagree on an option of the call (a Lanczos run of different length).
    _expect_error(
        messages, "k", lambda: top_eigenpairs(lin, k=1 + rank, rng=0, process_group=group)
    )
    _expect_error(
        messages,
        "reduction",
        lambda: detach_and_mix(
            lin, rng=0, reduction=("sum", "mean")[rank], progress=False, process_group=group
        ),
    )
    # Ranks weight the trace differently (an EWC penalty from different anchors).
    weights = torch.full((lin.num_params,), 1.0 + rank, dtype=torch.float64)
    _expect_error(
        messages,
        "weights",
        lambda: detach_and_mix(
            lin, what="trace", weights=weights, rng=0, progress=False, process_group=group
        ),
    )
    # Ranks hold the same architecture at different parameter values.
    from fisherbound.adapters.torch import loss_function
    from fisherbound.landscape import surface

    loss = loss_function(model(seed=rank), x[:8], torch.zeros(8, dtype=torch.int64))
    dirs = torch.ones((1, loss.num_params), dtype=torch.float64)
    _expect_error(
        messages,
        "theta",
        lambda: surface(loss, dirs, num_points=3, progress=False, process_group=group),
    )
    # An empty accumulator on one rank.
    acc = Accumulator()
    if rank == 0:
        acc.update(np.ones((2, 3)), num_inputs=1)
    _expect_error(messages, "accumulator", lambda: acc.all_reduce(group))
    # A numpy reference model reduces over gloo through DLPack (not an error).
    mlp = MLP.random([IN, 4, C], rng=0)
    rng = np.random.default_rng(11)
    xs = rng.standard_normal((12, IN))
    part = xs[:5] if rank == 0 else xs[5:]
    got = fisher_diagonal(np_linearize(mlp, part), progress=False, process_group=group)
    want = fisher_diagonal(np_linearize(mlp, xs), progress=False)
    messages["numpy"] = f"max error {float(np.max(np.abs(got - want))):.3e}"
    return messages


def run(rank: int, out: str, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    group = dist.group.WORLD
    try:
        lins, losses, labels = shard(rank)
        results = computations(lins, losses, labels, group)
        np.savez(Path(out) / f"rank{rank}.npz", **results)
        messages = bad_inputs(rank, group)
        # The accumulator of this rank's detach-and-mix samples, all-reduced by hand.
        dist.barrier()
    except Exception:
        (Path(out) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    # A process group that is no longer initialised.
    from fisherbound.fisher import fisher_diagonal

    _expect_error(
        messages,
        "uninitialised",
        lambda: fisher_diagonal(lins[0], progress=False, process_group=group),
    )
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(messages))
    # Leave without interpreter finalisation: on a loaded machine gloo's C++ threads can
    # still be torn down there and abort the rank ('terminate called without an active
    # exception', SIGABRT of rank 0, seen once in CI; torch PR 179291 describes the same
    # crash at finalisation). Everything this rank reports is on disk by now, so skipping
    # the exit handlers loses nothing.
    os._exit(0)


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], int(sys.argv[2])), nprocs=WORLD, join=True)
