"""Constrained decoding on the real model: outputs that parse and validate, masks that leave the
unconstrained requests of the same batch alone, constraints under speculative decoding."""

import json
import re
from importlib import resources

import jsonschema
import pytest

from slimserve import LLM, SamplingParams
from slimserve.errors import InvalidRequest
from slimserve.structured import StructuredOutputs

SCHEMAS = json.loads(
    resources.files("slimserve.bench").joinpath("prompts/schemas.json").read_text()
)["schemas"]


@pytest.fixture(scope="module")
def llm(gguf_path):
    return LLM(gguf_path, kv_cache_memory="64MiB")


def _chat(llm, text):
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])


def _params(structured=None, max_tokens=160, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, structured=structured, **kw)


def test_every_schema_of_the_suite_gives_valid_json(llm):
    prompts = [_chat(llm, s["prompt"]) for s in SCHEMAS]
    params = [_params(StructuredOutputs(json=s["schema"]), max_tokens=300) for s in SCHEMAS]
    outs = llm.generate(prompts, params)
    done = 0
    for s, out in zip(SCHEMAS, outs):
        o = out.outputs[0]
        if o.finish_reason == "length":
            continue  # cut off by max_tokens: valid so far, not complete
        jsonschema.validate(json.loads(o.text), s["schema"])
        done += 1
    assert done >= 0.9 * len(SCHEMAS)


def test_without_the_constraint_most_outputs_are_not_valid(llm):
    """The contrast that makes the test above mean something: the model alone rarely complies."""
    valid = 0
    for s, out in zip(SCHEMAS[:8], llm.generate([_chat(llm, s["prompt"]) for s in SCHEMAS[:8]],
                                                _params())):  # fmt: skip
        try:
            jsonschema.validate(json.loads(out.outputs[0].text), s["schema"])
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    assert valid <= 4


def test_regex_and_choice(llm):
    regex = r"[A-Z][a-z]+ [0-9]{2}:[0-9]{2}"
    out = llm.generate(_chat(llm, "When does the train leave?"),
                       _params(StructuredOutputs(regex=regex)))[0].outputs[0]  # fmt: skip
    assert re.fullmatch(regex, out.text) and out.finish_reason == "stop"
    choices = ("positive", "negative", "neutral")
    out = llm.generate(_chat(llm, "Sentiment of 'I love it'?"),
                       _params(StructuredOutputs(choice=choices)))[0].outputs[0]  # fmt: skip
    assert out.text in choices


def test_lark_grammar(llm):
    grammar = 'start: "(" num ("+" num)* ")"\nnum: /[0-9]{1,3}/'
    out = llm.generate(_chat(llm, "Write a sum of numbers."),
                       _params(StructuredOutputs(grammar=grammar)))[0].outputs[0]  # fmt: skip
    assert re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})*\)", out.text), out.text


def test_constrained_requests_leave_the_others_unchanged(llm):
    plain = [_chat(llm, q) for q in ("What is rain?", "Name a fruit.", "Count to five.")]
    alone = [o.outputs[0].token_ids for o in llm.generate(plain, _params(max_tokens=40))]
    mixed_prompts = [plain[0], _chat(llm, SCHEMAS[0]["prompt"]), plain[1],
                     _chat(llm, SCHEMAS[1]["prompt"]), plain[2]]  # fmt: skip
    mixed_params = [_params(max_tokens=40), _params(StructuredOutputs(json=SCHEMAS[0]["schema"])),
                    _params(max_tokens=40), _params(StructuredOutputs(json=SCHEMAS[1]["schema"])),
                    _params(max_tokens=40)]  # fmt: skip
    mixed = llm.generate(mixed_prompts, mixed_params)
    assert [mixed[i].outputs[0].token_ids for i in (0, 2, 4)] == alone
    json.loads(mixed[1].outputs[0].text)


def test_unsatisfiable_within_max_tokens_ends_with_length(llm):
    schema = {"type": "object", "properties": {"essay": {"type": "string", "minLength": 400}},
              "required": ["essay"]}  # fmt: skip
    params = _params(StructuredOutputs(json=schema), max_tokens=20)
    out = llm.generate(_chat(llm, "Write an essay."), params)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 20
    assert out.text.startswith('{"essay":')


def test_constraints_under_speculative_decoding(gguf_path, llm):
    """Drafts the grammar refuses are rejected; the output is the constrained greedy one."""
    spec = LLM(gguf_path, kv_cache_memory="64MiB", speculative="suffix",
               speculative_adaptive=False)  # fmt: skip
    prompts = [_chat(llm, s["prompt"]) for s in SCHEMAS[:6]]
    params = [_params(StructuredOutputs(json=s["schema"])) for s in SCHEMAS[:6]]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in spec.generate(prompts, params)]
    assert got == want
    stats = spec.engine.stats()
    assert stats.spec_accepted_tokens > 20 and stats.spec_draft_tokens > stats.spec_accepted_tokens


@pytest.mark.parametrize("spec, param", [
    (StructuredOutputs(json={"type": "object", "properties": 5}), "structured_outputs"),
    (StructuredOutputs(json="{not json", param="response_format"), "response_format"),
    (StructuredOutputs(regex="a(+", param="guided_regex"), "guided_regex"),
    (StructuredOutputs(grammar="start: (("), "structured_outputs"),
])  # fmt: skip
def test_bad_constraints_are_refused_before_anything_runs(llm, spec, param):
    with pytest.raises(InvalidRequest) as e:
        llm.engine.add_request("hi", _params(spec))
    assert e.value.param == param
    assert not llm.engine.has_unfinished()


def test_a_constraint_takes_exactly_one_kind():
    with pytest.raises(InvalidRequest, match="exactly one"):
        StructuredOutputs(regex="a", choice=["a"])
    with pytest.raises(InvalidRequest, match="exactly one"):
        StructuredOutputs()


def test_jump_forward_keeps_the_output_and_saves_steps(llm):
    """Tokens the grammar forces go in as drafts, verified in one step: the same tokens as
    masked decoding one at a time, in fewer steps."""
    prompts = [_chat(llm, s["prompt"]) for s in SCHEMAS[:4]]
    params = [_params(StructuredOutputs(json=s["schema"])) for s in SCHEMAS[:4]]
    runs = {}
    for jump in (False, True):
        llm.engine.jump_forward = jump
        before = llm.engine.stats().steps
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        runs[jump] = (outs, llm.engine.stats().steps - before)
    llm.engine.jump_forward = True
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] < 0.9 * runs[False][1]
