"""The report's sections: the analysis' numbers as titled lists of blocks.

A block is ``("p", text)``, ``("meaning", text)`` (the plain-words "What this
means" paragraph that closes a section, for a reader who has not read the papers),
``("table", (header, rows))`` or ``("figure", entry)``; ``render`` writes the
same sections as Markdown and as HTML. One function per section, in the order of
the report (``SECTIONS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Block = tuple[str, Any]  # ("p" | "meaning", text) | ("table", (header, rows)) | ("figure", entry)
Section = tuple[str, list[Block]]
Figures = dict[str, dict[str, Any]]  # file name → {"file", "title", "caption", "width", ...}


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


def family_text(an: dict[str, Any]) -> str:
    """The family's name, with σ² for the Gaussian one."""
    if "variance" in an:
        return f"{an['family']} (regression, σ² = {fmt(an['variance'])})"
    return str(an["family"])


def fit_row(an: dict[str, Any]) -> list[str]:
    """The overview's row on how well the model fits the analysed labels."""
    where = "on the counted positions" if "positions" in an else "on them"
    if "rmse" in an:
        return [f"root mean squared error {where}", fmt(an["rmse"])]
    return [f"accuracy {where}", percent(an["accuracy"])]


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
        ["family", family_text(an)],
        ["dtype", an["dtype"]],
        ["data", data.get("description", "n/a")],
        ["analysed inputs N", fmt(an["num_inputs"])],
        *position_rows(an),
        fit_row(an),
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
    blocks.append(
        (
            "meaning",
            "The Fisher information F says how much the model's predicted probabilities "
            "change when its weights move: large along directions the data pins down, near "
            "0 along directions the predictions ignore. Each section below ends with a "
            "paragraph like this one: what its numbers tell you about the trained model, "
            "and when to worry. 'exact' numbers are computed to rounding; the others are "
            "random estimates with a 95% interval [low, high].",
        )
    )
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
                    "exactly 0",
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
                        fmt(r.get("zero_entries")),
                    ]
                    for r in fd["blocks"]
                ],
            ),
        ),
        (
            "p",
            f"Bounds hold entrywise: {fmt(fd['bounds_hold'])} (largest relative violation "
            f"{fmt(fd['max_relative_violation'], 3)}, rounding allowed). Median relative "
            f"standard error of an entry: {fmt(fd['median_relative_std_error'], 3)}."
            + zero_text(fd),
        ),
        ("figure", fig["fisher_diagonal.png"]),
        ("meaning", diagonal_meaning(fd)),
    ]
    return ("Fisher diagonal per layer", body)


def zero_text(fd: dict[str, Any]) -> str:
    """The sentence on the entries of diag F that are exactly 0 (empty without the count)."""
    zero = fd.get("zero_entries")
    if zero is None:
        return ""
    if zero["count"] == 0:
        return " No entry of diag F is exactly 0."
    blocks = ", ".join(
        f"{r['block']} {r['zero_entries']} of {r['size']}"
        for r in fd["blocks"]
        if r["block"] != "total" and r.get("zero_entries")
    )
    return (
        f" {zero['count']} of the D = {zero['of']} entries of diag F "
        f"({percent(zero['fraction'])}) are exactly 0 ({blocks}): these parameters move "
        "no output on any analysed input. The figure shows them apart, in the 'exactly 0' "
        "strip, not at a floor value."
    )


def diagonal_meaning(fd: dict[str, Any]) -> str:
    """Plain words on the Fisher diagonal: what F_ii tells, when to worry."""
    zero = fd.get("zero_entries") or {"count": 0, "fraction": 0.0}
    text = (
        "F_ii says how strongly the model's predictions on these inputs react to parameter "
        "i: a large value marks a parameter the predictions depend on, a tiny one a "
        "parameter they barely notice (a candidate for pruning, and one that a Fisher-"
        "weighted method such as EWC or a natural-gradient optimiser will hardly protect). "
        "The block traces compare layers. The bounds are guaranteed by the math: 'bounds "
        "hold' must say yes. The detach-and-mix estimate is what you would use when the "
        "exact diagonal is too expensive; its relative error shows how good a few probes "
        "are."
    )
    if zero["count"]:
        text += (
            f" Here {percent(zero['fraction'])} of the parameters have F_ii = 0 exactly: "
            "they change nothing on these inputs, e.g. weights from input features that "
            "are always 0 (the empty border pixels of an image) or weights of units that "
            "never activate (dead ReLUs). A few are harmless; worry when a large share of "
            "one layer is 0 (the 'exactly 0' column): those units are dead, their "
            "capacity is wasted and gradient descent cannot revive them (a smaller "
            "learning rate, another initialisation or a leaky activation helps)."
        )
    return text


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
            (
                "meaning",
                "Which way of getting diag F to use, and what it costs: a cost of k gradient "
                "steps means it takes as long as k training steps on these inputs. Pick the "
                "cheapest row whose error you can live with (the last column names it for "
                "1%, 10% and 30%); a diagonal for pruning or EWC rarely needs better than "
                "10%. 'within 95% interval' should be near 95%; far below it, the error "
                "bars are too optimistic. The empirical Fisher (observed labels) is cheap "
                "but biased, and its error does not shrink with more data or probes: "
                "prefer detach-and-mix or Monte Carlo.",
            ),
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
            ("meaning", core_space_meaning(numbers["analysed"]["family"], cs)),
        ],
    )


