"""The private helpers every public function relies on."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _assertions import assert_close

from fisherbound._lib import (
    RankedGenerator,
    array_namespace,
    as_generator,
    check_choice,
    check_logits,
    check_positive_int,
    probes,
)
from fisherbound._lib._estimate import estimate_from_samples


def test_same_seed_same_probes_on_every_backend(backend) -> None:
    xp = backend.xp
    # One random bit per entry, the bits of Generator.bytes in order: 1 -> +1, 0 -> -1.
    bits = np.unpackbits(np.frombuffer(np.random.default_rng(7).bytes(2), dtype=np.uint8))
    ref = (bits[:12] * 2.0 - 1.0).reshape(4, 3)
    got = probes(
        as_generator(7),
        (4, 3),
        distribution="rademacher",
        xp=xp,
        dtype=xp.float64,
        device=backend.device,
    )
    assert_close(got, np.asarray(ref), rtol=0, atol=0, like=backend)
    assert set(np.unique(backend.to_numpy(got))) <= {-1.0, 1.0}
    g = probes(
        as_generator(7),
        (5,),
        distribution="gaussian",
        xp=xp,
        dtype=xp.float64,
        device=backend.device,
    )
    assert_close(g, np.random.default_rng(7).standard_normal(5), rtol=0, atol=0, like=backend)


def test_probes_as_signs_are_the_same_draw_in_int8(backend) -> None:
    xp = backend.xp
    kw = {"distribution": "rademacher", "xp": xp, "device": backend.device}
    keep = np.array([True, False, True])
    floats = probes(as_generator(9), (1, 3, 4), dtype=xp.float64, keep=keep, **kw)
    signs = probes(as_generator(9), (1, 3, 4), dtype=xp.float64, keep=keep, signs=True, **kw)
    assert signs.dtype == xp.int8
    assert_close(xp.astype(signs, xp.float64), backend.to_numpy(floats), rtol=0, atol=0,
                 like=backend)  # fmt: skip


def test_probes_keep_zeroes_the_dropped_rows_of_the_same_draw() -> None:
    shape = (2, 3, 4, 5)  # (M, N, T, R)
    full = probes(
        as_generator(3), shape, distribution="rademacher", xp=np, dtype=np.float64, device=None
    )
    keep = np.ones((3, 4), dtype=bool)
    keep[0, 1] = keep[2, 3] = False
    kept = probes(
        as_generator(3),
        shape,
        distribution="rademacher",
        xp=np,
        dtype=np.float64,
        device=None,
        keep=keep,
    )
    np.testing.assert_array_equal(kept, np.where(keep[None, :, :, None], full, 0.0))
    # No position axes, (M, N, R) with keep (N,); and a RankedGenerator's (world, M, N, R)
    # draw of which this device keeps its own.
    rows = np.array([True, False, True])
    flat = probes(as_generator(4), (2, 3, 5), distribution="rademacher", xp=np, dtype=np.float64,
                  device=None)  # fmt: skip
    got = probes(as_generator(4), (2, 3, 5), distribution="rademacher", xp=np, dtype=np.float64,
                 device=None, keep=rows)  # fmt: skip
    np.testing.assert_array_equal(got, np.where(rows[None, :, None], flat, 0.0))
    world = probes(as_generator(6), (2, 2, 3, 5), distribution="rademacher", xp=np,
                   dtype=np.float64, device=None)  # fmt: skip
    ranked = RankedGenerator(np.random.default_rng(6), 2, lambda a: a[1])
    mine = probes(ranked, (2, 3, 5), distribution="rademacher", xp=np, dtype=np.float64,
                  device=None, keep=rows)  # fmt: skip
    np.testing.assert_array_equal(mine, np.where(rows[None, :, None], world[1], 0.0))
    # Gaussian probes: the same rows zeroed, the rest the same draw.
    g = probes(as_generator(5), (2, 3, 5), distribution="gaussian", xp=np, dtype=np.float64,
               device=None)  # fmt: skip
    g_kept = probes(as_generator(5), (2, 3, 5), distribution="gaussian", xp=np,
                    dtype=np.float64, device=None, keep=rows)  # fmt: skip
    np.testing.assert_array_equal(g_kept, np.where(rows[None, :, None], g, 0.0))
    # Many draws: the signs are balanced (mean 0, standard deviation 1/sqrt(n) = 0.001).
    many = probes(
        as_generator(0), (10**6,), distribution="rademacher", xp=np, dtype=np.float64, device=None
    )
    assert set(np.unique(many)) == {-1.0, 1.0}
    assert abs(float(np.mean(many))) < 5e-3


def test_as_generator() -> None:
    g = np.random.default_rng(1)
    assert as_generator(g) is g
    assert as_generator(3).random() == np.random.default_rng(3).random()
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator, an int seed"):
        as_generator("seed")
    with pytest.raises(TypeError, match="rng must be"):
        as_generator(True)
    with pytest.raises(ValueError, match="rng must be a non-negative int seed .*; got -1"):
        as_generator(-1)  # was NumPy's "expected non-negative integer"


def test_unknown_distribution() -> None:
    with pytest.raises(ValueError, match="distribution must be one of"):
        probes(as_generator(0), (2,), distribution="cauchy", xp=np, dtype=np.float64, device=None)


def test_mixed_namespaces_named() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="z is a numpy array but v is a torch array"):
        array_namespace(np.zeros(2), torch.zeros(2), names=("z", "v"))
    with pytest.raises(TypeError, match="v must be an array of an array-API library"):
        array_namespace(np.zeros(2), [1.0, 2.0], names=("z", "v"))


def test_check_logits_messages(backend) -> None:
    z = backend.asarray([[0.0, 1.0], [np.nan, 0.0], [0.0, 0.0], [np.inf, 1.0]])
    with pytest.raises(ValueError, match=r"z must be finite; got NaN and inf in rows \[1, 3\]"):
        check_logits(z)
    with pytest.raises(ValueError, match="at least one axis; got a 0-d array"):
        check_logits(backend.asarray(1.0))
    with pytest.raises(TypeError, match="real floating-point dtype"):
        check_logits(backend.asarray([[1, 2]], dtype="int64"))
    if hasattr(backend.xp, "float16"):
        with pytest.raises(TypeError, match=r"\(float32 or float64\); got .*float16"):
            check_logits(backend.asarray([[1.0, 2.0]], dtype="float16"))
    with pytest.raises(
        ValueError, match=r"at least 2 classes on its last axis; got shape \(3, 1\)"
    ):
        check_logits(backend.asarray(np.zeros((3, 1))), min_classes=2)
    assert check_logits(backend.asarray([[0.0, 1.0]])) is not None


def test_check_ints_and_choices() -> None:
    assert check_positive_int(3, "num_probes") == 3
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1; got 0"):
        check_positive_int(0, "num_probes")
    with pytest.raises(TypeError, match="num_probes must be an integer >= 1; got float"):
        check_positive_int(2.5, "num_probes")
    with pytest.raises(ValueError, match="kernel must be one of 'exact', 'upper'; got 'x'"):
        check_choice("x", "kernel", ("exact", "upper"))


def test_estimate_from_samples(backend) -> None:
    s = backend.asarray([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])
    est = estimate_from_samples(s, backend.xp)
    assert_close(est.value, [3.0, 2.0], rtol=1e-7, atol=0, like=backend)
    assert_close(est.std_error, [2.0 / np.sqrt(3), 0.0], rtol=1e-7, atol=0, like=backend)
    assert est.num_probes == 3
    one = estimate_from_samples(s[:1, ...], backend.xp)
    assert np.all(np.isnan(backend.to_numpy(one.std_error)))


def test_check_device_message() -> None:
    xs = pytest.importorskip("array_api_strict")
    from fisherbound._lib._validation import check_device

    x = xs.asarray([1.0], device=xs.Device("device1"))
    check_device(x, "v", xs.Device("device1"), owner="the linearization's device")
    with pytest.raises(
        ValueError,
        match=r"v must be on the linearization's device \(.*CPU_DEVICE.*\); got .*device1.*\. "
        r"Move it with xp.asarray\(v, device=...\)\.",
    ):
        check_device(x, "v", xs.Device("CPU_DEVICE"), owner="the linearization's device")
    with pytest.raises(ValueError, match=r"\. Use jax\.device_put\.$"):
        check_device(x, "v", xs.Device("CPU_DEVICE"), owner="it", remedy="Use jax.device_put.")


class _FakeCollective:
    """A Collective of two ranks whose extrema are given: the agree logic in one process."""

    @staticmethod
    def make(other: dict[str, object] | None, mine: dict[str, object]) -> object:
        from fisherbound._lib._collective import Collective, _code

        class Fake(Collective):
            description = "a fake group (2 ranks)"

            def extrema(self, values: list[int]) -> tuple[list[int], list[int]]:
                theirs = values if other is None else self._codes(other)
                return (
                    [min(a, b) for a, b in zip(values, theirs)],
                    [max(a, b) for a, b in zip(values, theirs)],
                )

            @staticmethod
            def _codes(fields: dict[str, object]) -> list[int]:
                codes = [_code(tuple(fields))] + [_code(v) for v in fields.values()]
                return codes + [0] * (16 - len(codes))

        return Fake()


def test_collective_agree_messages() -> None:
    mine = {"batches": 1, "k": 2, "family": "Categorical()"}
    same = _FakeCollective.make(None, mine)
    same.agree(mine, where="top_eigenpairs")  # type: ignore[attr-defined]
    other_k = _FakeCollective.make({"batches": 1, "k": 3, "family": "Categorical()"}, mine)
    with pytest.raises(
        ValueError,
        match=r"top_eigenpairs: the ranks of a fake group .* disagree on k \(this rank: k = 2\)",
    ):
        other_k.agree(mine, where="top_eigenpairs")  # type: ignore[attr-defined]
    empty = _FakeCollective.make({"batches": 0, "k": 2, "family": "Categorical()"}, mine)
    with pytest.raises(
        ValueError, match="every rank of a fake group .* must hold at least one batch"
    ):
        empty.agree(mine, where="surface")  # type: ignore[attr-defined]
    other_call = _FakeCollective.make({"batches": 1, "num_points": 3}, mine)
    with pytest.raises(ValueError, match="are not running the same call"):
        other_call.agree(mine, where="surface")  # type: ignore[attr-defined]
    many = {f"f{i}": i for i in range(16)}
    with pytest.raises(ValueError, match="agree compares at most 15 fields; got 16"):
        same.agree(many, where="x")  # type: ignore[attr-defined]


def test_set_row_in_place_and_through_the_masked_fallback(monkeypatch):
    import array_api_compat

    from fisherbound._lib import _namespace, set_row

    a = np.arange(6.0).reshape(2, 3)
    out = set_row(np, a, 1, np.array([7.0, 8.0, 9.0]))
    assert out is a  # NumPy: written in place
    np.testing.assert_array_equal(a, [[0.0, 1.0, 2.0], [7.0, 8.0, 9.0]])
    # An immutable array library without .at: the masked sum gives the same matrix.
    monkeypatch.setattr(_namespace.array_api_compat, "is_writeable_array", lambda x: False)
    b = np.arange(6.0).reshape(2, 3)
    out = set_row(array_api_compat.array_namespace(b), b, 0, np.array([-1.0, -2.0, -3.0]))
    np.testing.assert_array_equal(out, [[-1.0, -2.0, -3.0], [3.0, 4.0, 5.0]])
    np.testing.assert_array_equal(b, np.arange(6.0).reshape(2, 3))  # not written
    # Batched: row i of the last two axes of a (B, m, n) stack.
    c = np.zeros((2, 3, 4))
    out = set_row(np, c, 2, np.ones((2, 4)))
    np.testing.assert_array_equal(out[:, 2, :], 1.0)
    assert float(out.sum()) == 8.0


def _meta_front_doors() -> dict[str, Any]:
    """Public calls with one torch "meta" operand each; values: (call, the argument named)."""
    import torch

    from fisherbound import dimension, estimators, families, landscape, linalg, variance
    from fisherbound.adapters import torch as fb_torch

    def meta(*shape: int, dtype: Any = torch.float64) -> Any:
        return torch.zeros(*shape, dtype=dtype, device="meta")

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    net = net.double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.long)
    lin = fb_torch.linearize(net, x)
    loss = fb_torch.loss_function(net, x, y)
    d = lin.num_params
    quad = linalg.lanczos_quadrature(torch.eye(4, dtype=torch.float64), num_probes=2, num_matvecs=3)
    return {
        "Categorical.eigvalsh": (lambda: families.Categorical().eigvalsh(meta(3, 4)), "z"),
        "Categorical.mean": (lambda: families.Categorical().mean(meta(3, 4)), "z"),
        "Bernoulli.mean": (lambda: families.Bernoulli().mean(meta(3, 2)), "z"),
        "Gaussian.metric_matvec": (
            lambda: families.Gaussian().metric_matvec(meta(3, 2), meta(3, 2)),
            "z",
        ),
        "lanczos": (lambda: linalg.lanczos(meta(4, 4), num_matvecs=3), "A"),
        "lanczos v0": (
            lambda: linalg.lanczos(torch.eye(4, dtype=torch.float64), num_matvecs=3, v0=meta(4)),
            "v0",
        ),
        "eigsh": (lambda: linalg.eigsh(meta(4, 4), k=1), "A"),
        "slq": (lambda: linalg.slq(meta(4, 4), torch.log1p, num_probes=2, num_matvecs=3), "A"),
        "hutchinson_trace": (lambda: linalg.hutchinson_trace(meta(4, 4), num_probes=2), "A"),
        "hutchpp_trace": (lambda: linalg.hutchpp_trace(meta(4, 4), num_probes=3), "A"),
        "hutchinson_diagonal": (lambda: linalg.hutchinson_diagonal(meta(4, 4), num_probes=2), "A"),
        "smoothed_density": (lambda: linalg.smoothed_density(quad, meta(5), width=0.1), "grid"),
        "std_error_bound": (lambda: variance.std_error_bound(meta(4)), "value"),
        "random_directions": (lambda: landscape.random_directions(meta(4)), "params"),
        "default_step": (lambda: landscape.default_step(meta(4)), "params"),
        "saddle_probability": (
            lambda: landscape.saddle_probability(meta(4)),
            "hessian_eigenvalues",
        ),
        "projected_curvature": (
            lambda: landscape.projected_curvature(loss, meta(2, d)),
            "directions",
        ),
        "surface": (lambda: landscape.surface(loss, meta(1, d), num_points=3), "directions"),
        "surface coordinates": (
            lambda: landscape.surface(
                loss, torch.eye(1, d, dtype=torch.float64), coordinates=meta(3)
            ),
            "coordinates",
        ),
        "spectral_density grid": (
            lambda: dimension.spectral_density(lin, grid=meta(5), num_probes=2, num_matvecs=3),
            "grid",
        ),
        "empirical labels": (
            lambda: estimators.empirical(lin, meta(5, dtype=torch.long)),
            "labels",
        ),
        "Accumulator.update": (
            lambda: estimators.Accumulator().update(meta(2, 4)),
            r"samples\[0\]",
        ),
        "linearize (meta model and inputs)": (
            lambda: fb_torch.linearize(net.to("meta"), meta(5, 3)),
            ".*",  # the adapter's first check names the inputs or the model output
        ),
        "linearize (meta model, CPU inputs)": (
            lambda: fb_torch.linearize(net.to("meta"), x),
            ".*",
        ),
        "loss_function (meta model, CPU inputs)": (
            lambda: fb_torch.loss_function(net.to("meta"), x, y),
            ".*",
        ),
    }


_META_CASES = (
    "Categorical.eigvalsh",
    "Categorical.mean",
    "Bernoulli.mean",
    "Gaussian.metric_matvec",
    "lanczos",
    "lanczos v0",
    "eigsh",
    "slq",
    "hutchinson_trace",
    "hutchpp_trace",
    "hutchinson_diagonal",
    "smoothed_density",
    "std_error_bound",
    "random_directions",
    "default_step",
    "saddle_probability",
    "projected_curvature",
    "surface",
    "surface coordinates",
    "spectral_density grid",
    "empirical labels",
    "Accumulator.update",
    "linearize (meta model and inputs)",
    "linearize (meta model, CPU inputs)",
    "loss_function (meta model, CPU inputs)",
)


@pytest.mark.torch
@pytest.mark.parametrize("case", _META_CASES)
def test_meta_tensors_are_refused_by_every_front_door(case: str) -> None:
    """A torch "meta" operand (shape, no values) gets the house ValueError, from one
    check in array_namespace: never torch's "Tensor.item() cannot be called on meta
    tensors", nor meta tensors returned as if they were results."""
    pytest.importorskip("torch")
    call, name = _meta_front_doors()[case]
    with pytest.raises(
        ValueError,
        match=rf"^{name} must hold values: a tensor on the 'meta' device .* no values, and "
        r"fisherbound computes values; got a meta tensor of shape \(.*\) and dtype torch\.\w+\. "
        r"Materialise it first: .*module\.to_empty\(device='cpu'\)",
    ):
        call()


