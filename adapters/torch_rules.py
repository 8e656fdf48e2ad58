r"""The layer rules of the torch fast path: closed-form per-example squares, per layer kind.

``TorchLinearization.sum_squared_per_example_vjp`` computes :math:`\sum_n (J_n^\top U[n, k])^2`
without per-example gradients of the whole network for the parameters of the
layers listed here, as BackPACK does: one forward pass with hooks recording each
covered layer's input :math:`a` and output, ONE backward pass batched over the K
cotangents to the layer outputs (the output gradients :math:`\delta_k`), then one closed form
per layer kind, e.g. for ``nn.Linear`` on (N, in) inputs the weight square
:math:`(\delta_k \odot \delta_k)^\top (a \odot a)`. Every other parameter takes the generic path.

The registry
------------
A *rule* is one :class:`LayerRule` subclass per layer kind: the module classes it
covers (``module_types``), the parameters it gives squares for (``params``), why
a module of that kind cannot take the fast path (``ineligible``), the layout
check on the recorded input and output (``layout_ok``) and the squared
per-example sums (``squares``). ``RULES`` lists one instance of each, matched in
order with ``isinstance``. Adding a layer kind is one class and one line in
``RULES`` (see docs/adapters.md).

The plan
--------
Which parameters take the fast path depends only on the model, the parameter
selection and the inputs, so it is decided once per linearization
(:func:`plan_fast_path`) and cached as an immutable :class:`FastPathPlan`: its
``layers`` (each module with its rule, the parameters it covers and whether its
recorded tensors must be copied) and its ``reasons`` (per parameter name,
``"fast"`` or why it takes the generic path). The decision runs every check of
the fast path once: a parameter shared by several modules or also used outside
its module, a module called more than once per forward pass, a module whose
forward or hooks are not the stock ones, a layer whose axis 0 is not the example
axis (by shape, then by a probe of three examples), a parameter that does not
reach the logits, an in-place operation after a layer.

This module imports torch; ``import fisherbound.adapters`` does not import it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch  # noqa: TID253
from torch import nn  # noqa: TID253
from torch.nn import functional as F  # noqa: TID253
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: TID253

from fisherbound._lib import power_of_two_scale

__all__ = [
    "RULES",
    "BatchNormRule",
    "ConvRule",
    "EmbeddingRule",
    "FastPathPlan",
    "GroupNormRule",
    "LayerNormRule",
    "LayerRule",
    "LinearRule",
    "PlannedLayer",
    "RMSNormRule",
    "plan_fast_path",
    "rule_for",
]

Tensor = torch.Tensor

#: The reason of a parameter on the fast path in ``FastPathPlan.reasons``.
FAST = "fast"
#: The reason of a parameter of an eligible layer never planned (no layer left).
GENERIC = "generic"


# ---------------------------------------------------------------------------
# Small helpers shared with the generic path
# ---------------------------------------------------------------------------


def total(parts: Iterable[Tensor]) -> Tensor:
    """The sum of a non-empty sequence of tensors."""
    it = iter(parts)
    out = next(it)
    for p in it:
        out = out + p
    return out


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``size`` entries."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _squares(g: Tensor, sum_k: bool) -> Tensor:
    """Σ_n g² of per-example gradients g (K, n, ...): (K, ...) or, summed over k, (...)."""
    sq = g * g
    return sq.sum(dim=(0, 1)) if sum_k else sq.sum(dim=1)


# ---------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------


class LayerRule:
    """One layer kind whose parameters have closed-form per-example squares.

    A subclass sets ``module_types`` and ``params`` and implements ``squares``;
    it overrides ``ineligible`` and ``layout_ok`` where the kind needs more
    checks. Instances are stateless; ``RULES`` holds one of each.
    """

    #: The module classes the rule covers, matched with ``isinstance`` in order;
    #: a module whose class overrides the matched class's ``forward`` is not covered.
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: The parameter attributes (``module.weight``, ...) ``squares`` returns.
    params: ClassVar[tuple[str, ...]] = ("weight", "bias")

    def ineligible(self, module: Any) -> str:
        """Why ``module`` cannot take the fast path although its class is covered, or ``""``."""
        del module  # by default every module of a covered class is eligible
        return ""

    def layout_ok(self, module: Any, a: Tensor) -> bool:
        """Whether the recorded input ``a`` has the layout ``squares`` expects.

        Called once the input and output are known to have N rows on axis 0.
        """
        del module  # by default only the input's rank matters
        return a.ndim >= 2

    def squares(
        self, module: Any, a: Tensor, d: Tensor, *, sum_k: bool, n_chunk: int
    ) -> dict[str, Tensor]:
        r""":math:`\sum_n (\partial \langle \delta_k[n], \mathrm{out}[n] \rangle / \partial p)^2`.

        For each parameter :math:`p` in ``params``.

        Parameters
        ----------
        module
            The layer.
        a
            Its recorded input (N, ...), examples on axis 0.
        d
            The output gradients :math:`\delta` (K, N, ...) of K cotangents.
        sum_k
            Return the sum over k, shape ``p.shape``, instead of ``(K, *p.shape)``.
        n_chunk
            At most this many examples' per-example layer gradients at once.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        """``LinearRule()``: the class name (rules are stateless)."""
        return f"{type(self).__name__}()"