def core_space_meaning(family: str, cs: dict[str, Any]) -> str:
    """Plain words on the output-space metric I(z), by family."""
    median = fmt(cs["lambda_max"]["median"])
    if "Categorical" in family or "Bernoulli" in family:
        spread = (
            "one class gets a probability near 1"
            if "Categorical" in family
            else "every output's probability is near 0 or 1"
        )
        return (
            "I(z) measures how unsure the model is at one input: it is near 0 when "
            f"{spread}, and largest when the model hesitates. An input with a tiny λ_max "
            "adds almost nothing to F, so F is made by the inputs the model is unsure "
            f"about. Median λ_max here: {median}. When almost every input has a tiny λ_max "
            "the model is very confident on these inputs (on training data, a sign of "
            "overfitting), and F and everything built on it rest on a few inputs."
        )
    return (
        "I(z) weighs the model's outputs at one input. For a Gaussian output (regression) "
        "it is the same at every input, 1/σ² on each output (median λ_max here: "
        f"{median}): every input counts alike, and F scales with 1/σ², so the Fisher "
        "numbers below are only as meaningful as the noise variance you chose."
    )


def density_note(sp: dict[str, Any]) -> str:
    """The density's support (reflected at 0), or why it did not run."""
    density = sp.get("density", {})
    if "not_run" in density:
        return f" The spectral density did not run: {density['not_run']}"
    below = density.get("mass_below_zero_unreflected")
    if below is None:
        return ""
    return (
        " The smoothed spectral density (right of the figure) is drawn on [0, ∞): F is "
        "positive semi-definite, so every smoothing Gaussian is reflected at 0 "
        f"(smoothed_density(..., lower=0.0), width {fmt(density['width'], 3)}); without "
        f"the reflection {percent(below)} of its mass would sit at negative eigenvalues, "
        "an artefact of the smoothing."
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
                f"{sp['k']} carry {percent(sp['top_fraction_of_trace'])} of it." + density_note(sp),
            ),
            (
                "table",
                (["i", "λ_i(F_LR)", "λ_i(F)", "λ_i(F_DG)", "residual ‖F y − λ y‖"], top_rows),
            ),
            ("figure", fig["fisher_spectrum.png"]),
            (
                "meaning",
                "Each eigenvalue of F is how strongly the predictions react to a step along "
                "one direction in weight space. A few large eigenvalues (stiff directions) "
                "and very many near 0 (sloppy directions, along which the weights can move "
                "without changing the predictions) is the usual picture for a neural "
                f"network; here the top {sp['k']} carry "
                f"{percent(sp['top_fraction_of_trace'])} of the total. The density's peak "
                "near 0 is the sloppy part: the larger it is, the fewer directions the data "
                "actually pins down. Worry if the F_LR and F_DG columns do not bracket "
                "λ_i(F), or if the residuals are not small compared with λ_i (Lanczos did "
                "not converge: raise --lanczos-steps).",
            ),
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
            ("meaning", dimension_meaning(dim)),
        ],
    )