class _FakeBar:
    """Records what a tqdm bar would be told."""

    made: list[_FakeBar] = []

    def __init__(self, **options: Any) -> None:
        self.options, self.n, self.closed = options, 0, False
        self.total = options.get("total")
        _FakeBar.made.append(self)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.options["desc"] = desc

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_tqdm(monkeypatch: pytest.MonkeyPatch) -> list[_FakeBar]:
    pytest.importorskip("tqdm")
    import tqdm.auto

    _FakeBar.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", _FakeBar)
    return _FakeBar.made


def test_progress_bar_only_where_it_would_show(
    monkeypatch: pytest.MonkeyPatch, fake_tqdm: list[Any]
) -> None:
    """False and None off a terminal build no tqdm object (it costs ~0.4 ms per call);
    True draws one, left on screen; anything else is the house TypeError."""
    from fisherbound._lib import _progress, progress_bar

    monkeypatch.setattr(_progress, "_terminal", lambda: False)
    assert list(progress_bar([1, 2], desc="d", progress=False)) == [1, 2]
    assert list(progress_bar([1, 2], desc="d", progress=None)) == [1, 2]
    assert fake_tqdm == []
    assert list(progress_bar([1, 2], desc="d", progress=True)) == [1, 2]
    (bar,) = fake_tqdm
    assert bar.options == {"desc": "d", "unit": "batch", "total": 2, "leave": True}
    assert (bar.n, bar.closed) == (2, True)
    monkeypatch.setattr(_progress, "_terminal", lambda: True)
    assert list(progress_bar([3], desc="d", progress=None)) == [3]
    assert fake_tqdm[-1].options["delay"] == 2.0
    with pytest.raises(TypeError, match=r"progress must be True, False or None .* got str 'no'"):
        list(progress_bar([1], desc="d", progress="no"))


