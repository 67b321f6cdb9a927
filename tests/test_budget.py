"""The tree budget of a batch (core/budget.py): the cost table's interpolation, the pick against brute
force, never a tree expected slower than plain decoding, the default rule, and a batch decoded with
the budget's trees token-identical to each request alone."""

import itertools

import numpy as np
import pytest

from exo_medusa_mlx.core.budget import FREE_ROWS, BatchBudget, BatchCosts, default_costs
from exo_medusa_mlx.core.tree import ROOT_ONLY, build_tree, tree_choices

ACC = np.array([[0.6, 0.12, 0.05], [0.45, 0.10, 0.05], [0.35, 0.08, 0.04]])
CPU8 = build_tree(tree_choices("cpu-8"))
# A CPU-shaped table: a step's cost grows with its rows, B x T, and a little with B alone.
TABLE = {str(B): {str(T): 0.01 * (1 + 0.15 * (B * T - 1)) + 0.001 * B for T in (1, 2, 4, 8)} for B in (1, 2, 4, 8)}


def expected_of(tree, acc):
    """E[accepted + 1] of ``tree`` under the product model (brute force over its nodes)."""
    return 1.0 + sum(np.prod([acc[d, r] for d, r in enumerate(p)]) for p in tree.choices)


def test_costs_interpolate_between_and_beyond_the_table():
    costs = BatchCosts(TABLE)
    for B in (1, 2, 4, 8):
        for T in (1, 2, 4, 8):
            assert costs(B, T) == pytest.approx(TABLE[str(B)][str(T)])
    assert costs(3, 2) == pytest.approx((costs(2, 2) + costs(4, 2)) / 2)  # linear in B
    assert costs(2, 3) == pytest.approx((costs(2, 2) + costs(2, 4)) / 2)  # linear in T
    assert costs(2, 10) == pytest.approx(costs(2, 8) + (costs(2, 8) - costs(2, 4)) / 4 * 2)  # last slope
    assert costs(16, 2) == pytest.approx(costs(8, 4))  # past the largest batch: the rows decide
    assert costs(1, np.arange(1, 9)).shape == (8,)


@pytest.mark.parametrize("table,fragment", [
    ({"1": {}}, "batch_latency[1]"),
    ({"1": {"2": 0.1}}, "tree size 1"),
    ({"1": {"1": -0.1}}, "positive seconds"),
    ({"0": {"1": 0.1}}, "batch sizes >= 1"),
    ({}, "batch sizes >= 1"),
])
def test_bad_tables_are_one_line_errors(table, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        BatchCosts(table)


def test_pick_is_the_best_rate_and_never_below_plain():
    rng = np.random.default_rng(0)
    for _ in range(300):
        table = {str(b): {str(t): float(v) for t, v in zip((1, 2, 4, 8), np.sort(rng.uniform(0.01, 0.1, 4)))}
                 for b in (1, 4)}
        budget = BatchBudget(BatchCosts(table))
        expected = np.concatenate([[1.0], 1.0 + np.cumsum(rng.uniform(0, 0.6, 7) ** 2)])
        B = int(rng.integers(1, 12))
        n = budget.pick(B, expected)
        rates = [expected[k - 1] / budget.costs(B, k) for k in range(1, 9)]
        assert rates[n - 1] == pytest.approx(max(rates))
        assert rates[n - 1] >= rates[0] * (1 - 1e-12)  # plain decoding is among the candidates
        assert all(rates[k - 1] < rates[n - 1] * (1 - 1e-9) for k in range(1, n))  # ties: the smaller tree


def test_the_cut_tree_holds_the_most_probable_nodes():
    """Against brute force: of every ancestor-closed set of n - 1 paths of the tree, the cut keeps one
    with the highest expected accepted length."""
    tree = build_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1]])
    budget = BatchBudget(accuracy=ACC)
    paths = [tuple(p) for p in tree.choices]
    for n in range(2, tree.size):
        cut = budget.cut(tree, n)
        assert cut.size == n and set(cut.choices) <= set(paths)
        best = max(expected_of(build_tree([list(p) for p in s]), ACC)
                   for s in itertools.combinations(paths, n - 1) if all(p[:-1] in s or len(p) == 1 for p in s))
        assert expected_of(cut, ACC) == pytest.approx(best)


