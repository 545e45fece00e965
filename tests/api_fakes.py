"""A fake engine with AsyncEngine's interface, for fast API tests that need no model.

Tokens are characters (id = code point < 256, EOS = 256). The fake "generates" the alphabet
from a start letter picked by the prompt and seed, one token every `step_s` seconds, applies
stop strings and max_tokens like the real engine, and records aborted requests.
"""

from __future__ import annotations

import asyncio
import string
from collections.abc import AsyncIterator

from server.engine.async_engine import EngineStats, QueueFullError
from server.engine.outputs import RequestOutput, TokenLogprob
from server.engine.sampling_params import SamplingParams
from server.metrics import Metrics

EOS = 256


class FakeTokenizer:
    """Character-level tokenizer with a trivial chat template."""

    eos_token_id = EOS
    chat_template = "<{role}>{content} for each message, then <assistant>"

    def __len__(self) -> int:
        return EOS + 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i < EOS)

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(EOS)}

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool,
                            add_generation_prompt: bool) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeEngine:
    """Implements the AsyncEngine interface the API uses."""

    def __init__(self, step_s: float = 0.002, max_waiting: int = 100, max_model_len: int = 256,
                 total_blocks: int = 64) -> None:
        self.tokenizer = FakeTokenizer()
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.hidden_size = 8
        self.generates = True
        self.pooling = None
        self.peak_active = 0
        """The most requests in flight at once so far."""
        self.metrics = Metrics(self.model_name)
        self.step_s, self.max_waiting, self.total_blocks = step_s, max_waiting, total_blocks
        self.active: set[str] = set()
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.params: dict[str, SamplingParams] = {}
        self.prompt_ids: dict[str, list[int]] = {}
        self.alive = True

    def script(self, prompt: list[int], params: SamplingParams) -> str:
        start = (sum(prompt) + (params.seed or 0)) % 26
        letters = string.ascii_lowercase
        return (letters[start:] + letters[:start]) * 10

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if len(self.active) >= self.max_waiting:
            raise QueueFullError("full")
        self.active.add(request_id)
        self.peak_active = max(self.peak_active, len(self.active))
        self.params[request_id] = params
        self.prompt_ids[request_id] = list(prompt_token_ids)
        text, sent, n = "", 0, 0
        try:
            for ch in self.script(prompt_token_ids, params)[: params.max_tokens]:
                await asyncio.sleep(self.step_s)
                n += 1
                text += ch
                hit = next((s for s in params.stop if s in text), None)
                visible = text if hit is None else text[: text.index(hit)]
                new_text, sent = visible[sent:], max(sent, len(visible))
                done = hit is not None or n == params.max_tokens
                reason = ("stop" if hit else "length") if done else None
                logprobs = None
                if params.logprobs is not None:
                    top = [(ord(ch) + j, -0.5 - j) for j in range(params.logprobs)]
                    logprobs = [TokenLogprob(ord(ch), -0.5, top)]
                embedding = None
                if done and params.pooling is not None:  # (a one-hot vector: which the prompt says)
                    embedding = [0.0] * self.hidden_size
                    embedding[sum(prompt_token_ids) % self.hidden_size] = 1.0
                yield RequestOutput(request_id, [ord(ch)], new_text, len(prompt_token_ids),
                                    n, logprobs, done, reason, stop_reason=hit,
                                    embedding=embedding)
                if done:
                    self.finished.append(request_id)
                    self.metrics.request_success(reason)
                    return
        finally:
            if request_id not in self.finished:
                self.aborted.append(request_id)
            self.active.discard(request_id)

    def abort(self, request_id: str) -> None:
        self.active.discard(request_id)

    def is_alive(self) -> bool:
        return self.alive

    def stats(self) -> EngineStats:
        used = 2 * len(self.active)
        return EngineStats(len(self.active), 0, self.total_blocks - used, self.total_blocks)

    def shutdown(self) -> None:
        self.alive = False

