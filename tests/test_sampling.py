"""Exact sampling: Medusa's emitted tokens are distributed as plain sampling.

A tiny llama with a 12-token vocabulary runs the step generator for three tokens
per seed, over thousands of seeds; the counts of the 12^3 sequences are compared
by a chi-square test with the distribution enumerated from the base model's own
logits (``target_probs`` of every prefix, which is what plain sampling draws
from). The seeds are fixed, so every test is deterministic; ALPHA is the chance
that a correct sampler fails a test under a fresh choice of seeds.
"""

import itertools
import math
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.models import llama
from mlx_lm.sample_utils import apply_top_p

from exo_medusa_mlx.core.accept import Acceptance, make_policy, target_probs
from exo_medusa_mlx.core.dynamic import make_dynamic
from exo_medusa_mlx.cache import DEFAULT_KEEP, CacheContext, MedusaKVCache
from exo_medusa_mlx.core.step import generate_step
from exo_medusa_mlx.heads import MedusaHeads
from exo_medusa_mlx.core.heads_format import MedusaConfig
from exo_medusa_mlx.model import MedusaModel
from exo_medusa_mlx.core.tree import build_tree

V = 12
N_TOKENS = 3  # the joint distribution of the first three emitted tokens: 12^3 cells
TEMP, TOP_P = 0.8, 0.9
N_SEEDS = 2000  # per exactness test
N_CONTROL = 600  # per negative control: both fail by far (p < 1e-10)
ALPHA = 1e-3
PROMPT = np.array([3, 7, 1])
TREES = {"chain": [[0], [0, 0]], "branch": [[0], [1], [2], [0, 0], [0, 1], [1, 0]],
         "dynamic": lambda: make_dynamic(8, 2, V)}  # picked per step from the heads' probabilities

CONFIG = dict(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=V,
              max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=False)


def tiny_llama(seed: int = 2, scale: float = 1.5) -> llama.Model:
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(CONFIG))
    # Larger weights than the default init: peaked enough that a few hundred of the
    # 12^3 sequences hold the mass, so a few thousand samples test each of them.
    model.update(tree_map(lambda w: w * scale, model.parameters()))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def tiny_heads(num_heads: int = 2, seed: int = 1) -> MedusaHeads:
    heads = MedusaHeads(MedusaConfig(num_heads=num_heads, hidden_size=CONFIG["hidden_size"], vocab_size=V))
    mx.random.seed(seed)
    heads.update(tree_map(lambda w: mx.random.normal(w.shape) * 0.3, heads.parameters()))
    mx.eval(heads.parameters())
    return heads


def joint(base, prefix, n: int, temp: float, top_p: float) -> np.ndarray:
    """P(next n tokens) under plain sampling after ``prefix``, by enumeration: (V,) * n."""
    rest = np.array(list(itertools.product(range(V), repeat=n - 1)), dtype=np.int64).reshape(V ** (n - 1), n - 1)
    tokens = np.concatenate([np.tile(np.asarray(prefix), (len(rest), 1)), rest], axis=1)
    probs = target_probs(np.array(base(mx.array(tokens))[:, len(prefix) - 1 :]), temp, top_p)  # (V^(n-1), n, V)
    out = np.ones(())
    for k in range(n):
        # Token k's distribution is in any row whose first k tokens are the cell's.
        rows = np.arange(V**k).reshape((V,) * k) * V ** (n - 1 - k) if k else np.zeros((), dtype=np.int64)
        out = out[..., None] * probs[rows, k]
    return out


class _PrefixContext(CacheContext):
    """A cache context that also remembers the committed token ids."""

    def __init__(self, max_kv_size=None, keep=DEFAULT_KEEP):
        super().__init__(max_kv_size, keep)
        self.tokens: list[int] = []
        self.pending = np.zeros(0, dtype=np.int64)  # the forward in flight

    def commit(self, caches, nodes) -> None:
        super().commit(caches, nodes)
        self.tokens += self.pending[np.asarray(nodes)].tolist()


