r"""
Fisher-weighted merging, with exact and estimated Fishers
=========================================================

Two models fine-tuned from one base on different input domains, merged entry by
entry with their Fisher diagonals (Matena and Raffel, 2022),

.. math::

   \theta_i = \frac{\sum_k F_{k,i}\, \theta_{k,i}}{\sum_k F_{k,i}},

against the plain average; and the same merge from detach-and-mix estimates of
the diagonals, at one backward pass per probe, for a few numbers of probes. The
recipe on :doc:`/recipes` compares the exact merge with BackPACK's.
"""

# %%
# Two fine-tuned models
# ---------------------
# The data and the models of the recipe: a base trained briefly on both domains,
# then fine-tuned on each.

import copy

import matplotlib.pyplot as plt
import torch
from torch import nn

from fisherbound.adapters.torch import linearize
from fisherbound.estimators import detach_and_mix
from fisherbound.fisher import fisher_diagonal

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
w_true = torch.randn(6, 3)
x_a, x_b = torch.randn(256, 6) + 1.5, torch.randn(256, 6) - 1.5  # two input domains
y_a = (x_a @ w_true + 0.5 * torch.randn(256, 3)).argmax(1)
y_b = (x_b @ w_true + 0.5 * torch.randn(256, 3)).argmax(1)
cross_entropy = nn.functional.cross_entropy


def fine_tune(model, x, y, steps=300):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()
    return model


base = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
both_x = torch.cat([x_a[:16], x_b[:16]])
base = fine_tune(base, both_x, torch.cat([y_a[:16], y_b[:16]]), 100)
models = [fine_tune(copy.deepcopy(base), x, y) for x, y in ((x_a, y_a), (x_b, y_b))]
lins = [linearize(m, x) for m, x in zip(models, (x_a, x_b), strict=True)]


def merge(diagonals):
    """θ = Σ_k F_k θ_k / Σ_k F_k per entry, each F_k floored at 1e-6."""
    merged = copy.deepcopy(base)
    shaped = [lin.unravel(d) for lin, d in zip(lins, diagonals, strict=True)]
    params = [dict(m.named_parameters()) for m in models]
    with torch.no_grad():
        for n, p in merged.named_parameters():
            f = [fk[n].clamp_min(1e-6) for fk in shaped]
            p.copy_(
                sum(fk * pk[n] for fk, pk in zip(f, params, strict=True)) / sum(f)
            )
    return merged


def losses(model):
    with torch.no_grad():
        return float(cross_entropy(model(x_a), y_a)), float(
            cross_entropy(model(x_b), y_b)
        )


exact = merge([fisher_diagonal(lin, reduction="mean") for lin in lins])
average = merge([torch.ones(lins[0].num_params)] * 2)  # equal weights: the average
for name, m in (("average", average), ("Fisher merge", exact)):
    loss_a, loss_b = losses(m)
    print(f"{name:>12}: loss on A {loss_a:.4f}, on B {loss_b:.4f}")

# %%
# Merging with estimated Fishers
# ------------------------------
# The exact diagonal costs one backward pass per class and input; detach-and-mix
# one per probe: batch level, one backward pass of the whole batch per probe; per
# example (``per_example=True``), the per-example squares of the same probes (one
# batched backward pass on the torch fast path), whose variance is far smaller.
# The merge needs only the diagonals' relative sizes.

probes = [1, 2, 4, 8, 16, 32]
seeds = range(5)
spread = {}
for per_example in (False, True):
    rows = []
    for m in probes:
        runs = []
        for seed in seeds:
            est = [
                detach_and_mix(
                    lin,
                    num_probes=m,
                    per_example=per_example,
                    reduction="mean",
                    rng=seed,
                ).value
                for lin in lins
            ]
            runs.append(sum(losses(merge(est))))
        rows.append((min(runs), max(runs)))
    spread[per_example] = rows
    kind = "per example" if per_example else "batch level"
    print(f"{kind}: loss on A + B over 5 seeds, M = {probes}:")
    print("  " + ", ".join(f"{lo:.3f}-{hi:.3f}" for lo, hi in rows))

fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
for per_example, color in ((False, "tab:orange"), (True, "tab:green")):
    lo, hi = zip(*spread[per_example], strict=True)
    kind = "per example" if per_example else "batch level"
    ax.fill_between(
        probes,
        lo,
        hi,
        color=color,
        alpha=0.35,
        label=f"merge from M probes, {kind} (5 seeds)",
    )
ax.axhline(
    sum(losses(exact)), color="black", label="merge from the exact diagonals"
)
ax.axhline(sum(losses(average)), color="tab:blue", ls="--", label="plain average")
ax.set_xscale("log", base=2)
ax.set_xlabel("probes M per model")
ax.set_ylabel("loss on A + loss on B")
ax.set_title("Fisher merging of two fine-tuned models")
ax.legend(fontsize="small")
plt.show()