class LinearRule(LayerRule):
    """``nn.Linear``: rank-one per-example gradients δ_n a_nᵀ on (N, in) inputs.

    Weight (δ_k ⊙ δ_k)ᵀ (a ⊙ a) and bias Σ_n δ_k² on (N, in) inputs (one product,
    never a per-example gradient); on (N, ..., in) inputs the per-example
    gradients Σ_t δ_nt a_ntᵀ, in chunks of examples.
    """

    module_types = (nn.Linear,)

    def squares(
        self, module: Any, a: Tensor, d: Tensor, *, sum_k: bool, n_chunk: int
    ) -> dict[str, Tensor]:
        """See :meth:`LayerRule.squares`."""
        del module  # the closed forms need only the input and the output signal
        k, n = d.shape[0], d.shape[1]
        out: dict[str, Tensor] = {}
        if a.ndim == 2:
            # The per-example gradient δ_n a_nᵀ has rank one: its square is δ_n² (a_n²)ᵀ.
            # An example whose a² would overflow is scaled by a power of two s_n ≈ max |a_n|
            # (δ_n s_n and a_n / s_n: exact), so that a² cannot overflow where δ_n a_n is
            # finite (a saturated unit, δ = 0, behind a huge input gave 0 · inf = NaN).
            # Only those: scaling shifts small entries of a_n toward underflow.
            # On the CPU a host read says whether any example needs it (the common
            # case: none, and the scaling, a no-op then, is skipped).
            limit = torch.finfo(a.dtype).max / 16
            a2 = a.square() if a.device.type == "cpu" else None
            if a2 is not None and float(a2.max()) <= limit:
                ds2 = d.square()
                scale = None
            else:
                top = a.abs().amax(dim=1)
                big = top > math.sqrt(limit)
                scale = torch.where(big, power_of_two_scale(top, torch), torch.ones_like(top))
                a2 = (a / scale[:, None]).square_()
                ds2 = (d * scale[None, :, None]).square_()  # the one (K, N, out) temporary
            # The bias from δ² itself: where scaled, (δ s)² may overflow where δ² does not.
            d2 = ds2 if scale is None else d.square()
            if sum_k:
                per_example = ds2.sum(dim=0)  # Σ_k δ_nk² s_n², (N, out)
                out["weight"] = per_example.T @ a2
                out["bias"] = (per_example if scale is None else d2.sum(dim=0)).sum(dim=0)
            else:
                out["weight"] = torch.matmul(ds2.transpose(1, 2), a2)
                out["bias"] = d2.sum(dim=1)
            return out
        a3 = a.reshape(n, -1, a.shape[-1])
        d4 = d.reshape(k, n, -1, d.shape[-1])
        out["weight"] = total(
            _squares(torch.matmul(d4[:, s].transpose(-1, -2), a3[s]), sum_k)  # (K, n, out, in)
            for s in chunks(n, n_chunk)
        )
        out["bias"] = _squares(d4.sum(dim=2), sum_k)
        return out


