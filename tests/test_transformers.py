"""Hugging Face ``transformers`` models through the torch adapter, against torch.func.jacrev.

Tiny models built from configs with fixed seeds (no weights are downloaded), in
float64: a causal language model (GPT-2), a token classifier (BERT) and a sequence
classifier (GPT-2), with right padding given by ``attention_mask``. For each, the
exact Fisher diagonal equals Σ_x Σ_t [Σ_c p_c J_xtc² − (Σ_c p_c J_xtc)²] over the
counted positions, with J from ``torch.func.jacrev`` of the logits, and the mean of
detach-and-mix's probes lies within 5 standard errors of it. The causal LM's loss
function equals the model's own ``out.loss`` and its gradient equals autograd's.

Convention for the causal LM (as ``transformers``' ``ForCausalLMLoss``): the logits
stay (N, T, V) and position t is labelled with token t+1; the last position and the
positions whose next token is padding get label -100 (``ignore_index``), and the
Fisher uses the same positions (``mask=labels != -100``).

Skipped (with the reason) when ``transformers`` is not installed: it is an optional
extra (``pip install -e ".[hf]"``), not part of the ``test`` extra.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from _assertions import assert_close

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[hf]')"
)

from fisherbound.adapters.torch import linearize, loss_function  # noqa: E402
from fisherbound.estimators import detach_and_mix  # noqa: E402
from fisherbound.fisher import fisher_diagonal  # noqa: E402

F64 = torch.float64
N, T = 3, 6
ATTENTION = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])


@pytest.fixture(autouse=True)
def _quiet_transformers() -> Any:
    # Tiny configs trip transformers' config advice (e.g. GPT-2's default token ids
    # lie outside a 100-token vocabulary); it is logging, not a warning, but silence it.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


def _ids(vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (N, T), generator=gen)
    return ids.masked_fill(ATTENTION == 0, 0)  # 0 is the padding token


def _tiny(model_class: Any, config: Any, seed: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """A float64 model in eval mode with seeded weights, and a padded batch for it."""
    torch.manual_seed(seed)
    model = model_class(config).to(F64).eval()
    return model, {"input_ids": _ids(100, seed), "attention_mask": ATTENTION}


GPT2 = {"vocab_size": 100, "n_positions": 8, "n_embd": 16, "n_layer": 1, "n_head": 2}


def gpt2_lm(attn: str = "eager", seed: int = 0) -> tuple[Any, dict[str, torch.Tensor]]:
    config = transformers.GPT2Config(**GPT2, attn_implementation=attn)
    return _tiny(transformers.GPT2LMHeadModel, config, seed)


def gpt2_tokens(seed: int = 1) -> tuple[Any, dict[str, torch.Tensor]]:
    config = transformers.GPT2Config(**GPT2, num_labels=5, attn_implementation="eager")
    return _tiny(transformers.GPT2ForTokenClassification, config, seed)


def bert_tokens(seed: int = 1) -> tuple[Any, dict[str, torch.Tensor]]:
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=8,
        num_labels=5,
        attn_implementation="eager",
    )
    return _tiny(transformers.BertForTokenClassification, config, seed)


def gpt2_sequence(seed: int = 2) -> tuple[Any, dict[str, torch.Tensor]]:
    config = transformers.GPT2Config(
        **GPT2, num_labels=4, pad_token_id=0, attn_implementation="eager"
    )
    return _tiny(transformers.GPT2ForSequenceClassification, config, seed)


def next_token_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Position t is labelled with token t+1; -100 where that is padding or past the end."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    following = ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100)
    return torch.nn.functional.pad(following, (0, 1), value=-100)


# ---------------------------------------------------------------------------
# The independent reference
# ---------------------------------------------------------------------------


def dense_jacobian(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """∂ logits / ∂θ of shape (N, *S, C, D) by torch.func.jacrev (named_parameters order)."""
    named = list(model.named_parameters())
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(t: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, p in named:
            params[name] = t[offset : offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        return torch.func.functional_call(model, params, (), batch).logits

    return torch.func.jacrev(f, chunk_size=256)(theta)


def dense_fisher_per_position(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """diag(J_xtᵀ (diag p − p pᵀ) J_xt) for every position, (N, *S, D), from the dense J."""
    J = dense_jacobian(model, batch)  # (N, *S, C, D)
    with torch.no_grad():
        p = torch.softmax(model(**batch).logits, dim=-1)  # (N, *S, C)
    first = torch.einsum("...c,...cd->...d", p, J * J)
    mean = torch.einsum("...c,...cd->...d", p, J)
    return first - mean * mean


def counted_sum(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ over the counted (x, t) of per-position values (N, *S, D); returns (D,)."""
    if mask is not None:
        per_position = per_position * mask[..., None].to(per_position.dtype)
    return per_position.reshape(-1, per_position.shape[-1]).sum(dim=0)


def dense_fisher_diagonal(
    model: Any, batch: dict[str, torch.Tensor], mask: torch.Tensor | None
) -> torch.Tensor:
    """Σ over counted (x, t) of diag(J_xtᵀ (diag p − p pᵀ) J_xt), from the dense Jacobian."""
    return counted_sum(dense_fisher_per_position(model, batch), mask)


