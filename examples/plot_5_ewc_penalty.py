r"""
An EWC penalty with its own error bar
=====================================

Elastic weight consolidation from the Fisher diagonal: what the penalty does to
forgetting, and the penalty estimated from a few probes with its own error bar.

Elastic weight consolidation (Kirkpatrick et al., 2017) keeps a network near the
parameters θ* it learned on task A while it trains on task B, with the penalty
:math:`\Omega(\theta) = \frac{\lambda}{2} \sum_i F_i (\theta_i - \theta^*_i)^2`,
:math:`F_i` the diagonal of task A's mean Fisher at θ*. This is the recipe of
:doc:`/recipes`, with two figures: what the penalty does, and how well it is
estimated from a few probes when the exact diagonal is too expensive.
"""

# %%
# Two tasks, trained one after the other
# --------------------------------------
# Task A's labels depend on the first three inputs, task B's on the last three.
# After task A, the network trains on task B twice: alone, and with the EWC
# penalty built from the exact Fisher diagonal. The losses on both tasks are
# recorded along the way.

import copy

import matplotlib.pyplot as plt
import torch
from torch import nn

from fisherbound.adapters.torch import linearize
from fisherbound.estimators import detach_and_mix
from fisherbound.fisher import fisher_diagonal

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
x_a, x_b = torch.randn(256, 6), torch.randn(256, 6)
w_true = torch.randn(3, 3)
y_a = (x_a[:, :3] @ w_true + 0.5 * torch.randn(256, 3)).argmax(1)  # task A
y_b = (x_b[:, 3:] @ w_true + 0.5 * torch.randn(256, 3)).argmax(1)  # task B
model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
cross_entropy = nn.functional.cross_entropy


def train(model, loss_fn, steps=300, record=None):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        if record is not None:
            with torch.no_grad():
                record.append(
                    (
                        float(cross_entropy(model(x_a), y_a)),
                        float(cross_entropy(model(x_b), y_b)),
                    )
                )


train(model, lambda: cross_entropy(model(x_a), y_a))  # θ* after task A
star = {n: p.detach().clone() for n, p in model.named_parameters()}
lin = linearize(copy.deepcopy(model), x_a)  # at θ*, on a copy: the model trains on
fisher = lin.unravel(fisher_diagonal(lin, reduction="mean"))  # {name: F_i}
lam = 10.0


def ewc(f):  # λ/2 Σ_i F_i (θ_i − θ*_i)²
    return (
        lam
        / 2
        * sum(
            (f[n] * (p - star[n]) ** 2).sum() for n, p in model.named_parameters()
        )
    )


plain = copy.deepcopy(model)
history_plain, history_ewc = [], []
train(plain, lambda: cross_entropy(plain(x_b), y_b), record=history_plain)
train(
    model, lambda: cross_entropy(model(x_b), y_b) + ewc(fisher), record=history_ewc
)
for name, h in (("without EWC", history_plain), ("with EWC", history_ewc)):
    print(f"{name:>11}: task A loss {h[-1][0]:.4f}, task B loss {h[-1][1]:.4f}")

# %%
# Without the penalty the network forgets task A (its loss climbs); with it,
# both tasks end at a compromise.

fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
for h, style, name in (
    (history_plain, "--", "without EWC"),
    (history_ewc, "-", "with EWC"),
):
    ax.plot([a for a, _ in h], "C3" + style, label=f"task A, {name}")
    ax.plot([b for _, b in h], "C0" + style, label=f"task B, {name}")
ax.set(
    yscale="log",
    xlabel="Adam steps on task B",
    ylabel="mean cross-entropy",
    title="training on task B after task A",
)
ax.legend(ncols=2, fontsize="small")
plt.show()

# %%
# The penalty from a few probes
# -----------------------------
# The penalty is linear in F: :math:`\sum_i w_i F_i` with
# :math:`w_i = \frac{\lambda}{2} (\theta_i - \theta^*_i)^2`.
# ``detach_and_mix(..., what="trace", weights=w)`` estimates that weighted trace
# probe by probe, so its standard error is the penalty's own. Propagating the
# standard errors of the diagonal's entries as if they were independent,
# :math:`\sqrt{\sum_i w_i^2 \mathrm{SE}_i^2}`, gives error bars that are too short:
# the entries of one probe share its signs, so they are correlated.

with torch.no_grad():
    weights = {n: lam / 2 * (p - star[n]) ** 2 for n, p in model.named_parameters()}
    exact = float(ewc(fisher))
w = lin.ravel(weights)  # the flat (D,) form of the dict
probes = [4, 8, 16, 32, 64, 128]
rows = []
for m in probes:
    pen = detach_and_mix(
        lin,
        what="trace",
        weights=w,
        num_probes=m,
        per_example=True,
        reduction="mean",
        rng=m,
    )
    diag = detach_and_mix(
        lin, num_probes=m, per_example=True, reduction="mean", rng=m
    )
    low, high = pen.interval()
    naive = float(torch.sqrt(w**2 @ diag.std_error**2))
    rows.append((float(pen.value), float(low), float(high), naive))
    print(
        f"M = {m:3d}: {pen.value:.4f} ± {pen.std_error:.4f}, 95% interval "
        f"[{low:.4f}, {high:.4f}]; √Σ w²SE² = {naive:.4f}"
    )
print(f"exact: {exact:.4f}")

# %%
# The estimates against M, with the two kinds of error bars (offset sideways to
# be seen), and the exact penalty.

fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
value = torch.tensor([r[0] for r in rows])
ax.errorbar(
    torch.tensor(probes) * 1.04,
    value,
    yerr=(
        value - torch.tensor([r[1] for r in rows]),
        torch.tensor([r[2] for r in rows]) - value,
    ),
    fmt="o",
    color="C1",
    capsize=3,
    label="weighted trace: 95% interval",
)
ax.errorbar(
    torch.tensor(probes) / 1.04,
    value,
    yerr=1.96 * torch.tensor([r[3] for r in rows]),
    fmt="s",
    color="C0",
    mfc="none",
    capsize=3,
    label="± 1.96 √Σ w²SE² (entries taken as independent)",
)
ax.axhline(exact, color="k", lw=1, label="exact (fisher_diagonal)")
ax.set(
    xscale="log",
    xticks=probes,
    xticklabels=probes,
    xlabel="number of probes M",
    ylabel="EWC penalty at the end",
    title="the penalty estimated by detach-and-mix",
)
ax.legend(fontsize="small")
plt.show()
