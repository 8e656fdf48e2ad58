"""Benchmark: fisherbound beside BackPACK, curvlinops, nngeometry, PyHessian (torch CPU).

Only like with like: the same model, the same batch, the same quantity (the Fisher
of the softmax likelihood, which for the cross-entropy is the GGN: BackPACK's and
curvlinops' ``GGN`` and nngeometry's ``FIM(variant="classif_logits")``, rescaled
to fisherbound's sum over the batch). Before any timing, every peer's value is
compared with fisherbound's and the agreement is reported next to its time.

Quantities, each group timed interleaved with one gradient step (forward +
backward of the mean cross-entropy), so that ratios hold under load:

- the exact diagonal: ``fisher_diagonal``; BackPACK ``DiagGGNExact``; nngeometry
  ``FIM(..., PMatDiag)``;
- the exact trace: ``fisher_trace``; the sum of BackPACK's ``DiagGGNExact``;
  nngeometry ``FIM(..., PMatImplicit).trace()``;
- one Fisher-vector product, forward pass included: ``fisher_operator(...).matvec``;
  BackPACK ``hessianfree.ggn_vector_product``; curvlinops ``GGNLinearOperator @ v``;
  nngeometry ``PMatImplicit.mv``; and fisherbound's product with the forward pass
  kept (what Lanczos pays per step);
- the trace from M random probes: Hutchinson on ``fisher_operator`` and
  ``detach_and_mix(what="trace")``; curvlinops ``hutchinson_trace`` on its GGN
  (relative error against the exact trace, one draw each);
- the top k eigenvalues: ``top_eigenpairs`` (thick-restart Lanczos) and scipy's ``eigsh``
  (ARPACK), both to a relative residual of 1e-4,
  on curvlinops' ``GGNLinearOperator.to_scipy()`` (agreement of the k values);
- random diagonal estimates with M = 1 and 10 samples: ``detach_and_mix``; BackPACK
  ``DiagGGNMC``; nngeometry ``FIM_MonteCarlo(..., PMatDiag)``; curvlinops
  ``hutchinson_diag`` on its GGN (root-mean-square relative error over draws);
- PyHessian computes the loss Hessian, not the Fisher, so it meets fisherbound's
  landscape functions on the Hessian of the mean cross-entropy: the Hutchinson
  trace with M probes (``loss_trace(method="hvp")``; PyHessian ``hessian.trace``
  with its stopping rule disabled, so that both use M probes; agreement in combined
  standard errors) and the largest eigenvalue (``hessian_directions``, which also
  returns the smallest, and ``hessian_directions(which="largest")``, each with its
  Hessian-vector products counted; PyHessian ``hessian.eigenvalues``, power iteration
  to its default relative tolerance 1e-3).

The long methods (eigenvalues, the Hessian trace) run once each, between gradient
steps, and the values of that run are the ones compared. A peer that is not
importable gets rows with status "not installed".

Run:  python benchmarks/bench_peers.py [--threads 2] [--reps 5] [--quick]
Writes benchmarks/results/peers.json. ``--quick``: an MLP 64-32-10, batch 32.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import (
    PEERS,
    RESULTS,
    installed,
    interleaved,
    machine,
    now,
    table,
    timed,
    version,
    write_json,
)
from bench_landscape import HvpCount
from bench_spectrum import CountingLinearization
from torch import nn

from fisherbound.adapters.torch import linearize, loss_function
from fisherbound.dimension import top_eigenpairs
from fisherbound.estimators import detach_and_mix
from fisherbound.fisher import fisher_diagonal, fisher_operator, fisher_trace
from fisherbound.landscape import hessian_directions, loss_trace
from fisherbound.linalg import hutchinson_trace

NAME = "peers"
TITLE = "fisherbound beside BackPACK, curvlinops, nngeometry and PyHessian (torch CPU, float32)"
LIBRARIES = {"fisherbound": None, **{m: d for m, d in PEERS.items()}}


def make_model(quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    torch.manual_seed(0)
    if quick:
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        x, name = torch.randn(32, 64), "MLP 64-32-10 (ReLU), batch 32 (quick)"
    else:
        model = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
        )
        x, name = torch.randn(128, 784), "MLP 784-512-256-10 (ReLU), batch 128"
    model.eval()
    return model, x, torch.randint(0, 10, (x.shape[0],)), name


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def norm_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def flat(tensors: Any) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# The relative residual both eigensolvers stop at in the top-eigenvalue rows (float32).
TOP_TOL = 1e-4


class Counter:
    """Counts the products of a scipy LinearOperator (one per column)."""

    def __init__(self, op: Any) -> None:
        from scipy.sparse.linalg import LinearOperator

        self.count = 0

        def matvec(v: Any) -> Any:
            self.count += 1
            return op.matvec(v)

        def matmat(v: Any) -> Any:
            self.count += v.shape[1]
            return op.matmat(v)

        self.op = LinearOperator(op.shape, matvec=matvec, matmat=matmat, dtype=op.dtype)


# --------------------------------------------------------------------------- #
# the methods of each library, each returning fisherbound's convention (sums)


class Methods:
    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model, x, y
        self.n = int(x.shape[0])
        self.params = list(model.parameters())
        self.num_params = sum(p.numel() for p in self.params)

    # -- the baseline ----------------------------------------------------------
    def gradient_step(self) -> None:
        self.model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.model(self.x), self.y).backward()

    # -- fisherbound -------------------------------------------------------------
    def fb_diagonal(self) -> torch.Tensor:
        return fisher_diagonal(linearize(self.model, self.x), progress=False)

    def fb_trace(self) -> torch.Tensor:
        return fisher_trace(linearize(self.model, self.x), progress=False)

    def fb_matvec(self, v: torch.Tensor) -> torch.Tensor:
        return fisher_operator(linearize(self.model, self.x)).matvec(v)

    def fb_hutchinson(self, m: int, seed: int) -> tuple[float, float]:
        est = hutchinson_trace(
            fisher_operator(linearize(self.model, self.x)), num_probes=m, rng=seed
        )
        return float(est.value), float(est.std_error)

    def fb_dm_trace(self, m: int, seed: int) -> tuple[float, float]:
        lin = linearize(self.model, self.x)
        est = detach_and_mix(lin, what="trace", num_probes=m, rng=seed, progress=False)
        return float(est.value), float(est.std_error)

    def fb_top(self, k: int) -> tuple[list[float], int]:
        lin = CountingLinearization(linearize(self.model, self.x))
        pairs = top_eigenpairs(lin, k=k, tol=TOP_TOL, rng=0)
        return [float(e) for e in pairs.eigenvalues], lin.matvecs

    def fb_dm_diagonal(self, m: int, seed: int) -> torch.Tensor:
        lin = linearize(self.model, self.x)
        return detach_and_mix(lin, num_probes=m, rng=seed, progress=False).value

    # -- BackPACK ----------------------------------------------------------------
    def backpack(self) -> dict[str, Callable[..., Any]]:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact, DiagGGNMC
        from backpack.hessianfree.ggnvp import ggn_vector_product

        bp_model = extend(copy.deepcopy(self.model))  # its hooks must not touch the others
        loss_fn = extend(nn.CrossEntropyLoss())
        n = self.n

        def with_extension(extension: Any, attr: str) -> torch.Tensor:
            bp_model.zero_grad(set_to_none=True)
            loss = loss_fn(bp_model(self.x), self.y)
            with backpack(extension):
                loss.backward()
            # The mean loss: its GGN is fisherbound's sum divided by N.
            return flat(getattr(p, attr) for p in bp_model.parameters()) * n

        def matvec(v: torch.Tensor) -> torch.Tensor:
            out = bp_model(self.x)
            loss = nn.functional.cross_entropy(out, self.y, reduction="sum")
            shapes = [p.shape for p in bp_model.parameters()]
            parts = list(torch.split(v, [math.prod(s) for s in shapes]))
            vs = [part.reshape(s) for part, s in zip(parts, shapes)]
            return flat(ggn_vector_product(loss, out, bp_model, vs))

        def mc(m: int, seed: int) -> torch.Tensor:
            torch.manual_seed(seed)
            return with_extension(DiagGGNMC(mc_samples=m), "diag_ggn_mc")

        return {
            "diagonal": lambda: with_extension(DiagGGNExact(), "diag_ggn_exact"),
            "trace": lambda: with_extension(DiagGGNExact(), "diag_ggn_exact").sum(),
            "matvec": matvec,
            "mc_diagonal": mc,
        }

    # -- curvlinops --------------------------------------------------------------
    def curvlinops(self) -> dict[str, Callable[..., Any]]:
        from curvlinops import GGNLinearOperator, hutchinson_diag
        from curvlinops import hutchinson_trace as cl_hutchinson_trace
        from scipy.sparse.linalg import eigsh

        def operator() -> Any:
            return GGNLinearOperator(
                self.model,
                nn.CrossEntropyLoss(reduction="sum"),
                self.params,
                [(self.x, self.y)],
                check_deterministic=False,
                num_data=self.n,
            )

        def hutchinson(m: int, seed: int) -> float:
            torch.manual_seed(seed)
            return float(cl_hutchinson_trace(operator(), m))

        def top(k: int) -> tuple[list[float], int]:
            counter = Counter(operator().to_scipy())
            values = eigsh(counter.op, k=k, which="LA", tol=TOP_TOL, return_eigenvectors=False)
            return sorted((float(e) for e in values), reverse=True), counter.count

        def diagonal(m: int, seed: int) -> torch.Tensor:
            torch.manual_seed(seed)
            return hutchinson_diag(operator(), m)

        return {
            "matvec": lambda v: operator() @ v,
            "hutchinson": hutchinson,
            "top": top,
            "hutchinson_diagonal": diagonal,
        }

    # -- nngeometry --------------------------------------------------------------
    def nngeometry(self) -> dict[str, Callable[..., Any]]:
        from nngeometry.layercollection import LayerCollection
        from nngeometry.metrics import FIM, FIM_MonteCarlo
        from nngeometry.object import PMatDiag, PMatImplicit
        from nngeometry.object.vector import PVector
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(TensorDataset(self.x, self.y), batch_size=self.n)
        layers = LayerCollection.from_model(self.model)
        n = self.n

        # nngeometry's FIM is the mean over the examples: times N for the sum.
        def diagonal() -> torch.Tensor:
            return FIM(self.model, loader, PMatDiag, variant="classif_logits").get_diag() * n

        def trace() -> torch.Tensor:
            return FIM(self.model, loader, PMatImplicit, variant="classif_logits").trace() * n

        def matvec(v: torch.Tensor) -> torch.Tensor:
            fim = FIM(self.model, loader, PMatImplicit, variant="classif_logits")
            return fim.mv(PVector(layers, vector_repr=v)).to_torch() * n

        def mc(m: int, seed: int) -> torch.Tensor:
            torch.manual_seed(seed)
            fim = FIM_MonteCarlo(self.model, loader, PMatDiag, trials=m)
            return fim.get_diag() * n

        return {"diagonal": diagonal, "trace": trace, "matvec": matvec, "mc_diagonal": mc}

    # -- the loss Hessian: fisherbound's landscape and PyHessian -------------------
    def fb_hessian_trace(self, m: int, seed: int) -> tuple[float, float]:
        loss = loss_function(self.model, self.x, self.y, reduction="mean")
        est = loss_trace(loss, num_probes=m, method="hvp", rng=seed, progress=False)
        return float(est.value), float(est.std_error)

    def fb_hessian_top(self, steps: int | None, which: str = "both") -> tuple[float, int]:
        """λ_max (``which="both"``: λ_max and λ_min in one run) and the HVPs it took."""
        loss = loss_function(self.model, self.x, self.y, reduction="mean")
        with HvpCount() as count:
            hd = hessian_directions(loss, which=which, num_matvecs=steps, rng=0)
        return float(hd.eigenvalues[0]), count.n

    def pyhessian(self) -> dict[str, Callable[..., Any]]:
        from pyhessian import hessian

        model = copy.deepcopy(self.model)  # PyHessian leaves a graph in the .grad fields

        def make() -> Any:
            model.zero_grad(set_to_none=True)
            return hessian(model, nn.CrossEntropyLoss(), data=(self.x, self.y), cuda=False)

        def trace(m: int, seed: int) -> tuple[float, float]:
            torch.manual_seed(seed)
            # tol=-inf: exactly m probes. Its default rule stops when the relative
            # change of the running mean is below tol, which a negative mean meets at once.
            samples = make().trace(maxIter=m, tol=-math.inf)
            return statistics.fmean(samples), statistics.stdev(samples) / math.sqrt(len(samples))

        def top() -> tuple[float, int]:
            torch.manual_seed(0)
            with HvpCount() as count:
                value = float(make().eigenvalues(top_n=1)[0][0])
            return value, count.n

        return {"trace": trace, "top": top}


# --------------------------------------------------------------------------- #
# the comparison


def row(
    quantity: str,
    library: str,
    method: str,
    *,
    status: str = "measured",
    seconds: float | None = None,
    step: float | None = None,
    reference: float | None = None,
    agreement: float | None = None,
    agreement_kind: str = "",
    **extra: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "quantity": quantity,
        "library": library,
        "method": method,
        "status": status,
    }
    if status == "measured":
        assert seconds is not None
        assert step is not None
        out |= {
            "seconds": seconds,
            "ratio_to_gradient_step": seconds / step,
            "ratio_to_fisherbound": None if reference is None else seconds / reference,
            "agreement": agreement,
            "agreement_kind": agreement_kind,
        }
    return out | extra


def group(
    quantity: str,
    fns: dict[tuple[str, str], Callable[[], Any]],
    step_fn: Callable[[], Any],
    *,
    reps: int,
    warmup: int,
    agreement: dict[tuple[str, str], float],
    agreement_kind: str,
    reference: tuple[str, str],
    missing: list[tuple[str, str]],
    extra: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Time a group of methods interleaved with the gradient step; one row each."""
    named = {"step": step_fn} | {f"{lib}|{meth}": fn for (lib, meth), fn in fns.items()}
    times = interleaved(named, reps=reps, warmup=warmup)
    step = statistics.median(times["step"])
    med = {key: statistics.median(times[f"{key[0]}|{key[1]}"]) for key in fns}
    rows = [
        row(
            quantity,
            lib,
            meth,
            seconds=med[(lib, meth)],
            step=step,
            reference=med.get(reference),
            agreement=agreement.get((lib, meth)),
            agreement_kind=agreement_kind,
            **(extra or {}).get((lib, meth), {}),
        )
        for lib, meth in fns
    ]
    rows += [row(quantity, lib, meth, status="not installed") for lib, meth in missing]
    return rows


