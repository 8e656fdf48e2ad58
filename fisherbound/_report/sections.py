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


def bound(x: Any) -> str:
    """An end of an interval: ``fmt``, with ±∞ for an unbounded end."""
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return fmt(x)


def ci(value: Any, se: Any, interval: Any) -> str:
    """``value [low, high]``: the estimate and its 95% interval (``value ± se`` without one).

    A zero standard error (an exact result) shows the value alone.
    """
    if interval is None or not se:
        return pm(value, se or None)
    low, high = interval
    return f"{fmt(value)} [{bound(low)}, {bound(high)}]"


def percent(x: Any) -> str:
    """A fraction as a percentage with one decimal (``n/a`` for None)."""
    return "n/a" if x is None else f"{100.0 * x:.1f}%"


def shape_text(shape: list[int]) -> str:
    """The logits' shape with its letters: ``(N, T, C) = (6, 8, 5)``."""
    if len(shape) == 3:
        letters = ["N", "T", "C"]
    else:
        letters = ["N", *(f"S{i + 1}" for i in range(len(shape) - 2)), "C"]
    return f"({', '.join(letters)}) = ({', '.join(str(s) for s in shape)})"


def masked_text(pos: dict[str, Any]) -> str:
    """How many positions are masked, and by what: the mask, the ignore index."""
    parts = []
    if pos["masked_by_mask"]:
        parts.append(f"{pos['masked_by_mask']} by the mask")
    if pos["ignored_labels"]:
        parts.append(
            f"{pos['ignored_labels']} labelled with the ignore index {pos['ignore_index']}"
        )
    detail = f": {', '.join(parts)}" if parts else ""
    return f"{pos['masked']} masked{detail}"


def position_rows(an: dict[str, Any]) -> list[list[str]]:
    """The overview's rows on the position axes (none for (N, C) logits)."""
    pos = an.get("positions")
    if pos is None:
        return []
    return [
        ["logits", shape_text(an["output_shape"])],
        ["positions per input P", fmt(pos["per_example"])],
        [
            "counted positions K",
            f"{pos['counted']} of N P = {pos['total']} ({masked_text(pos)})",
        ],
    ]


def convention_text(an: dict[str, Any]) -> str:
    """The overview's paragraph on the sums and means of the report."""
    pos = an.get("positions")
    if pos is None:
        return (
            "Every Fisher quantity below is the SUM over the N analysed inputs (the papers' "
            "convention); the loss landscape uses the MEAN loss. All numbers are in "
            "report.json."
        )
    loss = "the MEAN loss over the K counted positions"
    if an["family"] == "Categorical":
        loss += " (as torch.nn.CrossEntropyLoss(reduction='mean', ignore_index=...) does)"
    return (
        f"The logits have position axes: each of the N = {an['num_inputs']} inputs has P = "
        f"{pos['per_example']} positions; K = {pos['counted']} of the N P = {pos['total']} "
        f"positions count ({masked_text(pos)}), and a masked position counts nowhere below. "
        "Per-token convention: every Fisher quantity is the SUM over the inputs and over "
        "their counted positions, F = Σ_x Σ_t J_xtᵀ I(z_xt) J_xt (reduction 'mean' would "
        f"divide F by N = {an['num_inputs']}, the inputs, not by the positions); the loss "
        f"landscape uses {loss}. All numbers are in report.json."
    )


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
        *position_rows(an),
        [
            "accuracy on the counted positions" if "positions" in an else "accuracy on them",
            percent(an["accuracy"]),
        ],
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
    blocks.append(("p", convention_text(an)))
    return ("Overview", blocks)


def metric_text(numbers: dict[str, Any]) -> str:
    """F as a sum over the inputs (and over their counted positions)."""
    if "positions" in numbers["analysed"]:
        return "F = Σ_x Σ_t J_xtᵀ I(z_xt) J_xt (inputs x, their counted positions t)"
    return "F = Σ_x J_xᵀ I(z_x) J_x"


