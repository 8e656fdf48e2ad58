"""The report's sections: the analysis' numbers as titled lists of blocks.

A block is ``("p", text)``, ``("table", (header, rows))`` or ``("figure", entry)``;
``render`` writes the same sections as Markdown and as HTML. One function per
section, in the order of the report (``SECTIONS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Block = tuple[str, Any]  # ("p", text) | ("table", (header, rows)) | ("figure", entry)
Section = tuple[str, list[Block]]
Figures = dict[str, dict[str, str]]  # file name → {"file", "title", "caption"}


def fmt(x: Any, digits: int = 4) -> str:
    """A number as the report prints it (``n/a`` for None and non-finite values)."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "n/a"
        return f"{x:.{digits}g}"
    return str(x)


def pm(value: Any, se: Any) -> str:
    """``value ± se`` (just the value without a standard error)."""
    return fmt(value) if se is None else f"{fmt(value)} ± {fmt(se, 2)}"


def percent(x: Any) -> str:
    """A fraction as a percentage with one decimal (``n/a`` for None)."""
    return "n/a" if x is None else f"{100.0 * x:.1f}%"


def overview_section(numbers: dict[str, Any], _fig: Figures) -> Section:
    """The model, the data, the training, the machine and the run time."""
    an = numbers["analysed"]
    blocks: list[Block] = []
    model = numbers.get("model", {})
    data = numbers.get("data", {})
    rows = [
        ["model", model.get("description", "n/a")],
        ["framework", numbers["environment"]["framework"]],
        ["parameters D", fmt(an["num_params"])],
        ["outputs C", fmt(an["num_outputs"])],
        ["family", an["family"]],
        ["dtype", an["dtype"]],
        ["data", data.get("description", "n/a")],
        ["analysed inputs N", fmt(an["num_inputs"])],
        ["accuracy on them", percent(an["accuracy"])],
    ]
    training = numbers.get("training")
    if training:
        rows += [
            ["training", training["description"]],
            ["training accuracy", percent(training["train_accuracy"])],
            ["training time", f"{training['seconds']:.2f} s"],
        ]
    rows += [
        ["machine", numbers["environment"]["machine"]],
        ["versions", ", ".join(f"{k} {v}" for k, v in numbers["environment"]["versions"].items())],
        ["analysis time", f"{numbers['timing']['analysis_seconds']:.2f} s"],
    ]
    blocks.append(("table", (["quantity", "value"], rows)))
    blocks.append(
        (
            "p",
            "Every Fisher quantity below is the SUM over the N analysed inputs (the papers' "
            "convention); the loss landscape uses the MEAN loss. All numbers are in "
            "report.json.",
        )
    )
    return ("Overview", blocks)


def diagonal_section(numbers: dict[str, Any], fig: Figures) -> Section:
    """The Fisher diagonal per block: exact, bounds, detach-and-mix."""
    fd = numbers["fisher_diagonal"]
    body: list[Block] = [
        (
            "p",
            "The diagonal of the Fisher metric F = Σ_x J_xᵀ I(z_x) J_x per parameter block: "
            "exact (fisher_diagonal), its certified bounds diag F_LR ≤ diag F ≤ diag F_DG "
            "(fisher_bounds) and the unbiased detach-and-mix estimate (detach_and_mix, "
            f"{fd['num_probes']} Rademacher probes, one batched backward pass). The block "
            "traces are sums of the diagonal; the estimate's error bar is the standard "
            "error over its probes. 'within 2 SE' is the fraction of diagonal entries "
            "whose exact value lies within two standard errors of the estimate.",
        ),
        (
            "table",
            (
                [
                    "block",
                    "size",
                    "tr F_LR",
                    "tr F (exact)",
                    "tr F_DG",
                    "detach-and-mix",
                    "rel. error",
                    "within 2 SE",
                    "bounds hold",
                ],
                [
                    [
                        r["block"],
                        fmt(r["size"]),
                        fmt(r["lower_trace"]),
                        fmt(r["exact_trace"]),
                        fmt(r["upper_trace"]),
                        pm(r["estimate_trace"], r["estimate_trace_std_error"]),
                        fmt(r["relative_error"], 3),
                        percent(r["coverage_2se"]),
                        fmt(r["bounds_hold"]),
                    ]
                    for r in fd["blocks"]
                ],
            ),
        ),
        (
            "p",
            f"Bounds hold entrywise: {fmt(fd['bounds_hold'])} (largest relative violation "
            f"{fmt(fd['max_relative_violation'], 3)}, rounding allowed). Median relative "
            f"standard error of an entry: {fmt(fd['median_relative_std_error'], 3)}.",
        ),
        ("figure", fig["fisher_diagonal.png"]),
    ]
    return ("Fisher diagonal per layer", body)


