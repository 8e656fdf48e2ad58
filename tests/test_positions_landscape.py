"""The loss landscape for models with outputs (N, T, C): masks, ignore_index, mean over tokens.

References: ``torch.nn.CrossEntropyLoss(ignore_index=-100)`` (the mean over the
counted tokens of the whole data set) evaluated through ``torch.func``, and its
dense Hessian (``torch.func.hessian``) on a tiny sequence model. Two loss
functions are checked: the torch adapter's ``loss_function(..., class_axis=...,
ignore_index=...)`` and a test-only one built directly on ``LossFunctionBase``
(``_hold_batch`` with ``mask`` / ``ignore_index``, ``reduce_log_likelihood``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fisherbound.adapters.torch import linearize, loss_function  # noqa: E402
from fisherbound.families import Bernoulli, Categorical  # noqa: E402
from fisherbound.landscape import (  # noqa: E402
    fisher_directions,
    hessian_directions,
    hessian_operator,
    loss_trace,
    projected_curvature,
    surface,
)
from fisherbound.linearization import LossFunctionBase, make_blocks  # noqa: E402

C, F, H = 3, 2, 3


class Tagger(torch.nn.Module):
    """A tiny sequence tagger (N, T, F) → (N, T, C) with a causal mix over time."""

    def __init__(self, channels_first: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.inp = torch.nn.Linear(F, H).double()
        self.out = torch.nn.Linear(H, C).double()
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        self.channels_first = channels_first

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.cumsum(h, dim=1) / math.sqrt(x.shape[1])  # position t sees 0..t
        z = self.out(h)
        return z.transpose(1, 2) if self.channels_first else z  # (N, C, T) for class_axis=1


def data(seed: int, n: int = 3, t: int = 4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, F, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (n, t), generator=gen)
    y[0, -2:] = -100  # padding of example 0
    y[1, 1] = -100
    return x, y


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def functional_loss(model, batches, reduction):
    """θ ↦ CrossEntropyLoss(ignore_index=-100) over the concatenated tokens of ``batches``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def f(theta):
        params = {
            n: piece.reshape(s)
            for n, piece, s in zip(names, torch.split(theta, sizes), shapes, strict=True)
        }
        zs, ys = [], []
        for x, y in batches:
            z = torch.func.functional_call(model, params, (x,))
            if model.channels_first:
                z = z.transpose(1, 2)
            zs.append(z.reshape(-1, C))
            ys.append(y.reshape(-1))
        ce = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction=reduction)
        return ce(torch.cat(zs), torch.cat(ys))

    return f


class BaseLoss(LossFunctionBase):
    """A LossFunction for (N, T, C) logits on LossFunctionBase: mask and ignore_index there."""

    def __init__(self, model, x, y, *, family, reduction, mask=None, ignore_index=-100):
        self._f = model
        self._x = x
        self._params = flat_params(model)
        self._xp = __import__("array_api_compat").array_namespace(self._params)
        self._blocks = make_blocks((n, tuple(p.shape)) for n, p in model.named_parameters())
        self._names = [n for n, _ in model.named_parameters()]
        with torch.no_grad():
            z = self._logits_at(self._params)
        self._hold_batch(z, y, family, reduction, mask=mask, ignore_index=ignore_index)

    def _logits_at(self, theta):
        sizes = [b.size for b in self._blocks]
        params = {
            n: piece.reshape(b.shape)
            for n, piece, b in zip(
                self._names, torch.split(theta, sizes), self._blocks, strict=True
            )
        }
        return torch.func.functional_call(self._f, params, (self._x,))

    def _loss(self, theta):
        z = self._logits_at(theta)
        return self.reduce_log_likelihood(
            self._family.unchecked_log_likelihood(z, self._labels, xp=self._xp)
        )

    def value(self, shifts):
        return torch.stack([self._loss(self._params + s) for s in shifts])

    def gradient(self):
        return torch.func.grad(self._loss)(self._params)

    def hvp(self, v):
        return torch.func.jvp(torch.func.grad(self._loss), (self._params,), (v,))[1]


