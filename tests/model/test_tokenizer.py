"""Our tokenizer, built from GGUF metadata, against transformers' tokenizer for the same file."""

import pytest

CORPUS = [
    "Hello, world!",
    "  leading and trailing   whitespace runs\t\ttabs\n\n\nnewlines  ",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית",
    "Emoji 🎉🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "Digits 0 1 12 123 1234 3.14159 -42 1e10 0xFF 1,000,000",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "<|endoftext|>special tokens mid<|im_end|>text",
    "I'm sure they've said it's fine, we'll see, you'd know, they're here",
    "   ",
    "",
    "a" * 300,
    "mixed\r\nline\rendings\n",
]


@pytest.fixture(scope="module")
def tok(llm):
    return llm.tokenizer


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_ids_match_transformers(tok, hf_tokenizer, text):
    assert (
        tok.encode(text, add_special_tokens=False)
        == hf_tokenizer(text, add_special_tokens=False).input_ids
    )


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_special_tokens_are_single_ids(tok):
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [2]
    assert 2 in tok.eos_ids  # <|im_end|> ends a chat turn


def test_bos_is_added_once(tok):
    # The GGUF asks for BOS; a prompt that already starts with it does not get a second one.
    if tok.add_bos:
        assert tok.encode("hi")[0] == tok.bos_id
        assert tok.encode("<|im_start|>hi")[:2] != [tok.bos_id, tok.bos_id]


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, with émoji 🎨"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tokenizer, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ref = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == ref


def test_incremental_decoding_never_emits_broken_utf8(tok):
    from slimserve.engine.detokenizer import Detokenizer
    from slimserve.sampling_params import SamplingParams

    text = "日本語 🎉 naïve 👩‍👩‍👧‍👦 end"
    ids = tok.encode(text, add_special_tokens=False)
    d = Detokenizer(tok, SamplingParams())
    seen = []
    for t in ids:
        d.add(t)
        seen.append(d.text)
    assert all("\ufffd" not in s for s in seen)
    assert d.text == text