def test_default_rule_root_alone_from_free_rows():
    budget = BatchBudget(accuracy=ACC)
    assert budget.tree_for(1, CPU8) is CPU8  # alone: the request's own tree, as tuned
    sizes = [budget.nodes(B, CPU8) for B in range(1, 33)]
    assert sizes[1] == FREE_ROWS // 2 and sizes[3] == FREE_ROWS // 4
    assert all(n == 1 for n in sizes[FREE_ROWS - 1:]) and budget.tree_for(FREE_ROWS, CPU8) is ROOT_ONLY
    assert sizes == sorted(sizes, reverse=True)
    # Whatever the heads: from FREE_ROWS sequences each extra node costs a whole row.
    sure = BatchBudget(accuracy=np.ones((3, 3)))
    assert sure.nodes(FREE_ROWS, CPU8) == 1 and sure.nodes(FREE_ROWS - 1, CPU8) > 1
    assert default_costs(2, 4) == default_costs(1, 1) < default_costs(3, 4)


def test_a_measured_table_shrinks_trees_as_the_batch_fills():
    budget = BatchBudget(BatchCosts(TABLE), ACC)
    sizes = [budget.nodes(B, CPU8) for B in (1, 2, 4, 8, 16, 32)]
    assert sizes[0] == CPU8.size and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True)
    for B in (2, 4, 8, 16, 32):
        tree = budget.tree_for(B, CPU8)
        plain = 1.0 / budget.costs(B, 1)
        assert expected_of(tree, ACC) / budget.costs(B, tree.size) >= plain  # never expected slower
    assert budget.relative_costs(4, 8)[1] == 1.0 and budget.relative_costs(4, 8).shape == (9,)


def test_from_facts_uses_this_machines_table_only():
    here = {"cpu": "x", "cores": 2, "device": "cpu"}
    facts = {"machine": here, "batch_latency": TABLE, "head_conditional_accuracy": ACC.tolist()}
    assert isinstance(BatchBudget.from_facts(facts, here).costs, BatchCosts)
    elsewhere = BatchBudget.from_facts(facts, {**here, "cpu": "y"})
    assert elsewhere.costs is default_costs and np.array_equal(elsewhere.accuracy, ACC)
    assert BatchBudget.from_facts({}, here).accuracy is None  # the prior then
    assert BatchBudget.from_facts({}, here).nodes(2, CPU8) == FREE_ROWS // 2


def test_tune_measures_the_batch_table_on_tiny_model(capsys):
    """``tune``'s batch table: the batched step timed at each batch size over tree sizes up to
    --max-nodes and the tuned tree's, as the tree file stores it and the budget reads it."""
    from exo_medusa_mlx.tune import TuneOptions, batch_costs
    from helpers.tiny import tiny_medusa

    opts = TuneOptions(max_nodes=4, batch_sizes=(1, 3), context=12, repeats=2)
    table = batch_costs(tiny_medusa(), opts, tree_size=6)
    assert sorted(table) == ["1", "3"] and all(sorted(c, key=int) == ["1", "2", "3", "4", "6"] for c in table.values())
    for curve in table.values():
        vals = [curve[k] for k in sorted(curve, key=int)]
        assert all(v > 0 for v in vals) and vals == sorted(vals)  # more rows never cheaper
    assert BatchCosts(table)(3, 1) == pytest.approx(table["3"]["1"])
    assert "batch 3: step ms N=1:" in capsys.readouterr().out