def dimension_meaning(dim: dict[str, Any]) -> str:
    """Plain words on the local dimension and the razor."""
    rb, counts = dim["rank_bound"], dim["local_dimension"]
    middle = counts[len(counts) // 2]
    return (
        "d_ε counts the directions in weight space that the data pins down more tightly "
        "than the prior does (eigenvalues of F above ε): the number of parameters the "
        f"model effectively uses. Here d_ε = {fmt(middle['value'])} at ε = "
        f"{fmt(middle['eps'])} out of D = {rb['num_params']} parameters: the model behaves "
        "like a much smaller one when d_ε ≪ D, which is why parameter counts overstate the "
        "complexity of neural networks. The razor is a complexity-penalised fit (in nats, "
        "lower is better when comparing models on the same data); BIC charges (D/2) log N "
        "for all D parameters, the razor only for the directions the data determines, so "
        "a razor far below the BIC term says BIC would over-penalise this model. Both "
        "depend on σ² (--prior-variance)."
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
    """One plotted plane: its projected Hessian's eigenvalues, slope, graph curvatures, loss."""
    c, s = plane["curvature"], plane["surface"]
    eig = hessian_eigenvalues(c)
    return [
        name,
        f"{fmt(eig[0])}, {fmt(eig[1])}",
        fmt(slope_norm(c), 3),
        f"{fmt(c['principal'][0])}, {fmt(c['principal'][1])}",
        fmt(c["gaussian"]),
        fmt(c["mean"]),
        fmt(s["loss_at_theta"]),
        f"{fmt(s['min'])} … {fmt(s['max'])}",
    ]


def hessian_eigenvalues(c: dict[str, Any]) -> list[float]:
    """The eigenvalues of a plane's 2 × 2 projected Hessian, largest first."""
    if "hessian_eigenvalues" in c:
        return list(c["hessian_eigenvalues"])
    (a, b), (_, d) = c["projected_hessian"]
    centre, radius = 0.5 * (a + d), math.hypot(0.5 * (a - d), b)
    return [centre + radius, centre - radius]


def slope_norm(c: dict[str, Any]) -> float:
    """|g|, the norm of the plane's slope (f_α, f_β) at θ."""
    return float(c.get("slope_norm", math.hypot(*c["gradient"])))


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
    hp_eig = hessian_eigenvalues(hp["curvature"])
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
                "Projected on them the Hessian is diag(λ_max, λ_min): the eigenvalues of "
                "the 2 × 2 projected Hessian H_αβ of the Hessian plane are "
                f"{fmt(hp_eig[0])} and {fmt(hp_eig[1])} (column 'Hessian eigenvalues'). "
                "A negative λ_min shows as a saddle there, which random directions "
                "(filter-normalised, random_directions) usually hide. Curvatures of each "
                "plotted plane at θ (projected_curvature): the eigenvalues of H_αβ, the "
                "second derivatives of the loss along the plane's principal axes; and the "
                "principal, Gaussian and mean curvatures of the plotted graph z = f(α, β), "
                "which equal the Hessian's only where the slope g = (f_α, f_β) is 0. θ is "
                "not exactly a critical point of this mean loss: with |g| = "
                f"{fmt(slope_norm(hp['curvature']), 3)} on the Hessian plane the graph's "
                "principal curvatures are the Hessian's divided by about (1 + |g|²)^(3/2) "
                f"({fmt(hp['curvature']['principal'][0])} beside λ_max = "
                f"{fmt(hess['eigenvalues'][0])}).",
            ),
            (
                "table",
                (
                    [
                        "plane",
                        "Hessian eigenvalues (of H_αβ)",
                        "slope |g|",
                        "graph principal curvatures",
                        "graph Gaussian",
                        "graph mean",
                        "loss at θ",
                        "loss range on the grid",
                    ],
                    [plane_row("random", rp), plane_row("Hessian", hp)],
                ),
            ),
            ("p", trace_text(tr)),
            ("figure", fig["landscape.png"]),
            ("meaning", landscape_meaning(hess["eigenvalues"])),
        ],
    )


def landscape_meaning(eigenvalues: list[float]) -> str:
    """Plain words on the curvature of the loss: sharpness, saddles, step sizes."""
    lam_max, lam_min = eigenvalues[0], eigenvalues[1]
    text = (
        "The curvature says how sharp the minimum is. λ_max is the sharpest direction: "
        "plain gradient descent with a learning rate above 2/λ_max "
        f"(= {fmt(2.0 / lam_max, 3) if lam_max and lam_max > 0 else 'n/a'} here) "
        "oscillates or diverges along it, and a sharp minimum (large λ_max, large trace) "
        "is often linked with worse generalisation than a flat one. The trace sums the "
        "curvature over all directions. A negative λ_min means θ is not a minimum: the loss "
        "still goes down along that direction (a saddle, or training not finished)."
    )
    if lam_min is not None and lam_max and lam_min < 0:
        text += (
            f" Here |λ_min| / λ_max = {fmt(abs(lam_min) / lam_max, 2)}: a ratio of a few "
            "percent or less is the usual slightly non-convex valley of a trained network; "
            "worry when it approaches 1."
        )
    return text


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
    tail.append(
        (
            "meaning",
            "Where the run spent its time, to choose what to skip (--skip) or shrink "
            "(--num-probes, --slq-probes, --grid) on a larger model. A warning means a "
            "number above did not reach what was asked (a target error, a Lanczos budget): "
            "read that number with its interval in mind."
            if numbers["warnings"]
            else "Where the run spent its time, to choose what to skip (--skip) or shrink "
            "(--num-probes, --slq-probes, --grid) on a larger model. No warning: every "
            "estimate reached what was asked of it.",
        )
    )
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