def _unfold_input(m: Any, a: Tensor) -> Tensor:
    """im2col of the layer input: (N, C_in · Π kernel, L), rows ordered like the weight."""
    padding: Any = m.padding
    if isinstance(padding, str) or m.padding_mode != "zeros":
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        a = F.pad(a, m._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(m.kernel_size)
    if isinstance(m, nn.Conv1d):
        return F.unfold(
            a.unsqueeze(2),
            kernel_size=(1, m.kernel_size[0]),
            dilation=(1, m.dilation[0]),
            padding=(0, padding[0]),
            stride=(1, m.stride[0]),
        )
    return F.unfold(
        a, kernel_size=m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride
    )


class ConvRule(LayerRule):
    """``nn.Conv1d`` / ``nn.Conv2d``: unfolded inputs, one product per (example, group).

    Per-example weight gradients δ_kn colsᵀ_n with the K cotangents stacked as
    rows, in chunks of examples; bias Σ over positions of δ.
    """

    module_types = (nn.Conv1d, nn.Conv2d)

    def layout_ok(self, module: Any, a: Tensor) -> bool:
        """(N, C, L) inputs for ``Conv1d``, (N, C, H, W) for ``Conv2d`` (no unbatched input)."""
        return a.ndim == (3 if isinstance(module, nn.Conv1d) else 4)

    def squares(
        self, module: Any, a: Tensor, d: Tensor, *, sum_k: bool, n_chunk: int
    ) -> dict[str, Tensor]:
        """See :meth:`LayerRule.squares`."""
        m = module
        k, n = d.shape[0], d.shape[1]
        groups = m.groups
        cols = _unfold_input(m, a)  # (N, C_in · kernel, L)
        length = cols.shape[-1]
        # Per-example weight gradients δ_kn colsᵀ_n, one product per (example, group),
        # with the K cotangents stacked as rows: (N g, K C_out/g, L) @ (N g, L, C_in/g · kernel).
        cols = cols.reshape(n * groups, -1, length)
        rows = d.reshape(k, n, groups, -1, length).permute(1, 2, 0, 3, 4)  # (N, g, K, o, L)
        parts = []
        for s in chunks(n, n_chunk):
            m_s = s.stop - s.start
            left = rows[s].reshape(m_s * groups, -1, length)
            g = torch.bmm(left, cols[s.start * groups : s.stop * groups].transpose(1, 2))
            g = g.reshape(m_s, groups, k, -1, g.shape[-1])
            sq = (g * g).sum(dim=0)  # (g, K, o, i)
            parts.append(sq.sum(dim=1) if sum_k else sq.transpose(0, 1))
        weight = total(parts)  # (g, o, i) or (K, g, o, i)
        lead = () if sum_k else (k,)
        out = {"weight": weight.reshape(lead + tuple(m.weight.shape))}
        out["bias"] = _squares(d.reshape(k, n, m.out_channels, -1).sum(dim=-1), sum_k)
        return out


class EmbeddingRule(LayerRule):
    """``nn.Embedding``: per example, the rows of δ summed by token, squared, scattered."""

    module_types = (nn.Embedding,)
    params = ("weight",)

    def ineligible(self, module: Any) -> str:
        """``max_norm`` renormalises rows in place; ``scale_grad_by_freq`` rescales them."""
        if module.max_norm is not None or module.scale_grad_by_freq:
            return "Embedding with max_norm or scale_grad_by_freq"
        return ""

    def layout_ok(self, module: Any, a: Tensor) -> bool:
        """Any index tensor (N, ...)."""
        del module, a  # every index layout is supported
        return True

    def squares(
        self, module: Any, a: Tensor, d: Tensor, *, sum_k: bool, n_chunk: int
    ) -> dict[str, Tensor]:
        """See :meth:`LayerRule.squares`."""
        del n_chunk  # the per-token sums take all examples of a cotangent chunk at once
        m = module
        k, n = d.shape[0], d.shape[1]
        vocab, dim = m.num_embeddings, m.embedding_dim
        idx2 = a.reshape(n, -1).to(torch.int64)
        d3 = d.reshape(k, -1, dim)  # (K, N T, E)
        # Per example, the gradient row of token v is the sum of δ over the positions
        # holding v: group the (example, token) pairs, add, square, then scatter by token.
        keys = torch.arange(n, device=a.device).unsqueeze(1) * vocab + idx2
        uniq, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
        sums = d3.new_zeros((k, uniq.shape[0], dim)).index_add_(1, inverse, d3)
        sq = sums * sums
        rows = uniq % vocab
        if sum_k:
            weight = sq.new_zeros((vocab, dim)).index_add_(0, rows, sq.sum(dim=0))
        else:
            weight = sq.new_zeros((k, vocab, dim)).index_add_(1, rows, sq)
        if m.padding_idx is not None:
            keep = torch.ones(vocab, 1, dtype=weight.dtype, device=weight.device)
            keep[m.padding_idx] = 0
            weight = weight * keep
        return {"weight": weight}


def _affine_squares(
    m: Any, xhat: Tensor, d4: Tensor, axis: int, sum_k: bool, n_chunk: int, bias: bool = True
) -> dict[str, Tensor]:
    """Squares of an elementwise affine y = x̂ ⊙ w + b after a normalisation.

    ``xhat`` (N, groups, positions) or (N, positions, features) and ``d4`` (K, N, ...)
    of the same layout; ``axis`` is the positions axis of ``d4``: per example, the
    weight gradient is Σ over positions of δ x̂ and the bias gradient Σ of δ.
    """
    k = d4.shape[0]
    n = xhat.shape[0]
    weight = total(_squares((d4[:, s] * xhat[s]).sum(dim=axis), sum_k) for s in chunks(n, n_chunk))
    pshape = tuple(m.weight.shape) if m.weight is not None else ()
    lead = () if sum_k else (k,)
    out = {"weight": weight.reshape(lead + pshape)}
    if bias:
        out["bias"] = _squares(d4.sum(dim=axis), sum_k).reshape(lead + pshape)
    return out


def _prod(shape: Sequence[int]) -> int:
    result = 1
    for s in shape:
        result *= int(s)
    return result


class _TrailingNormRule(LayerRule):
    """Norms over the trailing ``normalized_shape``: Σ over positions of δ x̂ (and δ)."""

    def normalized(self, module: Any, a: Tensor) -> Tensor:
        """x̂, the layer's input normalised without the affine map."""
        raise NotImplementedError

    def layout_ok(self, module: Any, a: Tensor) -> bool:
        """More axes than ``normalized_shape`` (the example axis in front)."""
        return a.ndim > len(module.normalized_shape)

    def squares(
        self, module: Any, a: Tensor, d: Tensor, *, sum_k: bool, n_chunk: int
    ) -> dict[str, Tensor]:
        """See :meth:`LayerRule.squares`."""
        k, n = d.shape[0], d.shape[1]
        xhat = self.normalized(module, a)
        size = xhat[0].numel() // max(1, _prod(tuple(module.normalized_shape)))
        x3 = xhat.reshape(n, size, -1)  # (N, positions, features)
        d4 = d.reshape(k, n, size, -1)
        return _affine_squares(module, x3, d4, 2, sum_k, n_chunk, bias="bias" in self.params)


class LayerNormRule(_TrailingNormRule):
    """``nn.LayerNorm``: x̂ = layer_norm(a) without affine; Σ over positions of δ x̂."""

    module_types = (nn.LayerNorm,)

    def normalized(self, module: Any, a: Tensor) -> Tensor:
        """layer_norm(a) over ``normalized_shape`` with the module's eps, no affine map."""
        return F.layer_norm(a, tuple(module.normalized_shape), None, None, module.eps)


class _ChannelNormRule(LayerRule):
    """Norms with one affine pair per channel (axis 1): Σ over positions of δ x̂."""

    def normalized(self, module: Any, a: Tensor) -> Tensor:
        """x̂, the layer's input normalised without the affine map."""
        raise NotImplementedError

    def squares(
        self, module: Any, a: Tensor, d: Tensor, *, sum_k: bool, n_chunk: int
    ) -> dict[str, Tensor]:
        """See :meth:`LayerRule.squares`."""
        k, n = d.shape[0], d.shape[1]
        channels = a.shape[1]
        x3 = self.normalized(module, a).reshape(n, channels, -1)  # (N, channels, positions)
        return _affine_squares(module, x3, d.reshape(k, n, channels, -1), 3, sum_k, n_chunk)


class GroupNormRule(_ChannelNormRule):
    """``nn.GroupNorm``: x̂ = group_norm(a) without affine."""

    module_types = (nn.GroupNorm,)

    def normalized(self, module: Any, a: Tensor) -> Tensor:
        """group_norm(a) with the module's groups and eps, no affine map."""
        return F.group_norm(a, module.num_groups, None, None, module.eps)


class BatchNormRule(_ChannelNormRule):
    """``nn.BatchNorm1d/2d/3d`` in eval mode: x̂ from the running statistics."""

    module_types = (_BatchNorm,)

    def normalized(self, module: Any, a: Tensor) -> Tensor:
        """(a − running_mean) / √(running_var + eps), per channel."""
        view = (1, a.shape[1]) + (1,) * (a.ndim - 2)
        mean = module.running_mean.reshape(view)
        var = module.running_var.reshape(view)
        return (a - mean) * torch.rsqrt(var + module.eps)


class RMSNormRule(_TrailingNormRule):
    """``nn.RMSNorm``: x̂ = a / rms(a) without the weight; Σ over positions of δ x̂.

    The weight is its only parameter. The example of docs/adapters.md ("Adding a
    layer rule"): one class and one line in ``RULES``.
    """

    module_types = (nn.RMSNorm,)
    params = ("weight",)

    def normalized(self, module: Any, a: Tensor) -> Tensor:
        """rms_norm(a) over ``normalized_shape`` with the module's eps, no weight."""
        return F.rms_norm(a, tuple(module.normalized_shape), None, module.eps)


#: The registry: one instance per layer kind, matched in order with ``isinstance``.
RULES: tuple[LayerRule, ...] = (
    LinearRule(),
    ConvRule(),
    EmbeddingRule(),
    LayerNormRule(),
    GroupNormRule(),
    BatchNormRule(),
    RMSNormRule(),
)


def rule_for(module: nn.Module, rules: Sequence[LayerRule] = RULES) -> tuple[LayerRule | None, str]:
    """The rule of ``module`` and ``""``, or None and why it has none.

    A module is covered when it is an instance of a rule's ``module_types``,
    its class keeps that type's ``forward``, it has no forward (pre-)hooks and
    the rule finds it eligible.
    """
    for rule in rules:
        for cls in rule.module_types:
            if isinstance(module, cls):
                if type(module).forward is not cls.forward:
                    return None, f"{type(module).__name__} overrides forward"
                if module._forward_hooks or module._forward_pre_hooks:
                    return None, f"{type(module).__name__} has forward hooks"
                why = rule.ineligible(module)
                return (None, why) if why else (rule, "")
    # A module may say itself why no rule fits (the holders of a function model's tensors).
    return None, getattr(module, "no_fast_rule", f"no fast rule for {type(module).__name__}")


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedLayer:
    """One module on the fast path.

    Attributes
    ----------
    module
        The layer.
    rule
        Its :class:`LayerRule`.
    params
        (attribute, index in the parameter selection) of each of its parameters
        the fast path computes.
    safe
        Record copies of its input and output (an in-place operation follows it).
    """

    module: nn.Module
    rule: LayerRule
    params: tuple[tuple[str, int], ...]
    safe: bool = False


@dataclass(frozen=True)
class FastPathPlan:
    """Which parameters take the fast path, decided once per linearization.

    Attributes
    ----------
    layers
        The modules on the fast path, in the order of the parameter selection.
    reasons
        A read-only mapping from every selected parameter name to ``"fast"`` or
        the reason it takes the generic path.
    """

    layers: tuple[PlannedLayer, ...]
    reasons: Mapping[str, str]


def static_candidates(
    model: nn.Module,
    names: Sequence[str],
    tensors: Sequence[Tensor],
    rules: Sequence[LayerRule] = RULES,
) -> tuple[tuple[PlannedLayer, ...], dict[str, str]]:
    """The layers whose selected parameters may take the fast path, and why others not.

    Decided from the module tree alone: a parameter must belong to exactly one
    module, which must have a rule covering that parameter; no global forward
    hooks may be registered.
    """
    owners: dict[int, dict[tuple[int, str], nn.Module]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), {})[(id(module), attr)] = module
    found: dict[int, tuple[nn.Module, LayerRule, list[tuple[str, int]]]] = {}
    reasons: dict[str, str] = {}
    global_hooks = bool(
        torch.nn.modules.module._global_forward_hooks
        or torch.nn.modules.module._global_forward_pre_hooks
    )
    for i, (name, p) in enumerate(zip(names, tensors, strict=True)):
        own = owners.get(id(p), {})
        if len(own) != 1:
            reasons[name] = "parameter shared by several modules (tied)"
            continue
        ((_, attr), module) = next(iter(own.items()))
        rule, why = rule_for(module, rules)
        if global_hooks:
            rule, why = None, "global forward hooks are registered"
        if rule is not None and attr not in rule.params:
            rule, why = None, f"no fast rule for {type(module).__name__}.{attr}"
        if rule is None:
            reasons[name] = why
            continue
        found.setdefault(id(module), (module, rule, []))[2].append((attr, i))
    layers = tuple(PlannedLayer(m, r, tuple(ps)) for m, r, ps in found.values())
    return layers, reasons