class CloseMedusa(MedusaModel):
    """Heads close to the target: head i's logits are the log of the plain-sampling
    distribution of the token i+1 after the root, on the most likely path (the root
    and the tokens between taken greedily), plus Gaussian noise fixed per prefix."""

    memo: dict[tuple, mx.array] = {}  # shared: a function of (prefix, heads) alone

    def __init__(self, base, tree, noise=0.5):
        super().__init__(base, tiny_heads(tree.depth), tree)
        self.noise = noise
        self.ctx = None

    def make_cache(self, max_kv_size=None, keep=DEFAULT_KEEP):
        self.ctx = _PrefixContext(max_kv_size, keep)
        self.pending_tree = None  # the prefill runs contiguous chunks
        return self.ctx, [MedusaKVCache(self.ctx) for _ in range(self.num_layers)]

    def forward(self, ctx, caches, tokens, tree=None):
        self.pending_tree = tree
        return super().forward(ctx, caches, tokens, tree)

    def hidden(self, tokens, caches, transposed=False):
        self.ctx.pending = np.array(tokens).reshape(-1)
        return super().hidden(tokens, caches, transposed)

    def project(self, h, depth=None):
        rows = super().project(h, depth)  # (1+D, V) after a commit, (1+D, T, V) over the nodes in flight
        if h.ndim == 1:
            return mx.concatenate([rows[:1], self._guesses(tuple(self.ctx.tokens))[: rows.shape[0] - 1]])
        guesses = []
        for n in range(h.shape[0]):  # node n: the committed tokens, then its path
            path = []
            while n >= 0:
                path.insert(0, int(self.ctx.pending[n]))
                n = int(self.pending_tree.parents[n]) if self.pending_tree is not None else n - 1
            guesses.append(self._guesses(tuple(self.ctx.tokens + path))[: rows.shape[0] - 1])
        return mx.concatenate([rows[:1], mx.stack(guesses, axis=1)])

    def _guesses(self, prefix: tuple) -> mx.array:
        K = self.heads.num_heads
        key = (id(self.base), prefix, K, self.noise)
        if key not in self.memo:
            path = list(prefix)
            for _ in range(K):  # the greedy root, then the tokens between
                path.append(int(np.argmax(np.array(self.base(mx.array([path]))[0, -1]))))
            logits = np.array(self.base(mx.array([path]))[0, len(prefix) :])  # (K, V): after root, after root + 1, ...
            noise = np.random.default_rng([7, *prefix]).normal(size=logits.shape) * self.noise
            guess = np.log(target_probs(logits, TEMP, TOP_P) + 1e-6) + noise
            self.memo[key] = mx.array(guess.astype(np.float32))
        return self.memo[key]


def sample_counts(model, policy_for, n_seeds: int, seed0: int) -> tuple[np.ndarray, float]:
    """Counts of the first three emitted tokens, one run per seed, and tokens per verification."""
    counts = np.zeros((V,) * N_TOKENS, dtype=np.int64)
    emitted = steps = 0
    for seed in range(seed0, seed0 + n_seeds):
        out = []
        for step in generate_step(PROMPT, model, policy_for(seed)):
            out += step.tokens
            if step.tree_size:
                emitted, steps = emitted + len(step.tokens), steps + 1
            if len(out) >= N_TOKENS:
                break
        counts[tuple(out[:N_TOKENS])] += 1
    return counts, emitted / steps


def chi2_sf(x: float, df: int) -> float:
    """P(chi-square with ``df`` degrees of freedom > x): Q(df/2, x/2) by its closed form."""
    if x <= 0:
        return 1.0
    y = x / 2
    q, a = (math.erfc(math.sqrt(y)), 0.5) if df % 2 else (math.exp(-y), 1.0)
    while a < df / 2:  # Q(a+1, y) = Q(a, y) + y^a e^-y / a!
        q += math.exp(a * math.log(y) - y - math.lgamma(a + 1))
        a += 1
    return q


