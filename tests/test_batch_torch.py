"""Continuous batching on torch: every request's greedy tokens == transformers' greedy ``generate`` of
that request alone, whatever else is in the batch and whenever it joined (tiny float32 models)."""

import numpy as np
import pytest
import torch

from exo_medusa_mlx.core.accept import make_policy
from exo_medusa_mlx.core.batch_generation import BatchGenerator, batch_generate
from exo_medusa_mlx.core.generation import stream_generate
from exo_medusa_mlx.core.step import ROOT_ONLY, generate_step
from exo_medusa_mlx.core.tree import build_tree, tree_choices
from exo_medusa_mlx.torch_compat.model import MedusaModel
from batch_oracle import BatchOracleHeads, Tokenizer, prompts_of, run, tokens
from oracle import take
from test_torch_tiny import hf_greedy
from torch_models import CONFIGS, random_heads, random_model

TREES = {name: build_tree(tree_choices(name)) for name in ("cpu-8", "chain-3", "mc_sim_7b_63")}


class Oracle(BatchOracleHeads, MedusaModel):
    def context(self, caches):
        return caches.ctx

    def positions(self, caches, B, T):
        return caches.ctx.positions.reshape(B, T).cpu().numpy()

    def host(self, a):
        return a.detach().float().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)

    def project(self, h, depth=None):
        rows = super().project(h, depth)
        return torch.from_numpy(self.rigged(self.host(rows), self.host(h))).to(rows)


@pytest.fixture(scope="module", params=list(CONFIGS))
def base(request):
    return random_model(CONFIGS[request.param])


def oracle(base, prompts, refs, ranks=(0, 1, 2)):
    futures = {int(p[0]): np.concatenate([p, r]) for p, r in zip(prompts, refs)}
    return Oracle(base, random_heads(), TREES["cpu-8"], futures, ranks=ranks)


def test_lengths_far_apart_cancel_and_join_equal_transformers(base):
    """Prompts of 3 to 140 tokens; one request cancelled mid-batch; one that joins (prefilled in chunks
    between steps) while the others are mid-tree."""
    prompts = prompts_of([3, 140, 21, 60], seed=10)
    refs = [hf_greedy(base, p, 30) for p in prompts]
    model = oracle(base, prompts, refs)
    gen = BatchGenerator(model, Tokenizer(), prefill_step_size=32)
    uids = gen.insert(prompts[:3], [30, 30, 30])
    out = run(gen, uids, until=lambda o: len(o[uids[2]]) >= 4)
    assert len(gen._batch.seqs) == 3 and all(s.tree.size > 1 for s in gen._batch.seqs)
    gen.remove([uids[2]])
    cut = len(out[uids[2]])
    uids += gen.insert(prompts[3:], [30])
    rest = run(gen, uids)
    assert rest[uids[2]] == [] and tokens(out[uids[2]]) == refs[2][:cut]
    for i in (0, 1, 3):
        assert tokens(out.get(uids[i], []) + rest[uids[i]]) == refs[i]
        assert rest[uids[i]][-1].mean_accepted > 1.8  # accepted deep into the tree, in a batch


def test_window_wraps_in_one_sequence_and_not_another(base):
    """A 24-token window over a long request and a short one: each == its own decoding alone (whose
    window is exactly mlx-lm's rotating cache, tests/test_torch_parity.py)."""
    prompts = prompts_of([20, 5], seed=11)
    alone = [take(generate_step(p, MedusaModel(base), max_kv_size=24, fast_path=False), m)[0]
             for p, m in zip(prompts, (60, 10))]
    gen = BatchGenerator(oracle(base, prompts, alone), Tokenizer(), max_kv_size=24)
    uids = gen.insert(prompts, [60, 10])
    seen = []
    out = run(gen, uids, until=lambda _: seen.append([s.slots.committed for s in gen._batch.seqs]) and False)
    assert [tokens(out[u]) for u in uids] == alone
    both = [c for c in seen if len(c) == 2]
    assert max(c[1] for c in both) < 23 < max(c[0] for c in both)


def test_trees_policies_and_batch_generate(base):
    """Requests with their own trees (root alone to 64 nodes) and policies: greedy ones == transformers,
    a sampling one == itself alone with the same seed; ``batch_generate`` == ``stream_generate``."""
    prompts = prompts_of([5, 19, 8, 33], seed=12)
    refs = [hf_greedy(base, p, 24) for p in prompts]
    model = oracle(base, prompts, refs, ranks=(0,))
    gen = BatchGenerator(model, Tokenizer())
    trees = [ROOT_ONLY, TREES["chain-3"], TREES["mc_sim_7b_63"], TREES["cpu-8"]]
    policies = [make_policy()] * 3 + [make_policy(0.8, 0.9, seed=5)]
    uids = gen.insert(prompts, [24] * 4, policies, trees=trees)
    out = run(gen, uids)
    assert [tokens(out[u]) for u in uids[:3]] == refs[:3]
    assert tokens(out[uids[3]]) == take(generate_step(prompts[3], model, make_policy(0.8, 0.9, seed=5)), 24)[0]
    tok = Tokenizer(eos=refs[1][6])
    res = batch_generate(model, tok, prompts, max_tokens=[24, 24, 3, 24], return_token_ids=True, temp=[0, 0, 0, 0.8],
                         seed=7)
    for p, m, temp, text, ids in zip(prompts, [24, 24, 3, 24], [0, 0, 0, 0.8], res.texts, res.token_ids):
        alone = list(stream_generate(model, tok, p, max_tokens=m, temp=temp, seed=7))
        assert text == "".join(r.text for r in alone)
        assert ids == [r.token for r in alone if r.token != tok.eos_token_id]
