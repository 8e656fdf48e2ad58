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
inlined) and gives each parameter leaf a rule or the reason it has none: used
twice (shared), inside another operation (a ``custom_jvp`` function, a ``scan``,
a ``gather`` of an embedding), or in a form the rules do not cover. Convolutions
(``conv_general_dilated``) have a rule that forms each example's kernel gradient
from the patches. ``sum_squared`` evaluates the
jaxpr with the perturbations and forms the squares; it applies only when every leaf
has a rule and the examples are independent (the adapter checks both).

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


class Tap(NamedTuple):
    """One covered use of a leaf: its rule and where its perturbation goes."""

    leaf: int
    rule: str  # the key of RULES
    operand: int  # the equation's input that is the activation (dense) or the sum (bias)
    transposed: bool  # dense: the kernel is (out, in), contracted on its axis 1
    params: tuple[tuple[str, Any], ...] = ()  # conv: the equation's parameters
    kernel: tuple[int, ...] = ()  # conv: the kernel's shape


class Plan(NamedTuple):
    """Per leaf: its tap, or the reason it has none; the taps by equation."""

    taps: dict[int, Tap]  # id(eqn) -> tap
    reasons: tuple[str, ...]  # per leaf: "fast" or why not
    #: Some dense layer's input has position axes: its per-example gradients are formed
    #: (the cotangents then go in chunks of ⌊max_vectors / N⌋).
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
    def squares(act: Array, delta: Array, tap: Tap, summed: bool) -> Array:
        """Σ_n (per-example gradient of the leaf for cotangent k)², (K, size).

        ``summed``: their sum over k instead, (1, size), which a rule may form
        without the K rows (one product instead of K).
        """
        raise NotImplementedError


class Dense(Rule):
    """s = a W: ``dot_general`` of an activation (N, ..., in) with a 2-D kernel."""

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
        if k == 0:
            return "a kernel on the left of its product"
        ndim = len(act.aval.shape)
        if batch_l or batch_r or tuple(contract_l) != (ndim - 1,) or len(contract_r) != 1:
            return "a product that is not over the activation's last axis"
        if ndim < 2:
            return "an activation without an example axis"
        # The kernel as used is (in, out) when contracted on its axis 0; (out, in) of
        # the leaf's layout when exactly one of "contracted on 1" and "transposed".
        return Tap(view.leaf, "dense", 0, (int(contract_r[0]) == 1) != view.transposed)

    @staticmethod
    def squares(act: Array, delta: Array, tap: Tap, summed: bool) -> Array:
        # act (N, ..., in), delta (K, N, ..., out)
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


