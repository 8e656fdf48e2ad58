"""Closed-form per-example squares for the layers of a JAX model, found in its jaxpr.

The exact Fisher diagonal (and the bounds' and ``per_example=True``'s squared
per-example sums) needs Σ_n (J_nᵀ u_nk)² for K cotangents per example. For a layer
s = a W (a dense layer: ``dot_general`` of an activation with a parameter) the
per-example gradient is a_nᵀ δ_nk with δ = ∂⟨u_k, z⟩/∂s, so its square is
(a_n²)ᵀ (δ_nk²) when an example has one row (and Σ_t a_ntᵀ δ_ntk, squared, with
positions t); for a bias b added to s it is (Σ_t δ_ntk)². Every δ comes from ONE
batched backward pass per cotangent through perturbations ε added at the layers'
outputs (the gradient with respect to ε is δ), as BackPACK does for torch and
kfac-jax finds its layers: no per-example gradient of the whole network, no
registration by the user.

``plan`` traces ``apply_fn`` to a jaxpr (``jax.make_jaxpr``, calls to ``jit``
inlined, each call on its own: a body called twice has two sets of taps) and gives
each parameter leaf a rule or the reason it has none: used twice (shared), inside
another operation (a ``custom_jvp`` function, a ``scan``), or in a form the rules
do not cover. The rules (``RULES``): dense kernels on either side of their product
(``Dense``), biases (``Bias``), per-channel scales of normalisation layers
(``Scale``, also γ times a constant such as an inference-mode ``BatchNorm``'s
running variance), whole-row lookups of an embedding table (``Embed``), and
convolution kernels from each example's patches (``Conv``). ``sum_squared``
evaluates the jaxpr with the perturbations (convolutions and max pooling in forms
whose batched backward passes XLA's CPU backend runs fast inside loops) and forms
the squares; it applies only
when every leaf has a rule and the examples are independent (the adapter checks
both).

A rule is a ``Rule`` subclass in ``RULES``: ``match`` decides from one equation
whether the leaf's use there is covered, ``squares`` forms the (K, size) squares.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax  # noqa: TID253
import jax.numpy as jnp  # noqa: TID253
from jax.extend.core import Literal  # noqa: TID253

Array = Any
PyTree = Any

#: Primitives that only re-type, transpose, re-shape or broadcast a parameter on its way
#: to its use.
_VIEWS = frozenset({"convert_element_type", "transpose", "reshape", "broadcast_in_dim"})
#: Call primitives whose body is inlined (their differentiation is their body's).
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})


class View(NamedTuple):
    """A variable that is (a re-typed, transposed, re-shaped or broadcast copy of) a leaf."""

    leaf: int
    reshaped: bool  # through reshape, broadcast_in_dim or a transpose of > 2 axes
    transposed: bool = False  # a 2-D leaf's transpose (its own layout otherwise)
    #: A per-channel leaf times this variable of the same body (a ``BatchNorm`` in
    #: inference mode: γ ⊙ (σ² + ε)^(-1/2) with the running variance σ²), or None.
    factor: Any = None


class Tap(NamedTuple):
    """One covered use of a leaf: its rule and where its perturbation goes."""

    leaf: int
    rule: str  # the key of RULES
    operand: int  # the equation's input that is the activation (dense) or the sum (bias)
    transposed: bool  # dense: the kernel is (out, in), contracted on its axis 1
    params: tuple[tuple[str, Any], ...] = ()  # conv: the equation's parameters
    kernel: tuple[int, ...] = ()  # conv: the kernel's shape


#: Where an equation is: the ids of the call equations it lies in, then its own id. A
#: jitted function called twice has ONE body; its equations are told apart by the call.
Key = tuple[int, ...]


class Plan(NamedTuple):
    """Per leaf: its tap, or the reason it has none; the taps by equation."""

    taps: dict[Key, Tap]  # where the tapped equation is -> its tap
    reasons: tuple[str, ...]  # per leaf: "fast" or why not
    #: The shape and dtype of each tapped equation's output (its perturbation's).
    outs: dict[Key, tuple[tuple[int, ...], Any]]
    #: The factor variable of each scale tap whose leaf was multiplied by one first
    #: (``View.factor``; read where the tap is evaluated).
    factors: dict[Key, Any]
    #: A convolution, or a dense layer whose input has position axes: per-example
    #: layer gradients are formed (the cotangents then go in chunks of ⌊max_vectors / N⌋).
    per_example: bool = False

    @property
    def complete(self) -> bool:
        return all(r == "fast" for r in self.reasons)


# --------------------------------------------------------------------------- #
# The rules
# --------------------------------------------------------------------------- #


class Rule:
    """A closed form for one kind of use of a parameter leaf."""

    name = ""

    @staticmethod
    def match(eqn: Any, views: list[View | None], leaf_shape: tuple[int, ...]) -> Tap | str:
        """The tap of this use, or why it is not covered (a short reason)."""
        raise NotImplementedError

    @staticmethod
    def prepare(act: Array, tap: Tap) -> Array:
        """What ``squares`` needs of the layer's input, formed once for every cotangent."""
        del tap
        return act

    @staticmethod
    def squares(act: Array, delta: Array, tap: Tap, summed: bool) -> Array:
        """Σ_n (per-example gradient of the leaf for cotangent k)², (K, size).

        ``act`` is what ``prepare`` made of the layer's input (for a scale whose leaf was
        multiplied by a factor first, the pair (input, factor)).

        ``summed``: their sum over k instead, (1, size), which a rule may form
        without the K rows (one product instead of K).
        """
        raise NotImplementedError