def test_progress_bar_total_from_the_source(fake_tqdm: list[Any]) -> None:
    """The total is the source's length (a list, a DataLoader through an adapter's
    linearizations); a generator has none: count and rate only."""
    torch = pytest.importorskip("torch")
    from fisherbound._lib import length_of, progress_bar
    from fisherbound.adapters.torch import linearizations
    from fisherbound.fisher import fisher_trace

    data = torch.utils.data.TensorDataset(torch.randn(12, 3), torch.zeros(12))
    loader = torch.utils.data.DataLoader(data, batch_size=5)
    model = torch.nn.Linear(3, 2)
    stream = linearizations(model, loader)
    assert length_of(stream) == 3
    next(stream)
    assert length_of(stream) == 2  # what is left
    assert length_of(x for x in [1, 2]) is None
    it = linearizations(model, iter([torch.randn(2, 3)] * 5))  # an iterator of batches
    next(it)
    next(it)
    assert length_of(it) == 3
    list(progress_bar((x for x in [1, 2]), desc="g", progress=True))
    assert fake_tqdm[-1].options["total"] is None
    fisher_trace(linearizations(model, loader), progress=True)
    assert (fake_tqdm[-1].options["total"], fake_tqdm[-1].n) == (3, 3)
    assert fake_tqdm[-1].options["desc"] == "Fisher trace"