def chi_square(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> tuple[float, int, float]:
    """Pearson's statistic, degrees of freedom and p-value, the cells expected under
    ``min_expected`` times pooled into one. A count where probs is 0 gives p = 0."""
    c, e = counts.ravel().astype(np.float64), probs.ravel() * counts.sum()
    if c[e == 0].any():
        return math.inf, 0, 0.0
    order = np.argsort(e)
    n_rare = int((e < min_expected).sum())
    # The pool takes the rare cells, and more of the smallest until it too is expected min_expected times.
    k = min(max(n_rare, int(np.searchsorted(np.cumsum(e[order]), min_expected)) + 1), len(e)) if n_rare else 0
    pool, cells = order[:k], order[k:]
    obs, exp = c[cells], e[cells]
    if k:
        obs, exp = np.append(obs, c[pool].sum()), np.append(exp, e[pool].sum())
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    return stat, df, chi2_sf(stat, df)


def bonus_from_p_acceptor(temp: float, top_p: float, rng: np.random.Generator):
    """The classic bug: after rejecting the children, draw the bonus from p instead
    of the residual, which over-emits the rejected drafts."""

    def accept(tree, tree_tokens, logits) -> Acceptance:
        node, nodes, out = 0, [0], []
        while True:
            p = target_probs(logits[node], temp, top_p)
            nxt = next((c for c in tree.children[node] if rng.random() < p[int(tree_tokens[c])]), None)
            if nxt is None:
                return Acceptance(np.array(nodes), out + [int(rng.choice(len(p), p=p))])
            out.append(int(tree_tokens[nxt]))
            nodes.append(nxt)
            node = nxt

    return accept


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def reference(base):
    p = joint(base, PROMPT, N_TOKENS, TEMP, TOP_P)
    # It must not hinge on rounding: no reachable token within 1e-4 of the top-p boundary.
    for eps in (-1e-4, 1e-4):
        assert np.array_equal(p > 0, joint(base, PROMPT, N_TOKENS, TEMP, TOP_P + eps) > 0)
    return p


def test_chi2_sf_known_values():
    assert chi2_sf(10.828, 1) == pytest.approx(1e-3, rel=1e-3)
    assert chi2_sf(5.991, 2) == pytest.approx(0.05, rel=1e-3)
    assert chi2_sf(16.266, 3) == pytest.approx(1e-3, rel=1e-3)
    assert chi2_sf(149.449, 100) == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("temp", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("top_p", [0.3, 0.9, 1.0])
def test_target_probs_is_mlx_lm_sampler(temp, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20, 24)) * 2
    logits[::2] = np.round(logits[::2])  # ties, also at the top-p boundary
    lp = mx.array(logits.astype(np.float32))
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    if top_p < 1.0:
        lp = apply_top_p(lp, top_p)
    want = np.array(mx.softmax(lp * (1 / temp), axis=-1))  # what mlx-lm's categorical_sampling draws from
    got = target_probs(logits, temp, top_p)
    assert np.array_equal(got > 0, want > 0)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("tree,heads,seed0", [("chain", "random", 0), ("chain", "close", 10_000),
                                              ("branch", "random", 20_000), ("branch", "close", 30_000),
                                              ("dynamic", "close", 50_000)])
def test_exact_sampling_is_plain_sampling(base, reference, tree, heads, seed0):
    buf = TREES[tree]() if callable(TREES[tree]) else build_tree(TREES[tree])
    model = CloseMedusa(base, buf) if heads == "close" else MedusaModel(base, tiny_heads(buf.depth), buf)
    counts, per_step = sample_counts(model, lambda s: make_policy(TEMP, TOP_P, "exact", s), N_SEEDS, seed0)
    stat, df, p = chi_square(counts, reference)
    assert p > ALPHA, f"chi2 {stat:.1f} on {df} df, p {p:.2e} ({per_step:.2f} tokens per step)"
    if heads == "close":  # candidates are accepted, not only bonus tokens drawn
        assert per_step > 1.1, per_step


@pytest.mark.parametrize("acceptor", ["typical", "bonus_from_p"])
def test_inexact_acceptors_fail(base, reference, acceptor):
    # Negative controls: the same test must reject the reference's typical acceptance
    # (it keeps any candidate above a probability floor) and a subtly wrong residual.
    def policy_for(seed):
        if acceptor == "typical":
            return make_policy(TEMP, TOP_P, "typical", seed)
        return replace(make_policy(TEMP, TOP_P, "exact", seed),
                       accept=bonus_from_p_acceptor(TEMP, TOP_P, np.random.default_rng([1, seed])))

    counts, _ = sample_counts(CloseMedusa(base, build_tree(TREES["chain"])), policy_for, N_CONTROL, 40_000)
    stat, df, p = chi_square(counts, reference)
    assert p < ALPHA, f"{acceptor} passed: chi2 {stat:.1f} on {df} df, p {p:.2e}"