@dataclass
class Record:
    """What a forward hook saw of one layer in one forward pass (per call, never kept)."""

    calls: int = 0
    input: Any = None
    output: Any = None
    versions: tuple[int, int] = (0, 0)


def record_forward(
    layers: Sequence[PlannedLayer],
    run: Callable[[], tuple[Tensor, tuple[Tensor, ...]]],
    safe: Sequence[bool] | None = None,
) -> tuple[Tensor, tuple[Tensor, ...], list[Record]]:
    """One forward pass ``run()`` (logits, parameter leaves) with hooks on ``layers``."""
    flags = [layer.safe for layer in layers] if safe is None else list(safe)
    records = [Record() for _ in layers]

    def hook(rec: Record, copy: bool) -> Callable[..., Any]:
        def record(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
        ) -> Any:
            del module  # a forward hook's signature; the record is per layer already
            rec.calls += 1
            a = args[0] if args else next(iter(kwargs.values()), None)
            if copy and isinstance(a, torch.Tensor):
                a = a.detach().clone()
            rec.input, rec.output = a, out
            if isinstance(a, torch.Tensor) and isinstance(out, torch.Tensor):
                rec.versions = (a._version, out._version)
                if copy:
                    # Later in-place operations act on a copy; the recorded
                    # output keeps its value and passes the gradient on.
                    return out.clone()
            return None

        return record

    handles = [
        layer.module.register_forward_hook(hook(rec, copy), with_kwargs=True)
        for layer, rec, copy in zip(layers, records, flags, strict=True)
    ]
    try:
        z, leaves = run()
    finally:
        for h in handles:
            h.remove()
    return z, leaves, records