class Conv(Rule):
    """s = a ⋆ W: ``conv_general_dilated`` of an activation with the parameter as kernel.

    Each example's kernel gradient is Σ_t patch_nt ⊗ δ_nt over the output positions,
    with the patches of ``lax.conv_general_dilated_patches`` (the same strides,
    padding, dilations and layouts; features ordered input channel first, then the
    kernel's spatial axes), reordered to the kernel's layout: the per-example
    gradients of this layer are formed, ⌊max_vectors / N⌋ cotangents at a time.
    Grouped convolutions have no rule.
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
        if params["batch_group_count"] != 1 or params["feature_group_count"] != 1:
            return "a grouped convolution"
        if numbers.lhs_spec[0] != 0 or numbers.out_spec[0] != 0:
            return "a convolution whose examples are not on axis 0"
        names = ("window_strides", "padding", "lhs_dilation", "rhs_dilation")
        kept = tuple((k, params[k]) for k in (*names, "dimension_numbers"))
        return Tap(view.leaf, "conv", 0, False, kept, tuple(leaf_shape))

    @staticmethod
    def squares(act: Array, delta: Array, tap: Tap, summed: bool) -> Array:
        params = dict(tap.params)
        numbers = params.pop("dimension_numbers")
        rhs = numbers.rhs_spec
        spatial = tuple(tap.kernel[a] for a in rhs[2:])
        patches = jax.lax.conv_general_dilated_patches(
            act, spatial, dimension_numbers=numbers, **params
        )
        n, k = act.shape[0], delta.shape[0]
        feature = numbers.out_spec[1]
        a = jnp.reshape(jnp.moveaxis(patches, feature, -1), (n, -1, patches.shape[feature]))
        d = jnp.moveaxis(delta, feature + 1, -1)
        d = jnp.reshape(d, (k, n, -1, d.shape[-1]))
        g = jnp.einsum("ntf,knto->knfo", a, d)  # per-example kernel gradients
        sq = jnp.sum(g * g, axis=1)  # (K, C_in · spatial, C_out)
        sq = jnp.sum(sq, axis=0, keepdims=True) if summed else sq
        sq = jnp.reshape(sq, (sq.shape[0], tap.kernel[rhs[1]], *spatial, tap.kernel[rhs[0]]))
        where = {rhs[1]: 1, rhs[0]: 2 + len(spatial)} | {a: 2 + i for i, a in enumerate(rhs[2:])}
        sq = jnp.transpose(sq, (0, *(where[axis] for axis in range(len(tap.kernel)))))
        return jnp.reshape(sq, (sq.shape[0], -1))


#: The primitive each rule covers -> the rule.
RULES: dict[str, type[Rule]] = {"dot_general": Dense, "add": Bias, "conv_general_dilated": Conv}
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
    uses, found, visits = _find(closed, num_leaves, shapes)
    _, found_plus, _ = _find(closed_plus, num_leaves, shapes)
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
    for f in found:
        # A jitted function called twice with the same shapes has ONE body: its layers
        # would share one equation (one perturbation, one recorded input).
        if any(visits[body] > 1 for body in f.bodies):
            wrong[f.tap.leaf] = "used inside a jitted function that the model calls more than once"
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
    return Plan({id(f.eqn): f.tap for f in kept}, tuple(reasons), per_example)


class _Found(NamedTuple):
    """A tap, its equation and the call bodies (ids) it lies in."""

    eqn: Any
    tap: Tap
    bodies: tuple[int, ...]


def _find(
    closed: Any, num_leaves: int, shapes: Sequence[tuple[int, ...]]
) -> tuple[list[list[Tap | str]], list[_Found], dict[int, int]]:
    """Every use of every leaf (a tap or why not), the taps, and each body's visits."""
    uses: list[list[Tap | str]] = [[] for _ in range(num_leaves)]
    found: list[_Found] = []
    visits: dict[int, int] = {}
    leaves = [View(i, False) for i in range(num_leaves)]
    ins = leaves + [None] * (len(closed.jaxpr.invars) - num_leaves)
    _walk(closed.jaxpr, ins, (), uses, found, visits, shapes)
    return uses, found, visits