def estimators_section(numbers: dict[str, Any], fig: Figures) -> Section:
    """The estimators compared: error against cost."""
    es = numbers["estimators"]
    est_rows = []
    for r in es["rows"]:
        if r["call"] == "fisher_bounds":
            err = f"{fmt(r['lower_relative_error'], 3)} / {fmt(r['upper_relative_error'], 3)}"
        else:
            err = fmt(r["relative_error"], 3)
        est_rows.append(
            [
                r["estimator"],
                f"`{r['call']}`",
                fmt(r["num_probes"]),
                f"{1e3 * r['seconds']:.3g}",
                fmt(r["cost_gradient_steps"], 3),
                err,
                fmt(r["trace_relative_error"], 3),
                percent(r["coverage_2se"]),
            ]
        )
    return (
        "Estimators compared",
        [
            (
                "p",
                "All on the same N inputs. Cost is wall-clock time in units of one "
                f"gradient step ({es['gradient_step']}), measured in this run: "
                f"{1e3 * es['gradient_step_seconds']:.3g} ms; {es['timing']}. Error is "
                "‖diag F̂ − diag F‖ / ‖diag F‖ against the exact diagonal (lower / upper "
                "for the bounds). The empirical Fisher uses the observed labels: it is "
                "biased, and its zero standard error says nothing about that bias.",
            ),
            (
                "table",
                (
                    [
                        "estimator",
                        "call",
                        "probes",
                        "time (ms)",
                        "cost (gradient steps)",
                        "rel. error",
                        "trace rel. error",
                        "within 2 SE",
                    ],
                    est_rows,
                ),
            ),
            ("figure", fig["estimators.png"]),
        ],
    )


def core_space_section(numbers: dict[str, Any], fig: Figures) -> Section:
    """The output-space metric at every input."""
    cs = numbers["core_space"]
    stat_rows = [
        [label, fmt(cs[key]["min"]), fmt(cs[key]["median"]), fmt(cs[key]["max"])]
        for label, key in (
            ("λ_max", "lambda_max"),
            ("lower bound of λ_max", "lambda_max_lower_bound"),
            ("upper bound of λ_max", "lambda_max_upper_bound"),
            ("lower bound / λ_max", "lower_bound_ratio"),
            ("upper bound / λ_max", "upper_bound_ratio"),
            ("trace Σ λ_i", "trace"),
            ("effective rank (Σλ)² / Σλ²", "effective_rank"),
            ("pseudo-determinant", "pseudo_determinant"),
            ("log pseudo-determinant", "log_pseudo_determinant"),
            ("eigenvalues above 1e-6", "num_eigenvalues_above_1e-6"),
        )
    ]
    return (
        "Core space",
        [
            (
                "p",
                f"The {cs['num_outputs']} × {cs['num_outputs']} metric I(z) of the output "
                f"family at each of the {cs['num_inputs']} inputs, never formed: its "
                "exact spectrum (eigvalsh, secular equation), the deterministic bounds "
                "of its largest eigenvalue (lambda_max_bounds) and its pseudo-"
                "determinant. The bounds bracket λ_max at "
                f"{percent(cs['lambda_max_bounds_hold'])} of the inputs.",
            ),
            ("table", (["statistic over inputs", "min", "median", "max"], stat_rows)),
            ("figure", fig["core_space.png"]),
        ],
    )


def spectrum_section(numbers: dict[str, Any], fig: Figures) -> Section:
    """The top of the Fisher spectrum beside the bound operators'."""
    sp = numbers["spectrum"]
    top_rows = [
        [
            str(i + 1),
            fmt(sp["lower"]["eigenvalues"][i]),
            fmt(sp["exact"]["eigenvalues"][i]),
            fmt(sp["upper"]["eigenvalues"][i]),
            fmt(sp["exact"]["residuals"][i], 2),
        ]
        for i in range(sp["k"])
    ]
    return (
        "Top of the Fisher spectrum",
        [
            (
                "p",
                f"The {sp['k']} largest eigenvalues of F by Lanczos on the matrix-free "
                "operator (top_eigenpairs), beside those of the bound operators F_LR and "
                "F_DG, which bracket them by Löwner order: "
                f"{fmt(sp['brackets_hold'])}. tr F = {fmt(sp['trace'])}; the top "
                f"{sp['k']} carry {percent(sp['top_fraction_of_trace'])} of it.",
            ),
            (
                "table",
                (["i", "λ_i(F_LR)", "λ_i(F)", "λ_i(F_DG)", "residual ‖F y − λ y‖"], top_rows),
            ),
            ("figure", fig["fisher_spectrum.png"]),
        ],
    )


