"""The torch adapter: the linearization contract, the fast exact-diagonal path
against the generic one, parameter selection and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _assertions import assert_like
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from fisherbound.adapters.torch import (
    TorchLinearization,
    linearizations,
    linearize,
    loss_function,
)
from fisherbound.linearization import Linearization

F64 = torch.float64


# ---------------------------------------------------------------------------
# Models (small, float64, seeded)
# ---------------------------------------------------------------------------


def _randomize_norm(bn: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        c = bn.weight.shape[0]
        bn.weight.copy_(1 + 0.3 * torch.randn(c, generator=gen, dtype=F64))
        bn.bias.copy_(0.3 * torch.randn(c, generator=gen, dtype=F64))
        if getattr(bn, "running_mean", None) is not None:
            bn.running_mean.copy_(0.2 * torch.randn(c, generator=gen, dtype=F64))
            bn.running_var.copy_(0.5 + torch.rand(c, generator=gen, dtype=F64))


def make_mlp(seed: int = 0, widths: tuple[int, ...] = (6, 10, 3), n: int = 5):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(a, b))
    model = nn.Sequential(*layers).to(F64)
    x = torch.randn(n, widths[0], dtype=F64)
    return model, (x,)


def make_cnn(seed: int = 1):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(27, 3),
    ).to(F64)
    _randomize_norm(model[1], gen)
    model.eval()
    return model, (torch.randn(4, 2, 6, 6, dtype=F64),)


class Attention(nn.Module):
    """Embedding + LayerNorm + MultiheadAttention with residuals + a token-wise Linear."""

    def __init__(self, vocab: int = 7, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.att = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ff = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(tokens))
        h = h + self.att(h, h, h, need_weights=False)[0]
        h = h + torch.tanh(self.ff(h))
        return self.head(h.mean(dim=1))


def make_attention(seed: int = 2):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Attention().to(F64)
    _randomize_norm(model.norm, gen)
    model.eval()
    tokens = torch.tensor([[0, 1, 2, 1], [3, 3, 4, 5], [6, 0, 0, 2], [1, 5, 5, 5], [2, 4, 6, 3]])
    return model, (tokens,)


class Tied(nn.Module):
    """The output layer shares the embedding matrix (weight tying)."""

    def __init__(self, vocab: int = 7, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(tokens))).mean(dim=1))


class FunctionalTie(nn.Module):
    """The same tying, but the output uses the embedding matrix directly."""

    def __init__(self, vocab: int = 7, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(tokens))).mean(dim=1)
        return F.linear(h, self.emb.weight)


def make_tied(seed: int = 3, cls: type[nn.Module] = Tied):
    torch.manual_seed(seed)
    tokens = torch.tensor([[0, 1, 1], [3, 4, 5], [6, 6, 6], [2, 0, 2], [5, 1, 3]])
    return cls().to(F64), (tokens,)


class Scale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.s


class Zoo(nn.Module):
    """Two inputs; grouped strided reflect-padded Conv1d, GroupNorm, 'same' Conv2d,
    BatchNorm eval, an in-place ReLU after a Linear, a Linear called twice, a custom
    module."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        self.gn = nn.GroupNorm(3, 6)
        self.c2 = nn.Conv2d(1, 2, 3, padding="same", dilation=2)
        self.bn1 = nn.BatchNorm2d(2)
        self.fc = nn.Linear(30 + 50, 8)
        self.relu = nn.ReLU(inplace=True)
        self.bn2 = nn.BatchNorm1d(8)
        self.shared = nn.Linear(8, 8)
        self.scale = Scale(8)
        self.out = nn.Linear(8, 3)

    def forward(self, seq: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.gn(self.c1(seq))).flatten(1)
        g = self.bn1(self.c2(img)).flatten(1)
        h = self.bn2(self.relu(self.fc(torch.cat([h, g], dim=1))))
        h = self.shared(torch.tanh(self.shared(h)))
        return self.out(self.scale(h))


def make_zoo(seed: int = 4):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Zoo().to(F64)
    for norm in (model.gn, model.bn1, model.bn2):
        _randomize_norm(norm, gen)
    with torch.no_grad():
        model.fc.bias.add_(0.5)  # keep most ReLU units active
    model.eval()
    n = 5
    return model, (torch.randn(n, 4, 9, dtype=F64), torch.randn(n, 1, 5, 5, dtype=F64))


class TimeMajor(nn.Module):
    """Examples on axis 0 of the input, but the Linear sees (T, N, F): time first."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, T, F)
        h = torch.tanh(self.fc(x.transpose(0, 1)))  # (T, N, 4)
        return self.out(h.mean(dim=0))


class BatchSecond(nn.Module):
    """Inputs with the examples on axis 1: (T, N, F)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(x).mean(dim=0))


CONTRACT_MODELS = {"mlp": make_mlp, "cnn": make_cnn, "attention": make_attention}
FAST_MODELS = {
    **CONTRACT_MODELS,
    "tied": make_tied,
    "functional_tie": lambda: make_tied(cls=FunctionalTie),
    "zoo": make_zoo,
}


def _lin(factory) -> tuple[TorchLinearization, nn.Module, tuple[torch.Tensor, ...]]:
    model, inputs = factory()
    return linearize(model, inputs), model, inputs


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def _logits_at(lin: TorchLinearization, model: nn.Module, inputs, theta: torch.Tensor):
    params = {b.name: theta[b.offset : b.offset + b.size].reshape(b.shape) for b in lin.blocks}
    with torch.no_grad():
        return torch.func.functional_call(model, params, inputs)


def _flat_params(lin: TorchLinearization, model: nn.Module) -> torch.Tensor:
    named = dict(model.named_parameters(remove_duplicate=False))
    return torch.cat([named[b.name].detach().reshape(-1) for b in lin.blocks])


def _dense_jacobian_jvp(lin: TorchLinearization) -> torch.Tensor:
    d = lin.num_params
    return lin.jvp_batch(torch.eye(d, dtype=F64)).reshape(d, -1).T  # (N C, D)


def _dense_jacobian_vjp(lin: TorchLinearization) -> torch.Tensor:
    n, c = lin.num_inputs, lin.num_outputs
    return lin.vjp_batch(torch.eye(n * c, dtype=F64).reshape(n * c, n, c))  # (N C, D)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-10) -> None:
    assert_like(a, b)  # the same namespace, device, dtype and shape before the values
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-300)
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"max error {err:.3e} vs scale {scale:.3e}"


# ---------------------------------------------------------------------------
# The contract, on an MLP, a CNN and an attention model
# ---------------------------------------------------------------------------


@pytest.fixture(params=list(CONTRACT_MODELS), scope="module")
def contract(request):
    lin, model, inputs = _lin(CONTRACT_MODELS[request.param])
    return lin, model, inputs


def test_protocol_and_namespace(contract) -> None:
    lin, model, inputs = contract
    assert isinstance(lin, Linearization)
    assert lin.logits.shape == (lin.num_inputs, lin.num_outputs)
    assert lin.logits.dtype == F64
    assert not lin.logits.requires_grad
    with torch.no_grad():
        expected = model(*inputs)
    _close(lin.logits, expected, 1e-12)
    assert lin.xp.__name__.endswith("torch")
    assert lin.num_params == sum(p.numel() for p in model.parameters())


def test_jvp_matches_central_differences(contract) -> None:
    lin, model, inputs = contract
    gen = torch.Generator().manual_seed(10)
    v = _rand(gen, lin.num_params)
    v = v / v.norm()
    theta = _flat_params(lin, model)
    h = 1e-5
    fd = (
        _logits_at(lin, model, inputs, theta + h * v)
        - _logits_at(lin, model, inputs, theta - h * v)
    ) / (2 * h)
    jv = lin.jvp(v)
    # Truncation h² ‖z'''‖/6 plus rounding eps ‖z‖ / h, with a margin for the constants.
    scale = 1.0 + float(lin.logits.abs().max())
    tol = 100 * (h**2 + torch.finfo(F64).eps / h) * scale
    assert float((fd - jv).abs().max()) <= tol
    assert float(jv.abs().max()) > 1e-3  # not trivially zero