class Dense(Rule):
    """s = a W (or W a): ``dot_general`` of an activation (N, ..., in) with a 2-D kernel."""

    name = "dense"

    @staticmethod
    def match(eqn: Any, views: list[View | None], leaf_shape: tuple[int, ...]) -> Tap | str:
        (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
        k = 0 if views[0] is not None else 1
        view, act = views[k], eqn.invars[1 - k]
        assert view is not None
        if views[1 - k] is not None:
            return "a product of two parameters"
        if view.reshaped or len(leaf_shape) != 2:
            return "a kernel that is not the parameter's own 2-D array"
        ndim = len(act.aval.shape)
        contract_w, contract_a = (contract_l, contract_r) if k == 0 else (contract_r, contract_l)
        if batch_l or batch_r or tuple(contract_a) != (ndim - 1,) or len(contract_w) != 1:
            return "a product that is not over the activation's last axis"
        if ndim < 2:
            return "an activation without an example axis"
        # The kernel as used is (in, out) when contracted on its axis 0; (out, in) of
        # the leaf's layout when exactly one of "contracted on 1" and "transposed".
        # On the left (W a, as equinox's vmapped Linear), the output's axis 0 is "out".
        transposed = (int(contract_w[0]) == 1) != view.transposed
        return Tap(view.leaf, "dense", 1 - k, transposed, (("left", k == 0),))

    @staticmethod
    def squares(act: Array, delta: Array, tap: Tap, summed: bool) -> Array:
        # act (N, ..., in), delta (K, N, ..., out), or (K, out, N, ...) on the left
        if dict(tap.params)["left"]:
            delta = jnp.moveaxis(delta, 1, -1)
        n, k = act.shape[0], delta.shape[0]
        if act.ndim == 2 and summed:  # Σ_k (a_n²)ᵀ δ_nk² = (a_n²)ᵀ Σ_k δ_nk²: one product
            sq = jnp.einsum("ni,no->io", act * act, jnp.sum(delta * delta, axis=0))[None]
        elif act.ndim == 2:
            sq = jnp.einsum("ni,kno->kio", act * act, delta * delta)
        else:  # positions: the per-example sum over them before the square
            a = jnp.reshape(act, (n, -1, act.shape[-1]))
            d = jnp.reshape(delta, (k, n, -1, delta.shape[-1]))
            g = jnp.einsum("nti,knto->knio", a, d)
            sq = jnp.sum(g * g, axis=1)
            sq = jnp.sum(sq, axis=0, keepdims=True) if summed else sq
        if tap.transposed:
            sq = jnp.swapaxes(sq, 1, 2)
        return jnp.reshape(sq, (sq.shape[0], -1))


class Bias(Rule):
    """s + b: an ``add`` of a 1-D parameter broadcast along the last axis."""

    name = "bias"

    @staticmethod
    def match(eqn: Any, views: list[View | None], leaf_shape: tuple[int, ...]) -> Tap | str:
        k = 0 if views[0] is not None else 1
        other = eqn.invars[1 - k]
        if views[1 - k] is not None:
            return "a sum of two parameters"
        shape = tuple(other.aval.shape)
        out = tuple(eqn.outvars[0].aval.shape)
        if len(leaf_shape) != 1 or len(shape) < 2 or shape != out or views[k].transposed:  # type: ignore[union-attr]
            return "an addition that is not a bias (a 1-D parameter over the last axis)"
        bias_shape = tuple(eqn.invars[k].aval.shape)
        one_per_channel = bias_shape[-1:] == leaf_shape == shape[-1:]
        if not one_per_channel or any(s != 1 for s in bias_shape[:-1]):
            return "an addition that is not a bias (a 1-D parameter over the last axis)"
        return Tap(views[k].leaf, "bias", 1 - k, False)  # type: ignore[union-attr]

    @staticmethod
    def squares(act: Array, delta: Array, tap: Tap, summed: bool) -> Array:
        del act, tap  # the bias's gradient is δ summed over the positions
        k, n = delta.shape[:2]
        s = jnp.sum(jnp.reshape(delta, (k, n, -1, delta.shape[-1])), axis=2)
        sq = jnp.sum(s * s, axis=1)
        return jnp.sum(sq, axis=0, keepdims=True) if summed else sq


class Scale(Rule):
    """s = a ⊙ γ: a ``mul`` of an activation with a 1-D parameter over the last axis.

    The scale of a normalisation layer (flax ``LayerNorm``, ``GroupNorm`` and
    ``RMSNorm``, equinox ``LayerNorm``; a ``BatchNorm`` in inference mode through a
    scaled view, ``View.factor``): each example's gradient is
    Σ_t a_nt ⊙ δ_nt over its positions (a broadcast along the axes where it has size 1).
    """

    name = "scale"

    @staticmethod
    def match(eqn: Any, views: list[View | None], leaf_shape: tuple[int, ...]) -> Tap | str:
        k = 0 if views[0] is not None else 1
        view, act = views[k], eqn.invars[1 - k]
        assert view is not None
        if views[1 - k] is not None:
            return "a product of two parameters"
        out = tuple(eqn.outvars[0].aval.shape)
        scale = tuple(eqn.invars[k].aval.shape)
        shape = tuple(getattr(act.aval, "shape", ()))
        per_channel = (
            len(leaf_shape) == 1
            and not view.transposed
            and len(out) >= 2
            and scale[-1:] == leaf_shape == out[-1:]
            and all(s == 1 for s in scale[:-1])
        )
        if not per_channel:
            return "a product that is not a scale (a 1-D parameter over the last axis)"
        if len(shape) != len(out) or shape[:1] != out[:1]:
            return "a scale of an activation without the example axis"
        return Tap(view.leaf, "scale", 1 - k, False)

    @staticmethod
    def squares(act: Array, delta: Array, tap: Tap, summed: bool) -> Array:
        del tap
        act, factor = act if isinstance(act, tuple) else (act, None)  # a scaled leaf's
        k, n, c = delta.shape[0], delta.shape[1], delta.shape[-1]
        g = jnp.sum(jnp.reshape(act[None] * delta, (k, n, -1, c)), axis=2)  # (K, N, C)
        if factor is not None:  # the scaled leaf's gradient: times the factor
            g = g * jnp.reshape(factor, (-1,))
        sq = jnp.sum(g * g, axis=1)
        return jnp.sum(sq, axis=0, keepdims=True) if summed else sq


class Embed(Rule):
    """s = E[i]: a ``gather`` of whole rows of a 2-D table (``jnp.take``, ``E[ids]``).

    Each example's gradient has a row Σ_{t: i_nt = v} δ_nt for each token v it
    holds: the positions are sorted by (example, token) and summed per group
    (``jax.ops.segment_sum``), the groups' squares added into their rows. Cost
    O(N T log(N T) + K N T d), memory K N T d besides the (K, V d) squares.
    Indices out of range follow the gather's derivative: clipped in ``CLIP`` mode,
    dropped otherwise (``FILL_OR_DROP``, and ``PROMISE_IN_BOUNDS``, whose forward
    pass clamps but whose derivative drops them, as JAX's own gradient does).
    """

    name = "embed"

    @staticmethod
    def match(eqn: Any, views: list[View | None], leaf_shape: tuple[int, ...]) -> Tap | str:
        view = views[0]
        if view is None or views[1] is not None:
            return "a gather whose indices are a parameter"
        if view.reshaped or view.transposed or len(leaf_shape) != 2:
            return "a gather from an array that is not the parameter's own 2-D table"
        numbers = eqn.params["dimension_numbers"]
        starts = tuple(numbers.start_index_map)
        out = len(eqn.outvars[0].aval.shape)
        batch = len(eqn.invars[1].aval.shape) - 1  # the index vector is the last axis
        rows = (
            tuple(eqn.params["slice_sizes"]) == (1, leaf_shape[1])
            and starts in ((0,), (0, 1))
            and set(numbers.collapsed_slice_dims) <= {0}
            and not tuple(getattr(numbers, "operand_batching_dims", ()))
            and tuple(numbers.offset_dims) == tuple(range(batch, out))
        )
        if not rows:
            return "a gather that does not take whole rows of the table"
        if batch < 1:
            return "a gather without an example axis"
        # Out of range, CLIP takes the nearest row, and so does its derivative; the
        # derivative of FILL_OR_DROP and of PROMISE_IN_BOUNDS (``E[ids]``) drops it.
        drop = "CLIP" not in str(eqn.params["mode"])
        col = starts.index(1) if 1 in starts else -1
        params = (("row", starts.index(0)), ("col", col), ("drop", drop), ("vocab", leaf_shape[0]))
        return Tap(view.leaf, "embed", 1, False, params, tuple(leaf_shape))

    @staticmethod
    def squares(act: Array, delta: Array, tap: Tap, summed: bool) -> Array:
        p = dict(tap.params)
        vocab, width = tap.kernel
        k, n = delta.shape[:2]
        if jnp.iinfo(act.dtype).bits < 32:  # uint8 ids of a vocabulary above 255
            act = act.astype(jnp.int32)
        ids = jnp.reshape(act[..., p["row"]], (n, -1))
        valid = (ids >= 0) & (ids < vocab)
        if p["col"] >= 0:  # a second index, on the row's own axis: only 0 takes a whole row
            valid &= jnp.reshape(act[..., p["col"]], (n, -1)) == 0
        if not p["drop"]:  # clipped into range, as the gather and its derivative do
            valid = jnp.ones_like(valid)
        ids = jnp.clip(ids, 0, vocab - 1).astype(jnp.int32)
        t = ids.shape[1]
        d = jnp.reshape(delta, (k, n, t, width)) * valid[None, :, :, None].astype(delta.dtype)
        example = jnp.broadcast_to(jnp.arange(n)[:, None], (n, t)).reshape(-1)
        ids = ids.reshape(-1)
        order = jnp.lexsort((ids, example))  # by example, then token
        sid, sex = ids[order], example[order]
        new = jnp.concatenate([jnp.ones(1, bool), (sid[1:] != sid[:-1]) | (sex[1:] != sex[:-1])])
        group = jnp.cumsum(new) - 1  # each (example, token) pair's group
        d = jnp.moveaxis(jnp.reshape(d, (k, n * t, width)), 1, 0)[order]  # (N T, K, d)
        g = jax.ops.segment_sum(d, group, num_segments=n * t, indices_are_sorted=True)
        sq = g * g
        if summed:
            sq = jnp.sum(sq, axis=1, keepdims=True)
        rows = jnp.zeros(n * t, ids.dtype).at[group].set(sid)  # unused groups: 0, sum 0
        table = jnp.zeros((vocab, *sq.shape[1:]), sq.dtype).at[rows].add(sq)
        return jnp.reshape(jnp.moveaxis(table, 1, 0), (sq.shape[1], -1))


class Conv(Rule):
    """s = a ⋆ W: ``conv_general_dilated`` of an activation with the parameter as kernel.

    Each example's kernel gradient is Σ_t patch_nt ⊗ δ_nt over the output positions,
    with the patches of ``lax.conv_general_dilated_patches`` (the same strides,
    padding, dilations and layouts; features ordered input channel first, then the
    kernel's spatial axes), reordered to the kernel's layout: the per-example
    gradients of this layer are formed, ⌊max_vectors / N⌋ cotangents at a time. With
    G feature groups (depthwise convolutions: G = C_in) group g's output channels see
    only its C_in / G input channels' patches. Batch groups have no rule.
    """

    name = "conv"

    @staticmethod
    def match(eqn: Any, views: list[View | None], leaf_shape: tuple[int, ...]) -> Tap | str:
        view = views[1]
        if views[0] is not None or view is None:
            return "a convolution whose input is a parameter"
        if view.reshaped or view.transposed:
            return "a convolution kernel that is not the parameter's own array"
        params = eqn.params
        numbers = params["dimension_numbers"]
        if params["batch_group_count"] != 1:
            return "a convolution with batch groups"
        if numbers.lhs_spec[0] != 0 or numbers.out_spec[0] != 0:
            return "a convolution whose examples are not on axis 0"
        names = ("window_strides", "padding", "lhs_dilation", "rhs_dilation")
        kept = tuple((k, params[k]) for k in (*names, "dimension_numbers", "feature_group_count"))
        return Tap(view.leaf, "conv", 0, False, kept, tuple(leaf_shape))

    @staticmethod
    def prepare(act: Array, tap: Tap) -> Array:
        # The patches (N, positions, C_in · spatial), once for every cotangent.
        params = dict(tap.params)
        numbers = params.pop("dimension_numbers")
        del params["feature_group_count"]  # the patches of every input channel
        spatial = tuple(tap.kernel[a] for a in numbers.rhs_spec[2:])
        patches = jax.lax.conv_general_dilated_patches(
            act, spatial, dimension_numbers=numbers, **params
        )
        feature = numbers.out_spec[1]
        n = act.shape[0]
        return jnp.reshape(jnp.moveaxis(patches, feature, -1), (n, -1, patches.shape[feature]))

    @staticmethod
    def squares(act: Array, delta: Array, tap: Tap, summed: bool) -> Array:
        numbers = dict(tap.params)["dimension_numbers"]
        groups = dict(tap.params)["feature_group_count"]
        rhs = numbers.rhs_spec
        spatial = tuple(tap.kernel[a] for a in rhs[2:])
        n, k = act.shape[0], delta.shape[0]
        # Patches (N, T, G, C_in/G · spatial): the features are input channel first.
        a = jnp.reshape(act, (n, act.shape[1], groups, -1))
        feature = numbers.out_spec[1]
        d = jnp.moveaxis(delta, feature + 1, -1)
        d = jnp.reshape(d, (k, n, -1, groups, d.shape[-1] // groups))  # (K, N, T, G, O/G)
        g = jnp.einsum("ntgf,kntgo->kngfo", a, d)  # per-example kernel gradients
        sq = jnp.sum(g * g, axis=1)  # (K, G, C_in/G · spatial, C_out/G)
        sq = jnp.sum(sq, axis=0, keepdims=True) if summed else sq
        # Output channel g · C_out/G + o: the groups next to the output axis.
        sq = jnp.moveaxis(sq, 1, -2)
        sq = jnp.reshape(sq, (sq.shape[0], tap.kernel[rhs[1]], *spatial, tap.kernel[rhs[0]]))
        where = {rhs[1]: 1, rhs[0]: 2 + len(spatial)} | {a: 2 + i for i, a in enumerate(rhs[2:])}
        sq = jnp.transpose(sq, (0, *(where[axis] for axis in range(len(tap.kernel)))))
        return jnp.reshape(sq, (sq.shape[0], -1))


#: The primitive each rule covers -> the rule.
RULES: dict[str, type[Rule]] = {
    "dot_general": Dense,
    "add": Bias,
    "mul": Scale,
    "gather": Embed,
    "conv_general_dilated": Conv,
}
_BY_NAME = {rule.name: rule for rule in RULES.values()}


# --------------------------------------------------------------------------- #
# Finding the layers
# --------------------------------------------------------------------------- #


def leaf_function(fn: Callable[..., Any], treedef: Any) -> Callable[..., Any]:
    """(leaves, (x, state)) ↦ fn(params, x[, state]) with params built from the leaves."""

    def call(leaves: Sequence[Array], xs: tuple[PyTree, PyTree]) -> Any:
        x, state = xs
        params = jax.tree_util.tree_unflatten(treedef, list(leaves))
        return fn(params, x) if state is None else fn(params, x, state)

    return call


def plan(
    closed: Any, closed_plus: Any, num_leaves: int, shapes: Sequence[tuple[int, ...]], n: int
) -> Plan:
    """Each leaf's rule or the reason it has none, from the jaxprs of ``leaf_function``.

    ``closed`` is traced on the batch (N = ``n`` examples), ``closed_plus`` on one
    example more: a rule holds only where its layer's input has the examples on axis
    0, the one axis whose size follows N (a model that moves them elsewhere, or
    whose other axes happen to equal N, is told apart by the second trace). The
    first ``num_leaves`` inputs of each are the parameter leaves.
    """
    uses, found = _find(closed, num_leaves, shapes)
    _, found_plus = _find(closed_plus, num_leaves, shapes)
    wrong: dict[int, str] = {}
    if [f.tap for f in found] != [f.tap for f in found_plus]:
        for f in found:
            wrong[f.tap.leaf] = "the model's layers change with the batch size"
    else:
        for f, f_plus in zip(found, found_plus, strict=True):
            a = tuple(f.eqn.invars[f.tap.operand].aval.shape)
            b = tuple(f_plus.eqn.invars[f.tap.operand].aval.shape)
            if a[:1] != (n,) or b[:1] != (n + 1,) or a[1:] != b[1:]:
                wrong[f.tap.leaf] = "layer input axis 0 is not the example axis"
    reasons = []
    for i, used in enumerate(uses):
        covered = [u for u in used if isinstance(u, Tap)]
        if len(used) == 1 and covered:
            reasons.append(wrong.get(i, "fast"))
        elif not used:
            reasons.append("not used by the model")
        elif len(used) > 1:
            reasons.append(f"used {len(used)} times in one forward pass (shared)")
        else:
            reasons.append(str(used[0]))
    kept = [f for f in found if reasons[f.tap.leaf] == "fast"]
    per_example = any(
        f.tap.rule == "conv"
        or (f.tap.rule == "dense" and len(f.eqn.invars[f.tap.operand].aval.shape) > 2)
        for f in kept
    )
    taps = {f.key: f.tap for f in kept}
    outs = {f.key: (tuple(f.eqn.outvars[0].aval.shape), f.eqn.outvars[0].aval.dtype) for f in kept}
    factors = {f.key: f.factor for f in kept if f.factor is not None}
    return Plan(taps, tuple(reasons), outs, factors, per_example)


class _Found(NamedTuple):
    """A tap, its equation and where the equation is."""

    eqn: Any
    tap: Tap
    key: Key
    factor: Any = None


def _find(
    closed: Any, num_leaves: int, shapes: Sequence[tuple[int, ...]]
) -> tuple[list[list[Tap | str]], list[_Found]]:
    """Every use of every leaf (a tap or why not), and the taps."""
    uses: list[list[Tap | str]] = [[] for _ in range(num_leaves)]
    found: list[_Found] = []
    leaves = [View(i, False) for i in range(num_leaves)]
    ins = leaves + [None] * (len(closed.jaxpr.invars) - num_leaves)
    _walk(closed.jaxpr, ins, (), uses, found, shapes)
    return uses, found


def _walk(
    jaxpr: Any,
    ins: Sequence[View | None],
    path: Key,
    uses: list[list[Tap | str]],
    found: list[_Found],
    shapes: Sequence[tuple[int, ...]],
) -> list[View | None]:
    """Record the uses of the leaves in ``jaxpr`` whose inputs are the views ``ins``.

    Returns the views among its outputs (a parameter returned by a jitted function
    and used after it is followed there). Each body has its own variables.
    """
    views: dict[Any, View] = {v: w for v, w in zip(jaxpr.invars, ins, strict=True) if w}
    for eqn in jaxpr.eqns:
        seen = [views.get(v) if not isinstance(v, Literal) else None for v in eqn.invars]
        name = eqn.primitive.name
        if not any(seen):
            continue
        if name in _VIEWS:
            view = seen[0]
            assert view is not None
            if name == "convert_element_type":
                views[eqn.outvars[0]] = view
            elif view.factor is not None:  # leading axes of size 1 only: still per channel
                if _leading_ones(eqn):
                    views[eqn.outvars[0]] = View(view.leaf, True, False, view.factor)
                else:
                    uses[view.leaf].append(f"a scaled parameter re-shaped by {name}")
            elif name == "transpose" and tuple(eqn.params["permutation"]) == (1, 0):
                views[eqn.outvars[0]] = view._replace(transposed=not view.transposed)
            else:
                views[eqn.outvars[0]] = View(view.leaf, True)
            continue
        if name == "mul" and _scaling(eqn, seen):
            k = 0 if seen[0] is not None else 1
            views[eqn.outvars[0]] = seen[k]._replace(factor=eqn.invars[1 - k])  # type: ignore[union-attr]
            continue
        if name in _CALLS:
            for i, view in enumerate(seen):
                if view is not None and view.factor is not None:
                    uses[view.leaf].append("a scaled parameter passed into a jitted function")
                    seen[i] = None
            inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
            inner = getattr(inner, "jaxpr", inner)
            outs = _walk(inner, seen, (*path, id(eqn)), uses, found, shapes)
            for var, view in zip(eqn.outvars, outs, strict=True):
                if view is not None and view.factor is not None:  # the body's variable
                    uses[view.leaf].append("a scaled parameter returned by a jitted function")
                elif view is not None:
                    views[var] = view
            continue
        rule = RULES.get(name)
        for view in seen:
            if view is None:
                continue
            if rule is None:
                uses[view.leaf].append(f"used by {name}, which has no rule")
                continue
            if view.factor is not None and rule is not Scale:
                uses[view.leaf].append(f"a scaled parameter used by {name}")
                continue
            got = rule.match(eqn, seen, shapes[view.leaf])
            uses[view.leaf].append(got)
            if isinstance(got, Tap):
                found.append(_Found(eqn, got, (*path, id(eqn)), view.factor))
    return [None if isinstance(v, Literal) else views.get(v) for v in jaxpr.outvars]


def _scaling(eqn: Any, seen: list[View | None]) -> bool:
    """Whether this ``mul`` scales a per-channel leaf by a factor of its own shape.

    The product is then a scaled view of the leaf (``View.factor``), not a use: a
    factor of the leaf's shape holds no example axis, so the product's own use
    (a ``Scale``) carries the per-example gradient.
    """
    views = [v for v in seen if v is not None]
    if len(views) != 1 or views[0].factor is not None or views[0].transposed:
        return False
    k = 0 if seen[0] is not None else 1
    shape = tuple(eqn.invars[k].aval.shape)
    other = tuple(getattr(eqn.invars[1 - k].aval, "shape", ()))
    out = tuple(eqn.outvars[0].aval.shape)
    per_channel = len(shape) >= 1 and all(s == 1 for s in shape[:-1])
    return per_channel and out == shape and len(other) in (0, len(shape))


def _leading_ones(eqn: Any) -> bool:
    """Whether a reshape or broadcast only puts axes of size 1 before the last axis."""
    shape, out = tuple(eqn.invars[0].aval.shape), tuple(eqn.outvars[0].aval.shape)
    ones = len(shape) >= 1 and shape[-1:] == out[-1:] and all(s == 1 for s in out[:-1])
    if eqn.primitive.name == "broadcast_in_dim":
        return ones and tuple(eqn.params["broadcast_dimensions"])[-1:] == (len(out) - 1,)
    return ones and eqn.primitive.name == "reshape"


# --------------------------------------------------------------------------- #
# The squares
# --------------------------------------------------------------------------- #


def evaluate(
    jaxpr: Any,
    consts: Sequence[Array],
    args: Sequence[Array],
    taps: dict[Key, Tap],
    eps: dict[Key, Array],
    acts: dict[Key, Array],
    factors: dict[Key, Any],
    path: Key = (),
) -> list[Array]:
    """The jaxpr's outputs, with ``eps[key]`` added to each tapped output.

    ``acts`` receives each tap's layer input (not a bias's). As
    ``jax.core.eval_jaxpr``, with the calls holding taps inlined (so their taps are
    reached) and the primitives of ``_LOOP_FRIENDLY`` in their other forms (same
    values and derivatives, fast batched backward passes inside ``lax.scan``);
    ``path`` is where ``jaxpr`` is (the calls it lies in).
    """
    env: dict[Any, Array] = {}
    inside = {key[:i] for key in taps for i in range(len(path) + 1, len(key))}

    def read(v: Any) -> Array:
        return v.val if isinstance(v, Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        key = (*path, id(eqn))
        if eqn.primitive.name in _CALLS and key in inside:
            inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
            body, body_consts = getattr(inner, "jaxpr", inner), getattr(inner, "consts", ())
            outs = evaluate(body, body_consts, invals, taps, eps, acts, factors, key)
        else:
            got = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = got if isinstance(got, tuple) else ((), got)  # JAX < 0.7: a pair
            context = getattr(getattr(eqn, "ctx", None), "manager", None)
            rewrite = _LOOP_FRIENDLY.get(eqn.primitive.name)
            with context if context is not None else contextlib.nullcontext():
                out = None if rewrite is None else rewrite(invals, params)
                if out is None:
                    out = eqn.primitive.bind(*subfuns, *invals, **params)
            outs = out if eqn.primitive.multiple_results else [out]
        tap = taps.get(key)
        if tap is not None:
            if key in factors:  # the layer's input and the leaf's factor
                acts[key] = (invals[tap.operand], read(factors[key]))
            elif tap.rule != "bias":  # the rules that need the layer's input
                acts[key] = invals[tap.operand]
            outs = [outs[0] + eps[key]]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _conv_channels_last(invals: list[Array], params: dict[str, Any]) -> Array | None:
    """The convolution on arrays stored channels last, the same result.

    The backward pass to the convolution's input is a convolution with the kernel's
    in and out axes swapped. Inside a ``lax.scan`` over cotangents XLA's CPU backend
    runs it on the arrays as they are stored, and unless the examples' features come
    last (NHWC) and the kernel's out axis comes before its in axis (HWOI), it takes
    a slow generic loop: with an HWIO kernel 20 cotangents through a 3x3, 16 → 32
    convolution took 0.30 s in chunks of 2 against 6 ms, and NCHW inputs made a
    CNN's exact diagonal 3.4 times slower. So the input, kernel and output are
    transposed to (N, spatial…, C), (spatial…, out, in) and (N, spatial…, C) around
    the convolution, and the result back to the model's layout.
    """
    lhs, rhs = invals
    numbers = params["dimension_numbers"]
    batch, feature, *spatial = numbers.lhs_spec
    out_axis, in_axis, *kernel = numbers.rhs_spec
    o_batch, o_feature, *o_spatial = numbers.out_spec
    orders = (
        (batch, *spatial, feature),
        (*kernel, out_axis, in_axis),
        (o_batch, *o_spatial, o_feature),
    )
    if all(order == tuple(range(len(order))) for order in orders):
        return None
    k = len(spatial)
    last = (0, k + 1, *range(1, k + 1))
    moved = numbers._replace(lhs_spec=last, rhs_spec=(k, k + 1, *range(k)), out_spec=last)
    out = jax.lax.conv_general_dilated_p.bind(
        jnp.transpose(lhs, orders[0]),
        jnp.transpose(rhs, orders[1]),
        **{**params, "dimension_numbers": moved},
    )
    back = [0] * out.ndim  # out's axis orders[2][i] is the result's axis i
    for i, axis in enumerate(orders[2]):
        back[axis] = i
    return jnp.transpose(out, back)


def _max_pool(invals: list[Array], params: dict[str, Any]) -> Array | None:
    """Max pooling over windows that do not overlap, as a selection of its maxima.

    ``reduce_window_max``'s backward pass is XLA's select-and-scatter over the layer's
    input, and batched over cotangents it selects again for each (a CNN's 10 class
    cotangents: 0.28 s against 0.085 s so). With windows as long as their strides
    (2x2 pooling with stride 2), the windows are the input reshaped: the result is
    ``where(first maximum of its window, x, 0)`` summed over the window, the first
    maximum in the window's row-major order found once (the element JAX's own
    gradient takes at ties), and its backward pass is elementwise. Other windows
    (overlapping, dilated), integer inputs and empty results keep the primitive. A
    window with NaN routes the derivative to its first NaN (JAX: another one); the
    finite checks refuse such values before.
    """
    (x,) = invals
    window, strides = params["window_dimensions"], params["window_strides"]
    if (
        tuple(window) != tuple(strides)
        or any(d != 1 for d in (*params["base_dilation"], *params["window_dilation"]))
        or not jnp.issubdtype(x.dtype, jnp.floating)
    ):
        return None
    lowest = jnp.array(-jnp.inf, x.dtype)
    x = jax.lax.pad(x, lowest, [(lo, hi, 0) for lo, hi in params["padding"]])
    counts = [size // w for size, w in zip(x.shape, window, strict=True)]
    if 0 in counts:  # an empty result: the primitive gives it
        return None
    x = x[tuple(slice(0, c * w) for c, w in zip(counts, window, strict=True))]
    split = [d for c, w in zip(counts, window, strict=True) for d in (c, w)]
    r = jnp.reshape(x, split)  # (c0, w0, c1, w1, …)
    r = jnp.transpose(r, (*range(0, r.ndim, 2), *range(1, r.ndim, 2)))
    r = jnp.reshape(r, (*counts, -1))  # each window's elements, row-major, last
    first = jnp.argmax(jax.lax.stop_gradient(r), axis=-1, keepdims=True)
    chosen = jax.lax.broadcasted_iota(jnp.int32, r.shape, r.ndim - 1) == first
    return jnp.sum(jnp.where(chosen, r, jnp.zeros((), x.dtype)), axis=-1)


#: Primitives evaluated in another form with the same values and derivatives, whose
#: batched backward passes are fast inside loops (None: the primitive as it is).
_LOOP_FRIENDLY: dict[str, Callable[[list[Array], dict[str, Any]], Array | None]] = {
    "conv_general_dilated": _conv_channels_last,
    "reduce_window_max": _max_pool,
}


def sum_squared(
    closed: Any,
    layers: Plan,
    leaves: Sequence[Array],
    flat_inputs: Sequence[Array],
    select: Callable[[Any], Array],
    U: Array,
    vector_chunk: int,
    local: Callable[[Array], Array],
    summed: bool,
) -> Array:
    """Σ_n (J_nᵀ U[n, k])² (K, D) for leaves that all have a tap, by the rules.

    ``summed``: the sum over k, (D,), formed without the (K, D) rows where a rule can.

    ``closed`` is the jaxpr of the model over (leaves, flat inputs); ``select`` turns
    its outputs into the logits (N, ∗S, C); ``U`` (N, K, ∗S, C) is masked already.
    One forward pass with the perturbations, then one batched backward pass per
    cotangent, ``vector_chunk`` cotangents at a time in a ``lax.scan`` (each chunk's
    δ and, with position axes, its per-example layer gradients, vector_chunk · N of
    them, are alive at once; the sums accumulate; the cotangents left after the full
    chunks go through on their own, and one chunk is not looped over). The squares are formed in the
    parameters' dtype (a half-precision layer's δ and input are upcast first).
    ``local`` makes the perturbations vary as the inputs do inside ``shard_map``
    (``shard_local``: the derivative on this device's shard, not summed over them).
    """
    dtype = leaves[0].dtype
    width = sum(math.prod(leaf.shape) for leaf in leaves)
    taps = layers.taps
    zeros = {key: local(jnp.zeros(*layers.outs[key])) for key in taps}

    def forward(eps: dict[Key, Array]) -> tuple[Array, dict[Key, Array]]:
        acts: dict[Key, Array] = {}
        args = [*leaves, *flat_inputs]
        outs = evaluate(closed.jaxpr, closed.consts, args, taps, eps, acts, layers.factors)
        return select(outs), acts

    _, pullback, acts = jax.vjp(forward, zeros, has_aux=True)
    acts = jax.tree_util.tree_map(  # a scaled tap's act is (input, factor); not indices
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, acts
    )
    order = sorted(taps.items(), key=lambda item: item[1].leaf)
    acts = {key: _BY_NAME[tap.rule].prepare(acts[key], tap) for key, tap in order if key in acts}
    k = int(U.shape[1])
    chunk = max(1, min(vector_chunk, k))
    steps, rest = divmod(k, chunk)  # full chunks in a loop, the rest on its own
    U = jnp.moveaxis(U, 1, 0)  # (K, N, *S, C)
    chunks = jnp.reshape(U[: steps * chunk], (steps, chunk, *U.shape[1:]))

    def squares(u: Array) -> Array:  # (chunk, N, *S, C) -> (chunk or 1, D)
        deltas = jax.vmap(lambda v: pullback(v)[0])(u)
        parts = [
            _BY_NAME[tap.rule].squares(acts.get(key), deltas[key].astype(dtype), tap, summed)
            for key, tap in order
        ]
        out = jnp.concatenate(parts, axis=1)
        if out.shape[1] != width:  # every leaf exactly once: the plan guarantees it
            msg = f"layer rules: {out.shape[1]} squared sums for {width} parameters."
            raise RuntimeError(msg)
        return out

    # One chunk is not looped over: XLA then optimises across the pullback and the
    # squares (a CNN's 10 classes took 0.28 s in one chunk, 0.49 s as a loop of one,
    # before convolutions were evaluated channels last; since then the two measure
    # alike within this machine's noise on the MLPs, and the CNN takes chunks of 4).
    parts = [squares(chunks[0])] if steps == 1 else []
    if steps > 1 and summed:
        total = local(jnp.zeros((1, width), dtype))
        parts.append(jax.lax.scan(lambda t, u: (t + squares(u), None), total, chunks)[0])
    elif steps > 1:
        parts.append(jnp.reshape(jax.lax.map(squares, chunks), (steps * chunk, -1)))
    if rest:
        parts.append(squares(U[steps * chunk :]))
    if summed:
        return sum(parts)[0]
    return jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
