"""Training prompts per task kind (training/kinds.py, kind_data.py): the held-out prompts per
kind and their separation from everything trained on, the composition of each kind from
written texts, deduplication, the mix record, resuming, and the train command on a tiny model."""

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from exo_medusa_mlx.training import kind_data as KD
from exo_medusa_mlx.training import kinds as K
from exo_medusa_mlx.training.prompts import (DATA_DIR, Excluded, normalize, prompt_text, read_jsonl_prompts,
                                             read_kind_prompts, sentences)

HELD = read_kind_prompts()
WORDS = ("river lamp owl garden window bread music cloud pencil harbour winter engine forest market letter candle "
         "mountain village rocket coffee blanket mirror ladder island button violin kettle meadow tunnel basket "
         "compass lantern orchard pebble saddle thunder velvet whistle anchor biscuit cactus dragon feather glacier "
         "hammock igloo jigsaw kayak lemon magnet noodle oyster parrot quilt ribbon saucer tiger umbrella walnut "
         "yogurt zipper acorn bamboo canyon dolphin falcon ginger hazel ivory jasmine koala lobster maple nectar "
         "olive panda quartz raven spruce tulip").split()
WORDS = [w + end for w in WORDS for end in ("", "s", "er", "ish")]  # enough for 280 words that do not repeat much


def _sentence(rng, n=7) -> str:
    return " ".join(rng.choice(WORDS, n, replace=False)).capitalize() + "."


class FakeWriters:
    """A stand-in for the base model: texts drawn from (input, seed), one call logged per batch."""

    def __init__(self):
        self.calls = []

    def _rng(self, text, seed):
        return np.random.default_rng([seed, int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)])

    def lines(self, contexts, seed):
        self.calls.append(("lines", len(contexts)))
        return [" " + _sentence(self._rng(c, seed), 6)[:-1] + "?\nnext line" for c in contexts]

    def chat(self, prompts, seed, max_tokens, temp):
        self.calls.append(("chat", len(prompts)))
        out = []
        for p in prompts:
            rng = self._rng(prompt_text(p), seed)
            if prompt_text(p).startswith("Translate into"):
                out.append("Le " + _sentence(rng, 5))
            else:  # a passage (sentences cut by the token limit), then code
                out.append(" ".join(_sentence(rng) for _ in range(40)) + " And then"
                           + "\n\n```python\ndef f(x):\n    return x + 1\n```")
        return out


# --------------------------------------------------------------------------- held-out prompts


def test_heldout_kinds_are_about_ten_per_kind_in_the_shapes_users_send():
    from transformers import AutoTokenizer

    from exo_medusa_mlx.default_model import resolve_model_path

    assert list(HELD) == list(K.KINDS) and all(9 <= len(v) <= 12 for v in HELD.values())
    for chat in HELD["chat"]:  # earlier turns in the prompt, the user's last
        assert isinstance(chat, list) and len(chat) >= 3 and chat[-1]["role"] == "user"
        assert [m["role"] for m in chat[:-1]].count("assistant") >= 1
    assert all(isinstance(p, str) for k, v in HELD.items() if k != "chat" for p in v)
    tok = AutoTokenizer.from_pretrained(str(resolve_model_path(None)))
    lengths = [len(tok.encode(p)) for p in HELD["long"]]
    assert min(lengths) >= 1000 and max(lengths) <= 2000, lengths
    assert all(len(p.split()) > 100 for p in HELD["summarization"])  # passages, not one-liners


def _strings(x):
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)


def test_no_heldout_kind_prompt_or_passage_is_in_a_training_source():
    """Every file training prompts come from (shipped prompts, self-instruct and kind seeds) holds
    no held-out prompt and no sentence of 8+ words of one (their passages)."""
    sources = [normalize(s) for f in ("train_prompts.json", "self_instruct_seeds.json", "kind_seeds.json")
               for s in _strings(json.loads((DATA_DIR / f).read_text()))]
    text = "\n".join(sources)
    held_sentences = set().union(*(sentences(prompt_text(p)) for v in HELD.values() for p in v))
    assert len(held_sentences) > 300  # the passages are in there, split into sentences
    assert [s for s in held_sentences if s in text] == []
    assert [p for v in HELD.values() for p in v if normalize(prompt_text(p)) in text] == []
    # ... and the filters catch them: a held-out prompt, or a text quoting one of its passages.
    excluded = Excluded()
    assert all(p in excluded for v in HELD.values() for p in v)
    passage = HELD["summarization"][3]
    quoted = "Please read this. " + passage.split("\n\n")[1].split(". ")[1] + ". Thanks."
    assert excluded.overlaps(quoted) and not excluded.overlaps("Please read this. Thanks for the bread recipe.")