def group_once(
    quantity: str,
    fns: dict[tuple[str, str], Callable[[], Any]],
    step_fn: Callable[[], Any],
    *,
    compare: Callable[[dict[tuple[str, str], Any]], dict[tuple[str, str], float]],
    agreement_kind: str,
    reference: tuple[str, str],
    missing: list[tuple[str, str]],
    describe: Callable[[Any], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Long methods: each runs once, timed, between gradient steps; its values are compared."""
    outputs: dict[tuple[str, str], Any] = {}
    seconds: dict[tuple[str, str], float] = {}
    steps: list[float] = []
    for key, fn in fns.items():
        steps.append(timed(step_fn)[0])
        seconds[key], outputs[key] = timed(fn)
        steps.append(timed(step_fn)[0])
    step = statistics.median(steps)
    agreement = compare(outputs)
    rows = [
        row(
            quantity,
            lib,
            meth,
            seconds=seconds[(lib, meth)],
            step=step,
            reference=seconds.get(reference),
            agreement=agreement.get((lib, meth)),
            agreement_kind=agreement_kind,
            **(describe(outputs[(lib, meth)]) if describe else {}),
        )
        for lib, meth in fns
    ]
    rows += [row(quantity, lib, meth, status="not installed") for lib, meth in missing]
    return rows


def run(
    *,
    quick: bool = False,
    threads: int = 2,
    reps: int | None = None,
    probes: int | None = None,
    k: int | None = None,
    draws: int | None = None,
    hessian_probes: int | None = None,
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    hessian_probes = hessian_probes or (4 if quick else 32)
    lanczos_steps = 20 if quick else None  # Hessian rows: the eigsh budget (None: default)
    reps = reps or (1 if quick else 5)
    probes = probes or (10 if quick else 100)
    k = k or (3 if quick else 5)
    draws = draws or (2 if quick else 3)
    warmup = 1
    model, x, y, model_name = make_model(quick)
    m = Methods(model, x, y)
    have = {lib: lib == "fisherbound" or installed(lib) for lib in LIBRARIES}
    with warnings.catch_warnings():
        # BackPACK's hooks warn that no input requires a gradient (expected here).
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message=".*backward hook.*", category=UserWarning)
        warnings.filterwarnings("ignore", message="Using backward.. with create_graph=True")
        rows = compare(
            m,
            have,
            reps=reps,
            warmup=warmup,
            probes=probes,
            k=k,
            draws=draws,
            hessian_probes=hessian_probes,
            lanczos_steps=lanczos_steps,
        )
    ratios = {}
    for r in rows:
        if r["status"] != "measured":
            continue
        ratios[f"{r['quantity']}: {r['library']} {r['method']} / gradient step"] = r[
            "ratio_to_gradient_step"
        ]
        if r["library"] != "fisherbound" and r["ratio_to_fisherbound"] is not None:
            ratios[f"{r['quantity']}: {r['library']} {r['method']} / fisherbound"] = r[
                "ratio_to_fisherbound"
            ]
    return {
        "model": model_name,
        "num_params": m.num_params,
        "threads": threads,
        "dtype": "float32",
        "reps": reps,
        "probes": probes,
        "k": k,
        "draws": draws,
        "hessian_probes": hessian_probes,
        "lanczos_steps": lanczos_steps or "default budget",
        "top_tol": TOP_TOL,
        "libraries": {
            lib: ("installed " + (version(dist) or "?") if dist else "this package")
            if have[lib]
            else "not installed"
            for lib, dist in LIBRARIES.items()
        },
        "rows": rows,
        "ratios": ratios,
    }


def compare(
    m: Methods,
    have: dict[str, bool],
    *,
    reps: int,
    warmup: int,
    probes: int,
    k: int,
    draws: int,
    hessian_probes: int,
    lanczos_steps: int | None,
) -> list[dict[str, Any]]:
    bp = m.backpack() if have["backpack"] else {}
    cl = m.curvlinops() if have["curvlinops"] else {}
    ng = m.nngeometry() if have["nngeometry"] else {}
    rows: list[dict[str, Any]] = []

    def split(
        candidates: dict[tuple[str, str], Callable[..., Any] | None],
    ) -> tuple[dict[tuple[str, str], Callable[..., Any]], list[tuple[str, str]]]:
        present = {key: fn for key, fn in candidates.items() if have[key[0]] and fn is not None}
        return present, [key for key in candidates if not have[key[0]]]

    # -- exact diagonal --------------------------------------------------------
    fns, missing = split(
        {
            ("fisherbound", "fisher_diagonal"): m.fb_diagonal,
            ("backpack", "DiagGGNExact"): bp.get("diagonal"),
            ("nngeometry", "FIM(PMatDiag)"): ng.get("diagonal"),
        }
    )
    ref = m.fb_diagonal()
    agree = {key: max_rel_diff(fn(), ref) for key, fn in fns.items()}
    rows += group(
        "exact diagonal",
        fns,
        m.gradient_step,
        reps=reps,
        warmup=warmup,
        agreement=agree,
        agreement_kind="max |d - d_fb| / max |d_fb|",
        reference=("fisherbound", "fisher_diagonal"),
        missing=missing,
    )

    # -- exact trace -----------------------------------------------------------
    fns, missing = split(
        {
            ("fisherbound", "fisher_trace"): m.fb_trace,
            ("backpack", "sum of DiagGGNExact"): bp.get("trace"),
            ("nngeometry", "FIM(PMatImplicit).trace()"): ng.get("trace"),
        }
    )
    exact_trace = float(m.fb_trace())
    agree = {key: abs(float(fn()) - exact_trace) / exact_trace for key, fn in fns.items()}
    rows += group(
        "exact trace",
        fns,
        m.gradient_step,
        reps=reps,
        warmup=warmup,
        agreement=agree,
        agreement_kind="|t - t_fb| / t_fb",
        reference=("fisherbound", "fisher_trace"),
        missing=missing,
    )

    # -- one Fisher-vector product --------------------------------------------
    v = torch.randn(m.num_params, generator=torch.Generator().manual_seed(1))
    kept = fisher_operator(linearize(m.model, m.x))
    fns_v: dict[tuple[str, str], Callable[..., Any] | None] = {
        ("fisherbound", "fisher_operator(linearize(...)).matvec"): m.fb_matvec,
        ("fisherbound", "matvec, forward pass kept"): kept.matvec,
        ("backpack", "hessianfree.ggn_vector_product"): bp.get("matvec"),
        ("curvlinops", "GGNLinearOperator @ v"): cl.get("matvec"),
        ("nngeometry", "FIM(PMatImplicit).mv"): ng.get("matvec"),
    }
    present_v, missing = split(fns_v)
    ref = m.fb_matvec(v)
    agree = {key: norm_rel_diff(fn(v), ref) for key, fn in present_v.items()}
    rows += group(
        "one Fisher-vector product",
        {key: (lambda fn=fn: fn(v)) for key, fn in present_v.items()},
        m.gradient_step,
        reps=reps,
        warmup=warmup,
        agreement=agree,
        agreement_kind="‖Fv - (Fv)_fb‖ / ‖(Fv)_fb‖",
        reference=("fisherbound", "fisher_operator(linearize(...)).matvec"),
        missing=missing,
    )

    # -- trace from random probes ---------------------------------------------
    label = f"trace, {probes} random probes"
    estimates: dict[tuple[str, str], tuple[float, float | None]] = {}
    candidates: dict[tuple[str, str], Callable[[], Any] | None] = {
        ("fisherbound", "Hutchinson on fisher_operator"): lambda: m.fb_hutchinson(probes, 0),
        ("fisherbound", "detach_and_mix(what='trace')"): lambda: m.fb_dm_trace(probes, 0),
        ("curvlinops", "hutchinson_trace on GGNLinearOperator"): (
            (lambda: (cl["hutchinson"](probes, 0), None)) if cl else None
        ),
    }
    fns, missing = split(candidates)
    for key, fn in fns.items():
        estimates[key] = fn()
    agree = {key: abs(value - exact_trace) / exact_trace for key, (value, _) in estimates.items()}
    extra = {
        key: {
            "estimate": value,
            "std_error": se,
            "exact": exact_trace,
        }
        for key, (value, se) in estimates.items()
    }
    rows += group(
        label,
        fns,
        m.gradient_step,
        reps=max(1, reps // 2),
        warmup=0,
        agreement=agree,
        agreement_kind="|estimate - exact| / exact, one draw",
        reference=("fisherbound", "Hutchinson on fisher_operator"),
        missing=missing,
        extra=extra,
    )

    # -- top eigenvalues -------------------------------------------------------
    fb_key = ("fisherbound", "top_eigenpairs (thick-restart Lanczos, tol 1e-4)")
    fns, missing = split(
        {
            fb_key: lambda: m.fb_top(k),
            ("curvlinops", "scipy eigsh (tol 1e-4) on GGNLinearOperator.to_scipy()"): (
                (lambda: cl["top"](k)) if cl else None
            ),
        }
    )

    def compare_top(found: dict[tuple[str, str], Any]) -> dict[tuple[str, str], float]:
        ref = torch.tensor(found[fb_key][0])
        return {key: max_rel_diff(torch.tensor(vals), ref) for key, (vals, _) in found.items()}

    rows += group_once(
        f"top {k} eigenvalues",
        fns,
        m.gradient_step,
        compare=compare_top,
        agreement_kind="max |λ - λ_fb| / λ_fb,max",
        reference=fb_key,
        missing=missing,
        describe=lambda out: {"eigenvalues": out[0], "products": out[1]},
    )

    rows += hessian_groups(m, have, hessian_probes=hessian_probes, lanczos_steps=lanczos_steps)

    # -- random diagonal estimates ---------------------------------------------
    exact = m.fb_diagonal()
    for samples in (1, 10):
        label = f"diagonal estimate, {samples} sample(s)"
        cands: dict[tuple[str, str], Callable[[int], torch.Tensor] | None] = {
            ("fisherbound", f"detach_and_mix, {samples} probe(s)"): (
                lambda seed, s=samples: m.fb_dm_diagonal(s, seed)
            ),
            ("backpack", f"DiagGGNMC(mc_samples={samples})"): (
                (lambda seed, s=samples: bp["mc_diagonal"](s, seed)) if bp else None
            ),
            ("nngeometry", f"FIM_MonteCarlo(PMatDiag, trials={samples})"): (
                (lambda seed, s=samples: ng["mc_diagonal"](s, seed)) if ng else None
            ),
            ("curvlinops", f"hutchinson_diag, {samples} GGN product(s)"): (
                (lambda seed, s=samples: cl["hutchinson_diagonal"](s, seed)) if cl else None
            ),
        }
        present_d, missing = split(cands)
        errors = {
            key: math.sqrt(
                statistics.fmean(norm_rel_diff(fn(100 + s), exact) ** 2 for s in range(draws))
            )
            for key, fn in present_d.items()
        }
        rows += group(
            label,
            {key: (lambda fn=fn: fn(0)) for key, fn in present_d.items()},
            m.gradient_step,
            reps=reps,
            warmup=warmup,
            agreement=errors,
            agreement_kind=f"‖d̂ - d‖ / ‖d‖, root mean square over {draws} draws",
            reference=("fisherbound", f"detach_and_mix, {samples} probe(s)"),
            missing=missing,
        )
    return rows


def hessian_groups(
    m: Methods, have: dict[str, bool], *, hessian_probes: int, lanczos_steps: int | None
) -> list[dict[str, Any]]:
    """The loss Hessian of the mean cross-entropy: fisherbound's landscape and PyHessian."""
    ph = m.pyhessian() if have["pyhessian"] else {}
    rows: list[dict[str, Any]] = []
    fb_key = ("fisherbound", "loss_trace(method='hvp')")
    ph_key = ("pyhessian", "hessian.trace")
    m.fb_hessian_trace(1, 0)  # warm-up: torch.func's first forward-over-reverse transform
    fns: dict[tuple[str, str], Callable[[], Any]] = {
        fb_key: lambda: m.fb_hessian_trace(hessian_probes, 0)
    }
    if ph:
        fns[ph_key] = lambda: ph["trace"](hessian_probes, 0)

    def compare_trace(out: dict[tuple[str, str], Any]) -> dict[tuple[str, str], float]:
        (a, sa) = out[fb_key]
        agree = {fb_key: 0.0}
        if ph_key in out:
            b, sb = out[ph_key]
            agree[ph_key] = abs(a - b) / math.sqrt(sa * sa + sb * sb)
        return agree

    rows += group_once(
        f"Hessian trace, {hessian_probes} Hutchinson probes",
        fns,
        m.gradient_step,
        compare=compare_trace,
        agreement_kind="|t - t_fb| in combined standard errors",
        reference=fb_key,
        missing=[] if ph else [ph_key],
        describe=lambda out: {"estimate": out[0], "std_error": out[1]},
    )
    # hessian_directions stops at its default tol (3.5e-4 relative residual in float32,
    # an eigenvalue error near residual² / gap); PyHessian at a 1e-3 relative change of
    # its Rayleigh quotient. bench_landscape.py --eigen times both at equal accuracy.
    fb_key = ("fisherbound", "hessian_directions (Lanczos, λ_max and λ_min)")
    fb_top = ("fisherbound", "hessian_directions(which='largest') (Lanczos, λ_max)")
    ph_key = ("pyhessian", "hessian.eigenvalues (power iteration, λ_max)")
    # Both run to their default tolerance (lanczos_steps, a fixed step count for
    # top_eigenpairs' --quick rows, would be a budget here).
    warm = loss_function(m.model, m.x, m.y, reduction="mean")
    warm.hvp(torch.ones(warm.num_params))  # warm-up: torch.func's first forward-over-reverse
    fns = {
        fb_key: lambda: m.fb_hessian_top(None),
        fb_top: lambda: m.fb_hessian_top(None, "largest"),
    }
    if ph:
        fns[ph_key] = ph["top"]
    rows += group_once(
        "largest Hessian eigenvalue",
        fns,
        m.gradient_step,
        compare=lambda out: {
            key: abs(v - out[fb_key][0]) / abs(out[fb_key][0]) for key, (v, _) in out.items()
        },
        agreement_kind="|λ - λ_fb| / |λ_fb|",
        reference=fb_key,
        missing=[] if ph else [ph_key],
        describe=lambda out: {"eigenvalue": out[0], "products": out[1]},
    )
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']} ({result['num_params']:,} parameters), float32, "
        f"{result['threads']} threads. Libraries: "
        + ", ".join(f"{lib} {state}" for lib, state in result["libraries"].items())
        + ".",
        "",
    ]
    quantities: list[str] = []
    for r in result["rows"]:
        if r["quantity"] not in quantities:
            quantities.append(r["quantity"])
    for q in quantities:
        rows = [r for r in result["rows"] if r["quantity"] == q]
        kind = next((r["agreement_kind"] for r in rows if r["status"] == "measured"), "")
        cells = []
        for r in rows:
            if r["status"] != "measured":
                cells.append([r["library"], r["method"], r["status"], "", "", ""])
                continue
            vs_fb = r["ratio_to_fisherbound"]
            note = ""
            if "products" in r:
                note = f" ({r['products']} products)"
            cells.append(
                [
                    r["library"],
                    r["method"] + note,
                    f"{1e3 * r['seconds']:.3g}",
                    f"{r['ratio_to_gradient_step']:.3g}",
                    f"{vs_fb:.3g}",
                    f"{r['agreement']:.2g}" if r["agreement"] is not None else "",
                ]
            )
        lines += [
            f"**{q}** (agreement: {kind})",
            "",
            table(
                [
                    "library",
                    "method",
                    "median (ms)",
                    "× gradient step",
                    "× fisherbound",
                    "agreement",
                ],
                cells,
                align="llrrrr",
            ),
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--probes", type=int, default=None, help="random probes for the trace")
    parser.add_argument("--k", type=int, default=None, help="top eigenvalues")
    parser.add_argument("--draws", type=int, default=None, help="draws per relative error")
    parser.add_argument("--hessian-probes", type=int, default=None, help="Hessian trace probes")
    parser.add_argument("--quick", action="store_true", help="an MLP 64-32-10, batch 32")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    args = parser.parse_args()
    result = run(
        quick=args.quick,
        threads=args.threads,
        reps=args.reps,
        probes=args.probes,
        k=args.k,
        draws=args.draws,
        hessian_probes=args.hessian_probes,
    )
    record = {"date": now(), "command": "python " + " ".join(sys.argv), "machine": machine()}
    write_json(args.out, {**record, **result})
    print(markdown(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