def test_one_bar_per_call_and_none_inside_another(fake_tqdm: list[Any]) -> None:
    """A call inside an open bar draws none; after it (or an error in the loop), bars
    show again."""
    from fisherbound._lib import close_bar, open_bar, progress_bar

    outer = open_bar(desc="outer", progress=True, total=2, unit="step")
    assert list(progress_bar([1, 2], desc="inner", progress=True)) == [1, 2]
    assert [b.options["desc"] for b in fake_tqdm] == ["outer"]
    close_bar(outer)
    assert outer.closed

    def broken() -> None:
        for _ in progress_bar([1, 2], desc="broken", progress=True):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        broken()
    list(progress_bar([1], desc="after", progress=True))
    assert [b.options["desc"] for b in fake_tqdm] == ["outer", "broken", "after"]
    assert all(b.closed for b in fake_tqdm)


def test_a_bar_closes_when_its_call_fails_and_ends_at_what_came(fake_tqdm: list[Any]) -> None:
    """An error kept by the caller (a notebook keeps the last one) leaves no bar open;
    a source shorter than its total ends its bar at what came."""
    from fisherbound._lib import _progress, progress_bar
    from fisherbound.adapters.numpy import MLP, linearizations
    from fisherbound.estimators import detach_and_mix
    from fisherbound.fisher import fisher_trace

    model = MLP.random([4, 8, 3], rng=0)
    source = [np.ones((4, 4))] * 3
    kept = None
    try:
        detach_and_mix(
            linearizations(model, source), what="trace", weights=np.ones(3), progress=True
        )
    except ValueError as err:
        kept = err
    assert kept is not None
    assert _progress._depth() == 0
    fisher_trace(linearizations(model, source), progress=True)
    assert [b.options["desc"] for b in fake_tqdm] == ["detach-and-mix", "Fisher trace"]
    assert all(b.closed for b in fake_tqdm)
    list(progress_bar(iter([1, 2, 3]), desc="short", progress=True, total=10))
    assert (fake_tqdm[-1].n, fake_tqdm[-1].total) == (3, 3)
