"""Prompt sources for the load-testing client.

Every source yields `BenchRequest`s: chat messages (or a plain prompt for the completions
endpoint) plus the number of output tokens to ask for. Sources: the built-in prompt set
shipped in `bench/data/prompts.jsonl`, random prompts with spread lengths, ShareGPT-format
JSON, and our own JSONL format (the built-in file's format).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

_WORDS = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force"
).split()


@dataclass(frozen=True)
class BuiltinPrompt:
    """One prompt of the built-in set (shared with `leapfrog bench spec`)."""

    id: str
    category: str
    messages: list[dict[str, str]]
    max_tokens: int


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: chat messages and the output budget. Its prompt's token count
    comes later, from the server's usage or a tokenizer."""

    id: str
    messages: list[dict[str, str]]
    max_tokens: int

    def prompt_text(self) -> str:
        """The messages flattened to one prompt, for the completions endpoint."""
        if len(self.messages) == 1:
            return self.messages[0]["content"]
        return "".join(f"{m['role']}: {m['content']}\n" for m in self.messages) + "assistant:"


class TokenizerLike(Protocol):
    """The slice of a `transformers` tokenizer that the datasets use."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def _parse_prompt_line(obj: dict[str, Any], where: str, index: int) -> BuiltinPrompt:
    messages = obj.get("messages")
    if messages is None and "prompt" in obj:
        messages = [{"role": "user", "content": str(obj["prompt"])}]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: line {index + 1}: needs 'messages' (a non-empty list) or 'prompt'")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: line {index + 1}: each message needs 'role' and 'content'")
    return BuiltinPrompt(
        id=str(obj.get("id", f"{Path(where).stem}-{index}")),
        category=str(obj.get("category", "custom")),
        messages=[{"role": str(m["role"]), "content": str(m["content"])} for m in messages],
        max_tokens=int(obj.get("max_tokens", 128)),
    )


def load_jsonl_prompts(path: str | Path) -> list[BuiltinPrompt]:
    """Read our JSONL format: one object per line with `messages` (or `prompt`),
    optional `id`, `category`, `max_tokens` (default 128)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [
        _parse_prompt_line(json.loads(line), str(path), i)
        for i, line in enumerate(lines)
        if line.strip()
    ]


def load_builtin_prompts() -> list[BuiltinPrompt]:
    """The built-in prompt set (`bench/data/prompts.jsonl`), in file order."""
    text = resources.files("bench").joinpath("data/prompts.jsonl").read_text(encoding="utf-8")
    return [
        _parse_prompt_line(json.loads(line), "prompts.jsonl", i)
        for i, line in enumerate(text.splitlines())
        if line.strip()
    ]


def _cycle_sample(prompts: list[BuiltinPrompt], n: int, seed: int) -> list[BuiltinPrompt]:
    """n prompts: shuffled passes over the set, so every prompt is used before any repeats."""
    rng = random.Random(seed)
    out: list[BuiltinPrompt] = []
    while len(out) < n:
        batch = list(prompts)
        rng.shuffle(batch)
        out.extend(batch[: n - len(out)])
    return out


def prompts_to_requests(
    prompts: list[BuiltinPrompt], n: int, seed: int, output_len: int | None
) -> list[BenchRequest]:
    """Turn prompt records into n requests (cycling), overriding max_tokens if asked."""
    if not prompts:
        raise ValueError("the dataset has no prompts")
    return [
        BenchRequest(
            id=f"{p.id}#{i}", messages=p.messages,
            max_tokens=output_len if output_len is not None else p.max_tokens,
        )
        for i, p in enumerate(_cycle_sample(prompts, n, seed))
    ]


def _spread(rng: random.Random, center: int, ratio: float) -> int:
    low, high = max(1, int(center * (1 - ratio))), max(1, int(center * (1 + ratio)))
    return rng.randint(low, high)


def random_requests(
    n: int, input_len: int, output_len: int, range_ratio: float, seed: int,
    tokenizer: TokenizerLike | None = None,
) -> list[BenchRequest]:
    """Random prompts with lengths uniform in [len*(1-r), len*(1+r)].

    With a tokenizer the prompt is decoded from random token ids (like vLLM's random
    dataset), so lengths are close to tokens after re-encoding; without one it is random
    common English words, about one token each.
    """
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        in_len, out_len = _spread(rng, input_len, range_ratio), _spread(rng, output_len, range_ratio)
        if tokenizer is not None:
            ids = [rng.randrange(1000, 20000) for _ in range(in_len)]
            text = tokenizer.decode(ids)
        else:
            text = " ".join(rng.choice(_WORDS) for _ in range(in_len))
        out.append(BenchRequest(f"random-{i}", [{"role": "user", "content": text}], out_len))
    return out


def sharegpt_requests(
    path: str | Path, n: int, seed: int, output_len: int | None,
    tokenizer: TokenizerLike | None = None,
) -> list[BenchRequest]:
    """First human turn of each ShareGPT conversation; the output budget is the length of
    the first reply (tokens with a tokenizer, else words * 4/3), or --output-len.

    Like vLLM, conversations with fewer than two turns are skipped, and so are pairs whose
    prompt or reply is under 4 tokens, prompt over 1024, or prompt + reply over 2048.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    pairs = [
        (c["conversations"][0]["value"], c["conversations"][1]["value"])
        for c in data
        if len(c.get("conversations", [])) >= 2
    ]
    random.Random(seed).shuffle(pairs)

    def count(text: str) -> int:
        if tokenizer is not None:
            return len(tokenizer.encode(text, add_special_tokens=False))
        return max(1, round(len(text.split()) * 4 / 3))

    out: list[BenchRequest] = []
    for prompt, reply in pairs:
        if len(out) == n:
            break
        p_len, r_len = count(prompt), count(reply)
        if p_len < 4 or r_len < 4 or p_len > 1024 or p_len + r_len > 2048:
            continue
        out.append(BenchRequest(
            id=f"sharegpt-{len(out)}", messages=[{"role": "user", "content": prompt}],
            max_tokens=output_len if output_len is not None else r_len,
        ))
    if len(out) < n:
        raise ValueError(f"{path}: only {len(out)} usable conversations, --num-prompts is {n}")
    return out


@dataclass(frozen=True)
class RandomSpec:
    """Lengths for `--dataset random`."""

    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.25


def load_requests(
    spec: str, n: int, seed: int, output_len: int | None,
    random_spec: RandomSpec = RandomSpec(), tokenizer: TokenizerLike | None = None,
) -> list[BenchRequest]:
    """Requests for a `--dataset` value: builtin, random, sharegpt:PATH or jsonl:PATH."""
    if n < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {n}")
    kind, _, path = spec.partition(":")
    if kind == "builtin" and not path:
        return prompts_to_requests(load_builtin_prompts(), n, seed, output_len)
    if kind == "random" and not path:
        reqs = random_requests(n, random_spec.input_len, random_spec.output_len,
                               random_spec.range_ratio, seed, tokenizer)
        if output_len is None:
            return reqs
        return [replace(r, max_tokens=output_len) for r in reqs]
    if kind == "sharegpt" and path:
        return sharegpt_requests(path, n, seed, output_len, tokenizer)
    if kind == "jsonl" and path:
        return prompts_to_requests(load_jsonl_prompts(path), n, seed, output_len)
    raise ValueError(f"--dataset must be builtin, random, sharegpt:PATH or jsonl:PATH; got {spec!r}")
