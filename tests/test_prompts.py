"""Training prompts: the user's JSONL, dedup and junk filters, self-instruct prompts written
in rounds that a rerun continues, and held-out / bench prompts kept out of all of it."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest

from exo_medusa_mlx.training.prompts import (BENCH_PROMPTS, DEFAULT_PROMPTS, HELDOUT_PROMPTS, Excluded, junk_reason, mix_prompts, normalize, read_jsonl_prompts, read_prompts)
from exo_medusa_mlx.training.self_instruct import accept, clean, load_seeds, write_prompts

HELD = read_prompts(HELDOUT_PROMPTS)
BENCH = read_prompts(BENCH_PROMPTS)
TRAIN = read_prompts(DEFAULT_PROMPTS)


def test_shipped_training_prompts_hold_no_heldout_or_bench_prompt():
    excluded = Excluded()
    assert len(HELD) == 40 and len(BENCH) == 24
    assert [p for p in TRAIN if p in excluded] == []
    assert all(p in excluded for p in HELD + BENCH)
    assert " WHY is the sky, blue " in Excluded([BENCH_PROMPTS])  # normalised: case, punctuation, spaces


def test_user_jsonl_bad_lines_are_one_line_errors(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"prompt": "Tell me about owls."}\n\n"A plain string prompt"\n')
    assert read_jsonl_prompts(f) == ["Tell me about owls.", "A plain string prompt"]
    for text, message in [('{"prompt": "ok"}\n{"prompt": "cut\n', r"mine.jsonl:2: not valid JSON"),
                          ('{"prompt": "ok"}\n{"text": "x"}\n', r"mine.jsonl:2: expected \{\"prompt\""),
                          ('{"prompt": ""}\n', r"mine.jsonl:1: expected"), ("\n\n", "holds no prompts")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=message) as e:
            read_jsonl_prompts(f)
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_jsonl_prompts(tmp_path / "missing.jsonl")


def test_mix_drops_heldout_bench_and_duplicates():
    logged = []
    mixed = mix_prompts([("file", ["Name three rivers.", HELD[0], "name three RIVERS!"]),
                         ("user", [BENCH[1].upper(), "Explain rainbows.", "Name three rivers."])],
                        Excluded(), log=logged.append)
    assert mixed == ["Name three rivers.", "Explain rainbows."]
    assert "file: 1 kept, 1 held-out/bench dropped, 1 duplicates" in logged[0]


@pytest.mark.parametrize("text, reason", [
    ("Explain how a rainbow forms.", None),
    ("Hi?", "length"),
    ("t5 t17 t33 t40 t2 t9", "language"),
    ("Расскажи мне о погоде в Москве сегодня.", "language"),
    ("the the the the the the cat", "repetition"),
    ("Topic: volcanoes. Write a poem.", "junk"),
    ("See https://example.com for the answer please", "junk"),
])
def test_junk_filter(text, reason):
    assert junk_reason(text) == reason


def test_clean_takes_the_first_line_without_marks():
    assert clean('  1. "Write a haiku about frost."\nMore text') == "Write a haiku about frost."
    assert clean("Request: Compare tea and coffee.") == "Compare tea and coffee."
    assert clean("- List three moons of Jupiter.") == "List three moons of Jupiter."


def _writer(outputs, calls):
    """A fake model: round r continues the contexts with outputs[r], then with junk."""
    def write(contexts, seed):
        calls.append((contexts, seed))
        out = outputs[len(calls) - 1] if len(calls) <= len(outputs) else []
        return (out + [" t1 t2 t3 t4 t5 t6"] * len(contexts))[: len(contexts)]
    return write


@pytest.fixture
def seeds(tmp_path):
    f = tmp_path / "seeds.json"
    f.write_text(json.dumps({"topics": ["owls"], "starts": ["Write"]}))
    return f


def test_self_instruct_keeps_clean_new_prompts_and_continues(tmp_path, seeds):
    held, train = "Write a short poem about a lighthouse in a storm.", "Write a short speech to welcome new employees."
    assert held in HELD and train in TRAIN
    excluded = Excluded()
    seen = {normalize(p) for p in TRAIN}
    w = len("Write")
    rounds = [[" a haiku about rain.", held[w:], train[w:], " a HAIKU about rain!"],
              [" a song about snow\nand more", " me a letter from the moon.", " x"]]
    calls = []
    kw = dict(examples=TRAIN[:10], excluded=excluded, settings={"model": "m"}, batch_size=4, seed=1, seeds=seeds,
              log=lambda *_: None)
    got = write_prompts(_writer(rounds, calls), 3, tmp_path / "si", seen=set(seen), **kw)
    assert got == ["Write a haiku about rain.", "Write a song about snow", "Write me a letter from the moon."]
    assert len(calls) == 2 and all(len(c[0]) == 4 for c in calls)
    for context in calls[0][0]:  # a list of shown training prompts, then the start
        lines = context.splitlines()
        assert lines[-1] == "- Write" and all(l[2:] in TRAIN[:10] for l in lines[1:-1]) and len(lines) == 6
    lines = (tmp_path / "si" / "prompts.jsonl").read_text().splitlines()
    assert [json.loads(l)["prompt"] for l in lines] == got

    # A rerun asking for more continues with the next round; the kept prompts are reused.
    with open(tmp_path / "si" / "prompts.jsonl", "a") as f:
        f.write('{"prompt": "cut by a ki')  # a line cut by a kill
    more = []
    got4 = write_prompts(_writer([[" owls are quiet.", " owls are quiet."]], more), 4, tmp_path / "si",
                         seen=set(seen), **kw)
    assert got4 == got + ["Write owls are quiet."]
    assert len(more) == 1 and more[0][1] != calls[0][1]  # round 2: other draws, another seed
    assert write_prompts(_writer([], []), 2, tmp_path / "si", seen=set(seen), **kw) == got[:2]
    with pytest.raises(ValueError, match="other settings"):
        write_prompts(_writer([], []), 2, tmp_path / "si", seen=set(seen), **{**kw, "seed": 2})


def test_self_instruct_gives_up_when_everything_is_junk(tmp_path, seeds):
    logged, calls = [], []
    got = write_prompts(_writer([], calls), 5, tmp_path / "si", examples=TRAIN[:5], seen=set(),
                        excluded=Excluded(), settings={}, batch_size=4, seeds=seeds, log=logged.append)
    assert got == [] and len(calls) == 4 * 2 + 1
    assert "0 of 5 prompts" in logged[-1] and "language" in logged[-1]
    topics, starts = load_seeds()
    assert len(topics) * len(starts) >= 1000 and any("{topic}" in s for s in starts)


def test_self_instruct_with_a_tiny_model_writes_in_batches(tmp_path):
    from exo_medusa_mlx.training.self_instruct import model_writer
    from exo_medusa_mlx.training.data import load_base
    from helpers.folders import save_hf_folder
    from helpers.tiny import N_LAYERS, tiny_base

    base, lm, tok, _ = load_base(str(save_hf_folder(tmp_path / "model", "llama", tiny_base("llama", layers=N_LAYERS))))
    write = model_writer(base, lm, tok, batch_size=3)
    texts = write(["t5 t6 t7", "t8 t9", "t10", "t11 t12"], seed=0)
    assert len(texts) == 4 and all(isinstance(t, str) and t for t in texts)
    assert texts == write(["t5 t6 t7", "t8 t9", "t10", "t11 t12"], seed=0)  # seeded
    assert texts != write(["t5 t6 t7", "t8 t9", "t10", "t11 t12"], seed=1)
    assert accept(texts, set(), Excluded(), Counter()) == []  # word-level junk ("t5 t6 ...") is dropped


def test_training_prompts_mix_user_and_written_prompts_without_heldout(tmp_path, monkeypatch):
    import exo_medusa_mlx.training.data as TD
    from exo_medusa_mlx.training.options import TrainOptions

    user = tmp_path / "mine.jsonl"
    user.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Sing me a song about dust.", HELD[5], TRAIN[3]]))
    seeds = tmp_path / "seeds.json"
    seeds.write_text(json.dumps({"topics": ["owls"], "starts": ["Write"]}))
    bench = "Write a short poem about the sea at night."
    assert bench in BENCH
    written = [bench[len("Write"):], " a riddle about a lost umbrella."]
    monkeypatch.setattr(TD, "model_writer", lambda *a, **k: _writer([written], []))
    opts = TrainOptions(output=str(tmp_path / "out"), add_prompts=[str(user)], self_instruct=1, gen_batch_size=2,
                        self_instruct_seeds=str(seeds))
    sources = TD.prompt_sources(opts)
    got, mix = TD.training_prompts(opts, sources, None, None, None, "m", tmp_path / "out", log=lambda *_: None)
    assert mix == {"sources": {"train_prompts.json": len(TRAIN), f"--add-prompts {user}": 1, "self-instruct": 1},
                   "prompts": len(TRAIN) + 2}
    assert got[: len(TRAIN)] == TRAIN
    assert got[len(TRAIN) :] == ["Sing me a song about dust.", "Write a riddle about a lost umbrella."]
    excluded = Excluded()
    assert not [p for p in got if p in excluded]
    assert (tmp_path / "out" / "self_instruct" / "prompts.jsonl").is_file()
    opts = SimpleNamespace(**{**vars(opts), "add_prompts": [str(tmp_path / "bad.jsonl")]})
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        TD.prompt_sources(opts)