def test_adjointness(contract) -> None:
    lin, _, _ = contract
    gen = torch.Generator().manual_seed(11)
    v = _rand(gen, lin.num_params)
    u = _rand(gen, lin.num_inputs, lin.num_outputs)
    jv, jtu = lin.jvp(v), lin.vjp(u)
    assert jtu.shape == (lin.num_params,)
    lhs, rhs = float((u * jv).sum()), float((jtu * v).sum())
    assert abs(lhs - rhs) <= 1e-12 * (float(u.norm() * jv.norm()) + float(jtu.norm() * v.norm()))


def test_dense_jacobian_from_jvps_equals_from_vjps(contract) -> None:
    lin, _, _ = contract
    j_fwd, j_rev = _dense_jacobian_jvp(lin), _dense_jacobian_vjp(lin)
    assert j_fwd.shape == (lin.num_inputs * lin.num_outputs, lin.num_params)
    _close(j_fwd, j_rev, 1e-12)
    assert float(j_fwd.abs().max()) > 0


def test_batched_products_equal_loops(contract) -> None:
    lin, _, _ = contract
    gen = torch.Generator().manual_seed(12)
    V = _rand(gen, 3, lin.num_params)
    U = _rand(gen, 4, lin.num_inputs, lin.num_outputs)
    _close(lin.jvp_batch(V), torch.stack([lin.jvp(V[m]) for m in range(3)]), 1e-12)
    _close(lin.vjp_batch(U), torch.stack([lin.vjp(U[m]) for m in range(4)]), 1e-12)
    assert lin.jvp_batch(V[:0]).shape == (0, lin.num_inputs, lin.num_outputs)
    assert lin.vjp_batch(U[:0]).shape == (0, lin.num_params)


def test_per_example_vjp_is_vjp_of_one_example(contract) -> None:
    lin, _, _ = contract
    gen = torch.Generator().manual_seed(13)
    n, c = lin.num_inputs, lin.num_outputs
    U = _rand(gen, n, 2, c)
    pe = lin.per_example_vjp(U)
    assert pe.shape == (n, 2, lin.num_params)
    for i in range(n):
        for k in range(2):
            mask = torch.zeros(n, 1, dtype=F64)
            mask[i] = 1
            _close(pe[i, k], lin.vjp(mask * U[i, k]), 1e-11)
    # Summing over examples gives the batch VJP.
    _close(pe.sum(dim=0), lin.vjp_batch(U.permute(1, 0, 2)), 1e-11)


def test_per_example_vjp_of_a_slice_of_examples(contract) -> None:
    lin, _, _ = contract
    gen = torch.Generator().manual_seed(16)
    U = _rand(gen, lin.num_inputs, 2, lin.num_outputs)
    full = lin.per_example_vjp(U)
    part = lin.per_example_vjp(U[1:3], examples=slice(1, 3))
    assert part.shape == (2, 2, lin.num_params)
    _close(part, full[1:3], 1e-12)
    with pytest.raises(ValueError, match=r"U must have shape \(n=2, K, C=3\); got \(3, 2, 3\)"):
        lin.per_example_vjp(U[:3], examples=slice(1, 3))
    with pytest.raises(TypeError, match="examples must be a contiguous slice"):
        lin.per_example_vjp(U[:2], examples=slice(0, 4, 2))


@pytest.mark.parametrize(
    ("name", "nonzero"),
    # The CNN is piecewise linear in each coordinate (ReLU, max pooling, BatchNorm
    # affine after a linear convolution): its diagonal second derivatives vanish.
    [("mlp", True), ("cnn", False)],
)
def test_output_second_derivative_diagonal_matches_the_hessian(name, nonzero) -> None:
    lin, model, inputs = _lin(CONTRACT_MODELS[name])

    def logits(theta: torch.Tensor) -> torch.Tensor:
        params = {b.name: theta[b.offset : b.offset + b.size].reshape(b.shape) for b in lin.blocks}
        return torch.func.functional_call(model, params, inputs)

    # First the adapter: it loads torch's forward-AD decompositions without the
    # DeprecationWarning that jacfwd would raise as an error here.
    results = [lin.output_second_derivative_diagonal(max_vectors=m) for m in (None, 7)]
    hessian = torch.func.jacfwd(torch.func.jacrev(logits))(_flat_params(lin, model))
    expected = torch.diagonal(hessian, dim1=-2, dim2=-1)  # (N, C, D)
    for got in results:
        assert got.shape == (lin.num_inputs, lin.num_outputs, lin.num_params)
        _close(got, expected, 1e-10)
    assert (float(expected.abs().max()) > 1e-3) == nonzero
    last = lin.blocks[-2]  # the output layer's weight: z is linear in it
    assert float(got[..., last.offset : last.offset + last.size].abs().max()) == 0.0
    with pytest.raises(ValueError, match="max_vectors must be an integer >= 1; got 0"):
        lin.output_second_derivative_diagonal(max_vectors=0)


@pytest.mark.parametrize("max_vectors", [None, 1, 2, 7])
def test_sum_squared_equals_squared_per_example(contract, max_vectors) -> None:
    lin, _, _ = contract
    gen = torch.Generator().manual_seed(14)
    U = _rand(gen, lin.num_inputs, 3, lin.num_outputs)
    expected = (lin.per_example_vjp(U) ** 2).sum(dim=0)
    got = lin.sum_squared_per_example_vjp(U, max_vectors=max_vectors)
    assert got.shape == (3, lin.num_params)
    _close(got, expected)
    generic = lin._generic_sum_squared_per_example_vjp(U, max_vectors=max_vectors)
    _close(generic, expected)
    summed = lin.sum_squared_per_example_vjp(U, max_vectors=max_vectors, sum_cotangents=True)
    _close(summed, expected.sum(dim=0))


def test_blocks_layout(contract) -> None:
    lin, model, _ = contract
    offset = 0
    named = list(model.named_parameters())
    assert [b.name for b in lin.blocks] == [name for name, _ in named]
    for block, (_, p) in zip(lin.blocks, named, strict=True):
        assert block.shape == tuple(p.shape)
        assert block.offset == offset
        assert block.size == p.numel()
        offset += p.numel()
    assert lin.num_params == offset
    # Block k of a VJP is that parameter's gradient of the same scalar.
    gen = torch.Generator().manual_seed(15)
    u = _rand(gen, lin.num_inputs, lin.num_outputs)
    g = lin.vjp(u)
    model.zero_grad()
    (model(*lin._inputs) * u).sum().backward()
    for block, (_, p) in zip(lin.blocks, named, strict=True):
        _close(g[block.offset : block.offset + block.size].reshape(block.shape), p.grad, 1e-12)
    model.zero_grad()


# ---------------------------------------------------------------------------
# The fast exact-diagonal path against the generic one
# ---------------------------------------------------------------------------

EXPECTED_FAST = {
    "mlp": {"0.weight", "0.bias", "2.weight", "2.bias"},
    "cnn": {"0.weight", "0.bias", "1.weight", "1.bias", "5.weight", "5.bias"},
    "attention": {
        "emb.weight", "norm.weight", "norm.bias", "ff.weight", "ff.bias", "head.weight",
        "head.bias",
    },
    "tied": {"mix.weight", "mix.bias"},
    "functional_tie": {"mix.weight", "mix.bias"},
    "zoo": {
        "c1.weight", "c1.bias", "gn.weight", "gn.bias", "c2.weight", "c2.bias",
        "bn1.weight", "bn1.bias", "fc.weight", "fc.bias", "bn2.weight", "bn2.bias",
        "out.weight", "out.bias",
    },
}  # fmt: skip


