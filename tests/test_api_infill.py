"""Fill-in-the-middle (`suffix` on /v1/completions, `server.api.infill`): the prompt a code
model was trained on, its stop tokens, and a 400 naming `suffix` for a model without them."""

from __future__ import annotations

import httpx
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from server.api.infill import infill_tokens
from tests.api_fakes import FakeEngine, FakeTokenizer
from tests.api_server import app_in_thread

QWEN = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|endoftext|>", "<|fim_pad|>",
        "<|file_sep|>"]
STARCODER = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<|endoftext|>"]
CODELLAMA = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]


def _tokenizer(specials: list[str], bos: bool = False) -> PreTrainedTokenizerFast:
    """Words w0..w19, then `specials` (ids 20, 21, ...); with `bos`, w1 before each text."""
    vocab = {f"w{i}": i for i in range(20)} | {name: 20 + i for i, name in enumerate(specials)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="w1 $A", special_tokens=[
            ("w1", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


@pytest.mark.parametrize(("specials", "bos"), [(QWEN, False), (STARCODER, True),
                                               (CODELLAMA, True)])
def test_each_family_s_tokens_make_the_prefix_suffix_middle_prompt(specials, bos) -> None:
    tok = _tokenizer(specials, bos)
    infill = infill_tokens(tok)
    assert (infill.prefix, infill.suffix, infill.middle) == (20, 21, 22)
    assert infill.leading == ((1,) if bos else ())
    assert infill.ends == tuple(range(23, 20 + len(specials)))
    assert infill.prompt(tok, "w5 w6", "w7") == [*infill.leading, 20, 5, 6, 21, 7, 22]
    assert infill.prompt(tok, [9, 9], "w7 w8") == [*infill.leading, 20, 9, 9, 21, 7, 8, 22]
    assert infill_tokens(_tokenizer(["<|endoftext|>"])) is None


class InfillTokenizer(FakeTokenizer):
    """The fake's characters, and Qwen2.5-Coder's infill tokens as ids 300-305."""

    def __len__(self) -> int:
        return 306

    def get_vocab(self) -> dict[str, int]:
        return super().get_vocab() | {name: 300 + i for i, name in enumerate(QWEN)}


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine(step_s=0.0)
    engine.tokenizer = InfillTokenizer()
    with app_in_thread(lambda: engine) as (url, _):
        yield url, engine


def _complete(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"max_tokens": 4, **body}, timeout=30)


def test_the_engine_gets_the_infill_prompt_and_its_stop_tokens(served) -> None:
    url, engine = served
    for prompt, head in (("ab", [97, 98]), ([120, 121], [120, 121])):
        reply = _complete(url, prompt=prompt, suffix="c", stop_token_ids=[5])
        assert reply.status_code == 200, reply.text
        rid = list(engine.prompt_ids)[-1]
        assert engine.prompt_ids[rid] == [300, *head, 301, 99, 302]
        assert engine.params[rid].stop_token_ids == [5, 303, 304, 305]
        assert reply.json()["usage"]["prompt_tokens"] == len(head) + 4
    _complete(url, prompt="ab")
    assert engine.prompt_ids[list(engine.prompt_ids)[-1]] == [97, 98]  # (no suffix: as it was)


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "ab", "suffix": "c", "echo": True}, "suffix"),
    ({"prompt": [1, 400], "suffix": "c"}, "prompt"),
])
def test_bad_infill_requests_are_400s(served, body, param) -> None:
    url, _ = served
    reply = _complete(url, **body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_a_model_without_infill_tokens_is_a_400_naming_suffix() -> None:
    with app_in_thread(lambda: FakeEngine(step_s=0.0)) as (url, _):
        reply = _complete(url, prompt="ab", suffix="c")
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "suffix" and error["code"] == "suffix_not_supported"
