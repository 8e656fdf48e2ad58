r"""
Choosing a network's width by the Laplace evidence
==================================================

The width of a one-hidden-layer network chosen by the Laplace approximation of
the evidence (the razor), term by term, against BIC.

With the prior :math:`\theta \sim N(0, \sigma^2 I)` and θ̂ the maximum a posteriori,
the Laplace approximation of the log evidence with the Fisher in place of the
Hessian is

.. math::

   \log p(y) \approx \log p(y \mid \hat\theta) - \frac{\lVert\hat\theta\rVert^2}{2\sigma^2}
   - \frac12 \sum_i \log\bigl(1 + \sigma^2 \lambda_i(F)\bigr).

``razor`` returns minus it (the razor complexity of :doc:`/dimension`) with its
three terms. Here it picks the width of a one-hidden-layer network, as in the
recipe of :doc:`/recipes`, over more widths.
"""

# %%
# Fit each width to its MAP, then the three terms
# -----------------------------------------------
# For D up to 800 the log-determinant is exact (a full Lanczos run on the Fisher
# operator); above, stochastic Lanczos quadrature gives it with a standard error.

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from fisherbound.adapters.torch import linearize
from fisherbound.dimension import razor

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
x = torch.randn(200, 6)
y = (x[:, :3] @ torch.randn(3, 3) + 0.5 * torch.randn(200, 3)).argmax(1)
prior_variance = 1.0  # θ ~ N(0, σ² I): weight decay 1/(2σ²) on the summed loss


def fit_map(width):
    """The network of this width at its MAP: −log p(y | θ) + ‖θ‖²/(2σ²) minimised."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 3))
    opt = torch.optim.LBFGS(
        model.parameters(), max_iter=200, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        theta = nn.utils.parameters_to_vector(model.parameters())
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        loss = loss + theta @ theta / (2 * prior_variance)
        loss.backward()
        return loss

    opt.step(closure)
    return model


widths = [1, 2, 4, 8, 16]
terms = []
for width in widths:
    model = fit_map(width)
    theta = nn.utils.parameters_to_vector(model.parameters()).detach()
    r = razor(
        linearize(model, x), prior_variance=prior_variance, labels=y, theta=theta
    )
    terms.append(
        (
            float(r.neg_log_likelihood),
            float(r.prior_penalty),
            float(r.log_det.value) / 2,
            float(r.bic_penalty),
        )
    )
    print(
        f"width {width:2d} (D = {theta.numel():3d}): "
        f"log evidence {-r.value:8.3f} = "
        f"log p(y|θ) {-r.neg_log_likelihood:8.3f} - prior {r.prior_penalty:6.3f} "
        f"- ½ log det {r.log_det.value / 2:6.3f}  [{r.method}]"
    )

# %%
# The terms against the width
# ---------------------------
# Wider networks fit better (the likelihood term falls) and pay for it in the
# prior and the log-determinant; the sum, minus the log evidence, has its minimum
# at an intermediate width. The BIC score :math:`-\log p(y \mid \hat\theta) +
# (D/2) \log N` counts every parameter as fully determined by the data, so it
# charges more per parameter than the log-determinant does, and prefers a
# narrower network.

nll, prior, half_log_det, bic = (np.array(t) for t in zip(*terms, strict=True))
razor_value = nll + prior + half_log_det
best = widths[int(np.argmin(razor_value))]
print(
    f"largest evidence at width {best}; "
    f"BIC picks width {widths[int(np.argmin(nll + bic))]}"
)

# %%
# The stacked bars are minus the log evidence; the lower, the better.

fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
position = np.arange(len(widths))
ax.bar(position, nll, color="C0", label="−log p(y | θ̂)")
ax.bar(position, prior, bottom=nll, color="C2", label="‖θ̂‖² / 2σ²")
ax.bar(
    position,
    half_log_det,
    bottom=nll + prior,
    color="C1",
    label="½ log det(I + σ²F)",
)
ax.plot(position, nll + bic, "kD--", label="BIC: −log p(y | θ̂) + (D/2) log N")
ax.plot(
    position[widths.index(best)],
    razor_value.min(),
    "r*",
    ms=15,
    label="largest evidence",
)
ax.set(
    xticks=position,
    xticklabels=widths,
    xlabel="hidden width",
    ylim=(0, 1.6 * razor_value.max()),
    ylabel="nats",
    title="minus the Laplace log evidence, term by term",
)
ax.legend(fontsize="small", loc="upper left")
plt.show()
