"""``core/tokens.py``: a prompt trained on and the same prompt asked at inference are the same ids,
on both backends' tokenizers, and those ids are mlx-lm's; the ids that end an answer."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from exo_medusa_mlx.core.tokens import apply_template, chat_ids, encode_prompt, eos_ids, prompt_ids
from exo_medusa_mlx.default_model import resolve_model_path
from exo_medusa_mlx.training import data
from exo_medusa_mlx.training.prompts import read_documents

PROMPTS = ["Explain how a rainbow forms.", "Name three rivers in Africa, with one fact each.",
           "<|im_start|> is not a template here: just text", "  spaces  and\nnew lines\n"]


def load_tokenizer(backend: str):
    """The default model's tokenizer as ``backend`` loads it (mlx-lm's wrapper; transformers' in ours)."""
    path = resolve_model_path(None)
    if backend == "mlx":
        from mlx_lm.utils import load_tokenizer

        return load_tokenizer(path)
    pytest.importorskip("transformers")
    from exo_medusa_mlx.torch_compat.generate import load_tokenizer

    return load_tokenizer(path)


@pytest.fixture(scope="module", params=["mlx", "torch"])
def tokenizer(request):
    return load_tokenizer(request.param)


@pytest.fixture(params=["template", "no template"])
def tok(request, tokenizer):
    if request.param == "template":
        return tokenizer
    bare = load_tokenizer("torch" if type(tokenizer).__module__.startswith("exo_medusa_mlx") else "mlx")
    bare._tokenizer.chat_template = None  # both wrappers hand attributes to the tokenizer inside
    assert apply_template(bare, "x") == "x"
    return bare


def training_ids(tok, prompts: list[str], tmp_path, monkeypatch) -> tuple[list, list]:
    """The ids ``mlx_medusa train`` self-distils for ``prompts`` (what ``build_data`` hands the
    cache builder), and the prompt part of ``--data`` prompt/completion documents."""
    seen = {}
    monkeypatch.setattr(data, "training_prompts", lambda *a, **k: (list(prompts), {}))  # (prompts, the mix)
    monkeypatch.setattr(data, "build_cache", lambda folder, *a, **kw: seen.update(kw) or {})
    opts = SimpleNamespace(data=None, val_split=0.0, seed=0, samples_per_prompt=1, max_tokens=8, temp=0.0,
                           gen_batch_size=1, gen_lanes=1)
    data.build_data(opts, [], None, None, tok, "m", tmp_path, tmp_path / "cache", log=lambda *_: None)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"prompt": p, "completion": " Fine, thanks."}) + "\n" for p in prompts))
    documents = [ids[: start + 1] for ids, start in read_documents(docs, tok, 10_000)]
    return seen["prompts"], documents


def test_training_and_inference_prompts_are_the_same_ids(tok, tmp_path, monkeypatch):
    distilled, documents = training_ids(tok, PROMPTS, tmp_path, monkeypatch)
    # What ``mlx_medusa generate`` (and bench, tune, the ring) feeds the model for the same prompt.
    generated = [encode_prompt(tok, apply_template(tok, p, None, True)).tolist() for p in PROMPTS]
    assert distilled == documents == generated == [prompt_ids(tok, p) for p in PROMPTS]
    if tok.chat_template is not None:
        # The server's, from messages; and mlx-lm's own (its server tokenizes in the template).
        messages = [[{"role": "user", "content": p}] for p in PROMPTS]
        assert [chat_ids(tok, m) for m in messages] == generated
        assert [list(tok.apply_chat_template(m, add_generation_prompt=True, return_dict=False)) for m in messages] == generated
    else:  # encoded as mlx-lm encodes a raw prompt: with the BOS the tokenizer adds, if any
        assert generated == [list(tok.encode(p)) for p in PROMPTS]


def test_a_system_prompt_and_a_whole_conversation(tokenizer):
    with_system = apply_template(tokenizer, "Hi", "Answer in French.", True)
    assert with_system == chat_ids(tokenizer, [{"role": "system", "content": "Answer in French."},
                                               {"role": "user", "content": "Hi"}])
    talk = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    whole = chat_ids(tokenizer, talk, add_generation_prompt=False)
    assert whole == list(tokenizer.apply_chat_template(talk, return_dict=False))  # what --data "messages" lines train on
    assert apply_template(tokenizer, "Hi", None, False) == "Hi"


def test_encode_prompt_refuses_an_empty_prompt(tokenizer):
    with pytest.raises(ValueError, match="prompt is empty"):
        encode_prompt(tokenizer, [])
    bos = tokenizer.bos_token
    if bos is not None:  # mlx-lm's rule: a prompt that starts with BOS gets no second one
        assert encode_prompt(tokenizer, bos + "Hi").tolist().count(tokenizer.bos_token_id) == 1


def test_eos_ids():
    assert eos_ids(SimpleNamespace(eos_token_ids={2, 7}, eos_token_id=2), also=[9]) == {2, 7}
    assert eos_ids(SimpleNamespace(eos_token_ids=[], eos_token_id=None)) == set()  # listed: none
    assert eos_ids(SimpleNamespace(eos_token_id=5), also=[9, 5]) == {5, 9}  # a bare tokenizer
    assert eos_ids(SimpleNamespace(eos_token_id=None)) == set()


def test_eos_ids_of_the_default_model(tokenizer):
    assert eos_ids(tokenizer) == {2}  # <|im_end|>, as mlx-lm's wrapper lists it
