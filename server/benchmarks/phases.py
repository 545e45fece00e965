"""`leapfrog bench phases`: where an engine step's time goes, by the step's shape.

One engine (speculation as configured) runs the built-in prompts, batch by batch, and
every step's phases are timed: scheduling, filling a CUDA graph's inputs, the model
(on CUDA the replayed graph's device time, from events around the replay; elsewhere the
forward and LM head), drafting, the scheduler's update of the results and the outputs
(detokenizing, metrics). Steps are grouped by shape: a replayed graph's (bucket, Q) on
CUDA; (requests, most tokens a request) for other decode or verification steps; steps
with a prompt chunk as "prefill", steps that only end requests as "idle". Each cell is a
median in microseconds; "host" is a step's wall time less its model time: what serving
adds to the device (or the CPU's forward). On an H200 this showed that the default
model's verification steps are slow on the device, not the host, at batch 1, and that the
host takes half of a 16-request step with n-gram drafts (docs/benchmarks/gpu.md, run 105).

The timers wrap the engine's own methods on its instances: a benchmark's view of the
internals, not an API.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from server.benchmarks.common import config_of, machine, table, write_json
from server.engine.config import EngineConfig
from server.engine.draft_plan import decoding

PHASES = ("schedule", "fill", "model", "draft", "update", "outputs")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model path (default: the embedded model)")
    p.add_argument("--speculative", default="ngram", help="drafter, or none")
    p.add_argument("--speculative-model", default=None,
                   help="trained drafter weights, or the draft model (draft-model)")
    p.add_argument("--num-speculative-tokens", type=int, default=EngineConfig.num_speculative_tokens)
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--max-tokens", type=int, default=128, help="cap on each prompt's output tokens")
    p.add_argument("--prompts-per-category", type=int, default=3, help="prompts per category at batch 1")
    p.add_argument("--dtype", default="auto", help="compute dtype")
    p.add_argument("--quantization", default=None, help="weight quantization")
    p.add_argument("--result-json", default=None, help="write the tables here")


class StepTimer:
    """Times each step of `engine` by phase (see module docs) between `attach` and
    `detach`."""

    def __init__(self, engine: object) -> None:
        self.engine = engine
        self.totals: dict[str, float] = defaultdict(float)
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.steps: dict[str, list[dict[str, float]]] = defaultdict(list)
        self._shape = "prefill"

    def attach(self) -> None:
        e = self.engine
        runner, graphs = e.runner, e.runner.graphs
        self._wrap(e.scheduler, "schedule", "schedule", self._after_schedule)
        self._wrap(e.scheduler, "update", "update")
        self._wrap(runner, "_draft", "draft")
        self._wrap(e.outputs, "step_outputs", "outputs")
        self._wrap(e.outputs, "ended", "outputs")
        if graphs is None:  # the model's time is its forward and LM head, on the host clock
            self._wrap(e.model, "forward", "model")
            self._wrap(e.model, "compute_logits", "model")
        else:
            self._wrap(graphs, "_fill", "fill")
            for captured in graphs.graphs.values():
                self._time_replays(captured.graph)
        step = e.step

        def timed_step() -> list:
            before, self.events = dict(self.totals), []
            start = time.perf_counter()
            out = step()
            wall = time.perf_counter() - start
            phases = {k: v - before.get(k, 0.0) for k, v in self.totals.items()}
            if self.events:
                self.events[-1][1].synchronize()
                phases["model"] = sum(a.elapsed_time(b) for a, b in self.events) / 1e3
            phases["step"], phases["host"] = wall, wall - phases.get("model", 0.0)
            self.steps[self._shape].append(phases)
            return out

        e.step = timed_step

    def detach(self) -> None:
        """Undo `attach`: drop the instance attributes that shadow the engine's methods."""
        e = self.engine
        for obj in (e, e.scheduler, e.runner, e.outputs, e.model, e.runner.graphs):
            if obj is not None:
                for name in ("step", "schedule", "update", "_draft", "step_outputs", "ended",
                             "forward", "compute_logits", "_fill"):
                    obj.__dict__.pop(name, None)
        if e.runner.graphs is not None:
            for captured in e.runner.graphs.graphs.values():
                captured.graph.__dict__.pop("replay", None)

    def _after_schedule(self, out: object) -> None:
        graphs = self.engine.runner.graphs
        key = graphs.key(out) if graphs is not None else None
        if not out.scheduled:  # (a step that only ends requests)
            self._shape = "idle"
        elif key is not None:
            self._shape = f"graph {key}"
        elif decoding(out.scheduled):
            most = max(s.num_new_tokens for s in out.scheduled)
            self._shape = f"eager ({len(out.scheduled)}, {most})"
        else:
            self._shape = "prefill"

    def _wrap(self, obj: object, name: str, phase: str,
              after: Callable[[object], None] | None = None) -> None:
        inner = getattr(obj, name)

        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            result = inner(*args, **kwargs)
            self.totals[phase] += time.perf_counter() - start
            if after is not None:
                after(result)
            return result

        setattr(obj, name, timed)

    def _time_replays(self, graph: torch.cuda.CUDAGraph) -> None:
        replay = graph.replay

        def timed_replay() -> None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replay()
            end.record()
            self.events.append((start, end))

        graph.replay = timed_replay

    def rows(self) -> list[dict[str, object]]:
        """One row a shape: its step count and the median of each phase, in us."""
        out = []
        for shape, steps in sorted(self.steps.items()):
            row: dict[str, object] = {"shape": shape, "steps": len(steps)}
            for key in ("step", "model", "host", *[p for p in PHASES if p != "model"]):
                row[f"{key}_us"] = round(statistics.median(s.get(key, 0.0) for s in steps) * 1e6, 1)
            out.append(row)
        return out


def run(args: argparse.Namespace) -> int:
    from bench.datasets import load_builtin_prompts
    from server.engine.llm import LLM, chat_prompt_ids
    from server.engine.sampling_params import SamplingParams

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    speculative = None if args.speculative in (None, "none") else args.speculative
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization,
              max_num_seqs=max(batch_sizes), max_num_batched_tokens=1024, speculative=speculative,
              speculative_model=args.speculative_model,
              num_speculative_tokens=args.num_speculative_tokens,
              enable_prefix_caching=False)  # (each step shape as before it)
    tok = llm.tokenizer
    by_cat: dict[str, list] = defaultdict(list)
    for p in load_builtin_prompts():
        by_cat[p.category].append(p)
    llm.generate([tok("warm up").input_ids])
    results = {}
    for batch in batch_sizes:
        timer = StepTimer(llm.engine)
        timer.attach()
        for items in by_cat.values():
            chosen = (items[: args.prompts_per_category] if batch == 1
                      else [items[i % len(items)] for i in range(batch)])
            prompts = [chat_prompt_ids(tok, p.messages) for p in chosen]
            params = [SamplingParams(max_tokens=min(p.max_tokens, args.max_tokens), temperature=0.0)
                      for p in chosen]
            for i in range(0, len(prompts), batch):
                llm.generate(prompts[i : i + batch], params[i : i + batch])
        timer.detach()
        rows = timer.rows()
        results[f"batch {batch}"] = rows
        headers = list(rows[0]) if rows else ["shape"]
        print(f"\nbatch {batch}, speculation {speculative or 'off'} (medians, us):")
        print(table(headers, [list(r.values()) for r in rows]))
    write_json(args.result_json, {"config": config_of(args), "machine": machine(),
                                  "results": results})
    return 0


if __name__ == "__main__":  # `python -m server.benchmarks.phases`: without the CLI's server imports
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