def test_a_batch_with_the_budget_equals_each_request_alone():
    """Greedy tokens of requests decoded with the budget's trees (shrinking as others join, growing as
    they leave) == each decoded alone == mlx-lm; the joining request starts with the cut tree."""
    from exo_medusa_mlx.core.batch_generation import BatchGenerator
    from helpers.batch_mlx import oracle, references
    from helpers.batch_oracle import Tokenizer, prompts_of, run, tokens
    from helpers.tiny import tiny_base

    base = tiny_base("llama")
    prompts = prompts_of([5, 19, 8, 33], seed=7)
    refs = references(base, prompts, 48)
    model = oracle(base, prompts, refs)  # cpu-8 trees, heads that know each continuation
    budget = BatchBudget(accuracy=ACC)
    gen = BatchGenerator(model, Tokenizer())
    gen.tree_for = budget.tree_for
    uids = gen.insert(prompts, [48, 16, 24, 12])
    seen = []  # after each next(): the trees the running sequences verify next
    out = run(gen, uids, until=lambda _: seen.append([s.tree.size for s in gen._batch.seqs]) and False)
    assert [tokens(out[u]) for u in uids] == [r[:m] for r, m in zip(refs, [48, 16, 24, 12])]
    # The short prompts all join before the second step (one prefill chunk's worth of tokens), each
    # with the tree cut for the batch it joins: the first alone, its own tree; the others smaller.
    assert seen[0] == [budget.nodes(b, model.tree) for b in (1, 2, 3, 4)]
    assert seen[0][0] == model.tree.size > budget.nodes(4, model.tree)
    full = [sizes for sizes in seen[1:] if len(sizes) == 4]
    # Four running: every tree is picked for a batch of four.
    assert full and all(sizes == [budget.nodes(4, model.tree)] * 4 for sizes in full)
    after = seen[seen.index(full[-1]):]
    assert [model.tree.size] in after  # alone again at the end: its own tree again


def test_a_dynamic_plan_takes_the_batch_cost_curve():
    """A dynamic plan in a batch picks its sizes by the batched step's cost: alone its own curve, at B the
    budget's relative costs (one copy per batch size, the same superset), so its picks shrink as the batch fills."""
    from helpers.tiny import tiny_medusa

    plan = tiny_medusa().plan("dynamic:8")
    budget = BatchBudget(BatchCosts(TABLE))
    assert budget.tree_for(1, plan) is plan
    at4 = budget.tree_for(4, plan)
    assert budget.tree_for(4, plan) is at4 and at4.superset is plan.superset and at4.sizes == plan.sizes
    assert np.allclose(at4.cost[1:], budget.relative_costs(4, len(plan.cost) - 1)[1:])
    scores = np.log(np.full(plan.superset.size, 0.2))  # each node 1 in 5: a tree pays alone, not among 4
    scores[0] = 0.0
    alone, full = plan.pick(scores)[0].size, at4.pick(scores)[0].size
    budget8 = BatchBudget()  # the default rule: from FREE_ROWS requests, the root alone
    assert full < alone and budget8.tree_for(FREE_ROWS, plan).pick(scores)[0].size == 1


def test_dynamic_plans_with_the_budget_equal_each_request_alone():
    """Dynamic plans cut by the batch's costs: greedy tokens still each request's alone."""
    from exo_medusa_mlx.core.batch_generation import BatchGenerator
    from helpers.batch_mlx import oracle, references
    from helpers.batch_oracle import Tokenizer, prompts_of, run, tokens
    from helpers.tiny import tiny_base

    base = tiny_base("llama")
    prompts = prompts_of([7, 15, 26], seed=3)
    refs = references(base, prompts, 24)
    model = oracle(base, prompts, refs)
    gen = BatchGenerator(model, Tokenizer())
    gen.tree_for = BatchBudget(BatchCosts(TABLE)).tree_for
    lengths = [24, 12, 8]  # all three join at once; the longest finishes alone
    uids = gen.insert(prompts, lengths, trees=[model.plan("dynamic:8")] * 3)
    sizes = []
    out = run(gen, uids, until=lambda _: sizes.append([s.tree.size for s in gen._batch.seqs]) and False)
    assert [tokens(out[u]) for u in uids] == [r[:m] for r, m in zip(refs, lengths)]
    mean = lambda n: float(np.mean([x for s in sizes if len(s) == n for x in s]))  # noqa: E731
    assert mean(3) < mean(1), (mean(3), mean(1))  # the batch of three verifies smaller trees