def check_estimate_within_5_standard_errors(
    model: Any, batch: dict[str, torch.Tensor], exact: torch.Tensor, **options: Any
) -> None:
    """Detach-and-mix's diagonal, a mean over 64 probes, lies within 5 standard errors.

    Checked on the diagonal's sum over all of θ and over three parameter blocks
    (the first, the middle and the last; each through its own linearization,
    ``params=[name]``). The standard error of such a sum comes from the same 64
    probes: ``what="trace"`` with the same seed draws the same probes and returns
    the same sum with its standard error. A sum over many coordinates of a mean
    over 64 probes is close to normal, so 5 standard errors is a sound bound for
    each of these four sums; single coordinates of a tiny model have skewed,
    heavy-tailed probe values (their maximum over thousands of coordinates is no
    5-sigma test).
    """
    names = [name for name, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    parts = dict(zip(names, torch.split(exact, sizes)))
    for name in [None, names[0], names[len(names) // 2], names[-1]]:
        lin = linearize(model, batch, params=None if name is None else [name], **options)
        target = exact if name is None else parts[name]
        diagonal = detach_and_mix(lin, num_probes=64, rng=0)
        trace = detach_and_mix(lin, what="trace", num_probes=64, rng=0)
        assert diagonal.value.shape == target.shape, name
        assert_close(diagonal.value.sum(), trace.value, rtol=1e-10, atol=0.0)
        total, se = float(target.sum()), float(trace.std_error)
        assert abs(float(diagonal.value.sum()) - total) <= 5 * se, (name, total, se)
        # Not vacuous: 64 probes give a relative error of about √(2/64) ≈ 0.18 or less.
        assert 0.0 < se < 0.5 * total, (name, total, se)


# ---------------------------------------------------------------------------
# Causal language model
# ---------------------------------------------------------------------------


def test_causal_lm_loss_equals_the_models_own_loss_and_gradient() -> None:
    model, batch = gpt2_lm()
    labels = next_token_labels(batch)
    loss = loss_function(model, batch, labels, output="logits", reduction="mean")
    counted = int((labels != -100).sum())
    assert loss.num_counted == counted == 5 + 3 + 2
    # transformers shifts the labels itself: pass the tokens, padding as -100.
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    value = loss.value(torch.zeros(1, loss.num_params, dtype=F64))
    # out.loss is computed in float32 (transformers upcasts the logits with .float()).
    assert_close(value, out.loss.to(F64).reshape(1), rtol=1e-6, atol=0.0)

    # The gradient against autograd, of the model's loss (float32) and of a float64 one.
    params = [p for _, p in model.named_parameters()]
    own = torch.cat([g.reshape(-1) for g in torch.autograd.grad(out.loss, params)])
    assert_close(loss.gradient(), own.to(F64), rtol=1e-5, atol=1e-7)
    logits = model(**batch).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 100), labels.reshape(-1))
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref, params)])
    assert_close(loss.gradient(), exact, rtol=1e-10, atol=1e-13)
    assert_close(value, ref.detach().reshape(1), rtol=1e-12, atol=0.0)


def test_causal_lm_fisher_diagonal_against_jacrev() -> None:
    model, batch = gpt2_lm()
    counted = next_token_labels(batch) != -100
    lin = linearize(model, batch, output="logits", mask=counted)
    assert lin.output_shape == (N, T, 100)
    assert lin.num_positions == T
    exact = fisher_diagonal(lin)
    per_position = dense_fisher_per_position(model, batch)
    reference = counted_sum(per_position, counted)
    assert_close(exact, reference, rtol=1e-9, atol=1e-12)
    # The mask matters: the unmasked diagonal (every position) is larger.
    everything = counted_sum(per_position, None)
    assert float(everything.sum()) > float(reference.sum()) * 1.05
    # reduction="mean" divides by the number of sequences, not of positions.
    assert_close(fisher_diagonal(lin, reduction="mean"), reference / N, rtol=1e-9, atol=1e-13)
    check_estimate_within_5_standard_errors(model, batch, exact, output="logits", mask=counted)


