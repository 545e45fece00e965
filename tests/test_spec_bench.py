"""`leapfrog bench spec`'s lossless check and its counting mode, over fake engines."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from server.benchmarks.spec import _divergence, _measure
from server.metrics import Metrics


@dataclass
class _Result:
    token_ids: list[int]
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_steps: int = 1


class _FakeLLM:
    """Answers each prompt with fixed tokens (prompt -> outputs); with drafts, each generate
    call counts one verification step launched ahead in its engine's metrics."""

    def __init__(self, outputs: dict[tuple[int, ...], list[int]], drafted: int = 0) -> None:
        self.outputs, self.drafted = outputs, drafted
        self.engine = SimpleNamespace(model_name="fake", metrics=Metrics("fake"))

    def generate(self, prompts: list[list[int]], params: list) -> list[_Result]:
        if self.drafted:
            self.engine.metrics.steps_ahead["verification"].inc()
        out = [self.outputs[tuple(p)] for p in prompts]
        return [_Result(o, self.drafted, self.drafted // 2, max(1, len(o) // 2)) for o in out]


def test_divergence_is_the_first_differing_position() -> None:
    assert _divergence([1, 2, 3], [1, 2, 3]) is None
    assert _divergence([1, 2, 3], [1, 5, 3]) == 1
    assert _divergence([1, 2, 3], [1, 2]) == 2
    assert _divergence([], [7]) == 0


def test_measure_fails_on_differing_outputs_unless_counting() -> None:
    prompts = [[1], [2], [3]]
    plain = _FakeLLM({(1,): [4, 5, 6], (2,): [7, 8], (3,): [9]})
    spec = _FakeLLM({(1,): [4, 5, 6], (2,): [7, 0], (3,): [9]}, drafted=4)
    with pytest.raises(RuntimeError, match="lossless check failed"):
        _measure(plain, spec, prompts, [3, 3, 3], batch=2, repeats=1)
    m = _measure(plain, spec, prompts, [3, 3, 3], batch=2, repeats=2, on_mismatch="count")
    assert (m["mismatched"], m["first_divergence"]) == (1, [1])
    assert m["tokens"] == 6 and m["drafted"] == 12 and m["accepted"] == 6
    assert m["verification_steps_ahead"] == 4  # (2 chunks, 2 repeats)
    same = _measure(plain, plain, prompts, [3, 3, 3], batch=1, repeats=1)
    assert (same["mismatched"], same["first_divergence"]) == (0, [])