def make_losses(kind, model, batches, reduction):
    if kind == "adapter":
        axis = 1 if model.channels_first else -1
        return [
            loss_function(model, x, y, reduction=reduction, class_axis=axis) for x, y in batches
        ]
    return [BaseLoss(model, x, y, family=Categorical(), reduction=reduction) for x, y in batches]


KINDS = pytest.mark.parametrize("kind", ["adapter", "base"])


@KINDS
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_value_gradient_and_hessian_match_cross_entropy(kind, reduction) -> None:
    model = Tagger(channels_first=kind == "adapter")
    batch = data(1)
    (loss,) = make_losses(kind, model, [batch], reduction)
    f = functional_loss(model, [batch], reduction)
    theta = flat_params(model)
    assert loss.num_counted == 9  # 12 tokens, 3 ignored
    assert loss.logits.shape == (3, 4, C)
    gen = torch.Generator().manual_seed(3)
    shifts = 0.3 * torch.randn(4, theta.numel(), generator=gen, dtype=torch.float64)
    want = torch.stack([f(theta + s) for s in shifts])
    torch.testing.assert_close(loss.value(shifts), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.gradient(), torch.func.grad(f)(theta), rtol=1e-10, atol=1e-12)
    dense = torch.func.hessian(f)(theta)
    torch.testing.assert_close(
        hessian_operator(loss).matmat(torch.eye(theta.numel(), dtype=torch.float64)),
        dense,
        rtol=1e-9,
        atol=1e-11,
    )


def test_mean_over_a_data_set_divides_by_all_counted_tokens() -> None:
    # Two batches of different lengths and padding: the total is the mean over the
    # 9 + 9 counted tokens of both (not the mean of the batch means).
    model = Tagger()
    batches = [data(1), data(2, n=2, t=6)]
    losses = make_losses("adapter", model, batches, "mean")
    f = functional_loss(model, batches, "mean")
    theta = flat_params(model)
    d = theta.numel()
    dense = torch.func.hessian(f)(theta)
    op = hessian_operator(losses)
    torch.testing.assert_close(
        op.matmat(torch.eye(d, dtype=torch.float64)), dense, rtol=1e-9, atol=1e-11
    )
    e = torch.eye(d, dtype=torch.float64)[:2]
    s = surface(losses, e[:1], coordinates=torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64))
    want = torch.stack([f(theta + a * e[0]) for a in (-0.5, 0.0, 0.5)])
    torch.testing.assert_close(s.values, want, rtol=1e-12, atol=1e-12)


def test_mean_of_a_data_set_with_the_base_loss_functions() -> None:
    # Loss functions built on LossFunctionBase: num_inputs = N examples, num_counted the
    # tokens; the data set's mean must weight the batches by num_counted.
    model = Tagger()
    batches = [data(1), data(2, n=2, t=6)]
    losses = make_losses("base", model, batches, "mean")
    assert [loss.num_inputs for loss in losses] == [3, 2]
    assert [loss.num_counted for loss in losses] == [9, 9]
    f = functional_loss(model, batches, "mean")
    theta = flat_params(model)
    v = torch.linspace(-1.0, 1.0, theta.numel(), dtype=torch.float64)
    torch.testing.assert_close(
        hessian_operator(losses).matvec(v), torch.func.hessian(f)(theta) @ v, rtol=1e-9, atol=1e-11
    )


@KINDS
def test_hessian_directions_curvature_and_trace(kind) -> None:
    model = Tagger(channels_first=kind == "adapter")
    batch = data(4)
    (loss,) = make_losses(kind, model, [batch], "mean")
    f = functional_loss(model, [batch], "mean")
    theta = flat_params(model)
    dense = torch.func.hessian(f)(theta)
    evals, evecs = torch.linalg.eigh(dense)
    hd = hessian_directions(loss, rng=0)
    torch.testing.assert_close(hd.eigenvalues, evals[[-1, 0]], rtol=1e-8, atol=1e-10)
    dirs = hd.directions
    pc = projected_curvature(loss, dirs)
    torch.testing.assert_close(pc.hessian, dirs @ dense @ dirs.T, rtol=1e-8, atol=1e-10)
    pc_loss = projected_curvature(loss, dirs, method="loss")
    torch.testing.assert_close(pc_loss.hessian, pc.hessian, rtol=1e-4, atol=1e-6)
    hv = loss_trace(loss, num_probes=400, method="hvp", rng=5)
    lv = loss_trace(loss, num_probes=400, method="loss", rng=5)  # the same probes
    torch.testing.assert_close(lv.value, hv.value, rtol=1e-4, atol=1e-6)
    assert abs(float(hv.value) - float(torch.trace(dense))) <= 5 * float(hv.std_error) + 1e-10