def dimension_section(numbers: dict[str, Any], _fig: Figures) -> Section:
    """The local dimension and the razor complexity."""
    dim = numbers["dimension"]
    rb, rz = dim["rank_bound"], dim["razor"]
    return (
        "Local dimension and razor",
        [
            (
                "p",
                "The local dimension d_ε = #{i : λ_i(F) > ε} (local_dimension: an exact "
                "Lanczos count when few eigenvalues exceed ε, stochastic Lanczos "
                "quadrature with a standard error otherwise), beside the structural "
                f"bound rank F ≤ min(D, N r) = min({rb['num_params']}, {rb['num_inputs']}"
                f" × {rb['rank_per_input']}) = {rb['value']}.",
            ),
            (
                "table",
                (
                    ["ε", "d_ε", "method"],
                    [
                        [fmt(c["eps"]), pm(c["value"], c["std_error"] or None), c["method"]]
                        for c in dim["local_dimension"]
                    ],
                ),
            ),
            (
                "p",
                f"The razor complexity with a Gaussian prior of variance σ² = "
                f"{fmt(rz['prior_variance'])} (razor): −log p(X|θ̂) + ‖θ̂‖²/(2σ²) + "
                "½ log det(I + σ² F), against the BIC term (D/2) log N.",
            ),
            (
                "table",
                (
                    ["term", "nats"],
                    [
                        ["−log p(X | θ̂)", fmt(rz["neg_log_likelihood"])],
                        ["‖θ̂‖² / (2σ²)", fmt(rz["prior_penalty"])],
                        [
                            "½ log det(I + σ² F)",
                            pm(rz["half_log_det"], rz["half_log_det_std_error"] or None),
                        ],
                        ["razor", pm(rz["value"], rz["std_error"] or None)],
                        ["BIC term (D/2) log N", fmt(rz["bic_penalty"])],
                        ["log-det method", rz["method"]],
                    ],
                ),
            ),
        ],
    )


def plane_row(name: str, plane: dict[str, Any]) -> list[str]:
    """One plotted plane of the landscape: its curvatures and its loss range."""
    c, s = plane["curvature"], plane["surface"]
    return [
        name,
        f"{fmt(c['principal'][0])}, {fmt(c['principal'][1])}",
        fmt(c["gaussian"]),
        fmt(c["mean"]),
        fmt(s["loss_at_theta"]),
        f"{fmt(s['min'])} … {fmt(s['max'])}",
    ]


def landscape_section(numbers: dict[str, Any], fig: Figures) -> Section:
    """The loss landscape: Hessian directions, curvature, trace."""
    ls = numbers["landscape"]
    hess = ls["hessian"]
    rp, hp = ls["random_plane"], ls["hessian_plane"]
    tr = ls["trace"]
    return (
        "Loss landscape",
        [
            (
                "p",
                f"The mean loss over {ls['num_inputs']} inputs near θ. Hessian "
                "directions (hessian_directions, Lanczos on Hessian-vector products): "
                f"λ_max = {fmt(hess['eigenvalues'][0])}, λ_min = "
                f"{fmt(hess['eigenvalues'][1])} (residuals "
                f"{fmt(hess['residuals'][0], 2)}, {fmt(hess['residuals'][1], 2)}). "
                "Projected on them the Hessian is diag(λ_max, λ_min): a negative λ_min "
                "shows as a saddle there, which random directions (filter-normalised, "
                "random_directions) usually hide. Curvatures of each plotted plane at θ "
                "(projected_curvature):",
            ),
            (
                "table",
                (
                    [
                        "plane",
                        "principal curvatures",
                        "Gaussian",
                        "mean",
                        "loss at θ",
                        "loss range on the grid",
                    ],
                    [plane_row("random", rp), plane_row("Hessian", hp)],
                ),
            ),
            (
                "p",
                f"Hessian trace from {tr['num_probes']} Rademacher probes (loss_trace): "
                "from loss values only "
                f"{pm(tr['loss_only']['value'], tr['loss_only']['std_error'])}; with "
                "Hessian-vector products on the same probes "
                f"{pm(tr['hvp']['value'], tr['hvp']['std_error'])}.",
            ),
            ("figure", fig["landscape.png"]),
        ],
    )


def timing_section(numbers: dict[str, Any], _fig: Figures) -> Section:
    """The seconds of each step and the library's warnings."""
    tail: list[Block] = [
        (
            "table",
            (
                ["step", "seconds"],
                [[k, f"{v:.3f}"] for k, v in numbers["timing"]["stages_seconds"].items()],
            ),
        )
    ]
    if numbers["warnings"]:
        tail.append(("p", "Warnings: " + " | ".join(numbers["warnings"])))
    return ("Timing and warnings", tail)


#: The report's sections, in order.
SECTIONS: tuple[Callable[[dict[str, Any], Figures], Section], ...] = (
    overview_section,
    diagonal_section,
    estimators_section,
    core_space_section,
    spectrum_section,
    dimension_section,
    landscape_section,
    timing_section,
)


def build_sections(numbers: dict[str, Any], figures: list[dict[str, str]]) -> list[Section]:
    """Every section of the report, from report.json's numbers and the figures made."""
    fig = {f["file"]: f for f in figures}
    return [build(numbers, fig) for build in SECTIONS]