def test_kinds_and_seeds_are_checked_with_one_line_errors(tmp_path):
    assert K.parse_kinds("all") == list(K.KINDS) and K.parse_kinds(" qa,chat ") == ["chat", "qa"]
    for bad in ("", "qa,poetry", "al"):
        with pytest.raises(ValueError, match="--kinds"):
            K.parse_kinds(bad)
    seeds = json.loads((DATA_DIR / "kind_seeds.json").read_text())
    seeds["templates"]["code"] = ["{task}"]  # no template that shows code
    del seeds["lists"]["sentence"]
    (tmp_path / "s.json").write_text(json.dumps(seeds))
    with pytest.raises(ValueError, match=r"lists.sentence, templates.code") as e:
        K.load_kind_seeds(tmp_path / "s.json")
    assert "\n" not in str(e.value)
    f = tmp_path / "held.json"
    f.write_text(json.dumps({"kinds": {"chat": [[{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                       "content": "hello"}]]}}))
    with pytest.raises(ValueError, match="chat prompt 0: a chat prompt is a list of"):
        read_kind_prompts(f)


def test_messages_lines_are_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me a joke."}]
    f.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"prompt": "Plain one."}) + "\n")
    assert read_jsonl_prompts(f) == [chat, "Plain one."]
    f.write_text(json.dumps({"messages": chat[:2]}) + "\n")
    with pytest.raises(ValueError, match="p.jsonl:1: a chat prompt"):
        read_jsonl_prompts(f)


# --------------------------------------------------------------------------- composition


def _written(n=6, seed=0):
    rng = np.random.default_rng(seed)
    passages = [" ".join(_sentence(rng) for _ in range(40)) for _ in range(n)]  # six reach a long prompt
    requests = [_sentence(rng)[:-1] + "?" for _ in range(n)]
    sentences_ = [_sentence(rng) for _ in range(n)]
    tasks = ["Write a Python function that " + _sentence(rng).lower() for _ in range(n)]
    return K.Written({
        "request": [{"text": t} for t in requests],
        "answer": [{"text": "Answer to " + t, "of": K.text_key(t)} for t in requests[:-1]],  # the last had none
        "followup": [{"text": "Can you " + _sentence(rng).lower()} for _ in range(2)],
        "sentence": [{"text": t} for t in sentences_],
        "translated": [{"text": "Le " + t, "of": K.text_key(t), "lang": "French"} for t in sentences_[:2]],
        "passage": [{"text": p} for p in passages],
        "question": [{"text": f"What about number {i}?", "of": K.text_key(p)} for i, p in enumerate(passages)],
        "problem": [{"text": f"A farmer has {i} cows and buys two more. How many now?"} for i in range(n)],
        "code_task": [{"text": t} for t in tasks],
        "code": [{"text": "```python\ndef f():\n    return 1\n```", "of": K.text_key(tasks[0])}],
    })


def test_each_kind_is_composed_from_what_it_needs():
    w, seeds = _written(), K.load_kind_seeds()
    passages, words = w.texts("passage"), lambda s: len(s.split())
    got = {k: K.compose_kind(k, 6, w, seeds, 0, words, Excluded(), set())[0] for k in K.KINDS}
    assert all(len(v) == 6 for v in got.values()), {k: len(v) for k, v in got.items()}
    answers = {r["of"]: r["text"] for r in w.pools["answer"]}
    for chat in got["chat"]:  # a first request, the model's own answer to it, a follow-up
        assert [m["role"] for m in chat] == ["user", "assistant", "user"]
        assert chat[1]["content"] == answers[K.text_key(chat[0]["content"])]
        assert chat[2]["content"] in w.texts("followup")
    languages = ["English", *seeds["languages"]]
    for p in got["translation"]:
        assert any(s in p for s in w.texts("sentence") + w.texts("translated"))
        assert sum(lang in p for lang in languages) >= 1
    for p in got["summarization"]:
        assert sum(x in p for x in passages) == 1
    questions = {r["text"]: r["of"] for r in w.pools["question"]}
    for kind, docs in (("qa", 1), ("rag", K.RAG_DOCS)):
        for p in got[kind]:  # the passage a question was written over is in the prompt
            q = [q for q in questions if q in p]
            assert len(q) == 1 and sum(x in p for x in passages) == docs
            assert any(K.text_key(x) == questions[q[0]] and x in p for x in passages)
    for p in got["long"]:
        assert K.LONG_TOKENS[0] <= words(p) <= K.LONG_TOKENS[1] and sum(x in p for x in passages) >= 3
    assert any("```python" in p for p in got["code"]) and any("Write a Python function" in p for p in got["code"])
    assert all(any(x in p for x in w.texts("problem")) for p in got["math"])


