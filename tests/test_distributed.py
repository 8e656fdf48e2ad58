"""Data-parallel reduction: 2 gloo processes and 2 JAX devices against one process.

The workers (tests/_distributed_torch.py, tests/_distributed_jax.py) run in
subprocesses started here: torch.multiprocessing spawns the two gloo ranks, and
JAX needs ``XLA_FLAGS`` before it starts. Exact quantities must equal the
single-process values to 1e-12 (relative). Estimates use independent probes per
rank, so they are compared in distribution: the distributed estimate is exactly
the merge of the two ranks' local estimates (reproduced here from the per-rank
seeds), and it sits within a few combined standard errors of the exact value.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
EXACT = [
    "diagonal",
    "diagonal_mean",
    "trace",
    "dense",
    "lower",
    "upper",
    "matmat",
    "top",
    "local_dimension",
    "rank_bound",
    "razor",
    "emp",
    "surface",
    "hvp",
    "loss_trace",
    "loss_trace_loss_only",
    "curvature",
    "hessian_eigenvalues",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _np(x: object) -> np.ndarray:
    detach = getattr(x, "detach", None)
    return detach().cpu().numpy() if detach is not None else np.asarray(x)


def _close(got: object, want: object) -> float:
    """max |got − want| / max |want|."""
    g, w = _np(got), _np(want)
    return float(np.max(np.abs(g - w))) / max(float(np.max(np.abs(w))), 1e-300)


# --------------------------------------------------------------------------- #
# torch.distributed (gloo)


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("gloo")
    proc = subprocess.run(
        [sys.executable, str(HERE / "_distributed_torch.py"), str(out), str(_free_port())],
        capture_output=True,
        text=True,
        timeout=900,
    )
    errors = "".join(p.read_text() for p in out.glob("*.error"))
    written = sorted(p.name for p in out.iterdir())
    assert proc.returncode == 0, f"{proc.stderr[-4000:]}{errors}\nfiles written: {written}"
    return out


@pytest.fixture(scope="module")
def worker() -> object:
    sys.path.insert(0, str(HERE))
    try:
        import _distributed_torch as w
    finally:
        sys.path.remove(str(HERE))
    return w


def _rank_seed(seed: int, rank: int, world: int) -> np.random.Generator:
    """The per-rank stream of Collective.generator, reproduced."""
    base = int(np.random.default_rng(seed).integers(0, 2**63))
    return np.random.default_rng([base, rank, world])


def test_ranks_agree_and_match_one_process(torch_run: Path, worker: object) -> None:
    ranks = [dict(np.load(torch_run / f"rank{r}.npz")) for r in range(2)]
    for key in ranks[0]:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    lins, losses, labels = worker.shard(None)  # type: ignore[attr-defined]
    single = worker.computations(lins, losses, labels, None)  # type: ignore[attr-defined]
    for key in EXACT:
        assert _close(ranks[0][key], single[key]) <= 1e-12, key
    blocks = [k for k in single if k.startswith("block:")]
    assert blocks
    for key in blocks:
        assert _close(ranks[0][key], single[key]) <= 1e-12, key


def test_estimates_are_the_merge_of_independent_ranks(torch_run: Path, worker: object) -> None:
    from fisherbound.estimators import detach_and_mix, monte_carlo

    w = worker
    got = dict(np.load(torch_run / "rank0.npz"))
    shards = [w.shard(r) for r in range(2)]  # type: ignore[attr-defined]
    cases = {
        "dm_diagonal": lambda lins, g: detach_and_mix(lins, num_probes=w.PROBES, rng=g),
        "dm_trace": lambda lins, g: detach_and_mix(lins, what="trace", num_probes=w.PROBES, rng=g),
        "dm_pe": lambda lins, g: detach_and_mix(lins, num_probes=8, per_example=True, rng=g),
        "mc": lambda lins, g: monte_carlo(lins, num_samples=8, rng=g),
    }
    for key, run in cases.items():
        local = [run(shards[r][0], _rank_seed(w.SEED, r, 2)) for r in range(2)]
        value = sum(_np(e.value) for e in local)
        se = np.sqrt(sum(_np(e.std_error) ** 2 for e in local))
        assert _close(got[key], value) <= 1e-12, key
        assert _close(got[f"{key}_se"], se) <= 1e-12, key
        # The probes of the two ranks differ (identical streams would be a bug).
        assert not np.allclose(_np(local[0].value), _np(local[1].value))
    # The factor of what="full" is the sum of the ranks' per-probe gradient sums;
    # the Monte-Carlo factor stacks the ranks' per-example rows in rank order.
    full = [
        detach_and_mix(shards[r][0], what="full", num_probes=8, rng=_rank_seed(w.SEED, r, 2))
        for r in range(2)
    ]
    assert _close(got["dm_full"], _np(full[0].value) + _np(full[1].value)) <= 1e-12
    rows = [
        monte_carlo(shards[r][0], what="full", num_samples=2, rng=_rank_seed(w.SEED, r, 2))
        for r in range(2)
    ]
    assert _close(got["mc_full"], np.concatenate([_np(e.value) for e in rows])) <= 1e-12


def test_estimates_are_unbiased_within_their_error_bars(torch_run: Path, worker: object) -> None:
    from fisherbound.fisher import fisher_diagonal, fisher_trace

    w = worker
    got = dict(np.load(torch_run / "rank0.npz"))
    lins, _, _ = w.shard(None)  # type: ignore[attr-defined]
    exact = _np(fisher_diagonal(lins, progress=False))
    # 3 batches x 32 probes: the standard errors have 93 degrees of freedom, so
    # the z-scores are close to standard normal; 5 is far in either tail for 57
    # coordinates (a bias of one SE would still pass, a missing all-reduce of one
    # rank -- a third of the data -- would not).
    for key in ("dm_diagonal", "mc"):
        z = (got[key] - exact) / got[f"{key}_se"]
        assert np.max(np.abs(z)) < 5.0, key
    missing_rank = _np(fisher_diagonal(lins[:2], progress=False))
    assert np.max(np.abs((got["dm_diagonal"] - missing_rank) / got["dm_diagonal_se"])) > 5.0
    # The lockstep target run: both ranks stopped at the same point, at the target.
    firsts = [w.shard(r)[0][0] for r in range(2)]  # type: ignore[attr-defined]
    trace = float(fisher_trace(firsts, progress=False))
    value, se = float(got["dm_target"]), float(got["dm_target_se"])
    assert se / value <= w.TARGET  # type: ignore[attr-defined]
    assert abs(value - trace) <= 4.0 * se
    # Streaming in lockstep over uneven shards, target out of reach: the ranks keep
    # going until every rank has run out, so all batches are used (as without one).
    assert bool(got["dm_lockstep_warned"])
    assert _close(got["dm_lockstep"], got["dm_no_target"]) <= 1e-12


def test_bad_inputs_fail_on_every_rank(torch_run: Path) -> None:
    messages = [json.loads((torch_run / f"rank{r}.json").read_text()) for r in range(2)]
    for m in messages:
        assert "disagree on the number of parameters" in m["params"], m["params"]
        assert "disagree on family" in m["family"], m["family"]
        assert "at least one batch" in m["empty"], m["empty"]
        assert "random generators differ" in m["rng"], m["rng"]
        assert "disagree on k" in m["k"], m["k"]
        assert "disagree on reduction" in m["reduction"], m["reduction"]
        assert "disagree on weights" in m["weights"], m["weights"]
        assert "disagree on the parameter values" in m["theta"], m["theta"]
        assert "at least one batch" in m["accumulator"], m["accumulator"]
        assert m["uninitialised"].startswith("RuntimeError"), m["uninitialised"]
        assert "not initialised" in m["uninitialised"]
        error = float(m["numpy"].split()[-1])
        assert error <= 1e-12 * 10, m["numpy"]


def test_process_group_errors_in_one_process() -> None:
    from fisherbound.adapters.numpy import MLP, linearize
    from fisherbound.estimators import Accumulator
    from fisherbound.fisher import fisher_diagonal

    lin = linearize(MLP.random([3, 4, 2], rng=0), np.ones((2, 3)))
    with pytest.raises(TypeError, match="process_group must be None, a torch"):
        fisher_diagonal(lin, process_group=42)
    with pytest.raises(TypeError, match="torch process group or a JAX axis name; got None"):
        Accumulator().update(np.ones((2, 3))).all_reduce(None)
    pytest.importorskip("jax")
    with pytest.raises(ValueError, match="no axis of that name"):
        fisher_diagonal(lin, process_group="data")


def test_cupy_mixed_with_numpy_is_a_clear_error() -> None:
    cupy = pytest.importorskip("cupy")
    try:
        cupy.zeros(1)
    except Exception:
        pytest.skip("CuPy with a GPU is not available")
    from fisherbound.estimators import Accumulator

    acc = Accumulator().update(np.ones((2, 3)))
    with pytest.raises(TypeError, match="one array library"):
        acc.update(cupy.ones((2, 3)))


# --------------------------------------------------------------------------- #
# JAX: two host devices under shard_map


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    pytest.importorskip("jax")
    out = tmp_path_factory.mktemp("jax")
    proc = subprocess.run(
        [sys.executable, str(HERE / "_distributed_jax.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out / "jax.npz"))


def test_jax_psum_matches_one_device(jax_run: dict[str, np.ndarray]) -> None:
    exact = [k[len("sharded_") :] for k in jax_run if k.startswith("sharded_")]
    exact = [k for k in exact if k not in ("dm", "dm_se", "mc", "mc_se")]
    assert "diagonal" in exact
    assert "matmat" in exact
    for key in exact:
        assert _close(jax_run[f"sharded_{key}"], jax_run[f"single_{key}"]) <= 1e-12, key


def test_jax_named_sharding_matches_one_device(jax_run: dict[str, np.ndarray]) -> None:
    # Inputs split over two devices by a NamedSharding (jit-style sharding): every
    # result, the estimates with their host-drawn probes included, is the one-device one.
    single = [k[len("single_") :] for k in jax_run if k.startswith("single_")]
    assert {"diagonal", "matmat", "dm", "mc", "top"} <= set(single)
    for key in single:
        for kind in ("named", "jitnamed"):
            if f"{kind}_{key}" in jax_run:
                assert _close(jax_run[f"{kind}_{key}"], jax_run[f"single_{key}"]) <= 1e-12, (
                    kind,
                    key,
                )
    assert "jitnamed_diagonal" in jax_run


def test_jax_estimates_within_error_bars(jax_run: dict[str, np.ndarray]) -> None:
    exact = jax_run["single_diagonal"]
    for key in ("dm", "mc"):
        z = (jax_run[f"sharded_{key}"] - exact) / jax_run[f"sharded_{key}_se"]
        assert np.max(np.abs(z)) < 5.0, key


def test_jax_devices_draw_independent_probes(jax_run: dict[str, np.ndarray]) -> None:
    # Device r keeps row r of one host draw for all devices: reproducible from
    # the seed, and different on the two devices.
    np.testing.assert_array_equal(jax_run["probes"], jax_run["host_probes"])
    assert not np.allclose(jax_run["probes"][0], jax_run["probes"][1])
    assert "no axis of that name" in str(jax_run["unbound_error"])
    assert "top_eigenpairs runs Lanczos on the host" in str(jax_run["lanczos_error"])


def test_torchrun_example_of_the_docs() -> None:
    pytest.importorskip("torch")
    script = HERE.parent / "docs" / "examples" / "torchrun_fisher.py"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            f"--master-port={_free_port()}",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "2 ranks, N = 2048, D = 1994"
    # The median over 1994 coordinates of |estimate − exact| / SE: 0.67 for
    # standard normal z-scores; 2 would mean error bars three times too small.
    z = float(lines[2].split()[-1])
    assert 0.3 < z < 1.2
    top = json.loads(lines[3].removeprefix("top eigenvalues "))
    assert top == sorted(top, reverse=True)
    assert top[0] > 0.0