def test_base_applies_mask_and_ignore_index() -> None:
    model = Tagger()
    x, y = data(6)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 0] = False
    y_junk = y.clone()
    y_junk[2, 0] = 77  # out of range, but masked: never read
    loss = BaseLoss(model, x, y_junk, family=Categorical(), reduction="mean", mask=mask)
    assert loss.num_counted == 8
    assert bool((loss.mask == (mask & (y != -100))).all())
    assert int(loss.labels.min()) >= 0  # ignored and masked labels replaced by 0
    y_ref = y.clone()
    y_ref[2, 0] = -100
    f = functional_loss(model, [(x, y_ref)], "mean")
    theta = flat_params(model)
    torch.testing.assert_close(loss.value(torch.zeros(1, theta.numel(), dtype=torch.float64))[0],
                               f(theta), rtol=1e-12, atol=1e-12)  # fmt: skip
    # Bernoulli targets (N, T, C): the mask covers every class of a position.
    targets = (torch.rand(3, 4, C, generator=torch.Generator().manual_seed(1)) < 0.5).double()
    targets[2, 0] = float("nan")  # masked: never read
    bern = BaseLoss(model, x, targets, family=Bernoulli(), reduction="sum", mask=mask)
    z = model(x).detach()
    ll = targets[..., :] * z - torch.nn.functional.softplus(z)
    want = -ll.sum(-1)[mask].sum()
    torch.testing.assert_close(bern.value(torch.zeros(1, theta.numel(), dtype=torch.float64))[0],
                               want, rtol=1e-12, atol=1e-12)  # fmt: skip


def test_base_refusals() -> None:
    model = Tagger()
    x, y = data(7)
    with pytest.raises(
        ValueError, match=r"mask must be a boolean array of shape \(N, \*S\) = \(3, 4\)"
    ):
        BaseLoss(model, x, y, family=Categorical(), reduction="sum", mask=torch.ones(3, 5) > 0)
    with pytest.raises(TypeError, match="mask must be None or a boolean array"):
        BaseLoss(model, x, y, family=Categorical(), reduction="sum", mask=[[True] * 4] * 3)
    with pytest.raises(ValueError, match="at least one position"):
        BaseLoss(model, x, torch.full((3, 4), -100), family=Categorical(), reduction="mean")
    with pytest.raises(ValueError, match="labels do not fit the logits"):
        BaseLoss(model, x, y[:, :3], family=Categorical(), reduction="sum")


def test_fisher_directions_with_positions_and_a_mask() -> None:
    # The Fisher metric Σ_x Σ_t J_xtᵀ I(z_xt) J_xt over the counted tokens, dense by jacrev.
    model = Tagger()
    x, y = data(8)
    mask = y != -100
    lin = linearize(model, x, mask=mask)
    theta = flat_params(model)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    shapes = [p.shape for p in model.parameters()]

    def logits(t):
        params = {
            n: p.reshape(s) for n, p, s in zip(names, torch.split(t, sizes), shapes, strict=True)
        }
        return torch.func.functional_call(model, params, (x,))

    jac = torch.func.jacrev(logits)(theta)  # (N, T, C, D)
    z = logits(theta).detach()
    p = torch.softmax(z, -1)
    kern = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    fisher = torch.einsum("ntcd,ntce,ntef->df", jac * mask[..., None, None], kern, jac)
    top = torch.linalg.eigvalsh(fisher)[-2:].flip(0)
    fd = fisher_directions(lin, num_directions=2, rng=0)
    np.testing.assert_allclose(fd.eigenvalues.numpy(), top.numpy(), rtol=1e-8)
