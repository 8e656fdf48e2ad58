r"""
The core space: the spectrum of one input's Fisher metric
=========================================================

The exact spectrum of one input's 10 × 10 core metric, its interlacing with the
class probabilities, the bounds of its largest eigenvalue and the envelopes that
bracket it, as the logits sharpen.

Every Fisher quantity is a pull-back :math:`F = \sum_x J_x^\top K(z_x) J_x` of a
small C × C core metric through the network's Jacobian. For the categorical family
the exact core metric is :math:`I(z) = \operatorname{diag}(p) - p p^\top`,
:math:`p = \operatorname{softmax}(z)`. ``fisherbound.families`` solves it exactly
from the logits alone: its spectrum by the secular equation (never forming the
matrix), bounds on :math:`\lambda_{\max}` without any eigen-solve, and the
envelopes (kernels) that bound it in Löwner order (:doc:`/families`).
"""

# %%
# One input's logits
# ------------------
# A ten-class output: the logits of one digit, as a trained classifier might give.

import matplotlib.pyplot as plt
import numpy as np

from fisherbound.families import KERNELS, Categorical

fam = Categorical()
z = np.array([4.0, 2.5, 2.2, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0])
p = fam.probabilities(z)
eig = fam.eigvalsh(z)  # ascending: 0, then one root between consecutive sorted p
dense = np.linalg.eigvalsh(fam.metric(z))  # the same from the dense C × C matrix
lower, upper = fam.lambda_max_bounds(z)  # Theorem 1: no eigen-solve, O(C)
print("sorted p:", " ".join(f"{v:.4f}" for v in np.sort(p)))
print("λ(I(z)): ", " ".join(f"{v:.4f}" for v in eig))
print(
    f"largest difference from the dense eigvalsh: {np.abs(eig - dense).max():.1e}"
)
print(f"λ_max = {eig[-1]:.4f} in [{float(lower):.4f}, {float(upper):.4f}]")

# %%
# Interlacing
# -----------
# The eigenvalues of :math:`\operatorname{diag}(p) - p p^\top` interlace the sorted
# probabilities, :math:`p_{(i-1)} \le \lambda_i \le p_{(i)}`: each nonzero eigenvalue
# is the root of :math:`\sum_i p_i / (p_i - \lambda) = 0` between two consecutive
# sorted probabilities. The shaded band is the certified interval of
# :math:`\lambda_{\max}` from ``lambda_max_bounds``; :math:`\lambda_1 = 0` is off the
# logarithmic axis.

order = np.arange(1, len(p) + 1)
fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
ax.axhspan(float(lower), float(upper), color="C2", alpha=0.25, label="λ_max bounds")
ax.plot(order, np.sort(p), "o", color="C0", label="sorted $p_{(i)}$")
ax.plot(
    order, eig, "x", color="C3", ms=8, mew=2, label="eigenvalues $λ_i$ (eigvalsh)"
)
ax.set(
    yscale="log",
    ylim=(1e-4, 1),
    xticks=order,
    xlabel="index i (ascending)",
    title="the spectrum of diag(p) − p pᵀ interlaces p",
)
ax.legend(loc="lower right")
plt.show()

# %%
# The envelopes, and how tight the bounds are
# -------------------------------------------
# The kernels of ``KERNELS`` bound the exact metric in Löwner order:
# ``"lower"`` (the rank-one :math:`\lambda_{\max} v v^\top`) and ``"scalar_lower"``
# below, ``"upper"`` (:math:`\operatorname{diag} p`) and ``"scalar_upper"`` above.
# Their traces against the exact one, for this input:

for kernel in KERNELS:
    k = fam.metric(z, kernel=kernel)
    top = np.linalg.eigvalsh(k)[-1]
    print(f"{kernel:>12}: trace {np.trace(k):.4f}, largest eigenvalue {top:.4f}")

# %%
# Sharpening the logits (dividing them by a temperature T) moves p from nearly
# uniform to nearly one-hot. Relative to :math:`\lambda_{\max}`, its bounds stay
# within a factor 0.9 to 1.7 along the way and close in at both ends, where
# :math:`\lambda_{\max}` itself spans six orders of magnitude. The traces of the
# envelopes bracket the exact trace :math:`1 - \lVert p \rVert^2`; the diagonal
# upper envelope and the scalar lower one drift far from it as p becomes one-hot,
# the rank-one lower envelope is nearly exact when one class dominates and
# tends to :math:`1/(C - 1)` of it for uniform p.

temperatures = np.geomspace(0.1, 20, 120)
logits = z / temperatures[:, None]  # (120, 10): the methods take any leading axes
lam = fam.eigvalsh(logits)[:, -1]
lo, hi = fam.lambda_max_bounds(logits)
exact_trace = 1 - np.sum(fam.probabilities(logits) ** 2, axis=-1)
ratio = {
    k: np.trace(fam.metric(logits, kernel=k), axis1=-2, axis2=-1) / exact_trace
    for k in KERNELS
}
print(
    f"T = 0.1: λ_max = {lam[0]:.2e}, "
    f"bounds / λ_max = [{lo[0] / lam[0]:.3f}, {hi[0] / lam[0]:.3f}]"
)

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
left.fill_between(
    temperatures,
    lo / lam,
    hi / lam,
    color="C2",
    alpha=0.3,
    label="lambda_max_bounds / λ_max",
)
left.axhline(1, color="k", lw=1, label="λ_max (eigvalsh)")
left.set(
    xscale="log",
    xlabel="temperature T (logits z / T)",
    ylabel="relative to λ_max",
    title="the bounds of λ_max, relative to it",
)
left.legend(loc="upper left")
for kernel, style in zip(
    KERNELS, ("k-", "C0--", "C3--", "C0:", "C3:"), strict=True
):
    right.plot(temperatures, ratio[kernel], style, label=kernel)
right.set(xscale="log", yscale="log", xlabel="temperature T (logits z / T)")
right.set(
    ylabel="tr K(z) / tr I(z)", title="the envelopes bracket the exact kernel"
)
right.legend(title="kernel", fontsize="small", loc="lower right")
plt.show()