@pytest.mark.parametrize("name", list(FAST_MODELS))
def test_fast_path_matches_generic(name) -> None:
    lin, _, _ = _lin(FAST_MODELS[name])
    gen = torch.Generator().manual_seed(20)
    U = _rand(gen, lin.num_inputs, 3, lin.num_outputs)
    fast = lin.sum_squared_per_example_vjp(U)
    report = dict(lin.fast_path_reasons)
    generic = lin._generic_sum_squared_per_example_vjp(U)
    _close(fast, generic)
    assert float(generic.abs().max()) > 0
    assert {k for k, v in report.items() if v == "fast"} == EXPECTED_FAST[name]
    summed = lin.sum_squared_per_example_vjp(U, sum_cotangents=True, max_vectors=2)
    _close(summed, generic.sum(dim=0))


def test_fast_path_reports_why_a_parameter_is_generic() -> None:
    lin, _, _ = _lin(make_zoo)
    gen = torch.Generator().manual_seed(21)
    lin.sum_squared_per_example_vjp(_rand(gen, lin.num_inputs, 2, lin.num_outputs))
    report = lin.fast_path_reasons
    assert report["shared.weight"] == "module called 2 times in one forward pass"
    assert report["scale.s"] == "no fast rule for Scale"
    assert report["fc.weight"] == "fast"  # despite the in-place ReLU that follows it

    lin, _, _ = _lin(make_tied)
    lin.sum_squared_per_example_vjp(_rand(gen, lin.num_inputs, 2, lin.num_outputs))
    assert lin.fast_path_reasons["emb.weight"] == "parameter shared by several modules (tied)"

    lin, _, _ = _lin(lambda: make_tied(cls=FunctionalTie))
    lin.sum_squared_per_example_vjp(_rand(gen, lin.num_inputs, 2, lin.num_outputs))
    assert lin.fast_path_reasons["emb.weight"] == "parameter also used outside its module"


class DeadBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.unused = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.unused(x)
        return self.fc(x)


def test_fast_path_with_a_parameter_that_does_not_reach_the_logits() -> None:
    torch.manual_seed(7)
    lin = linearize(DeadBranch().to(F64), torch.randn(4, 3, dtype=F64))
    U = _rand(torch.Generator().manual_seed(24), 4, 2, 2)
    out = lin.sum_squared_per_example_vjp(U)
    _close(out, lin._generic_sum_squared_per_example_vjp(U))
    assert lin.fast_path_reasons["unused.weight"] == "parameter does not affect the logits"
    assert lin.fast_path_reasons["fc.weight"] == "fast"
    assert float(out[:, 8:].abs().max()) == 0.0


class Normed(nn.Module):
    """RMSNorm on (N, T, F) tokens and on (N, F) features: the rule added in docs/adapters.md."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.tok = nn.RMSNorm(4)
        self.feat = nn.RMSNorm([2, 4], eps=1e-3)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 2, 3)
        h = torch.tanh(self.tok(self.fc(x)))
        return self.out(self.feat(h).flatten(1))


def test_fast_path_rmsnorm_rule_matches_generic() -> None:
    torch.manual_seed(10)
    model = Normed().to(F64)
    with torch.no_grad():
        model.tok.weight.copy_(1 + 0.3 * torch.randn(4, dtype=F64))
        model.feat.weight.copy_(1 + 0.3 * torch.randn(2, 4, dtype=F64))
    lin = linearize(model, torch.randn(6, 2, 3, dtype=F64))
    U = _rand(torch.Generator().manual_seed(27), 6, 3, 3)
    fast = lin.sum_squared_per_example_vjp(U)
    _close(fast, lin._generic_sum_squared_per_example_vjp(U))
    _close(fast, (lin.per_example_vjp(U) ** 2).sum(dim=0))
    _close(lin.sum_squared_per_example_vjp(U, sum_cotangents=True, max_vectors=1), fast.sum(0))
    assert lin.fast_path_reasons["tok.weight"] == "fast"
    assert lin.fast_path_reasons["feat.weight"] == "fast"
    assert all(v == "fast" for v in lin.fast_path_reasons.values())


def test_fast_path_reasons_is_read_only_and_decided_once(monkeypatch) -> None:
    lin, _, _ = _lin(make_zoo)
    reasons = lin.fast_path_reasons
    with pytest.raises(TypeError):
        reasons["fc.weight"] = "generic"  # type: ignore[index]
    assert set(reasons) == {b.name for b in lin.blocks}
    calls = []
    original = lin._grad_batched

    def spy(z, outputs, cot, retain):
        calls.append(int(cot.shape[0]))
        return original(z, outputs, cot, retain)

    monkeypatch.setattr(lin, "_grad_batched", spy)
    U = _rand(torch.Generator().manual_seed(28), lin.num_inputs, 2, lin.num_outputs)
    first = lin.sum_squared_per_example_vjp(U)
    second = lin.sum_squared_per_example_vjp(U)
    assert len(calls) == 2  # no probe: the plan was decided at the first access
    assert lin.fast_path_reasons is reasons
    _close(first, second, 0.0)
    _close(first, lin._generic_sum_squared_per_example_vjp(U))


@pytest.mark.parametrize("time_steps", [3, 5])
def test_fast_path_rejects_layers_without_examples_on_axis_0(time_steps) -> None:
    # With T == N = 5 the shapes cannot tell time from examples; the probe can.
    torch.manual_seed(5)
    model = TimeMajor().to(F64)
    x = torch.randn(5, time_steps, 3, dtype=F64)
    lin = linearize(model, x)
    gen = torch.Generator().manual_seed(22)
    U = _rand(gen, 5, 2, 2)
    fast = lin.sum_squared_per_example_vjp(U)
    _close(fast, lin._generic_sum_squared_per_example_vjp(U))
    _close(fast, (lin.per_example_vjp(U) ** 2).sum(dim=0))
    assert lin.fast_path_reasons["fc.weight"] != "fast"
    assert lin.fast_path_reasons["out.weight"] == "fast"


class TimeMajorDeadLast(nn.Module):
    """Time-major Linear behind a ReLU whose last example is dead (zero input, bias < 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, T, F)
        h = torch.relu(self.out(torch.relu(self.fc(x.transpose(0, 1)))))  # (T, N, 2)
        return h.mean(dim=0)


def test_fast_path_probe_is_not_fooled_by_a_dead_example() -> None:
    # T == N and the last example's gradient into fc is zero: a single probe on the
    # last example would see on = off = 0 and wrongly keep fc on the fast path.
    torch.manual_seed(8)
    model = TimeMajorDeadLast().to(F64)
    with torch.no_grad():
        model.fc.bias.fill_(-0.3)
        model.out.bias.fill_(0.5)
    x = torch.rand(5, 5, 3, dtype=F64)
    x[-1] = 0.0
    lin = linearize(model, x)
    U = _rand(torch.Generator().manual_seed(25), 5, 2, 2)
    fast = lin.sum_squared_per_example_vjp(U)
    _close(fast, (lin.per_example_vjp(U) ** 2).sum(dim=0))
    assert lin.fast_path_reasons["fc.weight"] != "fast"