def diagonal_section(numbers: dict[str, Any], fig: Figures) -> Section:
    """The Fisher diagonal per block: exact, bounds, detach-and-mix."""
    fd = numbers["fisher_diagonal"]
    body: list[Block] = [
        (
            "p",
            f"The diagonal of the Fisher metric {metric_text(numbers)} per parameter block: "
            "exact (fisher_diagonal), its certified bounds diag F_LR ≤ diag F ≤ diag F_DG "
            "(fisher_bounds) and the unbiased detach-and-mix estimate (detach_and_mix, "
            f"{fd['num_probes']} Rademacher probes, one batched backward pass). The block "
            "traces are sums of the diagonal; [low, high] after an estimate is its 95% "
            "confidence interval over the probes (Estimate.interval: Student t with the "
            "degrees of freedom of the probes' variance, on the cube-root scale for these "
            "sums of squares). 'within 95% interval' is the fraction of diagonal entries "
            "(with a nonzero standard error) whose exact value lies in their interval: "
            "about 95% when the intervals are honest.",
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
                    "within 95% interval",
                    "bounds hold",
                ],
                [
                    [
                        r["block"],
                        fmt(r["size"]),
                        fmt(r["lower_trace"]),
                        fmt(r["exact_trace"]),
                        fmt(r["upper_trace"]),
                        ci(
                            r["estimate_trace"],
                            r["estimate_trace_std_error"],
                            r.get("estimate_trace_interval"),
                        ),
                        fmt(r["relative_error"], 3),
                        percent(r["coverage_95"]),
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
    marks = cheapest_marks(es)
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
                percent(r["coverage_95"]),
                marks.get(r["estimator"], ""),
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
                "biased, and its zero standard error says nothing about that bias. "
                "'cheapest to rel. error' marks, for each error level, the cheapest "
                "unbiased diagonal (the bounds and the empirical Fisher excluded) whose "
                "measured error is within it: " + cheapest_text(es) + " 'within 95% "
                "interval': the fraction of entries whose exact value lies in the "
                "estimate's 95% confidence interval (Estimate.interval).",
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
                        "within 95% interval",
                        "cheapest to rel. error",
                    ],
                    est_rows,
                ),
            ),
            ("figure", fig["estimators.png"]),
        ],
    )


def cheapest_marks(es: dict[str, Any]) -> dict[str, str]:
    """Estimator name → the error levels (``es["cheapest"]``) it is the cheapest way to."""
    marks: dict[str, list[str]] = {}
    for entry in es.get("cheapest", []):
        if entry["estimator"] is not None:
            marks.setdefault(entry["estimator"], []).append(f"≤ {percent(entry['level'])}")
    return {name: ", ".join(levels) for name, levels in marks.items()}


def cheapest_text(es: dict[str, Any]) -> str:
    """One clause per error level: the cheapest estimator and its cost."""
    parts = []
    for entry in es.get("cheapest", []):
        level = percent(entry["level"])
        if entry["estimator"] is None:
            parts.append(f"none of them reached {level}")
        else:
            cost = fmt(entry["cost_gradient_steps"], 3)
            parts.append(f"to {level}, {entry['estimator']} ({cost} gradient steps)")
    return "; ".join(parts) + "." if parts else "n/a."


def rows_text(numbers: dict[str, Any]) -> str:
    """What the core space runs over: the inputs, or the counted positions."""
    return "counted positions" if "positions" in numbers["analysed"] else "inputs"


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
                f"family at each of the {cs['num_inputs']} {rows_text(numbers)}, never "
                "formed: its "
                "exact spectrum (eigvalsh, secular equation), the deterministic bounds "
                "of its largest eigenvalue (lambda_max_bounds) and its pseudo-"
                "determinant. The bounds bracket λ_max at "
                f"{percent(cs['lambda_max_bounds_hold'])} of the {rows_text(numbers)}.",
            ),
            (
                "table",
                ([f"statistic over {rows_text(numbers)}", "min", "median", "max"], stat_rows),
            ),
            ("figure", fig["core_space.png"]),
        ],
    )


def density_note(sp: dict[str, Any]) -> str:
    """A sentence when the spectral density did not run (empty otherwise)."""
    density = sp.get("density", {})
    if "not_run" not in density:
        return ""
    return f" The spectral density did not run: {density['not_run']}"


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
                f"{sp['k']} carry {percent(sp['top_fraction_of_trace'])} of it." + density_note(sp),
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
    if "counted_positions" in rb:
        rank_text = (
            f"rank F ≤ min(D, K r) = min({rb['num_params']}, {rb['counted_positions']} × "
            f"{rb['rank_per_input']}) = {rb['value']}, K the counted positions"
        )
    else:
        rank_text = (
            f"rank F ≤ min(D, N r) = min({rb['num_params']}, {rb['num_inputs']}"
            f" × {rb['rank_per_input']}) = {rb['value']}"
        )
    return (
        "Local dimension and razor",
        [
            (
                "p",
                "The local dimension d_ε = #{i : λ_i(F) > ε} (local_dimension: an exact "
                "Lanczos count when few eigenvalues exceed ε, stochastic Lanczos "
                "quadrature with its 95% interval [low, high] otherwise), beside the "
                f"structural bound {rank_text}.",
            ),
            (
                "table",
                (
                    ["ε", "d_ε", "method"],
                    [
                        [
                            fmt(c["eps"]),
                            ci(c["value"], c["std_error"], c.get("interval")),
                            c["method"],
                        ]
                        for c in dim["local_dimension"]
                    ],
                ),
            ),
            *razor_blocks(rz, rb["num_params"], rb.get("counted_positions")),
        ],
    )


