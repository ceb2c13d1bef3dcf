"""Generation behaviour of the real model: seeds, stop strings, stop reasons, streaming."""

from slimserve import SamplingParams
from slimserve.engine.detokenizer import Detokenizer

CHAT = [{"role": "user", "content": "Tell me a short story about a robot."}]


def test_same_seed_same_text(llm):
    p = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=7)
    a = llm.chat(CHAT, p)[0].outputs[0]
    b = llm.chat(CHAT, p)[0].outputs[0]
    c = llm.chat(CHAT, SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=8))[
        0
    ].outputs[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_stop_string_across_tokens_is_cut_and_not_emitted(llm):
    base = llm.chat(CHAT, SamplingParams(max_tokens=40, temperature=0.0))[0].outputs[0]
    ids = base.token_ids
    # Pick a stop string that straddles a token boundary in the greedy output.
    pieces = [llm.tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    i = next(
        i
        for i in range(3, len(ids))
        if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i - 1]) - len(pieces[i - 2]) >= 2
    )
    stop = pieces[i][len(pieces[i - 1]) - 1 : len(pieces[i - 1]) + 1]
    assert len(stop) == 2
    out = llm.chat(CHAT, SamplingParams(max_tokens=40, temperature=0.0, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text
    assert out.text == base.text[: base.text.index(stop)]


def test_detokenizer_holds_back_a_possible_stop_prefix(llm):
    tok = llm.tokenizer
    d = Detokenizer(tok, SamplingParams(stop=["world peace"]))
    for t in tok.encode("hello world", add_special_tokens=False):
        assert not d.add(t)
    assert (
        d.visible_text(finished=False)
        == "hello world"[: len("hello world") - len("world peace") + 1]
    )
    assert d.visible_text(finished=True) == "hello world"


def test_finish_reasons(llm):
    out = llm.chat(
        [{"role": "user", "content": "Say hi."}], SamplingParams(max_tokens=200, temperature=0.0)
    )
    assert out[0].outputs[0].finish_reason == "stop"
    assert out[0].outputs[0].token_ids[-1] in llm.tokenizer.eos_ids
    assert "<|im_end|>" not in out[0].outputs[0].text
    out = llm.chat(CHAT, SamplingParams(max_tokens=5, temperature=0.0))
    assert out[0].outputs[0].finish_reason == "length" and len(out[0].outputs[0].token_ids) == 5
    first = out[0].outputs[0].token_ids[0]
    out = llm.chat(CHAT, SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=[first]))
    assert out[0].outputs[0].finish_reason == "stop" and out[0].outputs[0].token_ids == [first]


def test_stream_text_equals_final_text(llm):
    p = SamplingParams(max_tokens=30, temperature=0.0)
    prompt = llm.tokenizer.apply_chat_template(CHAT)
    chunks, last = [], ""
    for out in llm.stream(prompt, p):
        text = out.outputs[0].text
        assert text.startswith(last)
        chunks.append(text[len(last) :])
        last = text
    assert "".join(chunks) == llm.generate(prompt, p)[0].outputs[0].text
    assert not llm.engine.has_unfinished()


def test_batch_outputs_equal_solo_outputs(llm):
    prompts = [
        llm.tokenizer.apply_chat_template([{"role": "user", "content": q}])
        for q in ("Hi!", "What is 7 times 8?", "Name the planets of the solar system.")
    ]
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (8, 20, 32)]
    batch = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    solo = [llm.generate(p, sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    assert batch == solo


def test_logprobs_returned(llm):
    out = llm.chat(CHAT, SamplingParams(max_tokens=4, temperature=0.0, logprobs=2))[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and entry[tok] <= 0.0 and len(entry) >= 2


def test_blocks_are_freed_after_generation(llm):
    kv = llm.engine.kv
    before = kv.num_free_blocks
    llm.chat(CHAT, SamplingParams(max_tokens=8, temperature=0.0))
    assert kv.num_free_blocks == before == kv.num_blocks
