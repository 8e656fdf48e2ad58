r"""
A language model's Fisher, token by token
=========================================

A tiny causal language model with padded sequences: the per-token Fisher
diagonal exactly and from one batched backward pass, and the Fisher trace
position by position.

A language model puts out one distribution per position: logits of shape
(N, T, V) for N sequences of T tokens over a vocabulary of V. fisherbound treats
every counted position as an output of its own, so the Fisher sums over the
positions of every sequence,
:math:`F = \sum_x \sum_t J_{xt}^\top (\operatorname{diag} p_{xt} - p_{xt} p_{xt}^\top) J_{xt}`,
and a mask says which positions count (:doc:`/positions`). The exact diagonal
needs one backward pass per counted position and vocabulary entry; detach-and-mix
estimates it from M probes in one batched backward pass, whatever T and V.
"""

# %%
# A tiny causal model on padded sequences
# ---------------------------------------
# Token embeddings, one causal self-attention layer, an MLP and a read-out: logits
# (N, T, V). Each sequence counts up from a random start by a step of 1, 2 or 3
# (modulo V); its first token says the step, so the model must attend to it. The
# sequences have different lengths and are padded on the right with token 0.

import time

import matplotlib.pyplot as plt
import torch
from torch import nn

from fisherbound.adapters.torch import linearize
from fisherbound.estimators import detach_and_mix
from fisherbound.fisher import fisher_bounds, fisher_diagonal, fisher_trace
from fisherbound.plotting import plot_fisher_diagonal

V, T, WIDTH = 24, 16, 16


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, WIDTH)
        self.position = nn.Parameter(0.1 * torch.randn(T, WIDTH))
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, 2 * WIDTH), nn.Tanh(), nn.Linear(2 * WIDTH, WIDTH)
        )
        self.head = nn.Linear(WIDTH, V)
        self.register_buffer("causal", torch.ones(T, T).tril().bool())

    def forward(self, ids):  # (N, T) token ids -> (N, T, V) logits
        h = self.embed(ids) + self.position[: ids.shape[1]]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = (q @ k.transpose(-1, -2)) / WIDTH**0.5
        scores = scores.masked_fill(
            ~self.causal[: ids.shape[1], : ids.shape[1]], float("-inf")
        )
        h = h + torch.softmax(scores, dim=-1) @ v
        return self.head(h + self.mlp(h))


def sequences(n, generator):
    step = torch.randint(1, 4, (n, 1), generator=generator)
    start = torch.randint(4, V, (n, 1), generator=generator)
    ids = (start + step * torch.arange(T - 1)) % (V - 4) + 4  # tokens 4 ... V-1
    ids = torch.cat([step, ids], dim=1)  # first token: the step (1, 2 or 3)
    length = torch.randint(T // 2, T + 1, (n,), generator=generator)
    attention = (
        torch.arange(T) < length[:, None]
    )  # True on the tokens, False on padding
    return ids.masked_fill(~attention, 0), attention


torch.manual_seed(0)
generator = torch.Generator().manual_seed(0)
model = TinyLM()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(200):
    ids, attention = sequences(32, generator)
    labels = ids[:, 1:].masked_fill(
        ~attention[:, 1:], -100
    )  # position t predicts t + 1
    logits = model(ids)[:, :-1]
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100
    )
    opt.zero_grad()
    loss.backward()
    opt.step()
model.eval()
print(f"training loss at the end {loss:.3f} nats per token")

# %%
# Which positions count
# ---------------------
# As in transformers' own loss, the logits keep all T positions and position t is
# labelled with token t + 1: the last position and the positions whose next token
# is padding get the ignore index -100. The Fisher counts the same positions,
# ``mask=labels != -100``; the masked positions add nothing to any quantity.

ids, attention = sequences(8, generator)
labels = nn.functional.pad(
    ids[:, 1:].masked_fill(~attention[:, 1:], -100), (0, 1), value=-100
)
lin = linearize(model, ids, mask=labels != -100)
counted = int(lin.mask.sum())
print(
    f"logits {tuple(lin.logits.shape)}, D = {lin.num_params}, "
    f"{counted} counted positions"
)

# %%
# The diagonal, exactly and from one backward pass
# ------------------------------------------------
# ``fisher_diagonal`` backpropagates V cotangents through every counted position;
# ``detach_and_mix`` backpropagates M probes through the whole batch at once. Divided
# by the number of counted positions, both give the Fisher per token.

start = time.perf_counter()
exact = fisher_diagonal(lin)
exact_seconds = time.perf_counter() - start
start = time.perf_counter()
est = detach_and_mix(lin, num_probes=32, rng=0)
estimate_seconds = time.perf_counter() - start
lower, upper = fisher_bounds(lin)
print(
    f"exact: {counted} positions × V = {counted * V} cotangents, "
    f"{exact_seconds:.2f} s"
)
print(
    f"detach-and-mix: 32 probes in one batched backward pass, {estimate_seconds:.2f} s"
)
print(
    f"tr F per token: exact {exact.sum() / counted:.3f}, "
    f"estimate {est.value.sum() / counted:.3f}"
)

per_token = est._replace(
    value=est.value / counted, std_error=est.std_error / counted
)
fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
plot_fisher_diagonal(
    lin.blocks,
    exact=exact / counted,
    bounds=(lower / counted, upper / counted),
    estimate=per_token,
    max_points_per_block=120,
    ax=ax,
    title="Fisher diagonal per token of a tiny causal LM: exact, bounds, 32 probes",
)
plt.show()

# %%
# Position by position
# --------------------
# A mask that keeps one position t gives that position's Fisher. Its trace per
# sequence shows where the model is still uncertain: position 0 sees only the
# step and must guess the random start; most later positions follow from the
# context.

positions = range(T - 1)
exact_t, value_t, error_t = [], [], []
for t in positions:
    keep = (labels != -100) & (torch.arange(T) == t)
    lin_t = linearize(model, ids, mask=keep)
    exact_t.append(float(fisher_trace(lin_t)) / int(keep.sum()))
    tr = detach_and_mix(lin_t, what="trace", num_probes=32, rng=t)
    value_t.append(float(tr.value) / int(keep.sum()))
    error_t.append(float(tr.std_error) / int(keep.sum()))
print("tr F per token, by position:", " ".join(f"{v:.2f}" for v in exact_t))

# %%
# The exact trace at each position, and the 95% error bars of the estimate.

fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
ax.plot(positions, exact_t, "ko", label="exact (fisher_trace)")
ax.errorbar(
    positions,
    value_t,
    yerr=[1.96 * e for e in error_t],
    fmt="none",
    ecolor="C1",
    capsize=3,
    label="detach-and-mix, 32 probes, ± 1.96 SE",
)
ax.set(
    yscale="log",
    xlabel="position t (predicting token t + 1)",
    ylabel="tr F per counted token",
    title="the Fisher trace at each position",
)
ax.legend()
plt.show()