def razor_blocks(rz: dict[str, Any], d: int, counted: int | None) -> list[Block]:
    """The razor's paragraph and table, or why it did not run.

    ``counted``: the counted positions (the BIC term's n) of a model with
    position axes, None without them.
    """
    if "not_run" in rz:
        return [("p", f"The razor complexity (razor) did not run: {rz['not_run']}")]
    term, bic = "(D/2) log N", "(D/2) log N"
    if counted is not None and d > 0 and rz["bic_penalty"] is not None:
        term, bic = "(D/2) log n", f"(D/2) log n, n = {counted} observations"
    return [
        (
            "p",
            f"The razor complexity with a Gaussian prior of variance σ² = "
            f"{fmt(rz['prior_variance'])} (razor): −log p(X|θ̂) + ‖θ̂‖²/(2σ²) + "
            f"½ log det(I + σ² F), against the BIC term {bic}; [low, high]: the 95% "
            "interval of a stochastic log det.",
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
                        ci(
                            rz["half_log_det"],
                            rz["half_log_det_std_error"],
                            rz.get("half_log_det_interval"),
                        ),
                    ],
                    ["razor", ci(rz["value"], rz["std_error"], rz.get("interval"))],
                    [f"BIC term {term}", fmt(rz["bic_penalty"])],
                    ["log-det method", rz["method"]],
                ],
            ),
        ),
    ]


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


def terms_text(numbers: dict[str, Any]) -> str:
    """The terms of the landscape's mean loss: inputs, or counted positions."""
    ls = numbers["landscape"]
    if "positions" in numbers["analysed"]:
        return f"the {ls['num_counted']} counted positions of {ls['num_inputs']} inputs"
    return f"{ls['num_inputs']} inputs"


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
                f"The mean loss over {terms_text(numbers)} near θ. Hessian "
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
            ("p", trace_text(tr)),
            ("figure", fig["landscape.png"]),
        ],
    )


def estimate_text(est: dict[str, Any]) -> str:
    """``value ± se (95% interval low … high)`` of a scalar estimate's numbers."""
    text = pm(est["value"], est["std_error"])
    interval = est.get("interval")
    if interval is None:
        return text
    return f"{text} (95% interval {bound(interval[0])} … {bound(interval[1])})"


def trace_text(tr: dict[str, Any]) -> str:
    """The Hessian traces: HVP first; the loss-only one only with its caveats."""
    text = (
        f"Hessian trace from {tr['num_probes']} Rademacher probes with Hessian-vector "
        f"products (loss_trace): {estimate_text(tr['hvp'])}."
    )
    lo = tr.get("loss_only")
    if lo is None:
        return text
    caveats = " ".join(lo["caveats"])
    return (
        f"{text} From loss values only on the same probes (loss_trace(method='loss')): "
        f"{estimate_text(lo)}. Caveat: {caveats}"
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


#: The sections that a refused stage may leave out: builder → (its numbers, its title).
SKIPPABLE: dict[Callable[[dict[str, Any], Figures], Section], tuple[str, str]] = {
    diagonal_section: ("fisher_diagonal", "Fisher diagonal per layer"),
    estimators_section: ("estimators", "Estimators compared"),
    core_space_section: ("core_space", "Core space"),
    spectrum_section: ("spectrum", "Top of the Fisher spectrum"),
    dimension_section: ("dimension", "Local dimension and razor"),
    landscape_section: ("landscape", "Loss landscape"),
}


def build_sections(numbers: dict[str, Any], figures: list[dict[str, str]]) -> list[Section]:
    """Every section of the report, from report.json's numbers and the figures made.

    A section whose stage did not run (``{"not_run": reason}``) says so, with the
    reason, in place of its numbers.
    """
    fig = {f["file"]: f for f in figures}
    out = []
    for build in SECTIONS:
        key, title = SKIPPABLE.get(build, ("", ""))
        reason = numbers.get(key, {}).get("not_run") if key else None
        if reason is not None and "skipped" in numbers[key]:
            out.append((title, [("p", f"Not run: {reason}.")]))
        elif reason is not None:
            out.append((title, [("p", f"Not run for this model: {reason}")]))
        else:
            out.append(build(numbers, fig))
    return out
