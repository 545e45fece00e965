"""Engine configuration: one frozen dataclass, a docstring per field. The CLI maps flags onto it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import jinja2

from server.engine.block_manager import SinkWindow
from server.models.config import ModelConfig


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start. Unknown keys are errors (see `from_dict`)."""

    model: str | None = None
    """Local HF directory or .gguf file; None serves the embedded default (SmolLM2-135M)."""
    served_model_name: str | None = None
    """Name the API reports and accepts; defaults to the model's file or folder name."""
    chat_template: str | None = None
    """A Jinja chat template, or the path of a file holding one, rendered instead of the
    model's own (for a model without one, or with one that is wrong); None: the model's."""
    dtype: str = "auto"
    """Compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    quantization: str | None = None
    """Weight-only quantization at load: None (a GGUF's own 4/8-bit tensors are served packed
    on a CPU where the native kernel runs, and on CUDA for models over 2 GiB dense), int8,
    int4, or none (every weight dense)."""
    lora: tuple[tuple[str, float], ...] = ()
    """LoRA adapters (PEFT directories, GGUF adapters) merged into the weights at load, each
    with the scale its alpha / r is multiplied by (`server.models.lora`)."""
    max_model_len: int | None = None
    """Longest prompt + output; defaults to min(model limit, 8192), at most the trained
    context of a LongRoPE model (`ModelConfig.default_context`)."""
    rope_scaling: dict[str, object] | None = None
    """Replaces the model's own RoPE scaling (HF's rope_scaling dict: `{"rope_type":
    "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}`, or linear, llama3,
    default), e.g. YaRN to serve a Qwen model past the context it was trained at; the model
    limit becomes `factor` times that context (`ModelConfig.context_limit`)."""
    max_num_seqs: int = 64
    """Most requests in the running batch."""
    max_num_batched_tokens: int | None = None
    """Token budget of one step (prefill chunks, decode and draft tokens together); None:
    2048 on CUDA (where a step of a small model costs the host's time more than the
    device's: 2.4-3.6x less time to a 6,000-token prompt's first token than 512 on an H100,
    docs/benchmarks/gpu.md, session 42), 512 on a CPU."""
    admit_batch: int | None = None
    """With more requests waiting than the running batch has room for, take them in only
    once this many slots are free (or after 0.1 s, or in a step that computes a prompt
    anyway): see `SchedulerConfig.admit_batch`. None: max_num_seqs // 8 where decode steps
    are CUDA graphs (chosen when a step that took in a prompt ran eagerly, at many decode
    steps' cost; larger ones than `prompt_graph_tokens` still do), else 1 (as soon as
    there is room)."""
    scheduling_policy: str = "fcfs"
    """"fcfs" (arrival order) or "priority" (requests' `priority`, lower first, then
    arrival; a higher value is preempted first): `SchedulerConfig.policy`."""
    max_waiting: int = 256
    """Most requests allowed to wait; more are rejected (HTTP 429)."""
    block_size: int = 16
    """Tokens per KV cache block."""
    num_kv_blocks: int | None = None
    """KV cache size in blocks; None sizes it from kv_cache_memory_gb."""
    kv_cache_memory_gb: float | None = None
    """Memory for the KV cache (a draft model's included) when num_kv_blocks is not given;
    None: on CUDA, what gpu_memory_utilization leaves (`server.engine.kv_cache.kv_budget`),
    elsewhere 1 GiB."""
    gpu_memory_utilization: float = 0.9
    """On CUDA, with neither kv_cache_memory_gb nor num_kv_blocks: the share of the
    device's memory the engine may take. The KV cache gets what is left of it after what
    the device holds already (the weights, the CUDA context, other processes) and what the
    largest step takes beyond that (measured at start-up); CUDA graphs and sampling take
    theirs from the rest of the device."""
    kv_cache_dtype: str = "auto"
    """Element type of the KV cache: auto (the compute dtype), float32, bfloat16 or float16.
    A 16-bit cache under float32 compute (the CPU) holds twice the tokens in the same
    memory and halves what attention reads; keys and values are rounded to it as they are
    written. On CUDA it must be the compute dtype."""
    sliding_window: int | None = None
    """Hybrid KV cache: tokens of recent context the sink + window layers see (besides the
    sinks); their blocks before it return to the pool. None: every layer sees the whole
    context."""
    num_sink_tokens: int = 4
    """With sliding_window: the first tokens every sink + window layer also sees."""
    full_attention_layers: tuple[int, ...] | None = None
    """With sliding_window: the layers that keep full attention (empty: none); None: the
    last and every third before it (`default_full_attention_layers`)."""
    enable_prefix_caching: bool | None = None
    """Keep the KV of computed token blocks, found by a hash of all tokens up to each
    block's end, so that requests which begin the same way (a system prompt, a
    conversation's earlier turns) skip computing it. Full attention only: None turns it
    on unless some layer attends to sinks + a window; True insists (an error with such
    layers); False turns it off."""
    speculative: str | None = None
    """Drafter name (ngram, head, early-exit, ngram-head, draft-model) or None for no
    speculation."""
    speculative_model: str | None = None
    """Trained drafter weights (`leapfrog train-drafter`'s output), for drafters that
    take them (head, early-exit, ngram-head); for draft-model, the draft model (a GGUF
    file or HF directory sharing the target's tokenizer)."""
    num_speculative_tokens: int = 8
    """Most draft tokens per request per step."""
    speculative_disable_by_batch_size: int | None = None
    """With speculation: steps of at least this many requests draft nothing (vLLM's
    `disable_by_batch_size`), whatever the speculation policy would choose; None: the
    policy alone decides."""
    seed: int = 0
    """Seed for requests that give none."""
    enforce_eager: bool = False
    """Disable CUDA graphs and compilation."""
    prompt_graph_tokens: int = 512
    """With CUDA graphs: steps that take in prompts, of up to this many tokens in all (at
    most max_num_batched_tokens), replay graphs captured at start-up
    (`server.engine.cuda_graphs.prompt_buckets`); larger ones run eagerly. 0: every such
    step runs eagerly. On an H100 serving a SmolLM2-135M shape, 512 ran 1.29x, 1.13x and
    1.02x the output tok/s of eager prompt steps at 1, 64 and 256 clients (2048: 1.29x,
    1.07x, 0.94x; docs/benchmarks/gpu.md, session 46)."""
    debug_check_integrity: bool = False
    """Check the KV block manager's integrity after every step (slow)."""
    num_threads: int | None = None
    """CPU threads for torch; None keeps torch's default."""

    def __post_init__(self) -> None:
        """Refuse sizes no engine can run with (a step budget of 0 tokens would never
        schedule anything), naming the field."""
        at_least_one = {
            "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
            "admit_batch": self.admit_batch,
            "block_size": self.block_size, "num_kv_blocks": self.num_kv_blocks,
            "max_model_len": self.max_model_len, "num_threads": self.num_threads,
            "num_speculative_tokens": self.num_speculative_tokens,
            "speculative_disable_by_batch_size": self.speculative_disable_by_batch_size}
        for name, value in at_least_one.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be fcfs or priority, got "
                             f"{self.scheduling_policy!r}")
        if self.prompt_graph_tokens < 0:
            raise ValueError(f"prompt_graph_tokens must be at least 0, got "
                             f"{self.prompt_graph_tokens}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be at least 0, got {self.max_waiting}")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")

    def attention_layout(self, model: ModelConfig, max_model_len: int | None = None,
                         ) -> tuple[frozenset[int], SinkWindow | None]:
        """The layers that attend to sinks + a window, and that window: the model's own
        sliding window (`ModelConfig.window_layers`, no sinks) or, with sliding_window, the
        hybrid cache's; (empty, None) for full attention everywhere. The model's own window
        counts as none where it holds every position of the served context,
        `max_model_len` (Phi-3.5-mini's and Phi-4-mini's 262,144 positions: a window pool
        would be sized for every request's whole context), unless its window layers turn
        by a RoPE of their own (Gemma 3's, chosen by the layers' window); sliding_window
        may then make a hybrid cache of it. Raises ValueError for a window below 1,
        negative sinks, a layer out of range, or sliding_window on a model that has a
        window of its own."""
        n = model.num_layers
        own = model.sliding_window
        if (own is not None and max_model_len is not None and own >= max_model_len
                and model.local_rope_theta is None):
            own = None
        if self.sliding_window is None:
            if self.full_attention_layers is not None:
                raise ValueError("full_attention_layers needs sliding_window")
            if own is None:
                return frozenset(), None
            return frozenset(model.window_layers), SinkWindow(own)
        if own is not None:
            raise ValueError(f"the model attends with its own sliding window of "
                             f"{own} tokens; sliding_window cannot change it")
        window = SinkWindow(self.sliding_window, self.num_sink_tokens)
        full = self.full_attention_layers
        if full is None:
            full = default_full_attention_layers(n)
        wrong = sorted(i for i in full if not 0 <= i < n)
        if wrong:
            raise ValueError(f"full_attention_layers {wrong} out of range: the model has "
                             f"{n} layers")
        windowed = frozenset(range(n)) - set(full)
        return (windowed, window) if windowed else (frozenset(), None)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown engine config keys: {unknown}")
        return cls(**values)  # type: ignore[arg-type]


def read_chat_template(value: str) -> str:
    """`EngineConfig.chat_template`'s template: `value` itself when it is Jinja (holds `{{`
    or `{%`: a real template is too long to be tried as a file name), else the text of the
    file it names. Raises ValueError for a missing file, or for a template Jinja cannot
    parse."""
    if "{{" in value or "{%" in value:
        template = value
    else:
        try:
            template = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):  # (none, a folder, too long a name, binary)
            raise ValueError(f"chat_template {value[:200]!r} is neither a readable file nor "
                             "a Jinja template") from None
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat_template does not parse: {exc} (line {exc.lineno})") from exc
    return template


def default_full_attention_layers(num_layers: int) -> tuple[int, ...]:
    """Full-attention layers of a hybrid cache when none are named: the last layer and every
    third before it (a third of the layers). On the default model (30 layers, window 64,
    1,024 tokens of text) this layout lost the least of the 10-layer layouts tried
    (perplexity 14.4 against 12.7 with full attention; every third from layer 0: 16.4;
    the last ten: 15.7), as well as every second layer (14.3): docs/benchmarks/README.md."""
    return tuple(range((num_layers - 1) % 3, num_layers, 3))
