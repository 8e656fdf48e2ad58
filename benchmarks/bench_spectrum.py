"""Benchmark: the top of the Fisher spectrum and the SLQ log-det, on a CNN of ~1e6 parameters.

What it measures, on torch CPU in float32 (default 2 threads):

- one gradient step: forward + backward of the mean cross-entropy (the unit);
- one Fisher matvec F v = Σ_x J_xᵀ I_Δ(z_x) J_x v (one JVP + one VJP of the batch);
- ``top_eigenpairs(lin, k=10)``: Lanczos with the default m = 60 steps plus one
  batched matmat of 10 columns for the residuals;
- the razor's log det(I + σ² F) by SLQ (``razor(..., method="slq")``) with M probes
  and m Lanczos steps per probe (the M probes run together: one matmat of M
  columns per step).

Each row reports the number of Fisher matvecs (counted by a wrapper around the
linearization: every column of a JVP counts one), the median wall time, its
ratio to one gradient step (timed just before and after the row, so that the
ratio holds under the load of a shared machine) and the time per matvec, which
includes the Lanczos reorthogonalisation. The CNN is conv32-conv64-fc256-fc10 on 3×32×32
inputs (1,070,794 parameters), batch 64, at its random initialisation.

Run:  python benchmarks/bench_spectrum.py [--threads 2] [--reps 1] [--probes 5] [--steps 20]
Writes benchmarks/results/spectrum.json and prints a Markdown table. ``--quick``: a
tiny CNN (conv4-fc10 on 3×8×8, batch 8), k = 3, 2 probes × 5 steps.

``--jax``: instead, JAX's compiled Lanczos against matfree's ``tridiag_sym`` (full
reorthogonalisation) on the Fisher operator of a tanh MLP 64-256-256-10 (85,002
parameters, batch 128, float32; ``--x64`` for float64), with the same product function
(``fisher_operator(lin).traceable``) and the same number of steps: ``lanczos`` with
m = 60 from one vector, and ``slq`` of log(1 + λ) with M probes × m steps (matfree:
``stochtrace.estimator_monte_carlo`` of ``funm.monte_carlo_funm_sym``); first calls
(compilation included) and the median of later calls, the Python loop of before (the
same operator without its traceable product) beside them. Then ``top_eigenpairs`` with
k = 1 and k = 5 at the default tol (the compiled ``eigsh``), the Python loop it ran
before on the same operator, and matfree's ``tridiag_sym`` with the same number of
products from the same start vector followed by ``eig.eigh_partial`` (the eigh of the
tridiagonal and the Ritz vectors); the products of both loops are counted and must
agree. Last, ``local_dimension(method="lanczos")`` with eps = 86 (about 20 eigenvalues
above it; the compiled count) and ``hessian_directions(which="largest")`` on the loss of
the same MLP and batch (random labels; the compiled eigsh on a traceable Hessian
product), each beside the Python loop it ran before, with the products of both loops
counted and checked equal. Writes benchmarks/results/spectrum_jax.json. Needs
``pip install --no-deps matfree``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import machine, now, write_json
from torch import nn

from fisherbound.adapters.torch import linearize
from fisherbound.dimension import razor, top_eigenpairs
from fisherbound.families import Categorical
from fisherbound.fisher import fisher_operator
from fisherbound.linalg._operator import KeyedProduct

NAME = "spectrum"
TITLE = "Top of the Fisher spectrum and the SLQ log-det (torch CPU, float32)"


def make_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    return model, x, y


def make_cnn_quick() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )
    return model, torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))


class CountingLinearization:
    """Delegates to a linearization and counts forward products (one per column)."""

    def __init__(self, lin: Any) -> None:
        self._lin = lin
        self.matvecs = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lin, name)

    @property
    def logits(self) -> Any:
        return self._lin.logits

    @property
    def blocks(self) -> Any:
        return self._lin.blocks

    @property
    def num_params(self) -> int:
        return int(self._lin.num_params)

    @property
    def xp(self) -> Any:
        return self._lin.xp

    def jvp(self, v: Any, /) -> Any:
        self.matvecs += 1
        return self._lin.jvp(v)

    def jvp_batch(self, V: Any, /) -> Any:
        self.matvecs += int(V.shape[0])
        return self._lin.jvp_batch(V)

    def vjp(self, u: Any, /) -> Any:
        return self._lin.vjp(u)

    def vjp_batch(self, U: Any, /) -> Any:
        return self._lin.vjp_batch(U)

    def per_example_vjp(self, U: Any, /) -> Any:
        return self._lin.per_example_vjp(U)

    def sum_squared_per_example_vjp(self, U: Any, /, **kwargs: Any) -> Any:
        return self._lin.sum_squared_per_example_vjp(U, **kwargs)


def median_time(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    times = []
    out = None
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run(
    *,
    quick: bool = False,
    threads: int = 2,
    reps: int = 1,
    probes: int | None = None,
    steps: int | None = None,
    k: int | None = None,
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    probes = probes or (2 if quick else 5)
    steps = steps or (5 if quick else 20)
    k = k or (3 if quick else 10)
    model, x, y = make_cnn_quick() if quick else make_cnn()
    num_params = sum(p.numel() for p in model.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def grad_step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    for _ in range(3):  # warm-up
        grad_step()

    def timed(fn: Callable[[], Any], reps: int) -> tuple[float, float, Any]:
        """Median time of ``fn`` and of the gradient steps timed just before and after
        it (the machine is shared: the ratio uses the load of the moment)."""
        before, _ = median_time(grad_step, 5)
        t, out = median_time(fn, reps)
        after, _ = median_time(grad_step, 5)
        return t, statistics.median([before, after]), out

    t_grad, _ = median_time(grad_step, 15)
    lin = CountingLinearization(linearize(model, x))
    t_lin, g_lin, _ = timed(lambda: linearize(model, x), 5)
    op = fisher_operator(lin, Categorical())
    v = torch.randn(num_params)
    op.matvec(v)  # warm-up (forward-mode AD set-up)
    t_matvec, g_matvec, _ = timed(lambda: op.matvec(v), 7)

    def top() -> Any:
        lin.matvecs = 0
        return top_eigenpairs(lin, Categorical(), k=k, rng=0)

    t_top, g_top, pairs = timed(top, reps)
    top_matvecs = lin.matvecs

    def logdet() -> Any:
        lin.matvecs = 0
        return razor(
            lin,
            Categorical(),
            prior_variance=1.0,
            labels=y,
            theta=theta,
            method="slq",
            num_probes=probes,
            num_matvecs=steps,
            rng=0,
        )

    t_slq, g_slq, out = timed(logdet, reps)
    slq_matvecs = lin.matvecs

    rows = [
        ("gradient step (forward + backward, mean CE)", 0, t_grad, t_grad),
        ("linearize (one forward, kept for the VJPs)", 0, t_lin, g_lin),
        ("one Fisher matvec (1 JVP + 1 VJP)", 1, t_matvec, g_matvec),
        (f"top_eigenpairs k={k} (Lanczos m=60 + residuals)", top_matvecs, t_top, g_top),
        (
            f"SLQ log det(I + σ²F), M={probes} probes × m={steps} steps",
            slq_matvecs,
            t_slq,
            g_slq,
        ),
    ]
    results = {
        "threads": threads,
        "dtype": "float32",
        "model": (
            "CNN conv4-fc10 on 3x8x8, batch 8 (quick)"
            if quick
            else "CNN conv32-conv64-fc256-fc10 on 3x32x32, batch 64"
        ),
        "num_params": num_params,
        "rows": [
            {
                "quantity": q,
                "matvecs": m,
                "seconds": t,
                "gradient_step_seconds": g,
                "ratio_to_gradient_step": t / g,
            }
            for q, m, t, g in rows
        ],
        "top_eigenvalues": [float(e) for e in pairs.eigenvalues],
        "top_residuals": [float(r) for r in pairs.residuals],
        "slq_log_det": float(out.log_det.value),
        "slq_log_det_std_error": float(out.log_det.std_error),
        "bic_penalty": float(out.bic_penalty),
        "ratios": {q: t / g for q, m, t, g in rows[1:]},
    }
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"{results['model']}, {results['num_params']:,} parameters, float32, "
        f"{results['threads']} threads",
        "",
        "| quantity | Fisher matvecs | time (s) | × gradient step | s per matvec |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        q, m, t = row["quantity"], row["matvecs"], row["seconds"]
        per = f"{t / m:.2g}" if m else "–"
        lines.append(f"| {q} | {m} | {t:.3g} | {row['ratio_to_gradient_step']:.1f} | {per} |")
    lines.append("")
    top3 = ", ".join(f"{e:.4g}" for e in results["top_eigenvalues"][:3])
    lines.append(
        f"top eigenvalues: {top3}, …; max residual {max(results['top_residuals']):.2g}. "
        f"SLQ log det = {results['slq_log_det']:.2f} ± {results['slq_log_det_std_error']:.2f}"
        f" (½ log det = {results['slq_log_det'] / 2:.1f} nats vs BIC (D/2) log N ="
        f" {results['bic_penalty']:.0f})"
    )
    return "\n".join(lines)


def run_jax(
    *,
    quick: bool = False,
    reps: int = 5,
    probes: int | None = None,
    steps: int | None = None,
    lanczos_steps: int | None = None,
    x64: bool = False,
) -> dict[str, Any]:
    """The compiled JAX Lanczos and SLQ against matfree on one Fisher operator."""
    import jax

    if x64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from matfree import decomp, funm, stochtrace

    from fisherbound.adapters.jax import linearize as jax_linearize
    from fisherbound.linalg import LinearOperator, lanczos, slq

    probes = probes or (2 if quick else 10)
    steps = steps or (5 if quick else 30)
    m = lanczos_steps or (10 if quick else 60)
    sizes = (8, 16, 16, 3) if quick else (64, 256, 256, 10)
    batch = 16 if quick else 128
    dtype = jnp.float64 if x64 else jnp.float32
    rng = np.random.default_rng(0)
    params = [
        (
            jnp.asarray(rng.standard_normal((o, i)) / np.sqrt(i), dtype=dtype),
            jnp.asarray(0.1 * rng.standard_normal(o), dtype=dtype),
        )
        for i, o in zip(sizes[:-1], sizes[1:])
    ]

    def apply_fn(params: Any, x: Any) -> Any:
        for w, b in params[:-1]:
            x = jnp.tanh(x @ w.T + b)
        w, b = params[-1]
        return x @ w.T + b

    x = jnp.asarray(rng.standard_normal((batch, sizes[0])), dtype=dtype)
    lin = jax_linearize(apply_fn, params, x)
    op = fisher_operator(lin, Categorical())
    fn, operands = op.traceable
    n = int(op.shape[0])
    plain = LinearOperator(  # the operator without its traceable product: the Python loop
        op.shape, matvec=op.matvec, matmat=op.matmat, dtype=op.dtype, device=op.device, xp=jnp
    )
    v0 = jnp.asarray(rng.standard_normal(n), dtype=dtype)
    v0 = v0 / jnp.linalg.norm(v0)

    def matvec(v: Any, ops: Any) -> Any:
        return fn(ops, v[:, None])[:, 0]

    one_product = jax.jit(matvec)
    tridiag = decomp.tridiag_sym(m, materialize=False)
    mf_lanczos = jax.jit(lambda ops, v: tridiag(matvec, v, ops))
    integrand = funm.monte_carlo_funm_sym(
        funm.dense_funm_sym_eigh(jnp.log1p), decomp.tridiag_sym(steps)
    )
    estimate = stochtrace.estimator_monte_carlo(integrand, stochtrace.sampler_signs(v0, num=probes))
    mf_slq = jax.jit(lambda ops, key: estimate(matvec, key, ops))
    key = jax.random.PRNGKey(0)

    calls: dict[str, Callable[[], Any]] = {
        "product": lambda: one_product(v0, operands),
        "lanczos": lambda: lanczos(op, num_matvecs=m, v0=v0),
        "matfree_lanczos": lambda: mf_lanczos(operands, v0),
        "slq": lambda: slq(op, jnp.log1p, num_probes=probes, num_matvecs=steps, rng=0),
        "matfree_slq": lambda: mf_slq(operands, key),
        "loop_lanczos": lambda: lanczos(plain, num_matvecs=m, v0=v0),
        "loop_slq": lambda: slq(plain, jnp.log1p, num_probes=probes, num_matvecs=steps, rng=0),
    }

    def call(name: str) -> tuple[float, Any]:
        start = time.perf_counter()
        out = jax.block_until_ready(calls[name]())
        return time.perf_counter() - start, out

    jax.block_until_ready(jnp.ones(3) + 1)  # the runtime is up before the first timing
    first: dict[str, float] = {}
    outs: dict[str, Any] = {}
    for name in calls:
        first[name], outs[name] = call(name)
    later: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):  # alternated, so that a change of load hits every method
        for name in calls:
            if name.startswith("loop_") and len(later[name]) >= 2:
                continue  # slow: two later calls are enough
            later[name].append(call(name)[0])
    eigsh_rows, eigsh_checks = _jax_eigsh_rows(lin, op, call, calls, first, outs, later, reps)
    count_rows = _jax_count_rows(apply_fn, params, x, lin, reps, quick=quick)
    median = {name: statistics.median(ts) for name, ts in later.items()}
    # The same tridiagonal from the same vector (to rounding): the top Ritz values.
    ours = outs["lanczos"]
    alpha_mf, beta_mf = outs["matfree_lanczos"].J_small

    def top_ritz(alpha: Any, beta: Any) -> float:
        a, b = np.asarray(alpha, dtype=np.float64), np.asarray(beta, dtype=np.float64)
        return float(np.linalg.eigvalsh(np.diag(a) + np.diag(b, 1) + np.diag(b, -1))[-1])

    top, top_mf = top_ritz(ours.alpha, ours.beta), top_ritz(alpha_mf, beta_mf)
    est = outs["slq"]

    def row(label: str, name: str, products: int, baseline: str) -> dict[str, Any]:
        return {
            "quantity": label,
            "products": products,
            "first_call_seconds": first[name],
            "later_call_seconds": median[name],
            "later_calls": len(later[name]),
            "ratio_to_matfree": median[name] / median[baseline],
            "ratio_to_product": median[name] / median["product"],
        }

    rows = [
        row("one Fisher product (jit)", "product", 1, "product"),
        row(f"fisherbound lanczos, m = {m} (compiled)", "lanczos", m, "matfree_lanczos"),
        row(f"matfree tridiag_sym({m}), full reortho", "matfree_lanczos", m, "matfree_lanczos"),
        row(f"fisherbound lanczos, m = {m} (Python loop)", "loop_lanczos", m, "matfree_lanczos"),
        row(
            f"fisherbound slq, M = {probes} × m = {steps} (compiled)",
            "slq",
            probes * steps,
            "matfree_slq",
        ),
        row(
            f"matfree SLQ, M = {probes} × tridiag_sym({steps})",
            "matfree_slq",
            probes * steps,
            "matfree_slq",
        ),
        row(
            f"fisherbound slq, M = {probes} × m = {steps} (Python loop)",
            "loop_slq",
            probes * steps,
            "matfree_slq",
        ),
    ]
    rows += [row(label, name, products, baseline) for label, name, products, baseline in eigsh_rows]
    return {
        "dtype": "float64" if x64 else "float32",
        "jax": jax.__version__,
        "matfree": importlib.metadata.version("matfree"),
        "model": f"tanh MLP {'-'.join(map(str, sizes))}, batch {batch}"
        + (" (quick)" if quick else ""),
        "num_params": n,
        "rows": rows,
        "top_ritz": top,
        "top_ritz_matfree": top_mf,
        "top_ritz_relative_difference": abs(top - top_mf) / abs(top_mf),
        "slq_value": float(est.value),
        "slq_std_error": float(est.std_error),
        "matfree_slq_value": float(outs["matfree_slq"]),
        "ratios": {r["quantity"]: r["ratio_to_matfree"] for r in rows[1:]},
        "eigsh": eigsh_checks,
        "count_and_hessian": count_rows,
    }


def _jax_eigsh_rows(
    lin: Any,
    op: Any,
    call: Callable[[str], tuple[float, Any]],
    calls: dict[str, Callable[[], Any]],
    first: dict[str, float],
    outs: dict[str, Any],
    later: dict[str, list[float]],
    reps: int,
) -> tuple[list[tuple[str, str, int, str]], dict[str, Any]]:
    """``top_eigenpairs`` k = 1 and 5 at the default tol: compiled, the Python loop of
    before (``eigsh`` on the operator without its traceable product, which
    ``top_eigenpairs`` ran on JAX), and matfree's ``tridiag_sym`` with as many products
    from the same start vector followed by ``eig.eigh_partial``'s eigh of the
    tridiagonal. Adds the calls (first calls now, later calls alternated) and returns
    the rows and the checks: the products of both loops, the top eigenvalues."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from matfree import decomp, eig

    from fisherbound._lib import as_generator, probes
    from fisherbound.linalg import LinearOperator, TraceableProduct, eigsh

    fn, operands = op.traceable
    n = int(op.shape[0])
    # eigsh's start vector for rng=0: a Gaussian of the generator, normalised.
    gen = as_generator(0)
    start = probes(gen, (n,), distribution="gaussian", xp=jnp, dtype=op.dtype, device=op.device)
    start = start / jnp.linalg.norm(start)
    counted = [0]

    def counting_matvec(v: Any) -> Any:
        counted[0] += 1
        return op.matvec(v)

    plain = LinearOperator(
        op.shape, matvec=counting_matvec, matmat=op.matmat, dtype=op.dtype, device=op.device, xp=jnp
    )

    def matvec(v: Any, ops: Any) -> Any:
        return fn(ops, v[:, None])[:, 0]

    rows: list[tuple[str, str, int, str]] = []
    checks: dict[str, Any] = {}
    names: list[str] = []
    for k in (1, 5):
        loop, ours, theirs = f"loop_eigsh{k}", f"top_eigenpairs{k}", f"matfree_eigh{k}"
        calls[loop] = lambda k=k: eigsh(plain, k=k, rng=0)
        counted[0] = 0
        first[loop], outs[loop] = call(loop)  # the Python loop: counts the products
        m = counted[0]
        calls[ours] = lambda k=k: top_eigenpairs(lin, Categorical(), k=k, rng=0)
        partial = eig.eigh_partial(decomp.tridiag_sym(m))
        mf = jax.jit(lambda ops, v, partial=partial: partial(matvec, v, ops))
        calls[theirs] = lambda mf=mf: mf(operands, start)
        for name in (ours, theirs):
            first[name], outs[name] = call(name)
        names += [loop, ours, theirs]
        rows += [
            (f"top_eigenpairs k = {k}, default tol (compiled eigsh)", ours, m, theirs),
            (f"matfree tridiag_sym({m}) + eigh_partial", theirs, m, theirs),
            (f"top_eigenpairs k = {k} (Python loop)", loop, m, theirs),
        ]
        checks[f"k={k}"] = {
            "products_python_loop": m,
            "top_eigenvalue": float(outs[ours].eigenvalues[0]),
            "top_eigenvalue_python_loop": float(outs[loop].eigenvalues[-1]),
            "top_eigenvalue_matfree": float(jnp.max(outs[theirs][0])),
            "max_residual": float(jnp.max(outs[ours].residuals)),
        }
    for _ in range(reps):  # alternated, so that a change of load hits every method
        for name in names:
            if name.startswith("loop_") and len(later.setdefault(name, [])) >= 2:
                continue  # slow: two later calls are enough
            later.setdefault(name, []).append(call(name)[0])
    # The products of the compiled loop, counted by a host callback in another compile
    # (after the timings): the same as the Python loop's.
    box = [0]

    def counted_fn(ops: Any, V: Any) -> Any:
        jax.debug.callback(lambda: box.__setitem__(0, box[0] + V.shape[1]))
        return fn(ops, V)

    traced = TraceableProduct(counted_fn, operands)
    cop = LinearOperator(
        op.shape, matmat=op.matmat, dtype=op.dtype, device=op.device, xp=jnp, traceable=traced
    )
    for k in (1, 5):
        box[0] = 0
        eigsh(cop, k=k, rng=0)
        jax.effects_barrier()
        checks[f"k={k}"]["products_compiled"] = box[0]
        assert box[0] == checks[f"k={k}"]["products_python_loop"], checks
    np.testing.assert_allclose(  # the same pairs in both loops
        [c["top_eigenvalue"] for c in checks.values()],
        [c["top_eigenvalue_python_loop"] for c in checks.values()],
        rtol=1e-4,
    )
    return rows, checks