def _walk(
    jaxpr: Any,
    ins: Sequence[View | None],
    bodies: tuple[int, ...],
    uses: list[list[Tap | str]],
    found: list[_Found],
    visits: dict[int, int],
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
        if not any(seen) and name not in _CALLS:  # every call counts: a body called twice
            continue
        if name in _VIEWS:
            view = seen[0]
            assert view is not None
            if name == "convert_element_type":
                views[eqn.outvars[0]] = view
            elif name == "transpose" and tuple(eqn.params["permutation"]) == (1, 0):
                views[eqn.outvars[0]] = view._replace(transposed=not view.transposed)
            else:
                views[eqn.outvars[0]] = View(view.leaf, True)
            continue
        if name in _CALLS:
            inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
            inner = getattr(inner, "jaxpr", inner)
            visits[id(inner)] = visits.get(id(inner), 0) + 1
            outs = _walk(inner, seen, (*bodies, id(inner)), uses, found, visits, shapes)
            for var, view in zip(eqn.outvars, outs, strict=True):
                if view is not None:
                    views[var] = view
            continue
        rule = RULES.get(name)
        for view in seen:
            if view is None:
                continue
            if rule is None:
                uses[view.leaf].append(f"used by {name}, which has no rule")
                continue
            got = rule.match(eqn, seen, shapes[view.leaf])
            uses[view.leaf].append(got)
            if isinstance(got, Tap):
                found.append(_Found(eqn, got, bodies))
    return [None if isinstance(v, Literal) else views.get(v) for v in jaxpr.outvars]


# --------------------------------------------------------------------------- #
# The squares
# --------------------------------------------------------------------------- #


def evaluate(
    jaxpr: Any,
    consts: Sequence[Array],
    args: Sequence[Array],
    taps: dict[int, Tap],
    eps: dict[int, Array],
    acts: dict[int, Array],
) -> list[Array]:
    """The jaxpr's outputs, with ``eps[id(eqn)]`` added to each tapped output.

    ``acts`` receives each dense tap's activation. As ``jax.core.eval_jaxpr``, with
    the calls inlined (so their taps are reached).
    """
    env: dict[Any, Array] = {}

    def read(v: Any) -> Array:
        return v.val if isinstance(v, Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _CALLS and any(id(e) in taps for e in _eqns(eqn)):
            inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
            outs = evaluate(
                getattr(inner, "jaxpr", inner),
                getattr(inner, "consts", ()),
                invals,
                taps,
                eps,
                acts,
            )
        else:
            got = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = got if isinstance(got, tuple) else ((), got)  # JAX < 0.7: a pair
            context = getattr(getattr(eqn, "ctx", None), "manager", None)
            with context if context is not None else contextlib.nullcontext():
                outs = eqn.primitive.bind(*subfuns, *invals, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        tap = taps.get(id(eqn))
        if tap is not None:
            if tap.rule != "bias":  # the rules that need the layer's input
                acts[id(eqn)] = invals[tap.operand]
            outs = [outs[0] + eps[id(eqn)]]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _eqns(eqn: Any) -> list[Any]:
    """The equations of a call's body, nested calls included."""
    inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
    inner = getattr(inner, "jaxpr", inner)
    out = []
    for e in inner.eqns:
        out.append(e)
        if e.primitive.name in _CALLS:
            out.extend(_eqns(e))
    return out


def sum_squared(
    closed: Any,
    taps: dict[int, Tap],
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
    them, are alive at once; the sums accumulate). The squares are formed in the
    parameters' dtype (a half-precision layer's δ and input are upcast first).
    ``local`` makes the perturbations vary as the inputs do inside ``shard_map``
    (``shard_local``: the derivative on this device's shard, not summed over them).
    """
    dtype = leaves[0].dtype
    width = sum(math.prod(leaf.shape) for leaf in leaves)
    zeros = {key: local(jnp.zeros(*_out_aval(closed.jaxpr, key))) for key in taps}

    def forward(eps: dict[int, Array]) -> tuple[Array, dict[int, Array]]:
        acts: dict[int, Array] = {}
        outs = evaluate(closed.jaxpr, closed.consts, [*leaves, *flat_inputs], taps, eps, acts)
        return select(outs), acts

    _, pullback, acts = jax.vjp(forward, zeros, has_aux=True)
    acts = {key: a.astype(dtype) for key, a in acts.items()}
    order = sorted(taps.items(), key=lambda item: item[1].leaf)
    k = int(U.shape[1])
    chunk = max(1, min(vector_chunk, k))
    steps = -(-k // chunk)
    pad = [(0, 0), (0, steps * chunk - k)] + [(0, 0)] * (U.ndim - 2)
    chunks = jnp.moveaxis(jnp.pad(U, pad), 1, 0)  # (K', N, *S, C), zero cotangents last
    chunks = jnp.reshape(chunks, (steps, chunk, *chunks.shape[1:]))

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

    if summed:
        total = local(jnp.zeros((1, width), dtype))
        total = jax.lax.scan(lambda t, u: (t + squares(u), None), total, chunks)[0]
        return total[0]
    rows = jax.lax.map(squares, chunks)  # (steps, chunk, D)
    return jnp.reshape(rows, (steps * chunk, -1))[:k]


def _out_aval(jaxpr: Any, key: int) -> tuple[tuple[int, ...], Any]:
    """The shape and dtype of the output of the equation ``key`` (``id``), calls searched."""
    for eqn in jaxpr.eqns:
        inner = [eqn, *(_eqns(eqn) if eqn.primitive.name in _CALLS else [])]
        for e in inner:
            if id(e) == key:
                aval = e.outvars[0].aval
                return tuple(aval.shape), aval.dtype
    raise KeyError(key)