def leaf_use_counts(root: Tensor) -> dict[int, int]:
    """How many autograd edges reach each leaf tensor (by id) from ``root``."""
    counts: dict[int, int] = {}
    seen: dict[int, Any] = {}  # keeps the node objects alive so ids stay unique
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:
                counts[id(variable)] = counts.get(id(variable), 0) + 1
            stack.append(child)
    return counts


def _layout_ok(layer: PlannedLayer, rec: Record, n: int) -> bool:
    """Whether axis 0 of the recorded input and output is the example axis (by shape)."""
    a, out = rec.input, rec.output
    if not isinstance(a, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    if out.ndim < 1 or out.shape[0] != n or a.ndim < 1 or a.shape[0] != n:
        return False
    return layer.rule.layout_ok(layer.module, a)


GradBatched = Callable[[Tensor, list[Tensor], Tensor, bool], "tuple[Tensor | None, ...]"]


def plan_fast_path(
    candidates: Sequence[PlannedLayer],
    static_reasons: Mapping[str, str],
    names: Sequence[str],
    run: Callable[[], tuple[Tensor, tuple[Tensor, ...]]],
    grad_batched: GradBatched,
) -> tuple[FastPathPlan, tuple[Tensor, list[Record]] | None]:
    """Decide the fast path once, and the recorded forward pass it was decided on.

    Runs the forward pass with hooks (again with copies for the layers an
    in-place operation changed), counts the autograd uses of each parameter,
    checks the call counts and layouts, and probes three examples for the
    example axis. Returns the plan and, when it has layers, (logits, records of
    ``plan.layers``) whose graph is still alive, for the first computation.
    """
    report = dict.fromkeys(names, GENERIC)
    report.update(static_reasons)
    layers = list(candidates)
    if not layers:
        return FastPathPlan((), MappingProxyType(report)), None
    safe = [False] * len(layers)
    z, leaves, records = record_forward(layers, run, safe)
    moved = [
        j
        for j, rec in enumerate(records)
        if isinstance(rec.input, torch.Tensor)
        and isinstance(rec.output, torch.Tensor)
        and (rec.input._version, rec.output._version) != rec.versions
    ]
    if moved:
        # An in-place operation changed a recorded input or output after the
        # layer ran: record copies of those instead.
        for j in moved:
            safe[j] = True
        z, leaves, records = record_forward(layers, run, safe)
    uses = leaf_use_counts(z)
    n = int(z.shape[0])
    active: list[tuple[PlannedLayer, Record]] = []
    for layer, rec, copy in zip(layers, records, safe, strict=True):
        pnames = [names[i] for _, i in layer.params]
        if rec.calls != 1:
            why = f"module called {rec.calls} times in one forward pass"
        elif not _layout_ok(layer, rec, n):
            why = "layer input/output axis 0 is not the example axis"
        else:
            why = ""
        if why:
            report.update(dict.fromkeys(pnames, why))
            continue
        keep = []
        for attr, i in layer.params:
            count = uses.get(id(leaves[i]), 0)
            if count == 1:
                keep.append((attr, i))
            elif count == 0:
                report[names[i]] = "parameter does not affect the logits"
            else:
                report[names[i]] = "parameter also used outside its module"
        if keep:
            active.append((PlannedLayer(layer.module, layer.rule, tuple(keep), copy), rec))
    if not active:
        return FastPathPlan((), MappingProxyType(report)), None
    verdicts = _probe_example_axis(z, [rec.output for _, rec in active], grad_batched)
    kept = []
    for (layer, rec), why in zip(active, verdicts, strict=True):
        pnames = [names[i] for _, i in layer.params]
        report.update(dict.fromkeys(pnames, why or FAST))
        if not why:
            kept.append((layer, rec))
    plan = FastPathPlan(tuple(layer for layer, _ in kept), MappingProxyType(report))
    return plan, ((z, [rec for _, rec in kept]) if kept else None)


def _probe_example_axis(z: Tensor, outputs: list[Tensor], grad_batched: GradBatched) -> list[str]:
    """Per layer output, ``""`` if its axis 0 keeps the examples apart, else why not.

    The output gradients of random cotangents supported on one example (the
    first, the middle and the last) must vanish off that example's row of axis
    0 (to 64 eps relative) and reach it for at least one probe. One batched
    backward pass and one host synchronisation for all layers.
    """
    n = int(z.shape[0])
    if n < 2:
        return [""] * len(outputs)
    probe_rows = sorted({n - 1, 0, n // 2})
    gen = torch.Generator().manual_seed(0)
    probes = []
    for j in probe_rows:
        values = torch.randn(tuple(z.shape[1:]), generator=gen, dtype=torch.float64)
        onehot = torch.zeros(n, *(1,) * (z.ndim - 1), dtype=torch.float64)
        onehot[j] = 1.0
        probes.append(onehot * values)
    cot = torch.stack(probes).to(dtype=z.dtype, device=z.device)
    grads = grad_batched(z, outputs, cot, True)
    # Per layer, the largest |gradient| of each probe in each example's row: (P, N).
    # In the logits' dtype (MPS has no float64); the host reads Python floats.
    row_max = [
        z.new_zeros((len(probes), n))
        if g is None  # the layer does not reach the logits
        else g.reshape(len(probes), n, -1).abs().amax(dim=2).to(z.dtype)
        for g in grads
    ]
    host = torch.stack(row_max).cpu().tolist() if row_max else []  # one synchronisation
    eps = torch.finfo(z.dtype).eps
    verdicts = []
    for per_probe in host:
        on_off = [
            (row[j], _nan_max(row[:j] + row[j + 1 :]))
            for row, j in zip(per_probe, probe_rows, strict=True)
        ]
        reached = [(on, off) for on, off in on_off if on > 0]
        if reached and all(off <= 64 * eps * on for on, off in reached):
            verdicts.append("")
        elif reached:
            verdicts.append("layer output axis 0 mixes examples")
        else:
            verdicts.append("no probe example reaches the layer (axis 0 unverified)")
    return verdicts


def _nan_max(values: list[float]) -> float:
    """The largest value, NaN if any is NaN (Python's ``max`` may skip a NaN)."""
    return math.nan if any(map(math.isnan, values)) else max(values)


def fast_sum_squared(
    plan: FastPathPlan,
    forward: tuple[Tensor, list[Record]],
    U: Tensor,
    budget: int,
    num_params: int,
    sum_k: bool,
    grad_batched: GradBatched,
) -> dict[int, Tensor]:
    """Σ_n (J_nᵀ U[n, k])² of the planned parameters, by index in the selection.

    Streams the K cotangents in chunks whose layer-output gradients (chunk ×
    Σ_layers output size) fit in ``budget`` D-vectors, applying each layer's
    rule chunk by chunk: memory is bounded whatever K (= C for exact diagonals).
    """
    z, records = forward
    k = int(U.shape[1])
    per_cotangent = sum(int(rec.output.numel()) for rec in records)
    k_chunk = max(1, min(k, (budget * num_params) // max(per_cotangent, 1)))
    n_chunk = max(1, budget // k_chunk)
    cot = U.transpose(0, 1)  # (K, N, *S, C)
    outputs = [rec.output for rec in records]
    parts: dict[int, list[Tensor]] = {}
    for s in chunks(k, k_chunk):
        grads = grad_batched(z, outputs, cot[s], s.stop < k)
        with torch.no_grad():
            for layer, rec, d in zip(plan.layers, records, grads, strict=True):
                if d is None:  # the layer does not reach the logits
                    d = rec.output.new_zeros((s.stop - s.start, *rec.output.shape))
                values = layer.rule.squares(
                    layer.module, rec.input, d, sum_k=sum_k, n_chunk=n_chunk
                )
                for attr, i in layer.params:
                    parts.setdefault(i, []).append(values[attr])
    return {
        i: (sum(pieces[1:], pieces[0]) if sum_k else torch.cat(pieces))
        for i, pieces in parts.items()
    }


def batched_grad(
    z: Tensor, outputs: list[Tensor], cot: Tensor, retain: bool
) -> tuple[Tensor | None, ...]:
    """∂⟨cot[m], z⟩/∂outputs for each of the M cotangents ``cot``: one batched backward."""
    with warnings.catch_warnings():
        # Ops without a batching rule fall back to a loop inside vmap: still exact.
        warnings.filterwarnings("ignore", message=".*performance drop.*", category=UserWarning)
        return torch.autograd.grad(
            z,
            outputs,
            grad_outputs=cot,
            retain_graph=retain,
            is_grads_batched=True,
            allow_unused=True,
        )
