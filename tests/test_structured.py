"""Structured output (`SamplingParams.structured`, `server.engine.structured`) on the real
default model: JSON replies parse and follow their schema, batched with free-text requests
and in an engine that speculates; regex, choice and grammar replies match; specs xgrammar
cannot take are refused when the request is added."""

from __future__ import annotations

import json

import pytest

from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams, SamplingParamsError

pytestmark = pytest.mark.slow

CAT = json.dumps({"type": "object", "required": ["name", "age"],
                  "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}})
PETS = json.dumps({
    "$defs": {"pet": {"type": "object", "required": ["kind", "name"], "properties": {
        "kind": {"enum": ["cat", "dog"]}, "name": {"type": "string", "pattern": "^[A-Z][a-z]+$"}}}},
    "type": "object", "required": ["pets"],
    "properties": {"pets": {"type": "array", "items": {"$ref": "#/$defs/pet"},
                            "minItems": 2, "maxItems": 2}}})


def _chat(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=True,
                                             return_dict=False)


def _check(text: str, schema: str) -> None:
    reply = json.loads(text)
    if schema == CAT:
        assert set(reply) == {"name", "age"} and isinstance(reply["age"], int)
    else:
        assert len(reply["pets"]) == 2
        for pet in reply["pets"]:
            assert set(pet) == {"kind", "name"} and pet["kind"] in ("cat", "dog")
            assert pet["name"][:1].isupper() and pet["name"][1:].islower()


def test_json_replies_follow_their_schemas(default_llm: LLM) -> None:
    """Greedy and sampled replies to two schemas, batched with a free-text request that
    keeps its own tokens; each JSON reply ends by itself once complete."""
    cat, pets = _chat(default_llm, "Describe a cat as JSON."), _chat(default_llm, "Two pets?")
    free = SamplingParams(max_tokens=20, temperature=0.0)
    alone = default_llm.generate([pets], free)[0].token_ids
    params = [SamplingParams(max_tokens=80, temperature=0.0, json_schema=CAT),
              SamplingParams(max_tokens=120, temperature=0.8, seed=4, json_schema=PETS),
              free]
    got = default_llm.generate([cat, pets, pets], params)
    for out, schema in zip(got[:2], (CAT, PETS), strict=True):
        _check(out.text, schema)
        assert out.finish_reason == "stop"
    assert got[2].token_ids == alone
    anything = default_llm.generate([cat], SamplingParams(
        max_tokens=6, temperature=0.0, json_schema='{"type": "object"}'))[0]
    assert anything.text.lstrip().startswith("{")


def test_json_replies_in_an_engine_that_speculates() -> None:
    """With n-gram speculation on, a JSON request's drafts are verified against what its
    grammar allows after the drafts before each (`structured.mask_rows`): greedy replies are
    the engine's without speculation, drafts were verified and accepted, and a JSON reply
    that the schema cuts short of the copied text still parses."""
    import torch
    import xgrammar

    from tests.test_speculative import AlwaysDraft

    common = dict(dtype="float32", kv_cache_memory_gb=0.5)
    plain = LLM(**common)
    spec = LLM(**common, speculative="ngram", num_speculative_tokens=4)
    spec.engine.scheduler.spec_policy = AlwaysDraft(max_draft_tokens=4)
    # (a reply that copies its prompt: lookups would find drafts for both)
    # the second schema refuses the copied name, and then drafts of the copy from the middle
    lower = json.dumps({"type": "object", "required": ["name", "age"], "properties": {
        "name": {"type": "string", "pattern": "^[a-z]+$"}, "age": {"type": "integer"}}})
    copy = _chat(plain, 'Copy this JSON exactly: {"name": "Tom", "age": 3}')
    prompts = [copy, copy, _chat(plain, "Repeat three times: the cat sat on the mat.")]
    params = [SamplingParams(max_tokens=60, temperature=0.0, json_schema=CAT),
              SamplingParams(max_tokens=60, temperature=0.0, json_schema=lower),
              SamplingParams(max_tokens=60, temperature=0.0)]
    engine = spec.engine
    steps = engine.step

    def checked_step() -> list:
        """A step, then each JSON request's matcher against a fresh one fed its output:
        the same next-token mask (drafts taken in for verification were given back)."""
        outputs = steps()
        for r in engine.scheduler.running:
            if r.grammar is None or r.grammar.is_terminated():
                continue
            fresh = engine.grammars.matcher(*r.params.structured)
            assert all(fresh.accept_token(t) for t in r.output_token_ids)
            masks = [xgrammar.allocate_token_bitmask(1, engine.model_config.vocab_size)
                     for _ in range(2)]
            r.grammar.fill_next_token_bitmask(masks[0])
            fresh.fill_next_token_bitmask(masks[1])
            assert torch.equal(*masks)
        return outputs

    engine.step = checked_step
    got = spec.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in plain.generate(prompts, params)]
    _check(got[0].text, CAT)
    named = json.loads(got[1].text)
    assert set(named) == {"name", "age"} and named["name"].islower()
    for out in got[:2]:
        assert out.num_draft_tokens > out.num_accepted_tokens > 0


def test_refused_schemas_and_combinations(default_llm: LLM) -> None:
    engine = default_llm.engine
    prompt = _chat(default_llm, "hi")
    for schema, reason in (('{"type": "nonsense"}', "Unsupported type"),
                           ("[1, 2]", "must be a JSON object"), ("{oops", "not JSON")):
        with pytest.raises(ValueError, match=reason):
            engine.add_request("bad", prompt, SamplingParams(json_schema=schema))
    assert not engine.has_unfinished()
    for extra in (dict(min_tokens=2), dict(ignore_eos=True)):
        with pytest.raises(SamplingParamsError):
            SamplingParams(json_schema=CAT, **extra)


def test_regex_choice_and_grammar_replies(default_llm: LLM) -> None:
    """Each kind of structure, greedy and sampled, batched: every reply matches and ends by
    itself; a spec xgrammar cannot take is refused, as are two structures at once."""
    import re

    prompt = _chat(default_llm, "What is the capital of France? Answer in one word.")
    choices = ["Paris", "Lyon", "Marseille", "I don't know"]
    grammar = 'root ::= "The answer is " word "."\nword ::= [A-Z] [a-z]+'
    params = [SamplingParams(max_tokens=20, temperature=0.0, regex=r"[A-Z][a-z]+ \(\d{1,3}\)"),
              SamplingParams(max_tokens=20, temperature=0.0, choice=choices),
              SamplingParams(max_tokens=20, temperature=1.0, seed=3, choice=choices),
              SamplingParams(max_tokens=20, temperature=0.0, grammar=grammar)]
    got = default_llm.generate([prompt] * 4, params)
    assert re.fullmatch(r"[A-Z][a-z]+ \(\d{1,3}\)", got[0].text), got[0].text
    assert got[1].text in choices and got[2].text in choices
    assert re.fullmatch(r"The answer is [A-Z][a-z]+\.", got[3].text), got[3].text
    assert all(out.finish_reason == "stop" for out in got)
    engine = default_llm.engine
    for params, reason in ((SamplingParams(regex="(unclosed"), "unsupported regex"),
                           (SamplingParams(grammar="root ::= "), "unsupported grammar")):
        with pytest.raises(ValueError, match=reason):
            engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished()
    with pytest.raises(SamplingParamsError, match="one structure"):
        SamplingParams(regex="a+", choice=["a"])
    for bad in ([], ["a", ""]):
        with pytest.raises(SamplingParamsError, match="non-empty"):
            SamplingParams(choice=bad)