def test_causal_lm_with_sdpa_attention_batch_products() -> None:
    """With the default (SDPA) attention, the batch products and detach-and-mix work.

    The adapter runs the forward pass under the math SDPA kernel, which supports
    forward-mode AD, so ``jvp`` works too; they agree with the eager model's.
    """
    eager, batch = gpt2_lm("eager")
    sdpa, _ = gpt2_lm("sdpa")
    counted = next_token_labels(batch) != -100
    lin_e = linearize(eager, batch, output="logits", mask=counted)
    lin_s = linearize(sdpa, batch, output="logits", mask=counted)
    assert_close(lin_s.logits, lin_e.logits, rtol=1e-12, atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(lin_e.num_params, generator=gen, dtype=F64)
    assert_close(lin_s.jvp(v), lin_e.jvp(v), rtol=1e-10, atol=1e-12)
    U = torch.randn(3, N, T, 100, generator=gen, dtype=F64)
    assert_close(lin_s.vjp_batch(U), lin_e.vjp_batch(U), rtol=1e-10, atol=1e-12)
    a = detach_and_mix(lin_s, num_probes=4, rng=0).value
    assert_close(a, detach_and_mix(lin_e, num_probes=4, rng=0).value, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# Token and sequence classifiers
# ---------------------------------------------------------------------------


def test_token_classifier_fisher_diagonal_against_jacrev() -> None:
    model, batch = gpt2_tokens()
    lin = linearize(model, batch, output="logits", mask="attention_mask")
    assert lin.output_shape == (N, T, 5)
    assert bool((lin.mask == (ATTENTION != 0)).all())
    exact = fisher_diagonal(lin)
    assert_close(exact, dense_fisher_diagonal(model, batch, ATTENTION != 0), rtol=1e-9, atol=1e-12)
    check_estimate_within_5_standard_errors(
        model, batch, exact, output="logits", mask="attention_mask"
    )
    # Its loss with padding as ignore_index is torch's cross-entropy over the tokens.
    labels = torch.randint(0, 5, (N, T), generator=torch.Generator().manual_seed(3))
    labels = labels.masked_fill(ATTENTION == 0, -100)
    loss = loss_function(model, batch, labels, output="logits", reduction="mean")
    ref = torch.nn.functional.cross_entropy(lin.logits.reshape(-1, 5), labels.reshape(-1))
    value = loss.value(torch.zeros(1, loss.num_params, dtype=F64))
    assert_close(value, ref.reshape(1), rtol=1e-12, atol=0.0)
    assert_close(
        model(**batch, labels=labels).loss.reshape(1), ref.reshape(1), rtol=1e-12, atol=0.0
    )


def test_sequence_classifier_fisher_diagonal_against_jacrev() -> None:
    model, batch = gpt2_sequence()
    lin = linearize(model, batch, output="logits")
    assert lin.output_shape == (N, 4)
    assert lin.num_positions == 1
    exact = fisher_diagonal(lin)
    assert_close(exact, dense_fisher_diagonal(model, batch, None), rtol=1e-9, atol=1e-12)
    check_estimate_within_5_standard_errors(model, batch, exact, output="logits")


# Per-example products (exact diagonals, per_example=True) vmap the forward pass over the
# examples. transformers' mask creation branches on the attention mask's values
# (``padding_mask.all()``), which vmap refuses ("data-dependent control flow"), with SDPA
# attention (causal models) and with every attention for bidirectional models (BERT). The
# adapter then falls back to its "masked" per-example mode (batched backward passes with
# cotangents on one example), so these models work unchanged.


def test_causal_lm_with_sdpa_attention_exact_diagonal() -> None:
    model, batch = gpt2_lm("sdpa")
    counted = next_token_labels(batch) != -100
    lin = linearize(model, batch, output="logits", mask=counted)
    exact = fisher_diagonal(lin)
    reference = dense_fisher_diagonal(gpt2_lm("eager")[0], batch, counted)
    assert_close(exact, reference, rtol=1e-9, atol=1e-12)


def test_bidirectional_token_classifier_exact_diagonal() -> None:
    model, batch = bert_tokens()
    lin = linearize(model, batch, output="logits", mask="attention_mask")
    exact = fisher_diagonal(lin)
    assert_close(exact, dense_fisher_diagonal(model, batch, ATTENTION != 0), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# The quickstart's recipe runs as printed
# ---------------------------------------------------------------------------

_SECTION = "A language model in ten lines"
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _recipe() -> list[tuple[str, str]]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "quickstart.md").read_text("utf-8")
    section = text.split(f"## {_SECTION}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(python|text)\n(.*?)^```$", section, flags=re.M | re.S)
    pairs = [
        (code, out)
        for (lang_code, code), (lang_out, out) in zip(blocks[::2], blocks[1::2])
        if (lang_code, lang_out) == ("python", "text")
    ]
    assert pairs, f"no python/text block pair under '## {_SECTION}' in docs/quickstart.md"
    return pairs


def _same_line(got: str, expected: str) -> bool:
    """Equal text; decimals within one unit of the last printed digit (float32 sums)."""
    if _NUMBER.sub("#", got) != _NUMBER.sub("#", expected):
        return False
    for g, e in zip(_NUMBER.findall(got), _NUMBER.findall(expected)):
        unit = 10.0 ** -len(e.split(".")[1]) if "." in e else 0.0
        if abs(float(g) - float(e)) > unit * (1 + 1e-9):
            return False
    return True


def test_quickstart_language_model_recipe_prints_what_the_page_says() -> None:
    namespace: dict[str, object] = {"__name__": "quickstart_language_model"}
    for k, (code, expected) in enumerate(_recipe()):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(code, f"docs/quickstart.md [{_SECTION} {k}]", "exec"), namespace)
        got, want = buffer.getvalue().strip().splitlines(), expected.strip().splitlines()
        assert len(got) == len(want), buffer.getvalue()
        for g, e in zip(got, want):
            assert _same_line(g, e), f"docs/quickstart.md, {_SECTION}: printed\n{g}\nnot\n{e}"