def test_composition_drops_duplicates_and_held_out_passages():
    w, seeds = _written(n=2), K.load_kind_seeds()
    held_passage = HELD["summarization"][1].split("\n\n")[0]
    w.pools["passage"][0]["text"] = held_passage  # the model happened to write a held-out passage
    seen: set[str] = set()
    got, dropped = K.compose_kind("summarization", 20, w, seeds, 0, len, Excluded(), seen)
    assert got and all(held_passage not in p for p in got) and dropped["held-out"] > 0
    assert len({normalize(p) for p in got}) == len(got) and dropped["duplicate"] > 0
    assert len(got) < 20  # one usable passage, six templates: the kind runs short and says so
    again, _ = K.compose_kind("summarization", 20, w, seeds, 0, len, Excluded(), seen)
    assert again == []  # ``seen`` holds them now: the mix never gets one twice
    assert K.compose_kind("chat", 3, K.Written({}), seeds, 0, len, Excluded(), set()) == ([], Counter(unusable=9))


# --------------------------------------------------------------------------- written in rounds, resumed


def _write(tmp_path, writers, kinds=("chat", "translation", "qa", "code", "rag", "long"), n=3, seed=0, **kw):
    seen = set()
    return KD.write_kind_prompts(writers, list(kinds), n, tmp_path / "kinds", model_id="m", seed=seed,
                                 batch_size=2, excluded=Excluded(), seen=seen,
                                 count_tokens=lambda s: len(s.split()), log=lambda *_: None, **kw)


def test_kind_prompts_are_written_recorded_and_resumed(tmp_path):
    fake = FakeWriters()
    prompts, mix = _write(tmp_path, fake)
    assert mix["kinds"] == {"chat": 3, "translation": 3, "qa": 3, "code": 3, "rag": 3, "long": 3}
    assert mix["texts"]["passage"] == 6 and mix["texts"]["question"] == 3 and mix["texts"]["answer"] == 3
    assert mix["seed"] == 0 and mix["kind_seeds"].startswith("kind_seeds.json ")
    folder = tmp_path / "kinds"
    assert json.loads((folder / KD.MIX_FILE).read_text()) == mix
    lines = [json.loads(x) for x in (folder / KD.PROMPTS_FILE).read_text().splitlines()]
    assert [x.get("prompt", x.get("messages")) for x in lines] == prompts
    assert [x["kind"] for x in lines] == [k for k in mix["kinds"] for _ in range(3)]
    assert read_jsonl_prompts(folder / KD.PROMPTS_FILE) == prompts  # usable with --add-prompts as it is
    answers = [json.loads(x)["text"] for x in (folder / "answer" / "prompts.jsonl").read_text().splitlines()]
    assert all(a.endswith(".") and "```" not in a for a in answers)  # cut to whole sentences
    assert all(c["text"].startswith("```python") for c in map(json.loads, (folder / "code" / "prompts.jsonl")
                                                                 .read_text().splitlines()))

    # A rerun finds every pool done: nothing is written again, the same prompts come out.
    again = FakeWriters()
    assert _write(tmp_path, again)[0] == prompts and again.calls == []

    # Killed while writing questions: the last round and half a line lost; a rerun redraws them alike.
    qfile = folder / "question" / "prompts.jsonl"
    kept = qfile.read_text().splitlines()
    qfile.write_text("\n".join(kept[:2]) + "\n" + kept[2][:10])
    state = json.loads((folder / "question" / "settings.json").read_text())
    (folder / "question" / "settings.json").write_text(json.dumps({**state, "rounds": 1}))
    resumed = FakeWriters()
    assert _write(tmp_path, resumed)[0] == prompts and resumed.calls == [("lines", 1)]

    # More prompts per kind continue the same pools; another seed is refused, by folder.
    more = FakeWriters()
    _, mix5 = _write(tmp_path, more, n=5)
    assert mix5["kinds"]["qa"] == 5 and more.calls
    assert (folder / "question" / "prompts.jsonl").read_text().startswith(qfile.read_text())
    with pytest.raises(ValueError, match="other settings"):
        _write(tmp_path, FakeWriters(), seed=1)


