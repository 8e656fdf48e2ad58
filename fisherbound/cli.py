"""The command line: ``fisherbound demo`` (``python -m fisherbound demo``).

The demo runs on the NumPy reference models only, with no network and no
framework installed: it prints the core-space spectrum of one prediction, then the
exact Fisher diagonal of a small MLP next to its deterministic bounds, and random
estimates (Hutchinson trace, Lanczos top eigenvalues) next to the exact values.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from fisherbound.adapters.numpy import MLP, linearize
    from fisherbound.families import Categorical
    from fisherbound.fisher import fisher_bounds, fisher_diagonal, fisher_operator, fisher_trace
    from fisherbound.linalg import eigsh, hutchinson_trace

    family = Categorical()
    start = time.perf_counter()
    z = np.log(np.array([0.7, 0.2, 0.1]))
    lo, hi = family.lambda_max_bounds(z)
    print("Core space, p = (0.7, 0.2, 0.1)")
    print(
        f"  spectrum of I_Δ (secular equation): {np.array2string(family.eigvalsh(z), precision=10)}"
    )
    print(f"  λ_max bounds (Theorem 1):           [{float(lo):.6f}, {float(hi):.6f}]")
    print(f"  pseudo-determinant C·Π p:            {float(family.pseudo_determinant(z)):.6f}")

    rng = np.random.default_rng(args.seed)
    sizes = [8, args.width, args.width, 5]
    model = MLP.random(sizes, activation="tanh", rng=args.seed)
    x = rng.standard_normal((args.inputs, sizes[0]))
    lin = linearize(model, x)
    exact = fisher_diagonal(lin, family, progress=False)
    lower, upper = fisher_bounds(lin, family, progress=False)
    trace = float(fisher_trace(lin, family, progress=False))
    print(f"\nMLP {sizes}, tanh, D = {lin.num_params} parameters, N = {args.inputs} inputs")
    print("  block                 tr F_LR      tr F        tr F_DG")
    for blk in lin.blocks:
        sl = slice(blk.offset, blk.offset + blk.size)
        print(
            f"  {blk.name:<20} {lower[sl].sum():10.4f} {exact[sl].sum():10.4f} "
            f"{upper[sl].sum():10.4f}"
        )
    ok = bool(np.all(lower <= exact * (1 + 1e-12) + 1e-15) and np.all(exact <= upper * (1 + 1e-12)))
    print(f"  diag F_LR ≤ diag F ≤ diag F_DG entrywise: {ok}")

    op = fisher_operator(lin, family)
    est = hutchinson_trace(op, num_probes=args.probes, rng=args.seed)
    print(
        f"\nTrace: exact {trace:.4f}; Hutchinson ({args.probes} probes) "
        f"{float(est.value):.4f} ± {float(est.std_error):.4f}"
    )
    top = eigsh(op, k=3, which="largest", rng=args.seed)
    dense_top = np.sort(np.linalg.eigvalsh(op.matmat(np.eye(lin.num_params))))[-3:]
    print(f"Top eigenvalues, Lanczos: {np.array2string(np.asarray(top.eigenvalues), precision=6)}")
    print(f"Top eigenvalues, dense:   {np.array2string(dense_top, precision=6)}")
    print(f"\nDone in {time.perf_counter() - start:.1f} s.")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fisherbound`` command."""
    parser = argparse.ArgumentParser(prog="fisherbound", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the built-in example on the NumPy reference MLP")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--width", type=int, default=16)
    demo.add_argument("--inputs", type=int, default=64)
    demo.add_argument("--probes", type=int, default=200)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
