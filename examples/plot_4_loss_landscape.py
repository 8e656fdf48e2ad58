r"""
A loss landscape along random and Hessian directions
====================================================

The loss surface of a trained MLP along two random directions and along the
Hessian's extreme eigenvectors, with λ_max, λ_min and the Hessian trace.

A picture of a loss landscape is a 2-D section :math:`L(\theta + \alpha\eta + \beta\delta)`
of a function of D variables, and what it shows depends on the directions. Random
(filter-normalised) directions almost always show a bowl; the directions of the
largest and smallest Hessian eigenvalues show the curvature the network actually
has (Böttcher and Wheeler, 2024; :doc:`/landscape`).
"""

# %%
# A tanh MLP trained on the digits
# --------------------------------
# 64-32-10 (D = 2410), float64, 300 full-batch Adam steps on 1000 digits; the loss is
# the mean cross-entropy over two batches of 500.

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits

from fisherbound.adapters.torch import loss_function
from fisherbound.landscape import (
    hessian_directions,
    loss_trace,
    random_directions,
    surface,
)
from fisherbound.plotting import plot_surface

images, labels = load_digits(return_X_y=True)
x = torch.tensor(images[:1000] / 16.0)
y = torch.tensor(labels[:1000])
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
).double()
opt = torch.optim.Adam(model.parameters(), lr=0.01)
for _ in range(300):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()

batches = [(x[i : i + 500], y[i : i + 500]) for i in range(0, 1000, 500)]
losses = [loss_function(model, xb, yb, reduction="mean") for xb, yb in batches]

# %%
# Curvature
# ---------
# ``hessian_directions`` runs one Lanczos on exact Hessian-vector products and
# returns both extreme eigenpairs (``tol=1e-2`` is a loose stopping rule; the
# residuals reached are printed); ``loss_trace`` is Hutchinson's estimate of the
# Hessian trace with its standard error.

hd = hessian_directions(losses, tol=1e-2, num_matvecs=1000, rng=0)
lam_max, lam_min = (float(v) for v in hd.eigenvalues)
trace = loss_trace(losses, num_probes=50, rng=3)
print(
    f"λ_max = {lam_max:.4f}, λ_min = {lam_min:.2e}, "
    f"Ritz residuals {float(hd.residuals[0]):.1e}, {float(hd.residuals[1]):.1e}"
)
print(f"tr H ≈ {float(trace.value):.3f} ± {float(trace.std_error):.3f} (50 probes)")

# %%
# Two sections of the same landscape
# ----------------------------------
# ``surface`` evaluates the loss on a grid of the plane (streamed over the batches);
# ``plot_surface`` draws it, with θ marked by a red star. Each panel has its own
# colour scale.

rand = random_directions(losses[0], kind="filter", rng=1)
s_rand = surface(losses, rand, num_points=21)
s_hess = surface(losses, hd, num_points=21)
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
plot_surface(s_rand, ax=left, title="random (filter-normalised) directions")
plot_surface(s_hess, ax=right, title="Hessian directions (λ_max, λ_min)")
plt.show()

# %%
# The random plane shows a round bowl. The Hessian plane shows one stiff direction
# and, along :math:`\lambda_{\min}`, a valley that is flat to the eye: a nearly
# degenerate minimum, which a random section cannot reveal.