def test_lanes_take_long_prompts_a_few_at_a_time():
    from collections import deque

    from exo_medusa_mlx.training.distill import LANE_TOKENS, PREFILL_TOKENS, _joining

    prompts = [[0] * 40] * 10 + [[0] * 1500] * 30
    assert _joining(deque(range(10)), prompts, free=64, rows=0) == 10
    assert _joining(deque(range(10, 40)), prompts, free=64, rows=0) == PREFILL_TOKENS // 1500
    assert _joining(deque(range(10, 40)), prompts, free=64, rows=LANE_TOKENS // 1500) == 0  # wait for room
    assert _joining(deque([39]), [[0] * 10**5] * 40, free=64, rows=0) == 1  # an empty lane always takes one


# --------------------------------------------------------------------------- the command on a tiny model


def test_train_with_kinds_on_a_tiny_model(tmp_path, monkeypatch):
    """``mlx_medusa train --kinds`` end to end on a tiny random model with a chat template: its text
    is junk, so the junk filters are switched off; the plumbing is what is tested."""
    from exo_medusa_mlx.training import self_instruct
    from exo_medusa_mlx.training.options import setup_arg_parser
    from exo_medusa_mlx.training.train import run
    from helpers.folders import save_hf_folder
    from helpers.tiny import N_LAYERS, tiny_base

    folder = save_hf_folder(tmp_path / "model", "llama", tiny_base("llama", layers=N_LAYERS))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}t1 {{ m['content'] }} t2 {% endfor %}"
                            "{% if add_generation_prompt %}t3{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    for module, name in ((self_instruct, "junk_reason"), (KD, "junk_reason")):
        monkeypatch.setattr(module, name, lambda *a, **k: None)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["t5 t6 t7 t8", "t9 t10 t11", "t12 t13 t14 t15 t16"]))
    out = tmp_path / "heads"
    argv = ["--model", str(folder), "--prompts", str(prompts), "--kinds", "chat,math", "--kind-prompts", "2",
            "--max-tokens", "8", "--gen-batch-size", "4", "--val-split", "0", "--num-heads", "2",
            "--batch-size", "4", "--iters", "2", "--output", str(out)]
    run(setup_arg_parser().parse_args(argv))
    mix = json.loads((out / "config.json").read_text())["info"]["mix"]
    assert mix["sources"] == {"--prompts prompts.json": 3, "kinds": 4} and mix["prompts"] == 7
    assert mix["kind_prompts"]["kinds"] == {"chat": 2, "math": 2}
    assert json.loads((out / "mix.json").read_text()) == mix
    chats = [json.loads(x)["messages"] for x in (out / "kinds" / KD.PROMPTS_FILE).read_text().splitlines()
             if json.loads(x)["kind"] == "chat"]
    assert len(chats) == 2 and all(len(c) == 3 for c in chats)
    assert sorted(p.name for p in (out / "kinds").iterdir()) == sorted(
        ["answer", "followup", "problem", "request", KD.MIX_FILE, KD.PROMPTS_FILE])


@pytest.mark.parametrize("answer, block", [
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "```python\ndef f():\n    return 1\n```"),
    ("```js\nlet a = 1;\nlet b = 2;\nconsole.log(a + b", "```js\nlet a = 1;\nlet b = 2;\n```"),  # cut: whole lines
    ("```python\ndef f():", None), ("No code at all.", None), ("```\none line\n```", None),
])
def test_code_block(answer, block):
    assert K.code_block(answer) == block


def test_whole_sentences_drops_what_the_limit_cut():
    assert K.whole_sentences("One. Two!\n\n\n\nThree is cut") == "One. Two!"
    assert K.whole_sentences('He said "yes." Then') == 'He said "yes."'
    assert K.whole_sentences("No end at all") == "No end at all"


@pytest.mark.parametrize("argv, message", [
    (["--kinds", "qa,poems"], "--kinds 'qa,poems': use 'all' or a comma list of chat, translation"),
    (["--kinds", "all", "--kind-prompts", "0"], "argument --kind-prompts: 0 must be at least 1"),
    (["--kinds", "all", "--data", "d.txt"], "--kinds adds prompts to self-distil: not with --data"),
])
def test_kind_flags_are_checked_before_any_work(tmp_path, argv, message, capsys):
    from exo_medusa_mlx.training.train import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["-o", str(out), *argv])
    said = str(e.value.code) if e.value.code != 2 else capsys.readouterr().err.strip().splitlines()[-1]
    assert message in said and "\n" not in said
    assert not out.exists()


def test_a_conversation_is_asked_as_the_chat_template_lays_it_out():
    from transformers import AutoTokenizer

    from exo_medusa_mlx.core.tokens import chat_ids, prompt_ids
    from exo_medusa_mlx.default_model import resolve_model_path

    tok = AutoTokenizer.from_pretrained(str(resolve_model_path(None)))
    chat = HELD["chat"][0]
    assert prompt_ids(tok, chat) == chat_ids(tok, chat)
    assert prompt_ids(tok, "Name a river.") == prompt_ids(tok, [{"role": "user", "content": "Name a river."}])
    assert tok.decode(prompt_ids(tok, chat)).count("<|im_start|>assistant") == len(chat) // 2 + 1



def test_a_passage_is_kept_until_it_repeats_itself():
    text = "Bees rest at night. They sleep in short bursts. Bees rest at night. More text here."
    assert K.until_repeat(text) == "Bees rest at night. They sleep in short bursts."
    assert K.until_repeat("Yes. Yes. No repeats of four words here.") == "Yes. Yes. No repeats of four words here."