class _Untraceable(CountingLinearization):
    """A JAX linearization without ``_traceable``: its Fisher operator steps from Python
    (what ``local_dimension`` ran on JAX before); counts its products (JVP columns)."""

    def __getattr__(self, name: str) -> Any:
        if name == "_traceable":
            raise AttributeError(name)
        return getattr(self._lin, name)


def _jax_count_rows(
    apply_fn: Callable[..., Any], params: Any, x: Any, lin: Any, reps: int, *, quick: bool
) -> dict[str, Any]:
    """``local_dimension(method="lanczos")`` and ``hessian_directions(which="largest")``,
    compiled and stepping from Python, first call and median of later calls (alternated).

    The count's Python loop is ``local_dimension`` on the linearization without its
    traceable product (``_Untraceable``); the Hessian's is ``eigsh`` on
    ``hessian_operator(loss)`` without its traceable product (what ``hessian_directions``
    ran on JAX before). Products: counted in both loops (the compiled ones by a host
    callback, in another compile after the timings) and checked equal.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    import fisherbound._hessian
    import fisherbound.fisher
    from fisherbound.adapters.jax import loss_function
    from fisherbound.dimension import local_dimension
    from fisherbound.landscape import hessian_directions, hessian_operator
    from fisherbound.linalg import LinearOperator, TraceableProduct, eigsh

    eps = 1.2 if quick else 86.0  # about 20 (quick: 16) Fisher eigenvalues above it
    labels = jnp.asarray(np.random.default_rng(1).integers(0, int(lin.logits.shape[-1]), len(x)))
    loss = loss_function(apply_fn, params, x, labels)
    hop = hessian_operator(loss)
    counted = [0]

    def counting_matvec(v: Any) -> Any:
        counted[0] += 1
        return hop.matvec(v)

    plain_hessian = LinearOperator(
        hop.shape, matvec=counting_matvec, matmat=hop.matmat, dtype=hop.dtype, device=None, xp=jnp
    )
    untraceable = _Untraceable(lin)
    calls = {
        "count": lambda: local_dimension(lin, eps=eps, method="lanczos", rng=0).value,
        "loop_count": lambda: local_dimension(untraceable, eps=eps, method="lanczos", rng=0).value,
        "hessian": lambda: hessian_directions(loss, which="largest", rng=0).eigenvalues,
        "loop_hessian": lambda: eigsh(plain_hessian, k=1, which="largest", rng=0).eigenvalues,
    }
    first: dict[str, float] = {}
    later: dict[str, list[float]] = {name: [] for name in calls}
    outs: dict[str, Any] = {}

    def call(name: str) -> float:
        start = time.perf_counter()
        outs[name] = jax.block_until_ready(calls[name]())
        return time.perf_counter() - start

    products: dict[str, int] = {}
    for name in calls:
        untraceable.matvecs, counted[0] = 0, 0
        first[name] = call(name)
        if name == "loop_count":
            products[name] = untraceable.matvecs
        elif name == "loop_hessian":
            products[name] = counted[0]
    for _ in range(reps):
        for name in calls:
            if name.startswith("loop_") and len(later[name]) >= 2:
                continue  # slow: two later calls are enough
            later[name].append(call(name))
    # The compiled loops' products, by a host callback in another compile.
    box = [0]

    class Counted(KeyedProduct):
        def __init__(self, fn: Any) -> None:
            self.fn = self._key = fn

        def __call__(self, operands: Any, V: Any) -> Any:
            jax.debug.callback(lambda: box.__setitem__(0, box[0] + V.shape[1]))
            return self.fn(operands, V)

    def counting(make: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any) -> Any:
            t = make(*args)
            return None if t is None else TraceableProduct(Counted(t.fn), t.operands)

        return wrapped

    for name, module, attr in (
        ("count", fisherbound.fisher, "_traceable_fisher"),
        ("hessian", fisherbound._hessian, "_traceable_hessian"),
    ):
        original = getattr(module, attr)
        setattr(module, attr, counting(original))
        try:
            box[0] = 0
            jax.block_until_ready(calls[name]())
            jax.effects_barrier()
        finally:
            setattr(module, attr, original)
        products[name] = box[0]
    assert products["count"] == products["loop_count"], products
    assert products["hessian"] == products["loop_hessian"], products
    assert float(outs["count"]) == float(outs["loop_count"]), outs
    np.testing.assert_allclose(float(outs["hessian"][0]), float(outs["loop_hessian"][0]), rtol=1e-4)
    median = {name: statistics.median(ts) for name, ts in later.items()}
    labels_of = {
        "count": f"local_dimension eps = {eps:g}, method='lanczos' (compiled count)",
        "loop_count": f"local_dimension eps = {eps:g}, method='lanczos' (Python loop)",
        "hessian": "hessian_directions which='largest' (compiled eigsh)",
        "loop_hessian": "hessian_directions which='largest' (Python loop)",
    }
    rows = [
        {
            "quantity": labels_of[name],
            "products": products[name],
            "first_call_seconds": first[name],
            "later_call_seconds": median[name],
            "later_calls": len(later[name]),
            "ratio_to_python_loop": median[name] / median[f"loop_{name.removeprefix('loop_')}"],
        }
        for name in calls
    ]
    return {
        "rows": rows,
        "count": float(outs["count"]),
        "top_hessian_eigenvalue": float(outs["hessian"][0]),
    }


def markdown_jax(results: dict[str, Any]) -> str:
    lines = [
        f"{results['model']}, {results['num_params']:,} parameters, {results['dtype']}, "
        f"JAX {results['jax']} on the CPU, matfree {results['matfree']}",
        "",
        "| quantity | products | first call (s) | later calls (s, median) | × matfree "
        "| × one product |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['quantity']} | {r['products']} | {r['first_call_seconds']:.3g} | "
            f"{r['later_call_seconds']:.3g} | {r['ratio_to_matfree']:.2f} | "
            f"{r['ratio_to_product']:.1f} |"
        )
    lines.append("")
    lines.append(
        f"Top Ritz value {results['top_ritz']:.6g} (matfree {results['top_ritz_matfree']:.6g}, "
        f"relative difference {results['top_ritz_relative_difference']:.1e}); SLQ tr log(1 + F) "
        f"= {results['slq_value']:.5g} ± {results['slq_std_error']:.2g} (matfree, other "
        f"probes: {results['matfree_slq_value']:.5g})."
    )
    extra = results.get("count_and_hessian")
    if extra:
        lines += [
            "",
            "| quantity | products | first call (s) | later calls (s, median) | × Python loop |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in extra["rows"]:
            lines.append(
                f"| {r['quantity']} | {r['products']} | {r['first_call_seconds']:.3g} | "
                f"{r['later_call_seconds']:.3g} | {r['ratio_to_python_loop']:.2f} |"
            )
        lines.append(
            f"Count {extra['count']:g} in both loops; top Hessian eigenvalue "
            f"{extra['top_hessian_eigenvalue']:.6g}."
        )
    for k, c in results.get("eigsh", {}).items():
        lines.append(
            f"top_eigenpairs {k}: {c['products_compiled']} products compiled, "
            f"{c['products_python_loop']} in the Python loop; top eigenvalue "
            f"{c['top_eigenvalue']:.6g} (Python loop {c['top_eigenvalue_python_loop']:.6g}, "
            f"matfree {c['top_eigenvalue_matfree']:.6g}), largest residual "
            f"{c['max_residual']:.2g}."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=1, help="repetitions of the long rows")
    parser.add_argument("--probes", type=int, default=None, help="SLQ probes M (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="SLQ Lanczos steps m (default 20)")
    parser.add_argument("--k", type=int, default=None, help="top eigenpairs (default 10)")
    parser.add_argument("--quick", action="store_true", help="a tiny CNN, k = 3, 2 × 5 SLQ")
    parser.add_argument("--out", default=None, help="default results/spectrum[_jax].json")
    parser.add_argument("--jax", action="store_true", help="JAX's compiled Lanczos vs matfree")
    parser.add_argument("--x64", action="store_true", help="with --jax: float64")
    parser.add_argument("--lanczos-steps", type=int, default=None, help="with --jax (60)")
    args = parser.parse_args()
    record = {"date": now(), "command": "python " + " ".join(sys.argv), "machine": machine()}
    results_dir = Path(__file__).parent / "results"
    if args.jax:
        results = run_jax(
            quick=args.quick,
            reps=max(args.reps, 5),
            probes=args.probes,
            steps=args.steps,
            lanczos_steps=args.lanczos_steps,
            x64=args.x64,
        )
        write_json(Path(args.out or results_dir / "spectrum_jax.json"), {**record, **results})
        print(markdown_jax(results))
        return
    results = run(
        quick=args.quick,
        threads=args.threads,
        reps=args.reps,
        probes=args.probes,
        steps=args.steps,
        k=args.k,
    )
    write_json(Path(args.out or results_dir / "spectrum.json"), {**record, **results})
    print(markdown(results))


if __name__ == "__main__":
    main()
