"""The synchronous engine: schedule -> launch -> finish -> update, then the step's outputs
(`output_processor`).

`LLMEngine.step()` runs one step and returns a `RequestOutput` delta for every request that
produced tokens or finished (on CUDA, those of the step before: its outputs are made while
the device runs the step). The async client (`async_engine`) and the offline API (`llm`)
both drive it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import partial

import torch

from drafters.base import drafter_for_target
from server.engine.config import EngineConfig, read_chat_template
from server.engine.contracts import RunnerOutput, SampledTokens, SchedulerOutput
from server.engine.kv_cache import kv_budget, kv_pools, step_peak_memory
from server.engine.output_processor import OutputProcessor
from server.engine.outputs import RequestOutput
from server.engine.request import Request
from server.engine.runner import PROMPT_LOGPROB_ROWS, Launched, ModelRunner
from server.engine.sampling_params import SamplingParams, SamplingParamsError
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.spec_policy import SpecPolicy
from server.engine.structured import Grammars
from server.metrics import Metrics
from server.models.loader import build_model, open_checkpoint
from server.models.lora import read_adapter

log = logging.getLogger("leapfrog.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_kv_dtype(name: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's element type: `dtype` (the compute dtype) for auto; on CUDA only that."""
    kv = dtype if name == "auto" else _DTYPES.get(name)
    if kv is None:
        raise ValueError(f"unknown kv_cache_dtype {name!r}; choose from auto, "
                         f"{', '.join(_DTYPES)}")
    if device.type == "cuda" and kv != dtype:
        raise ValueError(f"kv_cache_dtype {name} differs from the compute dtype {dtype}: on "
                         "CUDA the KV cache takes the compute dtype")
    return kv


@dataclass
class _Emitted:
    """A step's new tokens by request (`Scheduler.update`) and the runner's results."""

    emitted: list[tuple[Request, list[int]]]
    sampled: dict[str, SampledTokens]


