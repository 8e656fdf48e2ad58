"""The torch adapter with position axes: logits (N, *S, C), masks, structured inputs and
outputs, and the loss functions with ignore_index, against dense per-position Jacobians
from torch.func.jacrev and against torch.nn.functional."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _assertions import assert_close
from torch import nn
from torch.nn import functional as F

from fisherbound.adapters.torch import (
    linearizations,
    linearize,
    loss_function,
    loss_functions,
)
from fisherbound.estimators import empirical
from fisherbound.families import Bernoulli, Gaussian
from fisherbound.fisher import fisher_diagonal

F64 = torch.float64


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-11) -> None:
    assert_close(a, b, rtol=tol, atol=tol)


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


# ---------------------------------------------------------------------------
# Tiny models (float64, seeded)
# ---------------------------------------------------------------------------


class Seq(nn.Module):
    """Token ids (N, T) -> logits (N, T, C): Embedding, a Linear on (N, T, F), tanh, Linear."""

    def __init__(self, vocab: int = 7, dim: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, 5)
        self.head = nn.Linear(5, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(self.emb(tokens))))


class Seg(nn.Module):
    """Images (N, 2, H, W) -> logits (N, C, H, W) (PyTorch's class axis 1)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.tanh(self.c1(x)))


class Output:
    """A Hugging Face-like output object: attributes, not a tensor."""

    def __init__(self, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        self.logits = logits
        self.hidden = hidden


class Keyword(nn.Module):
    """Keyword inputs (input_ids, attention_mask) -> an object with ``logits`` (N, T, C).

    The attention mask enters the forward pass (it scales the hidden states), as in
    a language model; the loss must still ignore the padded positions.
    """

    def __init__(self, vocab: int = 7, dim: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Output:
        h = torch.tanh(self.mix(self.emb(input_ids)))
        # Mix along the sequence (a causal cumulative mean), so positions interact.
        w = attention_mask.to(h.dtype).unsqueeze(-1)
        h = torch.cumsum(h * w, dim=1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
        return Output(self.head(h), h)


class TupleOut(nn.Module):
    """Two positional inputs -> (hidden, logits (N, C, T)) as a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.lin = nn.Linear(2, 4)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.conv(x))  # (N, 4, T)
        z = h * self.lin(s).unsqueeze(-1)  # (N, 4, T)
        return h, z


def _seq(seed: int = 0, n: int = 3, t: int = 5) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    return Seq().to(F64), torch.randint(0, 7, (n, t), generator=gen)


def _seg(seed: int = 1) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return Seg().to(F64), _rand(torch.Generator().manual_seed(seed), 2, 2, 3, 4)


def _keyword(seed: int = 2) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 7, (3, 4), generator=gen)
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    return Keyword().to(F64), {"input_ids": ids, "attention_mask": attention}


def _tuple_out(seed: int = 3) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    return TupleOut().to(F64), (_rand(gen, 3, 3, 4), _rand(gen, 3, 2))


# ---------------------------------------------------------------------------
# The independent reference: dense per-position Jacobians by torch.func.jacrev
# ---------------------------------------------------------------------------


def dense_jacobian(
    model: nn.Module,
    inputs: Any,
    select: Callable[[Any], torch.Tensor] = lambda out: out,
    class_axis: int = -1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """J of shape (N, *S, C, D), classes last, rows of masked positions zeroed."""
    named = list(model.named_parameters())
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    args, kwargs = (
        ((), inputs)
        if isinstance(inputs, dict)
        else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs), {})
    )

    def f(t: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, p in named:
            params[name] = t[offset : offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        z = select(torch.func.functional_call(model, params, args, kwargs))
        return torch.movedim(z, class_axis, -1)

    J = torch.func.jacrev(f)(theta)
    if mask is not None:
        J = J * mask[..., None, None].to(J.dtype)
    return J


def check_products(lin: Any, J: torch.Tensor, seed: int = 0) -> None:
    """Every product of ``lin`` against the dense J (N, *S, C, D)."""
    gen = torch.Generator().manual_seed(seed)
    out, d = tuple(J.shape[:-1]), int(J.shape[-1])
    n = out[0]
    assert lin.output_shape == out
    assert lin.num_params == d
    v = _rand(gen, d)
    _close(lin.jvp(v), J @ v)
    u = _rand(gen, *out)
    Jf = J.reshape(-1, d)
    _close(lin.vjp(u), u.reshape(-1) @ Jf)
    V = _rand(gen, 2, d)
    _close(lin.jvp_batch(V), torch.einsum("...d,md->m...", J, V))
    U = _rand(gen, 2, *out)
    _close(lin.vjp_batch(U), U.reshape(2, -1) @ Jf)
    k = 2
    Uk = _rand(gen, n, k, *out[1:])
    Jn = J.reshape(n, -1, d)  # (N, P C, D)
    expected = torch.einsum("npd,nkp->nkd", Jn, Uk.reshape(n, k, -1))
    _close(lin.per_example_vjp(Uk), expected)
    _close(lin.per_example_vjp(Uk[1:], examples=slice(1, n)), expected[1:])
    squares = (expected**2).sum(dim=0)
    _close(lin.sum_squared_per_example_vjp(Uk), squares)
    _close(lin.sum_squared_per_example_vjp(Uk, max_vectors=1), squares)
    _close(lin.sum_squared_per_example_vjp(Uk, sum_cotangents=True), squares.sum(dim=0))
    _close(lin._generic_sum_squared_per_example_vjp(Uk, max_vectors=1), squares)


# ---------------------------------------------------------------------------
# Products with position axes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_sequence_outputs_class_last(masked: bool) -> None:
    model, tokens = _seq()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]]) > 0 if masked else None
    lin = linearize(model, tokens, mask=mask)
    assert lin.num_positions == 5
    assert lin.num_outputs == 3
    if masked:
        assert lin.mask is not None
        assert torch.equal(lin.mask, mask)
    else:
        assert lin.mask is None
    _close(lin.logits, model(tokens).detach(), 1e-14)  # masked logits keep their values
    J = dense_jacobian(model, tokens, mask=mask)
    check_products(lin, J)
    assert lin._per_example_mode == "vmap"
    # The fast path covers the Embedding and both Linears on (N, T, F): weight sharing
    # over the positions, Σ_t a_t g_tᵀ per example.
    assert set(lin.fast_path_reasons.values()) == {"fast"}
    if masked:
        assert float(lin.jvp(_rand(torch.Generator(), lin.num_params))[~mask].abs().max()) == 0.0


def test_vjp_ignores_masked_rows_whether_zero_or_not() -> None:
    # The CPU skips the masking pass when the masked rows of u are zero already (the
    # estimators' probes): one nonzero entry there must still be ignored.
    model, tokens = _seq()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]]) > 0
    lin = linearize(model, tokens, mask=mask)
    J = dense_jacobian(model, tokens, mask=mask)
    d = int(J.shape[-1])
    gen = torch.Generator().manual_seed(3)
    U = _rand(gen, 2, *lin.output_shape) * mask[..., None]  # zero at masked positions
    want = U.reshape(2, -1) @ J.reshape(-1, d)
    _close(lin.vjp(U[0]), want[0])
    _close(lin.vjp_batch(U), want)
    U[1, 0, 4, 2] = 1e3  # position (0, 4) is masked
    _close(lin.vjp(U[1]), want[1])
    _close(lin.vjp_batch(U), want)
    only = torch.zeros_like(U)
    only[:, ~mask] = 1.0  # nonzero ONLY at the masked rows: nothing comes through
    assert float(lin.vjp(only[0]).abs().max()) == 0.0
    assert float(lin.vjp_batch(only).abs().max()) == 0.0
    mean, _, _ = lin.vjp_batch_square_moments(only)
    assert float(mean.abs().max()) == 0.0
    # Under torch.func.vmap the cheap test cannot read the rows: it masks instead.
    _close(torch.func.vmap(lin.vjp)(U), want)


@pytest.mark.parametrize("masked", [False, True])
def test_fast_path_equals_generic_path_on_sequences(masked: bool) -> None:
    model, tokens = _seq(seed=5, n=4, t=3)
    mask = torch.rand(4, 3, generator=torch.Generator().manual_seed(1)) > 0.4 if masked else None
    lin = linearize(model, tokens, mask=mask)
    U = _rand(torch.Generator().manual_seed(2), 4, 3, 3, 3)
    fast = lin.sum_squared_per_example_vjp(U)
    generic = lin._generic_sum_squared_per_example_vjp(U)
    _close(fast, generic)
    assert set(lin.fast_path_reasons.values()) == {"fast"}
    _close(lin.sum_squared_per_example_vjp(U, max_vectors=1), generic)
    # The per-example squares from the dense Jacobian, as an independent check.
    J = dense_jacobian(model, tokens, mask=mask).reshape(4, -1, lin.num_params)
    pe = torch.einsum("npd,nkp->nkd", J, U.reshape(4, 3, -1))
    _close(fast, (pe**2).sum(dim=0))


def test_segmentation_outputs_class_axis_1() -> None:
    model, x = _seg()
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[0, 1:, 2:] = False
    for m in (None, mask):
        lin = linearize(model, x, class_axis=1, mask=m)
        assert lin.output_shape == (2, 3, 4, 3)
        _close(lin.logits, model(x).detach().permute(0, 2, 3, 1), 1e-14)
        check_products(lin, dense_jacobian(model, x, class_axis=1, mask=m), seed=3)
        assert set(lin.fast_path_reasons.values()) == {"fast"}
    # The same with class_axis=-3, and the messages name the position axes.
    lin = linearize(model, x, class_axis=-3)
    assert lin.output_shape == (2, 3, 4, 3)
    with pytest.raises(
        ValueError, match=r"u must have shape \(N=2, T1=3, T2=4, C=3\); got \(2, 3\)"
    ):
        lin.vjp(torch.ones(2, 3, dtype=F64))


def test_operand_messages_with_positions() -> None:
    model, tokens = _seq()
    lin = linearize(model, tokens)
    with pytest.raises(ValueError, match=r"u must have shape \(N=3, T=5, C=3\); got \(3, 3\)"):
        lin.vjp(torch.ones(3, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"U must have shape \(M, N=3, T=5, C=3\); got \(3, 5\)"):
        lin.vjp_batch(torch.ones(3, 5, dtype=F64))
    with pytest.raises(
        ValueError, match=r"U must have shape \(n=3, K, T=5, C=3\); got \(3, 1, 3\)"
    ):
        lin.per_example_vjp(torch.ones(3, 1, 3, dtype=F64))
    with pytest.raises(
        ValueError, match=r"U must have shape \(N=3, K, T=5, C=3\); got \(3, 1, 4, 3"
    ):
        lin.sum_squared_per_example_vjp(torch.ones(3, 1, 4, 3, dtype=F64))
    assert lin.jvp_batch(torch.ones(0, lin.num_params, dtype=F64)).shape == (0, 3, 5, 3)
    assert lin.per_example_vjp(torch.ones(3, 0, 5, 3, dtype=F64)).shape == (3, 0, lin.num_params)


def test_masked_per_example_path_with_positions() -> None:
    # The per-example products from the batch's backward pass (models that do not act
    # per example use it) agree with the dense Jacobian too.
    model, tokens = _seq(seed=4)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]]) > 0
    lin = linearize(model, tokens, mask=mask)
    lin._per_example_mode = "masked"
    J = dense_jacobian(model, tokens, mask=mask).reshape(3, -1, lin.num_params)
    U = _rand(torch.Generator().manual_seed(5), 3, 2, 5, 3)
    _close(lin.per_example_vjp(U), torch.einsum("npd,nkp->nkd", J, U.reshape(3, 2, -1)))


def test_dict_inputs_and_attribute_output() -> None:
    model, batch = _keyword()
    mask = batch["attention_mask"] > 0
    for spec in ("attention_mask", mask, lambda inputs: inputs["attention_mask"]):
        lin = linearize(model, batch, output="logits", mask=spec)
        assert torch.equal(lin.mask, mask)
        J = dense_jacobian(model, batch, select=lambda out: out.logits, mask=mask)
        check_products(lin, J, seed=6)
        assert lin._per_example_mode == "vmap"  # vmap over dict inputs
    # A callable selector works the same.
    lin = linearize(model, batch, output=lambda out: out.logits)
    check_products(lin, dense_jacobian(model, batch, select=lambda out: out.logits), seed=7)


def test_tuple_output_with_int_selector() -> None:
    model, inputs = _tuple_out()
    lin = linearize(model, inputs, output=1, class_axis=1)
    assert lin.output_shape == (3, 4, 4)
    J = dense_jacobian(model, inputs, select=lambda out: out[1], class_axis=1)
    check_products(lin, J, seed=8)
    lin = linearize(model, list(inputs), output=-1, class_axis=-2)
    check_products(lin, J, seed=9)


def test_dict_output_with_key() -> None:
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"hidden": x, "logits": self.fc(x)}

    torch.manual_seed(0)
    model = DictOut().to(F64)
    x = _rand(torch.Generator().manual_seed(1), 2, 4, 3)
    lin = linearize(model, x, output="logits")
    check_products(lin, dense_jacobian(model, x, select=lambda out: out["logits"]))


def test_output_second_derivative_diagonal_with_positions() -> None:
    model, tokens = _seq(seed=6, n=2, t=3)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    lin = linearize(model, tokens, mask=mask, params=["fc.weight", "fc.bias", "head.bias"])
    h = lin.output_second_derivative_diagonal(max_vectors=7)
    named = dict(model.named_parameters())
    names = ["fc.weight", "fc.bias", "head.bias"]
    theta = torch.cat([named[k].detach().reshape(-1) for k in names])

    def f(t: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for k in names:
            params[k] = t[offset : offset + named[k].numel()].reshape(named[k].shape)
            offset += named[k].numel()
        return torch.func.functional_call(model, params, (tokens,))

    H = torch.func.jacfwd(torch.func.jacrev(f))(theta)  # (N, T, C, D, D)
    expected = torch.diagonal(H, dim1=-2, dim2=-1) * mask[..., None, None]
    assert h.shape == (2, 3, 3, lin.num_params)
    _close(h, expected, 1e-10)


# ---------------------------------------------------------------------------
# The Fisher diagonal end to end
# ---------------------------------------------------------------------------


def test_fisher_diagonal_sums_over_examples_and_positions() -> None:

    model, tokens = _seq(seed=7, n=3, t=4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]]) > 0
    lin = linearize(model, tokens, mask=mask)
    J = dense_jacobian(model, tokens, mask=mask)  # (N, T, C, D)
    p = torch.softmax(lin.logits, dim=-1)  # (N, T, C)
    K = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    expected = torch.einsum("ntcd,ntce,nted->d", J, K, J)
    _close(fisher_diagonal(lin), expected, 1e-10)
    _close(fisher_diagonal(lin, reduction="mean"), expected / 3, 1e-10)


# ---------------------------------------------------------------------------
# Loss functions
# ---------------------------------------------------------------------------


def _flat_loss(model: nn.Module, fn: Callable[[Any], torch.Tensor]) -> Callable[..., torch.Tensor]:
    named = list(model.named_parameters())

    def f(t: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, p in named:
            params[name] = t[offset : offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        return fn(lambda *a, **k: torch.func.functional_call(model, params, a, k))

    return f


def _check_loss(loss: Any, reference: Callable[..., torch.Tensor], model: nn.Module) -> None:
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    d = int(theta.shape[0])
    gen = torch.Generator().manual_seed(11)
    shifts = 0.1 * _rand(gen, 3, d)
    expected = torch.stack(
        [reference(theta + s) for s in torch.cat([theta.new_zeros(1, d), shifts])]
    )
    _close(loss.value(torch.cat([theta.new_zeros(1, d), shifts])), expected)
    _close(loss.gradient(), torch.func.grad(reference)(theta))
    V = _rand(gen, 2, d)
    H = torch.func.hessian(reference)(theta)
    _close(loss.hvp_batch(V), V @ H, 1e-10)
    _close(loss.hvp(V[0]), H @ V[0], 1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_with_ignore_index(reduction: str) -> None:
    # A (N, C, T) Conv1d model, class axis 1, labels (N, T) with -100 on padding.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 1)).to(F64)
    x = _rand(torch.Generator().manual_seed(4), 3, 2, 5)
    y = torch.tensor([[0, 1, 2, -100, -100], [2, 2, 1, 0, 1], [-100, 1, -100, 0, -100]])
    loss = loss_function(model, x, y, reduction=reduction, class_axis=1)
    assert loss.num_counted == 10  # the counted positions
    assert loss.num_inputs == 3
    assert torch.equal(loss.mask, y != -100)
    ref = _flat_loss(model, lambda m: F.cross_entropy(m(x), y, reduction=reduction))
    _check_loss(loss, ref, model)
    # The value is torch's own CrossEntropyLoss (ignore_index=-100).
    _close(
        loss.value(torch.zeros(1, loss.num_params, dtype=F64))[0],
        F.cross_entropy(model(x), y, reduction=reduction).detach(),
    )


def test_cross_entropy_with_mask_and_sequence_logits() -> None:
    model, tokens = _seq(seed=8)
    y = torch.randint(0, 3, (3, 5), generator=torch.Generator().manual_seed(9))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]]) > 0
    loss = loss_function(model, tokens, y, reduction="mean", mask=mask)
    assert loss.num_counted == int(mask.sum())
    target = torch.where(mask, y, -100)
    ref = _flat_loss(model, lambda m: F.cross_entropy(m(tokens).transpose(1, 2), target))
    _check_loss(loss, ref, model)


def test_bernoulli_and_gaussian_losses_in_the_user_layout() -> None:
    model, x = _seg(seed=5)
    gen = torch.Generator().manual_seed(6)
    bits = (torch.rand(2, 3, 3, 4, generator=gen) > 0.5).to(F64)  # (N, C, H, W)
    loss = loss_function(model, x, bits, family=Bernoulli(), class_axis=1)
    ref = _flat_loss(
        model, lambda m: F.binary_cross_entropy_with_logits(m(x), bits, reduction="sum")
    )
    _check_loss(loss, ref, model)
    targets = _rand(gen, 2, 3, 3, 4)
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[1, 0] = False
    loss = loss_function(
        model, x, targets, family=Gaussian(), class_axis=1, mask=mask, reduction="mean"
    )
    count = int(mask.sum())
    assert loss.num_counted == count
    w = mask[:, None].to(F64)  # the family's −log p: ½‖y − z‖² + (C/2) log 2π per position

    def gaussian(m: Callable[..., torch.Tensor]) -> torch.Tensor:
        sq = F.mse_loss(m(x) * w, targets * w, reduction="sum")
        return (0.5 * sq + count * 1.5 * math.log(2 * math.pi)) / count

    _check_loss(loss, _flat_loss(model, gaussian), model)


def test_loss_with_dict_inputs_and_selector() -> None:
    model, batch = _keyword()
    y = torch.tensor([[0, 1, 2, 1], [2, 0, -100, -100], [1, -100, -100, -100]])
    loss = loss_function(model, batch, y, output="logits", reduction="mean")
    assert loss.num_counted == 7
    ref = _flat_loss(model, lambda m: F.cross_entropy(m(**batch).logits.transpose(1, 2), y))
    _check_loss(loss, ref, model)


# ---------------------------------------------------------------------------
# Streams of dict batches
# ---------------------------------------------------------------------------


def test_streams_of_dict_batches_with_a_mask_key() -> None:
    model, first = _keyword()
    gen = torch.Generator().manual_seed(12)
    second = {
        "input_ids": torch.randint(0, 7, (2, 4), generator=gen),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
    }
    labels = [
        torch.tensor([[0, 1, 2, 1], [2, 0, -100, -100], [1, -100, -100, -100]]),
        torch.tensor([[1, 1, 0, -100], [2, 1, 0, 1]]),
    ]
    data = [{**b, "labels": y} for b, y in zip([first, second], labels, strict=True)]
    # Linearizations: the labels entry is left out (the model takes no labels).
    lins = list(linearizations(model, data, output="logits", mask="attention_mask"))
    for lin, b in zip(lins, [first, second], strict=True):
        assert torch.equal(lin.mask, b["attention_mask"] > 0)
        J = dense_jacobian(model, b, lambda out: out.logits, mask=b["attention_mask"] > 0)
        check_products(lin, J, seed=13)
    # Tuples (inputs, labels) whose inputs are a dict work too.
    (lin,) = linearizations(model, [(first, labels[0])], output="logits")
    assert lin.mask is None
    # Loss functions from dict batches: labels from the key "labels".
    losses = list(
        loss_functions(model, data, output="logits", mask="attention_mask", reduction="mean")
    )
    assert [loss.num_counted for loss in losses] == [7, 7]
    for loss, b, y in zip(losses, [first, second], labels, strict=True):
        target = torch.where(b["attention_mask"] > 0, y, -100)
        ref = _flat_loss(
            model, lambda m, b=b, t=target: F.cross_entropy(m(**b).logits.transpose(1, 2), t)
        )
        _check_loss(loss, ref, model)
    # Another key, and pairs.
    renamed = [
        {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "y": y}
        for b, y in zip([first, second], labels, strict=True)
    ]
    (a, _) = loss_functions(model, renamed, output="logits", label_key="y")
    assert a.num_counted == 7
    (c,) = loss_functions(model, [(first, labels[0])], output="logits")
    _close(c.gradient(), a.gradient())
    with pytest.raises(
        ValueError, match=r"batch 0 is a dict without the labels' key label_key='labels'"
    ):
        list(loss_functions(model, renamed, output="logits"))


def test_landscape_mean_over_counted_positions() -> None:
    # The landscape's mean over a data set weights each batch by its counted positions.
    from fisherbound.landscape import surface

    model, first = _keyword()
    labels = torch.tensor([[0, 1, 2, 1], [2, 0, -100, -100], [1, -100, -100, -100]])
    data = [
        ({k: v[:2] for k, v in first.items()}, labels[:2]),
        ({k: v[2:] for k, v in first.items()}, labels[2:]),
    ]
    losses = list(loss_functions(model, data, output="logits", reduction="mean"))
    whole = loss_function(model, first, labels, output="logits", reduction="mean")
    d = whole.num_params
    direction = _rand(torch.Generator().manual_seed(3), 1, d)
    got = surface(
        losses, direction, coordinates=torch.tensor([0.0, 0.5], dtype=F64), progress=False
    )
    expected = whole.value(torch.stack([0.0 * direction[0], 0.5 * direction[0]]))
    _close(got.values, expected)


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------


def test_bad_masks() -> None:
    model, tokens = _seq()
    with pytest.raises(
        ValueError,
        match=r"mask must have the logits' shape without the class axis, \(N, \*S\) = \(3, 5\); "
        r"got shape \(3, 4\)",
    ):
        linearize(model, tokens, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(
        ValueError, match=r"mask must have the logits' shape .*got shape \(3, 5, 3\)"
    ):
        linearize(model, tokens, mask=torch.ones(3, 5, 3, dtype=torch.bool))
    with pytest.raises(
        TypeError, match=r"mask must be a boolean torch.Tensor .*got dtype torch.float32"
    ):
        linearize(model, tokens, mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match="mask masks every position of the batch"):
        linearize(model, tokens, mask=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be None, a boolean torch.Tensor"):
        linearize(model, tokens, mask=[True] * 3)
    with pytest.raises(ValueError, match=r"mask='attention_mask' names no entry of the inputs"):
        linearize(model, tokens, mask="attention_mask")
    with pytest.raises(TypeError, match="mask of a stream of batches must be a str"):
        linearizations(model, [tokens], mask=torch.ones(3, 5, dtype=torch.bool))
    kw, batch = _keyword()
    with pytest.raises(ValueError, match=r"names no entry of the inputs: got keys \['input_ids'"):
        linearize(kw, batch, output="logits", mask="padding")
    with pytest.raises(ValueError, match="masks every position"):
        loss_function(
            model, tokens, torch.zeros(3, 5, dtype=torch.int64), mask=torch.zeros(3, 5) > 0
        )


def test_bad_labels() -> None:
    model, tokens = _seq()
    with pytest.raises(
        ValueError, match=r"labels do not fit the logits.*labels must have shape \(3, 5\)"
    ):
        loss_function(model, tokens, torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(
        ValueError, match="ignore_index=-100 leaves no position of the batch to count"
    ):
        loss_function(model, tokens, torch.full((3, 5), -100))
    with pytest.raises(ValueError, match="ignore_index=7 leaves no position"):
        loss_function(model, tokens, torch.full((3, 5), 7), ignore_index=7)
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        loss_function(model, tokens, torch.full((3, 5), -100), ignore_index=None)
    with pytest.raises(TypeError, match="ignore_index must be an int or None"):
        loss_function(model, tokens, torch.zeros(3, 5, dtype=torch.int64), ignore_index=1.5)
    # A class axis of size 1: the categorical family needs 2 classes (its message).
    conv = nn.Conv1d(2, 1, 1).to(F64)
    x = torch.ones(2, 2, 3, dtype=F64)
    with pytest.raises(ValueError, match="at least 2 classes on its last axis for Categorical"):
        loss_function(conv, x, torch.zeros(2, 3, dtype=torch.int64), class_axis=1)
    lin = linearize(conv, x, class_axis=1)  # a linearization itself is fine with C = 1
    assert lin.output_shape == (2, 3, 1)


def test_bad_selectors_and_class_axes() -> None:
    kw, batch = _keyword()
    with pytest.raises(
        ValueError,
        match=r"output='logitz' selects nothing.*tensor attributes \['hidden', 'logits'\]",
    ):
        linearize(kw, batch, output="logitz")
    with pytest.raises(ValueError, match=r"must return a tensor of logits .*got Output.*output="):
        linearize(kw, batch)
    model, inputs = _tuple_out()
    with pytest.raises(
        ValueError, match=r"output=2 selects nothing.*tuple of length 2 \(0: tensor \(3, 4, 4\)"
    ):
        linearize(model, inputs, output=2)
    with pytest.raises(ValueError, match=r"output='logits' selects nothing.*tuple"):
        linearize(model, inputs, output="logits")
    with pytest.raises(TypeError, match="output must be None, a str"):
        linearize(model, inputs, output=1.0)
    seq, tokens = _seq()
    with pytest.raises(
        ValueError,
        match="class_axis must not be 0: axis 0 of the model output holds the N examples",
    ):
        linearize(seq, tokens, class_axis=0)
    with pytest.raises(ValueError, match="class_axis must not be 0"):
        loss_function(seq, tokens, torch.zeros(3, 5, dtype=torch.int64), class_axis=0)
    with pytest.raises(
        ValueError, match=r"class_axis=-3 is axis 0 of the model output of shape \(3, 5, 3\)"
    ):
        linearize(seq, tokens, class_axis=-3)
    with pytest.raises(
        ValueError,
        match=r"class_axis must be an axis of the model output of shape \(3, 5, 3\).*got 3",
    ):
        linearize(seq, tokens, class_axis=3)
    with pytest.raises(TypeError, match="class_axis must be an int"):
        linearize(seq, tokens, class_axis=True)


def test_bad_structured_inputs() -> None:
    kw, batch = _keyword()
    bad = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"][:2]}
    with pytest.raises(
        ValueError,
        match=r"same N examples on axis 0; inputs\['input_ids'\] has 3 rows but "
        r"inputs\['attention_mask'\] has 2",
    ):
        linearize(kw, bad, output="logits")
    model, (x, s) = _tuple_out()
    with pytest.raises(ValueError, match=r"inputs\[0\] has 3 rows but inputs\[1\] has 2"):
        linearize(model, (x, s[:2]), output=1)
    with pytest.raises(
        TypeError, match=r"inputs\['attention_mask'\] must be a torch.Tensor .*keyword"
    ):
        linearize(kw, {"input_ids": batch["input_ids"], "attention_mask": [1, 2, 3]})
    with pytest.raises(ValueError, match="got an empty dict"):
        linearize(kw, {})
    with pytest.raises(
        ValueError, match=r"inputs\[1\] must hold the examples on axis 0; got a 0-d tensor"
    ):
        linearize(model, (x, torch.tensor(1.0, dtype=F64)), output=1)


# ---------------------------------------------------------------------------
# Labels in the model's layout, padding labels, 0/1 masks (review findings)
# ---------------------------------------------------------------------------


def test_empirical_reads_bernoulli_labels_in_the_model_layout() -> None:
    # C = H = W = 3: labels in the wrong layout would pass the shape check unnoticed.
    torch.manual_seed(4)
    model = Seg().to(F64)
    gen = torch.Generator().manual_seed(4)
    x = _rand(gen, 2, 2, 3, 3)
    y = (torch.rand(2, 3, 3, 3, generator=gen) > 0.5).to(F64)  # (N, C, H, W), as the model
    lin = linearize(model, x, class_axis=1)
    got = empirical(lin, y, Bernoulli()).value
    J = dense_jacobian(model, x, class_axis=1)  # (N, H, W, C, D)
    z = lin.logits
    u = torch.movedim(y, 1, -1) - torch.sigmoid(z)  # the Bernoulli score at the labels
    s = torch.einsum("nhwc,nhwcd->nd", u, J)
    _close(got, (s * s).sum(0))


def test_padding_labels_are_never_read() -> None:
    model, tokens = _seq()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    gen = torch.Generator().manual_seed(5)
    y = torch.randint(0, 3, (3, 5), generator=gen)
    padded = torch.where(mask, y, torch.full_like(y, -1))  # -1: no class, no ignore index
    zeroed = torch.where(mask, y, torch.zeros_like(y))
    lin = linearize(model, tokens, mask=mask)
    _close(empirical(lin, padded).value, empirical(lin, zeroed).value)
    a = loss_function(model, tokens, padded, mask=mask, ignore_index=None, reduction="mean")
    b = loss_function(model, tokens, zeroed, mask=mask, ignore_index=None, reduction="mean")
    theta = torch.zeros(1, a.num_params, dtype=F64)
    _close(a.value(theta), b.value(theta))
    assert a.num_counted == b.num_counted == 13


def test_a_mask_of_zeros_and_ones_reads_as_booleans() -> None:
    model, tokens = _seq()
    ones = torch.ones(3, 5, dtype=torch.long)
    ones[1, 2:] = 0
    lin = linearize(model, tokens, mask=ones)
    assert lin.mask.dtype == torch.bool
    _close(fisher_diagonal(lin), fisher_diagonal(linearize(model, tokens, mask=ones != 0)))
    with pytest.raises(ValueError, match=r"mask must be boolean or hold only 0 and 1"):
        linearize(model, tokens, mask=2 * ones)
    assert lin.class_axis == -1
    assert lin.output is None


def test_razor_names_the_remedies_for_positions() -> None:
    from fisherbound.dimension import razor

    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 3)).to(F64)
    gen = torch.Generator().manual_seed(6)
    x = torch.randint(0, 7, (2, 5), generator=gen)
    y = torch.randint(0, 3, (2, 5), generator=gen)
    y[0, 4] = -100
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with pytest.raises(ValueError, match=r"Padding labels \(such as -100\) must be masked"):
        razor(linearize(model, x), prior_variance=1.0, labels=y, theta=theta)
    masked = razor(linearize(model, x, mask=y != -100), prior_variance=1.0, labels=y, theta=theta)
    assert masked.method == "lanczos"
    # 50 positions x 100 classes: 5000 factor columns per example, over max_cotangents.
    wide = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 100)).to(F64)
    ids = torch.randint(0, 7, (1, 50), generator=gen)
    labels = torch.zeros(1, 50, dtype=torch.long)
    theta = torch.cat([p.detach().reshape(-1) for p in wide.parameters()])
    with pytest.raises(ValueError, match=r"razor\(method='dense'\).*method='lanczos'"):
        razor(linearize(wide, ids), prior_variance=1.0, labels=labels, theta=theta, method="dense")


# ---------------------------------------------------------------------------
# Soft targets (Categorical): class probabilities, as CrossEntropyLoss takes them
# ---------------------------------------------------------------------------


def test_categorical_soft_targets_against_torch_cross_entropy() -> None:
    from fisherbound.families import Categorical

    model, x = _seg()  # logits (N, C, H, W) = (2, 3, 3, 4), class axis 1
    gen = torch.Generator().manual_seed(4)
    y = torch.softmax(2.0 * _rand(gen, 2, 3, 3, 4), dim=1)  # target distributions
    y[0, :, 0, 0] = torch.tensor([0.0, 1.0, 0.0], dtype=F64)  # a hard row among them
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[1, 2, :] = False
    y_padded = y.clone()
    y_padded[1, :, 2, :] = -100.0  # padding may hold anything
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach() for n, p in model.named_parameters()}

    def flat(grads: dict, lead: int = 0) -> torch.Tensor:
        return torch.cat([grads[n].reshape(*grads[n].shape[:lead], -1) for n in names], dim=lead)

    def soft_ce(params: dict, xs: torch.Tensor, ys: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        z = torch.func.functional_call(model, params, (xs,))
        return (F.cross_entropy(z, ys, reduction="none") * ms).sum()  # torch's soft CE

    fam = Categorical()
    loss = loss_function(model, x, y_padded, family=fam, class_axis=1, mask=mask)
    d = loss.num_params
    want = soft_ce(theta, x, y, mask)
    assert float(loss.value(torch.zeros(1, d, dtype=F64))[0]) == pytest.approx(float(want), 1e-13)
    _close(loss.gradient(), flat(torch.func.grad(soft_ce)(theta, x, y, mask)), 1e-12)
    v = _rand(gen, d)
    split = dict(zip(names, torch.split(v, [theta[n].numel() for n in names]), strict=True))
    tangent = {n: split[n].reshape(theta[n].shape) for n in names}
    hvp = torch.func.jvp(lambda p: torch.func.grad(soft_ce)(p, x, y, mask), (theta,), (tangent,))
    _close(loss.hvp(v), flat(hvp[1]), 1e-11)
    # The empirical Fisher with observed target distributions: Σ_x (∇ℓ_x)², ℓ_x the soft
    # cross-entropy of example x summed over its counted positions.
    per = torch.func.vmap(
        lambda xs, ys, ms: torch.func.grad(soft_ce)(theta, xs[None], ys[None], ms[None])
    )(x, y, mask)
    lin = linearize(model, x, class_axis=1, mask=mask)
    emp = empirical(lin, y_padded, fam)
    _close(emp.value, (flat(per, lead=1) ** 2).sum(0), 1e-12)
    # One-hot rows give the same numbers as class indices.
    hard = torch.argmax(y, dim=1)
    onehot = F.one_hot(hard, 3).movedim(-1, 1).to(F64)
    _close(empirical(lin, onehot, fam).value, empirical(lin, hard, fam).value, 1e-13)
    # Bad target distributions: a clear error naming the argument and the rule.
    with pytest.raises(ValueError, match=r"rows summing to 1 \(to 0.0001\); got rows"):
        empirical(lin, y * 0.9, fam)
    with pytest.raises(ValueError, match=r"target distributions: entries in \[0, 1\]"):
        loss_function(model, x, y - 0.5, family=fam, class_axis=1)
    with pytest.raises(ValueError, match=r"must have shape \(2, 3, 4, 3\)"):
        empirical(lin, y[:, :2], fam)