class PerExampleThenTimeMajor(nn.Module):
    """A Linear on the examples (fast path), then Linears on time-major rows (not)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(3, 3)
        self.mix = TimeMajorDeadLast()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, T, F), T == N
        return self.mix(torch.tanh(self.pre(x)))


def test_fast_path_probe_fails_a_layer_with_nan_off_the_probed_rows() -> None:
    # N = 5: the probes sit on examples 0, 2 and 4. A NaN in example 3's row of a
    # layer's output gradient is off every probed row and never first among them, so
    # Python's max alone would skip it and keep the layer on the fast path.
    from fisherbound.adapters.torch_rules import _probe_example_axis

    n = 5
    z = torch.zeros(n, 3, dtype=F64)

    def grad_batched(z, outputs, cot, retain):  # type: ignore[no-untyped-def]
        g = torch.zeros(int(cot.shape[0]), n, 2, dtype=F64)
        for p, j in enumerate((0, 2, 4)):
            g[p, j] = 1.0  # each probe reaches its own example only
        nan = g.clone()
        nan[:, 3, 0] = float("nan")
        return (g, nan)

    outputs = [torch.zeros(n, 2, dtype=F64), torch.zeros(n, 2, dtype=F64)]
    assert _probe_example_axis(z, outputs, grad_batched) == [
        "",
        "layer output axis 0 mixes examples",
    ]


@pytest.mark.parametrize("order", ["computed first", "reasons first", "one cotangent per pass"])
def test_fast_path_plan_with_some_layers_failing_the_probe(order: str) -> None:
    # A layer that passes the example-axis probe and two that fail it: the same
    # verdicts and results whether the plan is made by the first computation or by
    # reading the reasons first, and with the smallest memory budget.
    torch.manual_seed(9)
    model = PerExampleThenTimeMajor().to(F64)
    x = torch.rand(5, 5, 3, dtype=F64)
    lin = linearize(model, x)
    U = _rand(torch.Generator().manual_seed(26), 5, 4, 2)
    if order == "reasons first":
        assert lin.fast_path_reasons["pre.weight"] == "fast"
    max_vectors = 1 if order == "one cotangent per pass" else None
    got = lin.sum_squared_per_example_vjp(U, max_vectors=max_vectors)
    _close(got, (lin.per_example_vjp(U) ** 2).sum(dim=0))
    reasons = dict(lin.fast_path_reasons)
    assert reasons["pre.weight"] == reasons["pre.bias"] == "fast"
    assert reasons["mix.fc.weight"] == "layer output axis 0 mixes examples"
    assert reasons["mix.out.weight"] == "layer output axis 0 mixes examples"
    _close(lin.sum_squared_per_example_vjp(U), got)  # the cached plan, a second time


@pytest.mark.parametrize("time_steps", [3, 4])
def test_per_example_when_examples_are_not_on_axis_0(time_steps) -> None:
    # Inputs (T, N, F): the single-example vmap cannot apply; the masked path must.
    torch.manual_seed(6)
    model = BatchSecond().to(F64)
    x = torch.randn(time_steps, 4, 3, dtype=F64)
    lin = linearize(model, x)
    gen = torch.Generator().manual_seed(23)
    U = _rand(gen, 4, 2, 2)
    pe = lin.per_example_vjp(U)
    for i in range(4):
        mask = torch.zeros(4, 1, dtype=F64)
        mask[i] = 1
        _close(pe[i, 1], lin.vjp(mask * U[i, 1]), 1e-12)
    _close(lin.sum_squared_per_example_vjp(U), (pe**2).sum(dim=0))


def test_exact_diagonal_of_linear_softmax_reference() -> None:
    # THEORY.md: z = W x, C = 3, x = (1, 2), W = 0: F = I_Δ(p) ⊗ x xᵀ, trace 10/3,
    # eigenvalues {5/3, 5/3, 0, 0, 0, 0}.
    model = nn.Linear(2, 3, bias=False).to(F64)
    nn.init.zeros_(model.weight)
    lin = linearize(model, torch.tensor([[1.0, 2.0]], dtype=F64))
    p = torch.softmax(lin.logits, dim=-1)  # (1, 3)
    B = (torch.eye(3, dtype=F64) - p.T) * p.sqrt()  # column y: √p_y (e_y − p)
    U = B.T.unsqueeze(0)  # U[n, r] = column r of B(z_n)
    diag = lin.sum_squared_per_example_vjp(U, sum_cotangents=True)
    expected = torch.tensor([2 / 9, 8 / 9] * 3, dtype=F64)
    _close(diag, expected, 1e-12)
    _close(lin._generic_sum_squared_per_example_vjp(U).sum(dim=0), expected, 1e-12)
    assert math.isclose(float(diag.sum()), 10 / 3, rel_tol=1e-12)
    J = _dense_jacobian_vjp(lin)  # (C, D)
    fisher = J.T @ (torch.diag(p[0]) - p.T @ p) @ J
    eig = torch.linalg.eigvalsh(fisher)
    _close(eig, torch.tensor([0, 0, 0, 0, 5 / 3, 5 / 3], dtype=F64), 1e-12)


@settings(max_examples=8, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    n=st.integers(1, 5),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_fast_equals_per_example_squares_hypothesis(widths, n, k, seed) -> None:
    model, (x,) = make_mlp(seed, tuple(widths), n)
    lin = linearize(model, x)
    U = _rand(torch.Generator().manual_seed(seed), n, k, widths[-1])
    expected = (lin.per_example_vjp(U) ** 2).sum(dim=0)
    _close(lin.sum_squared_per_example_vjp(U), expected)
    assert all(v == "fast" for v in lin.fast_path_reasons.values())


def test_float32_in_float32_out() -> None:
    model, (x,) = make_mlp()
    model = model.float()
    lin = linearize(model, x.float())
    U = torch.randn(5, 2, 3)
    assert lin.logits.dtype == torch.float32
    assert lin.jvp(torch.ones(lin.num_params)).dtype == torch.float32
    assert lin.vjp(U[:, 0]).dtype == torch.float32
    out = lin.sum_squared_per_example_vjp(U)
    assert out.dtype == torch.float32
    ref = lin._generic_sum_squared_per_example_vjp(U)
    _close(out, ref, 1e-5)


# ---------------------------------------------------------------------------
# Parameter selection
# ---------------------------------------------------------------------------


def test_subset_of_parameters() -> None:
    model, inputs = make_mlp()
    full = linearize(model, inputs)
    sub = linearize(model, inputs, params=["2.bias", "0.weight"])
    assert [b.name for b in sub.blocks] == ["2.bias", "0.weight"]
    assert [b.offset for b in sub.blocks] == [0, 3]
    assert sub.num_params == 3 + 60
    jf, js = _dense_jacobian_vjp(full), _dense_jacobian_vjp(sub)
    by_name = {b.name: b for b in full.blocks}
    cols = [jf[:, by_name[b.name].offset : by_name[b.name].offset + b.size] for b in sub.blocks]
    _close(js, torch.cat(cols, dim=1), 1e-12)
    gen = torch.Generator().manual_seed(30)
    U = _rand(gen, 5, 2, 3)
    _close(sub.sum_squared_per_example_vjp(U), (sub.per_example_vjp(U) ** 2).sum(dim=0))


def test_frozen_parameters_excluded_by_default_and_buffers_untouched() -> None:
    model, inputs = make_cnn()
    model[0].weight.requires_grad_(False)
    before = {n: b.clone() for n, b in model.named_buffers()}
    lin = linearize(model, inputs)
    assert "0.weight" not in [b.name for b in lin.blocks]
    assert lin.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    U = torch.randn(4, 2, 3, dtype=F64)
    lin.sum_squared_per_example_vjp(U)
    lin.per_example_vjp(U)
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n])
    # Naming a frozen parameter explicitly selects it.
    assert [b.name for b in linearize(model, inputs, params=["0.weight"]).blocks] == ["0.weight"]


def test_tied_parameter_appears_once_and_either_name_selects_it() -> None:
    model, inputs = make_tied()
    lin = linearize(model, inputs)
    assert [b.name for b in lin.blocks] == ["emb.weight", "mix.weight", "mix.bias"]
    via_head = linearize(model, inputs, params=["head.weight"])
    via_emb = linearize(model, inputs, params=["emb.weight"])
    assert [b.name for b in via_head.blocks] == ["head.weight"]
    _close(_dense_jacobian_vjp(via_head), _dense_jacobian_vjp(via_emb), 1e-14)
    # The tied gradient has both contributions: it is not the embedding path alone.
    u = torch.randn(5, 7, dtype=F64)
    model.zero_grad()
    (model(*inputs) * u).sum().backward()
    _close(via_head.vjp(u), model.emb.weight.grad.reshape(-1), 1e-12)


def test_parameter_selection_errors() -> None:
    model, inputs = make_tied()
    with pytest.raises(ValueError, match=r"params selects 'emb.weight' and 'head.weight'.*tied"):
        linearize(model, inputs, params=["emb.weight", "head.weight"])
    with pytest.raises(ValueError, match=r"lists 'mix.bias' twice"):
        linearize(model, inputs, params=["mix.bias", "mix.bias"])
    with pytest.raises(
        ValueError, match=r"unknown parameter 'mix.weigth'; did you mean 'mix.weight'"
    ):
        linearize(model, inputs, params=["mix.weigth"])
    with pytest.raises(ValueError, match=r"unknown parameter 'zzz'; available: 'emb.weight'"):
        linearize(model, inputs, params=["zzz"])
    with pytest.raises(ValueError, match="params is empty"):
        linearize(model, inputs, params=[])
    with pytest.raises(TypeError, match=r"params must be None or a list.*params=\['mix.bias'\]"):
        linearize(model, inputs, params="mix.bias")
    with pytest.raises(TypeError, match="params must contain parameter names"):
        linearize(model, inputs, params=[3])
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameter selected.*\(2 frozen\)"):
        linearize(frozen, torch.ones(1, 2))


def test_parameter_dtype_and_device_errors() -> None:
    model = nn.Linear(2, 3)
    model.register_parameter(
        "count", nn.Parameter(torch.ones(2, dtype=torch.int64), requires_grad=False)
    )
    with pytest.raises(TypeError, match=r"parameter 'count' must have a real floating-point dtype"):
        linearize(model, torch.ones(1, 2), params=["count"])
    mixed = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2).double())
    with pytest.raises(
        TypeError, match=r"share one dtype; '0.weight' is torch.float32 but '1.weight'"
    ):
        linearize(mixed, torch.ones(1, 2))
    split = nn.Linear(2, 3)
    split.bias = nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(
        ValueError, match=r"parameter 'bias' must hold values: a tensor on the 'meta'"
    ):
        linearize(split, torch.ones(1, 2))
    with pytest.raises(
        ValueError, match=r"inputs must be on the parameters' device cpu; input 0 is on meta"
    ):
        linearize(nn.Linear(2, 3), torch.ones(1, 2, device="meta"))


# ---------------------------------------------------------------------------
# Refusals and bad inputs
# ---------------------------------------------------------------------------


def test_training_mode_refusals() -> None:
    model, inputs = make_cnn()
    model.train()
    with pytest.raises(
        ValueError, match=r"module '1' \(BatchNorm2d\) is in training mode.*model.eval\(\)"
    ):
        linearize(model, inputs)
    drop = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.1))
    with pytest.raises(
        ValueError, match=r"module '1' \(Dropout\) is random in training mode.*eval"
    ):
        linearize(drop, torch.ones(1, 2))
    linearize(drop.eval(), torch.ones(1, 2))  # fine in eval mode
    linearize(nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.0)), torch.ones(1, 2))  # p = 0
    att = nn.MultiheadAttention(4, 1, dropout=0.2, batch_first=True)
    wrapped = nn.Sequential()
    wrapped.add_module("att", att)
    with pytest.raises(ValueError, match=r"'att' \(MultiheadAttention\) is random"):
        linearize(wrapped, torch.ones(1, 2, 4))
    stats = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match=r"track_running_stats=False.*couples the examples"):
        linearize(stats, torch.ones(2, 2))


class _Out(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3).double()
        self.fn = fn

    def forward(self, x):
        return self.fn(self.fc(x))


NAN_ROW = torch.tensor([[1.0], [math.nan]], dtype=F64)
INF_ROW = torch.tensor([[0.0], [math.inf]], dtype=F64)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (
            lambda z: z.reshape(2, 3, 1)[..., :0],
            r"at least 2-D and non-empty; got shape \(2, 3, 0\)",
        ),
        (lambda z: z.sum(), r"got shape \(\)"),
        (lambda z: (z, z), "must return a tensor of logits.*got tuple"),
        (lambda z: z.argmax(dim=1, keepdim=True), "floating-point logits; got dtype torch.int64"),
        (lambda z: z.float(), r"parameters' dtype torch.float64; got torch.float32"),
        (lambda z: z * NAN_ROW, r"model output must be finite; got NaN in rows \[1\]"),
        (lambda z: z + INF_ROW, r"model output must be finite; got inf in rows \[1\]"),
    ],
)
def test_bad_outputs(fn, match) -> None:
    with pytest.raises(ValueError, match=match):
        linearize(_Out(fn), torch.ones(2, 2, dtype=F64))


def test_bad_model_and_inputs() -> None:
    with pytest.raises(TypeError, match=r"params must be a non-empty dict .* got NoneType"):
        linearize(lambda x: x, torch.ones(2, 2))  # a function model needs its params
    with pytest.raises(TypeError, match=r"inputs must be a torch.Tensor.*numpy.ndarray"):
        linearize(nn.Linear(2, 3), np.ones((2, 2)))
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a torch.Tensor.*builtins.str"):
        linearize(nn.Bilinear(2, 2, 3), (torch.ones(2, 2), "x"))
    with pytest.raises(ValueError, match="non-empty tuple of tensors; got an empty sequence"):
        linearize(nn.Linear(2, 3), ())


def test_bad_product_arguments() -> None:
    lin, _, _ = _lin(make_mlp)
    d = lin.num_params
    with pytest.raises(ValueError, match=rf"v must have shape \(D={d},\); got \(3,\)"):
        lin.jvp(torch.ones(3, dtype=F64))
    with pytest.raises(
        TypeError, match=r"v must have the parameters' dtype torch.float64; got torch.float32"
    ):
        lin.jvp(torch.ones(d))
    with pytest.raises(TypeError, match=r"v must be a torch.Tensor.*numpy.ndarray"):
        lin.jvp(np.ones(d))
    with pytest.raises(ValueError, match=r"u must have shape \(N=5, C=3\); got \(3, 5\)"):
        lin.vjp(torch.ones(3, 5, dtype=F64))
    with pytest.raises(ValueError, match=rf"V must have shape \(M, D={d}\); got \({d},\)"):
        lin.jvp_batch(torch.ones(d, dtype=F64))
    with pytest.raises(ValueError, match=r"U must have shape \(M, N=5, C=3\); got \(5, 3\)"):
        lin.vjp_batch(torch.ones(5, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"U must have shape \(n=5, K, C=3\); got \(4, 1, 3\)"):
        lin.per_example_vjp(torch.ones(4, 1, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"U must have shape \(N=5, K, C=3\); got \(5, 3\)"):
        lin.sum_squared_per_example_vjp(torch.ones(5, 3, dtype=F64))
    with pytest.raises(ValueError, match="max_vectors must be an integer >= 1; got 0"):
        lin.sum_squared_per_example_vjp(torch.ones(5, 1, 3, dtype=F64), max_vectors=0)
    assert lin.per_example_vjp(torch.ones(5, 0, 3, dtype=F64)).shape == (5, 0, d)
    assert lin.sum_squared_per_example_vjp(torch.ones(5, 0, 3, dtype=F64)).shape == (0, d)


# ---------------------------------------------------------------------------
# Streaming batches
# ---------------------------------------------------------------------------


def test_linearizations_streams_batches() -> None:
    model, _ = make_mlp()
    gen = torch.Generator().manual_seed(40)
    xs = [_rand(gen, 3, 6), _rand(gen, 2, 6)]
    consumed = []

    def loader():
        for x in xs:
            consumed.append(x)
            yield (x, torch.zeros(x.shape[0]))

    stream = linearizations(model, loader())
    assert consumed == []  # lazy
    first = next(stream)
    assert len(consumed) == 1
    _close(first.logits, model(xs[0]).detach(), 1e-14)
    rest = list(stream)
    assert [lin.num_inputs for lin in rest] == [2]
    # Plain tensors and lists work too; params is honoured.
    lins = list(linearizations(model, [xs[0], [xs[1], None]], params=["2.bias"]))
    assert [lin.num_params for lin in lins] == [3, 3]
    zoo, inputs = make_zoo()
    (lin,) = linearizations(zoo, [(inputs, torch.zeros(5))])
    assert lin.num_inputs == 5


def test_linearizations_errors() -> None:
    model, _ = make_mlp()
    with pytest.raises(TypeError, match="batches must be an iterable of batches.*got int"):
        linearizations(model, 3)
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        linearizations(model, [], params=["nope"])  # checked before any batch


# ---------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA torch is not available")
@pytest.mark.parametrize("name", ["mlp", "cnn", "attention"])
def test_contract_on_cuda(name) -> None:
    model, inputs = CONTRACT_MODELS[name]()
    cpu = linearize(model, inputs)
    dev = torch.device("cuda")
    model = model.to(dev)
    lin = linearize(model, tuple(x.to(dev) for x in inputs))
    assert lin.logits.device.type == "cuda"
    gen = torch.Generator().manual_seed(50)
    v = _rand(gen, lin.num_params)
    U = _rand(gen, lin.num_inputs, 2, lin.num_outputs)
    _close(lin.jvp(v.to(dev)).cpu(), cpu.jvp(v), 1e-10)
    _close(lin.vjp(U[:, 0].to(dev)).cpu(), cpu.vjp(U[:, 0]), 1e-10)
    out = lin.sum_squared_per_example_vjp(U.to(dev))
    assert out.device.type == "cuda"
    _close(out.cpu(), cpu._generic_sum_squared_per_example_vjp(U), 1e-10)
    _close(lin.per_example_vjp(U.to(dev)).cpu(), cpu.per_example_vjp(U), 1e-10)
    with pytest.raises(ValueError, match="must be on the parameters' device"):
        lin.jvp(v)


def test_fast_path_streams_cotangents_within_max_vectors(monkeypatch) -> None:
    # Many outputs (C = 40) and max_vectors = 1: the layer-output gradients of all K
    # cotangents would not fit, so the fast path must run several chunked backwards.
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 40)).to(F64)
    lin = linearize(model, torch.randn(7, 3, dtype=F64))
    U = _rand(torch.Generator().manual_seed(26), 7, 40, 40)
    calls = []
    original = lin._grad_batched

    def spy(z, outputs, cot, retain):
        calls.append(int(cot.shape[0]))
        return original(z, outputs, cot, retain)

    monkeypatch.setattr(lin, "_grad_batched", spy)
    expected = lin._generic_sum_squared_per_example_vjp(U)
    calls.clear()
    got = lin.sum_squared_per_example_vjp(U, max_vectors=1)
    assert len(calls) > 2  # the probe pass plus several cotangent chunks
    assert max(calls[1:]) < 40
    assert sum(calls[1:]) == 40
    _close(got, expected)
    _close(lin.sum_squared_per_example_vjp(U, max_vectors=1, sum_cotangents=True), expected.sum(0))
    assert all(v == "fast" for v in lin.fast_path_reasons.values())


def test_inputs_the_model_cannot_take_get_house_errors() -> None:
    from fisherbound.adapters.torch import linearize, loss_function

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    with pytest.raises(
        TypeError,
        match=r"parameter dtype torch.float32; got torch.float64 \(5, 3\)",
    ):
        linearize(net, torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"cannot take integer inputs \(torch.int64 \(5, 3\)\)"):
        linearize(net, torch.ones(5, 3, dtype=torch.int64))
    with pytest.raises(
        ValueError,
        match=r"raised RuntimeError on inputs torch.float32 \(5, 7\).*shape the model expects",
    ):
        linearize(net, torch.randn(5, 7))
    with pytest.raises(ValueError, match=r"shape the model expects"):
        loss_function(net, torch.randn(5, 7), torch.zeros(5, dtype=torch.int64))
    # Integer inputs the model embeds are fine.
    emb = torch.nn.Sequential(torch.nn.Embedding(6, 4), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    assert linearize(emb, torch.randint(0, 6, (5, 2))).logits.shape == (5, 3)


class _FunctionalDropout(torch.nn.Module):
    """Dropout written as a function call: no Dropout module for a type check to find."""

    def __init__(self, always: bool, p: float = 0.5) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 3).double()
        self.always, self.p = always, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.nn.functional.dropout(x, self.p, training=self.always))


def test_random_forward_is_detected_by_a_second_pass() -> None:
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1])
    match = r"two forward passes on the same batch drew random numbers and disagree"
    with pytest.raises(ValueError, match=match):
        linearize(_FunctionalDropout(always=True), x)
    with pytest.raises(ValueError, match=match):
        loss_function(_FunctionalDropout(always=True), x, y)
    # Deterministic models pass: dropout off, or p = 0 (draws nothing or changes nothing).
    for model in (_FunctionalDropout(always=False), _FunctionalDropout(always=True, p=0.0)):
        assert linearize(model, x).logits.shape == (5, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused(dtype: torch.dtype) -> None:
    model = torch.nn.Linear(3, 2).to(dtype)
    with pytest.raises(TypeError, match=rf"'weight' must be float32 or float64; got {dtype}\."):
        linearize(model, torch.ones(4, 3, dtype=dtype))


def test_inputs_passed_the_wrong_way_get_a_house_error() -> None:
    model = nn.Linear(3, 2).double()
    pair = (torch.ones(4, 3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64))
    with pytest.raises(
        TypeError,
        match=r"model\(inputs\) raised TypeError with 2 positional input tensor\(s\): .* a "
        r"tuple or list of tensors as positional arguments model\(x1, x2, \.\.\.\)",
    ):
        linearize(model, pair)
    with pytest.raises(TypeError, match=r"with keywords \['z'\] input tensor\(s\)"):
        loss_function(model, {"z": pair[0]}, torch.zeros(4, dtype=torch.int64))


# ---------------------------------------------------------------------------
# Soft targets (Bernoulli): against torch.func on BCEWithLogits
# ---------------------------------------------------------------------------


def test_bernoulli_soft_targets_against_torch_func() -> None:
    from fisherbound.estimators import empirical
    from fisherbound.families import Bernoulli

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.rand(6, 3, dtype=torch.float64)  # soft targets (label smoothing, distillation)
    y[0] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)  # the ends of [0, 1] too
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach() for n, p in model.named_parameters()}

    def flat(grads: dict, lead: int = 0) -> torch.Tensor:
        return torch.cat([grads[n].reshape(*grads[n].shape[:lead], -1) for n in names], dim=lead)

    def split(v: torch.Tensor) -> dict:
        out, i = {}, 0
        for n in names:
            out[n] = v[i : i + theta[n].numel()].reshape(theta[n].shape)
            i += theta[n].numel()
        return out

    def bce(params: dict, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        z = torch.func.functional_call(model, params, (xs,))
        return F.binary_cross_entropy_with_logits(z, ys, reduction="sum")

    loss = loss_function(model, x, y, family=Bernoulli())
    d = loss.num_params
    assert float(loss.value(torch.zeros(1, d, dtype=torch.float64))[0]) == pytest.approx(
        float(bce(theta, x, y)), rel=1e-13
    )
    grad = flat(torch.func.grad(bce)(theta, x, y))
    torch.testing.assert_close(loss.gradient(), grad, rtol=1e-12, atol=1e-14)
    v = torch.randn(d, dtype=torch.float64)
    hvp = torch.func.jvp(lambda p: torch.func.grad(bce)(p, x, y), (theta,), (split(v),))[1]
    torch.testing.assert_close(loss.hvp(v), flat(hvp), rtol=1e-11, atol=1e-13)
    # The empirical Fisher with observed soft targets: Σ_n (∇ℓ_n)², per-example gradients
    # of the soft binary cross-entropy (the score y − σ(z) pulled back).
    per = torch.func.vmap(
        lambda xs, ys: torch.func.grad(bce)(theta, xs[None], ys[None]), in_dims=(0, 0)
    )(x, y)
    lin = linearize(model, x)
    emp = empirical(lin, y, Bernoulli())
    torch.testing.assert_close(emp.value, (flat(per, lead=1) ** 2).sum(0), rtol=1e-12, atol=1e-14)
    trace = empirical(lin, y, Bernoulli(), what="trace")
    assert float(trace.value) == pytest.approx(float((flat(per, lead=1) ** 2).sum()), rel=1e-12)
    # Bad soft targets are refused, naming the argument and the range.
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"must hold values in \[0, 1\]"):
            loss_function(model, x, torch.full_like(y, bad), family=Bernoulli())
        with pytest.raises(ValueError, match=r"must hold values in \[0, 1\]"):
            empirical(lin, torch.full_like(y, bad), Bernoulli())


def test_bernoulli_soft_targets_against_curvlinops() -> None:
    # curvlinops' own soft-target case: BCEWithLogitsLoss with targets in [0, 1].
    curvlinops = pytest.importorskip("curvlinops")
    from fisherbound.estimators import empirical
    from fisherbound.families import Bernoulli

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.rand(6, 3, dtype=torch.float64)
    params = list(model.parameters())
    bce = nn.BCEWithLogitsLoss(reduction="sum")
    d = sum(p.numel() for p in params)
    eye = torch.eye(d, dtype=torch.float64)
    ef = curvlinops.EFLinearOperator(model, bce, params, [(x, y)]) @ eye
    hessian = curvlinops.HessianLinearOperator(model, bce, params, [(x, y)]) @ eye
    factor = empirical(linearize(model, x), y, Bernoulli(), what="full").value  # (N, D)
    torch.testing.assert_close(factor.T @ factor, ef, rtol=1e-12, atol=1e-13)
    loss = loss_function(model, x, y, family=Bernoulli())
    torch.testing.assert_close(loss.hvp_batch(eye), hessian, rtol=1e-11, atol=1e-13)


# ---------------------------------------------------------------------------
# Function models f(params, *inputs) (the torch.func.functional_call style)
# ---------------------------------------------------------------------------


def test_function_model_equals_its_module() -> None:
    from fisherbound.adapters.torch import linearizations, loss_functions
    from fisherbound.estimators import detach_and_mix
    from fisherbound.fisher import fisher_diagonal

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    theta = {k: v.detach().clone() for k, v in module.named_parameters()}
    scale = torch.tensor(1.5, dtype=torch.float64)  # state read from the closure

    def f(p: dict, x: torch.Tensor, *, shift: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(F.linear(x if shift is None else x + shift, p["0.weight"], p["0.bias"]))
        return F.linear(h, p["2.weight"], p["2.bias"]) * scale

    def g(x: torch.Tensor) -> torch.Tensor:  # the module with the same closure
        return module(x) * scale

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return g(x)

    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    ref = linearize(Scaled(), x)
    lin = linearize(f, x, params=theta)
    assert [b.name for b in lin.blocks] == list(theta)  # θ named by the dict's keys
    assert set(lin.fast_path_reasons.values()) == {
        "a function model's tensor (its layers are not modules)"
    }
    torch.testing.assert_close(fisher_diagonal(lin), fisher_diagonal(ref), rtol=1e-13, atol=0)
    est = detach_and_mix(lin, num_probes=3, rng=0)
    est_ref = detach_and_mix(ref, num_probes=3, rng=0)
    torch.testing.assert_close(est.value, est_ref.value, rtol=1e-13, atol=0)
    kw = linearize(f, {"x": x, "shift": torch.zeros(5, 4, dtype=torch.float64)}, params=theta)
    torch.testing.assert_close(kw.logits, ref.logits, rtol=0, atol=0)  # keyword inputs
    loss, loss_ref = loss_function(f, x, y, params=theta), loss_function(Scaled(), x, y)
    torch.testing.assert_close(loss.gradient(), loss_ref.gradient(), rtol=1e-13, atol=0)
    v = torch.randn(loss.num_params, dtype=torch.float64)
    torch.testing.assert_close(loss.hvp(v), loss_ref.hvp(v), rtol=1e-12, atol=1e-14)
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    streamed = fisher_diagonal(linearizations(f, data, params=theta))
    torch.testing.assert_close(streamed, fisher_diagonal(ref), rtol=1e-13, atol=1e-15)
    assert [ls.num_inputs for ls in loss_functions(f, data, params=theta)] == [3, 2]
    assert all(torch.equal(theta[k], module.state_dict()[k]) for k in theta)  # not changed
    # θ follows the dict's order, dotted keys or not: flat vectors line up with it.
    mixed = {"2.bias": theta["2.bias"], "0.weight": theta["0.weight"], "w": theta["2.weight"]}
    mixed["0.bias"] = theta["0.bias"]

    def h(p: dict, xs: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(F.linear(xs, p["0.weight"], p["0.bias"]))
        return F.linear(hidden, p["w"], p["2.bias"]) * scale

    lin_mixed = linearize(h, x, params=mixed)
    assert [b.name for b in lin_mixed.blocks] == list(mixed)
    # buffers=: state f reads but that is not differentiated (here the output scale and a
    # frozen first layer), handed over in one dict after the parameters.
    seen: list[list[str]] = []

    def k(p: dict, xs: torch.Tensor) -> torch.Tensor:
        seen.append(list(p))
        hidden = torch.tanh(F.linear(xs, p["frozen.w"], p["frozen.b"]))
        return F.linear(hidden, p["2.weight"], p["2.bias"]) * p["scale"]

    head = {"2.weight": theta["2.weight"], "2.bias": theta["2.bias"]}
    state = {"frozen.w": theta["0.weight"], "frozen.b": theta["0.bias"], "scale": scale}
    lin_b = linearize(k, x, params=head, buffers=state)
    assert [b.name for b in lin_b.blocks] == ["2.weight", "2.bias"]
    assert seen[-1] == ["2.weight", "2.bias", "frozen.w", "frozen.b", "scale"]
    ref_head = linearize(Scaled(), x, params=["inner.2.weight", "inner.2.bias"])
    torch.testing.assert_close(
        fisher_diagonal(lin_b), fisher_diagonal(ref_head), rtol=1e-13, atol=0
    )
    loss_b = loss_function(k, x, y, params=head, buffers=state)
    ref_loss = loss_function(Scaled(), x, y, params=["inner.2.weight", "inner.2.bias"])
    torch.testing.assert_close(loss_b.gradient(), ref_loss.gradient(), rtol=1e-13, atol=0)
    # J θ for θ itself, flattened in each linearization's own order: the same vector.
    flat_mixed = torch.cat([t.reshape(-1) for t in mixed.values()])
    flat_ref = torch.cat([t.reshape(-1) for t in theta.values()])
    torch.testing.assert_close(lin_mixed.jvp(flat_mixed), ref.jvp(flat_ref), rtol=1e-13, atol=0)


def test_function_model_bad_params() -> None:
    def f(p: dict, x: torch.Tensor) -> torch.Tensor:
        return x @ p["w"]

    x = torch.randn(3, 2)
    with pytest.raises(TypeError, match=r"params must be a non-empty dict of tensors .* got list"):
        linearize(f, x, params=[torch.ones(2, 3)])
    with pytest.raises(TypeError, match=r"got an empty dict"):
        loss_function(f, x, torch.zeros(3).long(), params={})
    with pytest.raises(TypeError, match=r"params\['w'\] is a torch.int64 tensor"):
        linearize(f, x, params={"w": torch.ones(2, 3, dtype=torch.int64)})
    with pytest.raises(TypeError, match=r"params\['w'\] is ndarray"):
        linearize(f, x, params={"w": np.ones((2, 3))})
    with pytest.raises(TypeError, match=r"params keys must be names .*; got 'a\.\.w'"):
        linearize(f, x, params={"a..w": torch.ones(2, 3)})
    with pytest.raises(TypeError, match=r"params key 'to' cannot name a tensor"):
        linearize(f, x, params={"to": torch.ones(2, 3)})
    with pytest.raises(TypeError, match=r"params key 'to.w' cannot name a tensor"):
        linearize(f, x, params={"to.w": torch.ones(2, 3)})
    with pytest.raises(TypeError, match=r"params key 'a.w' .* nor a prefix"):
        linearize(f, x, params={"a": torch.ones(2, 3), "a.w": torch.ones(2, 3)})
    with pytest.raises(TypeError, match=r"for a torch.nn.Module; got a dict"):
        linearize(nn.Linear(2, 3), x, params={"weight": torch.ones(3, 2)})
    with pytest.raises(TypeError, match=r"buffers must be None for a torch.nn.Module"):
        linearize(nn.Linear(2, 3), x, buffers={"s": torch.ones(())})
    w = {"w": torch.ones(2, 3)}
    with pytest.raises(TypeError, match=r"buffers must be None or a dict of tensors .* list"):
        linearize(f, x, params=w, buffers=[torch.ones(())])
    with pytest.raises(TypeError, match=r"buffers\['s'\] is float"):
        linearize(f, x, params=w, buffers={"s": 1.0})
    with pytest.raises(TypeError, match=r"buffers keys must be names .*; got 's\.'"):
        linearize(f, x, params=w, buffers={"s.": torch.ones(())})
    with pytest.raises(TypeError, match=r"buffers key 'w' cannot name a tensor"):
        linearize(f, x, params=w, buffers={"w": torch.ones(())})
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, or a function"):
        linearize("model", x)


def test_unravel_and_ravel_shape_results_like_the_parameters() -> None:
    # Results shaped like the parameters (what EWC, merging and pruning code consumes).
    from fisherbound.adapters.numpy import MLP
    from fisherbound.adapters.numpy import linearize as linearize_numpy
    from fisherbound.fisher import fisher_diagonal

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    lin = linearize(module, torch.randn(5, 3, dtype=torch.float64), params=["2.weight", "0.bias"])
    d = fisher_diagonal(lin)
    tree = lin.unravel(d)
    assert list(tree) == ["2.weight", "0.bias"]  # the selection's names, in θ's order
    assert {k: tuple(v.shape) for k, v in tree.items()} == {"2.weight": (2, 4), "0.bias": (4,)}
    assert torch.equal(tree["2.weight"].reshape(-1), d[:8])  # the same entries, reshaped
    assert torch.equal(lin.ravel(tree), d)
    stack = torch.stack([d, 2 * d, 3 * d])  # leading axes are kept: (k, D) -> (k, *shape)
    trees = lin.unravel(stack)
    assert tuple(trees["2.weight"].shape) == (3, 2, 4)
    assert torch.equal(lin.ravel(trees), stack)
    with pytest.raises(ValueError, match=r"v must have shape \(D,\).*got \(5,\)"):
        lin.unravel(d[:5])
    with pytest.raises(ValueError, match=r"v must have shape \(K, D\).*got \(3, 5\)"):
        lin.unravel(stack[:, :5])
    with pytest.raises(ValueError, match=r"v must have shape \(\.\.\., D\) with D = 12; got a 0-d"):
        lin.unravel(d[0])
    with pytest.raises(TypeError, match=r"v must be an array of shape \(\.\.\., D\).*got list"):
        lin.unravel([1.0])
    with pytest.raises(TypeError, match=r"tree must be a dict from parameter names"):
        lin.ravel([d])
    with pytest.raises(ValueError, match=r"missing \['0.bias'\], unknown \['x'\]"):
        lin.ravel({"2.weight": tree["2.weight"], "x": tree["0.bias"]})
    with pytest.raises(ValueError, match=r"tree\['0.bias'\] must have shape"):
        lin.ravel({**tree, "0.bias": tree["0.bias"][:3]})
    with pytest.raises(TypeError, match=r"tree\['2.weight'\] must be an array .* got list"):
        lin.ravel({**tree, "2.weight": [[0.0] * 4] * 2})
    rank = r"tree\['2.weight'\] must have shape \(\.\.\., ∗\(2, 4\)\)"
    with pytest.raises(ValueError, match=rank):
        lin.ravel({**tree, "2.weight": tree["2.weight"][0]})
    # The NumPy reference models: the same dict form.
    ref = linearize_numpy(MLP.random([3, 4, 2], rng=0), np.ones((5, 3)))
    dn = fisher_diagonal(ref)
    arrays = ref.unravel(dn)
    assert {k: v.shape for k, v in arrays.items()} == {b.name: b.shape for b in ref.blocks}
    np.testing.assert_array_equal(ref.ravel(arrays), dn)


def test_loss_functions_unravel_hessian_directions_like_the_parameters() -> None:
    # The landscape's directions (k, D) come from loss functions: the same helpers.
    from fisherbound.adapters.numpy import MLP
    from fisherbound.adapters.numpy import loss_function as numpy_loss
    from fisherbound.adapters.torch import loss_function
    from fisherbound.landscape import hessian_directions

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    loss = loss_function(module, x, y, params=["2.weight", "0.bias"])
    hd = hessian_directions(loss, rng=0)
    tree = loss.unravel(hd.directions)
    assert {k: tuple(v.shape) for k, v in tree.items()} == {"2.weight": (2, 2, 4), "0.bias": (2, 4)}
    assert torch.equal(loss.ravel(tree), hd.directions)
    ref = numpy_loss(MLP.random([3, 4, 2], rng=0), np.ones((6, 3)), np.array([0, 1, 1, 0, 1, 0]))
    arrays = ref.unravel(np.arange(float(ref.num_params)))
    assert {k: v.shape for k, v in arrays.items()} == {b.name: b.shape for b in ref.blocks}


def test_parameters_updated_in_place_after_linearize_are_refused() -> None:
    """An optimiser step after linearize: every later product is a RuntimeError naming
    the changed parameters (selected or not), never a mixture of old and new θ."""
    from fisherbound.estimators import detach_and_mix
    from fisherbound.fisher import fisher_diagonal

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    lin = linearize(model, x, params=["2.weight", "2.bias"])
    before = fisher_diagonal(lin)
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # only the unselected layer
    model(x).sum().backward()
    opt.step()
    calls = {
        "fisher_diagonal": lambda: fisher_diagonal(lin),
        "detach_and_mix": lambda: detach_and_mix(lin, per_example=True, num_probes=2, rng=0),
        "jvp": lambda: lin.jvp(torch.ones(lin.num_params, dtype=torch.float64)),
        "vjp": lambda: lin.vjp(torch.ones_like(lin.logits)),
    }
    for call in calls.values():
        with pytest.raises(
            RuntimeError,
            match=r"^\['0\.weight', '0\.bias'\] \(parameters, buffers or inputs of the model\) "
            r"changed in place after linearize .* Build a new one with linearize\(model, inputs\)",
        ):
            call()
    fresh = fisher_diagonal(linearize(model, x, params=["2.weight", "2.bias"]))
    assert not torch.allclose(fresh, before)  # the new θ gives another Fisher


def test_buffers_and_inputs_changed_in_place_are_refused_too() -> None:
    class Shift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("b", torch.zeros(4, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.b

    from fisherbound.fisher import fisher_diagonal

    model = nn.Sequential(nn.Linear(3, 4), Shift(), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    lin = linearize(model, x)
    fisher_diagonal(lin)
    fisher_diagonal(lin)  # the library's own products change nothing
    model[1].b.add_(3.0)
    with pytest.raises(RuntimeError, match=r"^\['buffer 1\.b'\] \(parameters, buffers or inputs"):
        fisher_diagonal(lin)
    lin = linearize(model, x)
    x.mul_(2.0)
    with pytest.raises(RuntimeError, match=r"^\['inputs\[0\]'\] \(parameters, buffers or inputs"):
        lin.vjp(torch.ones_like(lin.logits))
