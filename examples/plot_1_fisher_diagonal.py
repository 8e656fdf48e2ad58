r"""
Exact, bounded, estimated: the Fisher diagonal of a small CNN
=============================================================

The Fisher diagonal of a small convolutional network, three ways: exact, between
certified bounds, and estimated from a few probes with honest error bars.

The Fisher information of the network on 256 handwritten digits is
:math:`F = \sum_x J_x^\top (\operatorname{diag} p_x - p_x p_x^\top) J_x`. Three
functions give its diagonal:

- ``fisher_diagonal``: the exact value (a backward pass per class, C = 10 here);
- ``fisher_bounds``: the certified bounds
  :math:`\operatorname{diag} F_{LR} \le \operatorname{diag} F \le \operatorname{diag} F_{DG}`,
  which hold for every θ and cost as much as the exact diagonal;
- ``detach_and_mix``: an unbiased estimate with a standard error per entry, from M
  probes at the cost of one backward pass of the batch per probe, with no
  per-example gradient (:doc:`/estimators`).
"""

# %%
# A CNN trained briefly on the digits
# -----------------------------------
# scikit-learn's bundled 8×8 digits (nothing is downloaded); two convolutions and a
# linear read-out, 100 full-batch Adam steps on 1000 images.

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

from fisherbound.adapters.torch import linearize
from fisherbound.estimators import detach_and_mix
from fisherbound.fisher import fisher_bounds, fisher_diagonal
from fisherbound.plotting import plot_fisher_diagonal

torch.manual_seed(0)
images, labels = load_digits(return_X_y=True)
x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
y = torch.tensor(labels)
model = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1),
    nn.Tanh(),
    nn.Conv2d(8, 16, 3, stride=2, padding=1),
    nn.Tanh(),
    nn.Flatten(),
    nn.Linear(16 * 4 * 4, 10),
)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(100):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[:1000]), y[:1000]).backward()
    opt.step()
model.eval()
with torch.no_grad():
    accuracy = (model(x[1000:]).argmax(1) == y[1000:]).double().mean()
print(f"held-out accuracy {accuracy:.3f}")

# %%
# The diagonal three ways
# -----------------------
# ``linearize`` freezes the model at its parameters on one batch; every quantity
# below is the sum over its 256 inputs.

lin = linearize(model, x[:256])
exact = fisher_diagonal(lin)
lower, upper = fisher_bounds(lin)
est = detach_and_mix(lin, num_probes=32, rng=0)  # value ± std_error, entry by entry

tol = 1 + 1e-5  # float32 rounding
print(f"D = {lin.num_params} parameters in {[b.name for b in lin.blocks]}")
print(
    "bounds hold:",
    bool(torch.all(lower <= exact * tol) & torch.all(exact <= upper * tol)),
)
print(f"tr F = {exact.sum():.1f}, bounds [{lower.sum():.1f}, {upper.sum():.1f}]")
low, high = est.interval(0.95)
covered = ((low <= exact) & (exact <= high)).double().mean()
print(
    f"32 probes: tr F ≈ {est.value.sum():.1f}; "
    f"the 95% interval covers {covered:.1%} of the exact entries"
)

# %%
# ``plot_fisher_diagonal`` sorts the entries of each block by their exact value:
# black dots, the certified band in green, the estimate with its 95% interval in
# orange. The model is confident on most inputs, so the rank-one lower envelope
# :math:`F_{LR}` hugs the exact diagonal, while the diagonal upper envelope
# :math:`F_{DG}` is one to two orders of magnitude above it.

fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
plot_fisher_diagonal(
    lin.blocks,
    exact=exact,
    bounds=(lower, upper),
    estimate=est,
    ax=ax,
    title="A CNN on 256 digits: exact, certified bounds, 32-probe estimate",
)

# sphinx_gallery_start_ignore
# The figure of README.md and docs/index.md is this one; regenerate it with
#     OMP_NUM_THREADS=1 python examples/plot_1_fisher_diagonal.py docs/figures/fisher_diagonal.png
# (no argument, as in the gallery build: nothing is written).
import sys  # noqa: E402

if len(sys.argv) > 1:
    fig.savefig(sys.argv[1], dpi=100)
# sphinx_gallery_end_ignore

# %%
# Are the error bars honest?
# --------------------------
# An estimated entry is a mean of M squares, skewed to the right, and its standard
# error comes from the same probes: a low draw comes with a small error bar. So
# the symmetric interval ``value ± 1.96 std_error`` covers the exact entry less
# often than 95% when M is small. ``est.interval(0.95)`` corrects for that skew
# (Student t with the estimate's degrees of freedom, on the cube-root scale). The
# fraction of the 3818 entries that each covers, against the number of probes (the
# entries of one run share its probes, so the fraction moves by a point or two
# from one seed to the next):

probes = [4, 8, 16, 32, 64, 128]
skewed, symmetric = [], []
for m in probes:
    e = detach_and_mix(lin, num_probes=m, rng=m)
    lo, hi = e.interval(0.95)
    skewed.append(float(((lo <= exact) & (exact <= hi)).double().mean()))
    half = 1.96 * e.std_error
    symmetric.append(
        float(
            ((e.value - half <= exact) & (exact <= e.value + half)).double().mean()
        )
    )
    print(
        f"M = {m:3d}: interval() covers {skewed[-1]:.1%}, "
        f"± 1.96 SE covers {symmetric[-1]:.1%}"
    )

# %%
# The two intervals against M; the horizontal line is the nominal 95%.

fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
ax.plot(probes, skewed, "o-", color="C1", label="est.interval(0.95)")
ax.plot(probes, symmetric, "s--", color="C0", label="value ± 1.96 std_error")
ax.axhline(0.95, color="k", lw=0.8)
ax.set(
    xscale="log",
    xticks=probes,
    xticklabels=probes,
    ylim=(0.5, 1),
    xlabel="number of probes M",
    ylabel="fraction of entries covered",
    title="coverage of the 95% intervals of the Fisher diagonal",
)
ax.legend(loc="lower right")
plt.show()