class LLMEngine:
    """Loads the model and runs steps; not thread-safe (one driver thread)."""

    def __init__(self, config: EngineConfig) -> None:
        if config.speculative_model is not None and not config.speculative:
            raise ValueError("speculative_model needs a drafter (speculative)")
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        if config.max_num_batched_tokens is None:
            config = replace(config, max_num_batched_tokens=(
                2048 if self.device.type == "cuda" else 512))
        self.config = config
        dtype = resolve_dtype(config.dtype, self.device)
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, dtype, self.device)
        checkpoint = open_checkpoint(config.model)
        if config.rope_scaling is not None:
            checkpoint.config = replace(checkpoint.config, rope_scaling=config.rope_scaling)
        self.model_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        if config.chat_template is not None:
            self.tokenizer.chat_template = read_chat_template(config.chat_template)
        self.model_name = config.served_model_name or checkpoint.path.name.removesuffix(".gguf")
        limit = checkpoint.config.context_limit
        if config.max_model_len and config.max_model_len > limit:
            log.warning("max_model_len %d is past the model's limit of %d positions "
                        "(max_position_embeddings, or its RoPE scaling's); serving %d",
                        config.max_model_len, limit, limit)
        self.max_model_len = min(config.max_model_len or checkpoint.config.default_context,
                                 limit)
        adapters = [read_adapter(path, scale, checkpoint.config) for path, scale in config.lora]
        self.model = build_model(checkpoint, dtype, self.device, self.max_model_len,
                                 config.quantization, adapters)
        windowed, window = config.attention_layout(self.model_config, self.max_model_len)
        policy = SpecPolicy(config.num_speculative_tokens,
                            disable_by_batch_size=config.speculative_disable_by_batch_size
                            ) if config.speculative else None
        drafter = (drafter_for_target(config.speculative, self.model, config.speculative_model)
                   if config.speculative else None)
        if drafter is not None:
            drafter.check_tokenizer(self.tokenizer)
        # the largest step: a full token budget, with a logits row for each sequence's
        # verified tokens (or a prompt's logprobs, PROMPT_LOGPROB_ROWS rows at a time)
        tokens = config.max_num_batched_tokens
        rows = max(config.max_num_seqs * (1 + config.num_speculative_tokens * bool(policy)),
                   PROMPT_LOGPROB_ROWS)
        budget = kv_budget(config, self.device, partial(
            step_peak_memory, self.model, self.device, tokens, min(rows, tokens),
            self.max_model_len, config.block_size, windowed, window, self.kv_dtype))
        self.blocks = kv_pools(
            self.model_config, config, self.max_model_len, self.kv_dtype, windowed, window,
            budget, drafter.kv_bytes_per_block(config.block_size, self.kv_dtype) if drafter else 0)
        graphed = self.device.type == "cuda" and not config.enforce_eager
        if graphed and self.model_config.num_experts:
            log.info("no CUDA graphs: a mixture of experts groups its tokens on the host "
                     "(server.models.moe); steps run eagerly")
            graphed = False
        admit_batch = (config.admit_batch if config.admit_batch is not None
                       else max(1, config.max_num_seqs // 8) if graphed else 1)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                            admit_batch, policy=config.scheduling_policy),
            self.blocks, policy, draft_slots=bool(drafter and drafter.num_draft_layers),
        )
        self.runner = ModelRunner(self.model, self.blocks, self.device, drafter, windowed,
                                  self.kv_dtype)
        if drafter is not None:
            drafter.prepare()
        if self.device.type == "cuda":  # (prefill and verification shapes: see warm_up)
            self.runner.warm_up(min(config.max_num_batched_tokens, self.max_model_len, 128))
        if graphed:
            # (verification of k drafts runs k + 1 tokens a sequence)
            self.runner.enable_cuda_graphs(
                config.max_num_seqs, self.max_model_len,
                1 + config.num_speculative_tokens * bool(policy),
                min(config.max_num_batched_tokens, config.prompt_graph_tokens))
            if policy is not None:  # decoding steps are replayed padded: drafts choose one Q
                policy.buckets = tuple(self.runner.graphs.buckets)
                policy.query_buckets = self.runner.graphs.query_buckets
                drafter.capture_graphs(policy.buckets,
                                       [q - 1 for q in policy.query_buckets if q > 1])
        self.drafter = drafter
        self.metrics = Metrics(self.model_name)
        full_pools = [p for p in self.blocks.pools if p.window is None]
        window_pools = [p for p in self.blocks.pools if p.window is not None]
        self.metrics.cache_config(
            block_size=config.block_size,
            num_blocks=full_pools[0].num_blocks if full_pools else 0,
            num_window_blocks=window_pools[0].num_blocks if window_pools else 0,
            cache_dtype=str(self.kv_dtype).removeprefix("torch."),
            enable_prefix_caching=bool(full_pools and full_pools[0].cache_prefixes),
            kv_cache_gib=f"{self.model.kv_cache_bytes() / 2**30:.3f}")
        self.eos_token_ids = tuple(sorted(set(checkpoint.config.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        )))
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids, self.scheduler,
                                       drafter, self.metrics)
        self.grammars = Grammars(self.tokenizer, checkpoint.config.vocab_size)
        self._seed_rng = torch.Generator().manual_seed(config.seed)
        self._drafting = 0.0  # seconds the previous step spent drafting this step's tokens
        self._pending: _Emitted | None = None  # a step's results whose outputs are not made
        # the outputs of a step are made during the next step's device work (see `step`)
        self.overlap_outputs = self.device.type == "cuda"
        # a decode step launched before the one it follows finished (see `step`)
        self._ahead: tuple[SchedulerOutput, Launched] | None = None
        self.launch_ahead = self.runner.graphs is not None
        # a verification step launched before the one it follows finished, its inputs
        # drafted on the device (a drafter with `device_drafts`; see `step`)
        self.verify_ahead = self.launch_ahead

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises ValueError for a prompt that can never fit."""
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(t < 0 or t >= vocab for t in [*params.logit_bias, *params.stop_token_ids,
                                               *params.logprob_token_ids,
                                               *params.allowed_token_ids]):
            raise ValueError(f"logit_bias, stop_token_ids, logprob_token_ids and "
                             f"allowed_token_ids take token ids in [0, {vocab})")
        if params.priority and self.config.scheduling_policy != "priority":
            raise SamplingParamsError("priority", "priority scheduling is off: a request's "
                                      "priority must be 0 unless the engine runs with "
                                      "--scheduling-policy priority")
        generator = torch.Generator()
        seed = params.seed if params.seed is not None else int(
            torch.randint(0, 2**62, (1,), generator=self._seed_rng)
        )
        generator.manual_seed(seed)
        request = Request(request_id, list(prompt_token_ids), params, self.eos_token_ids,
                          generator=generator, seed=seed)
        if params.structured is not None:
            request.grammar = self.grammars.matcher(*params.structured)
        self.scheduler.add_request(request)
        self.outputs.track(request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Finish a request now (its blocks return to the pool); None if unknown."""
        self.scheduler.finish_request(request_id, "abort")
        return self.outputs.abort(request_id)

    def has_unfinished(self) -> bool:
        return (self.scheduler.has_work() or self._pending is not None
                or self._ahead is not None)

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run a step; return the outputs of the requests that got tokens or finished. With
        `overlap_outputs` (CUDA), a step's outputs (detokenizing, stop strings, metrics)
        are made while the device runs the next step, and returned by that step's call:
        the host's share of a small model's step on a GPU is large (docs/benchmarks/gpu.md,
        run 105). A request that a stop string ends then computes one token more, dropped.
        With `launch_ahead` (CUDA graphs), a decode step whose tokens the device computes,
        and after which no request drafts, has the next decode step queued behind it before
        the host waits for it (`Scheduler.schedule_ahead`; its input tokens go from one step
        to the next on the device), so the device does not idle while the host takes in a
        step and schedules the next; that step is this method's next call's. With
        `verify_ahead` too, a verification step whose graph drafted every request's next
        step on the device has that step queued behind it likewise
        (`Scheduler.schedule_verify_ahead`): its tokens, positions and drafts go from one
        step to the next on the device. A request that a stop token or string ends
        computes up to two steps' tokens more, dropped.
        """
        start = time.perf_counter()
        if self._ahead is not None:  # launched by the last call: its inputs are in place
            (sched, launched), self._ahead = self._ahead, None
        else:
            sched = self.scheduler.schedule()
            if sched.preempted:
                self.metrics.num_preemptions.inc(len(sched.preempted))
            if sched.prefix_queries:
                self.metrics.prefix_cache_queries.inc(sched.prefix_queries)
                self.metrics.prefix_cache_hits.inc(sched.prefix_hits)
            launched = self.runner.launch(sched) if sched.scheduled else None
        if launched is not None and self.launch_ahead and launched.tokens:
            kind, ahead = "decode", self.scheduler.schedule_ahead(sched)
            if ahead is None and launched.next_ids is not None and self.verify_ahead:
                kind, ahead = "verification", self.scheduler.schedule_verify_ahead(sched)
            if ahead is not None:
                self._ahead = ahead, self.runner.launch(ahead, after=launched)
                self.metrics.steps_ahead[kind].inc()
        outputs = self._flush() + self.outputs.ended(sched.ended)
        if launched is None:
            return outputs
        result = self.runner.finish(launched)
        self._pending = _Emitted(
            self.scheduler.update(sched, result, self._ahead[0] if self._ahead else None),
            result.sampled)
        if not self.overlap_outputs:
            outputs += self._flush()
        if self.config.debug_check_integrity:
            self.blocks.check_integrity()
        seconds = time.perf_counter() - start - result.draft_seconds + self._drafting
        self._drafting = result.draft_seconds
        self._record_step_cost(sched, result, seconds)
        return outputs

    def _flush(self) -> list[RequestOutput]:
        """The outputs of the step whose results are pending (none if none is), and its
        metrics; requests aborted since get none."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        outputs = self.outputs.step_outputs(pending.emitted, pending.sampled)
        self._record_gauges()
        return outputs

    def _record_step_cost(self, sched: SchedulerOutput, result: RunnerOutput, seconds: float) -> None:
        """Feed decode/verify-only step times to the speculation policy's cost tables: a
        replay's by its requests and tokens a request (padding included), others by the
        tokens computed. The time is the whole step's (scheduling, the forward, verification,
        the outputs), as drafting changes all of it: on a GPU a small model's step is mostly
        such host work. Its drafting is the one that made its drafts, at the end of the
        step before, not the one it does for the next step, which the next step's size
        pays for: a plain step after which requests draft is still a plain step. No step
        captures a graph (`capture_all` runs at start-up): a capture's time, taken for a
        step's, would price its size out of the policy's reach for good."""
        policy = self.scheduler.spec_policy
        if policy is None:
            return
        if all(s.num_new_tokens == 1 + len(s.spec_token_ids) for s in sched.scheduled):
            if result.query_len is not None:
                policy.observe_padded(len(sched.scheduled), result.query_len, seconds)
            else:
                policy.costs.observe(sched.num_batched_tokens, seconds)

    def _record_gauges(self) -> None:
        m = self.metrics
        m.num_requests_running.set(len(self.scheduler.running))
        m.num_requests_waiting.set(len(self.scheduler.waiting))
        m.kv_cache_usage_perc.set(self.blocks.usage)
