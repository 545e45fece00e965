"""GPU decode benchmark: a Llama-3-8B-shaped model with random weights, and the default model.

`python3 -m server.benchmarks.gpu_decode [--gguf PATH] [--json OUT.json]` on a CUDA machine.
What each number times:

- ``ours``: one decode step of our model through `CudaGraphRunner.step` (CUDA graph replay,
  or the same padded step run eagerly): host-side input fill, one host-to-device copy per
  buffer, the forward, LM head and greedy argmax (in the graph, as the engine runs them),
  and reading the greedy next tokens back to the host (the step's one sync). The
  scheduler, sampler and detokenizer are not in it. tok/s = batch / median seconds per
  step, at a context of `--context` tokens. ``nopdl``: the same with
  programmatic dependent launch off (`kernels.pdl`). ``device``: the batch-1 graph replayed
  back to back with no host work between steps (device time alone; the gap to ``ours``
  is the host's share). ``device_nosums``: the same with the packed GEMVs merging their
  own split-K partials (`kernels.gemv_sums.sums_disabled`); ``device_autotuned``: the
  same with the GEMVs' configurations picked by the autotuner in this process instead of
  the device's table (`kernels.gemv_table.disabled`); best of two alternating rounds each.
- ``transformers``: `generate` (greedy, eager, its default cache) on the very same weights in
  the same process; tok/s over new tokens without the prefill: (N - 1) / (t(N) - t(1)).
- ``roofline``: measured copy bandwidth (bytes read + written per second of a device copy) /
  bytes of every weight a decode step reads (all projections, packed or dense, the LM head
  and norms; not the embedding table, of which a step reads one row per token).
  ``pct_roofline_all`` counts the embedding table too, as issue 5's goal does.
- ``engine``: the default model through `LLM.generate`, everything from scheduling to text;
  tok/s = generated tokens / wall seconds (median of `--repeats` runs), graphs on vs
  `enforce_eager`, the file's Q4_1 weights dequantized to bf16 (the default for a model
  this small) vs served packed (`quantization="int4"`); ``in_turn``: with graphs, the same
  engine with decode steps launched only once the step before has finished
  (`LLMEngine.launch_ahead` off), alternating with the runs as served; ``step_only``
  times the engine's model through `CudaGraphRunner.step` as for the 8B rows.
- ``graph costs`` (`--graph-costs`): the default model's graph of each (batch, Q) replayed
  back to back, device time of one step; Q = 1 decodes, Q > 1 verifies Q - 1 drafts.

int8/int4 are round-to-nearest (int8 per channel, int4 groups of 128) of every projection
including the LM head.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kernels import gemv_table, pdl
from kernels.bench_gpu import copy_bandwidth, tuned_configs
from kernels.gemv_sums import sums_disabled
from kernels.quant import to_words
from server.benchmarks.gpu_steps import (
    decode_runner,
    graph_costs,
    print_graph_costs,
    time_decode,
    time_replays,
)
from server.models.config import config_from_hf
from server.models.llama import LlamaForCausalLM
from server.models.quantize import linear_modules, quantize_dense


def llama3_8b():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def build_models(hf_config) -> tuple[torch.nn.Module, LlamaForCausalLM]:
    """transformers' model with its random init on the GPU, and ours loaded from it."""
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).eval()
        ours = LlamaForCausalLM(config_from_hf(hf_config.to_dict()), torch.bfloat16, 4096)
    ours.load_weights(hf.state_dict().items())
    return hf, ours.eval()


def time_transformers(hf: torch.nn.Module, prompt_len: int, new_tokens: int) -> float:
    """Decode tokens/s of `generate` at batch 1, prefill excluded."""
    ids = torch.randint(0, hf.config.vocab_size, (1, prompt_len), device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(2)
    return (new_tokens - 1) / (run(new_tokens) - run(1))


def weight_bytes(model: LlamaForCausalLM) -> int:
    """Bytes a decode step reads from weights (see module docs)."""
    total = 0
    for _, lin in linear_modules(model):
        total += lin.packed.nbytes() if lin.packed is not None else lin.weight.nbytes
    norms = [model.norm] + [p for layer in model.layers for p in (layer.input_norm, layer.post_norm)]
    return total + sum(p.nbytes for p in norms)


PROJECTIONS = ("qkv", "o", "gate_up", "down")  # a decoder layer's linear layers, in order


def profile_step(model: LlamaForCausalLM, context: int, steps: int = 8) -> list[tuple]:
    """Where a batch-1 decode step's device time goes, as served: (kernel, launches per
    step, marginal microseconds per step), largest first, from torch.profiler over the
    step's CUDA graph replayed `steps` times back to back, PDL on (`marginal_times`). The
    kernel of the linear layers (one launch each: 4 a layer and the LM head) is broken
    down by layer, in launch order: "name [gate_up]"."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with decode_runner(model, 1, context, 1) as (runner, tables), torch.inference_mode():
        runner.step(1, 1, [context], [[1]], tables)  # captures (compiles and tunes first)
        graph = runner.graphs[(1, 1)].graph
        for _ in range(2):
            graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                graph.replay()
            torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    names = label_linears([e.name for e in events], steps, model.config.num_layers)
    return marginal_times([(name, e.time_range.start, e.time_range.end)
                           for name, e in zip(names, events, strict=True)], steps)


def marginal_times(events: list[tuple[str, float, float]], steps: int) -> list[tuple]:
    """(name, launches per step, marginal time per step) by kernel name, largest first, of
    kernels (name, start, end) in start order over `steps` steps. A kernel's marginal time
    is how far it moves the latest end of the kernels before it (0 when it ends within
    them): with PDL a kernel starts during its predecessor and waits, so its own duration
    counts the wait; the marginal times add up to the span from the first start."""
    totals: dict[str, list[float]] = {}
    latest = events[0][1] if events else 0.0
    for name, _, end in events:
        entry = totals.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += max(end - latest, 0.0)
        latest = max(latest, end)
    rows = [(name, n / steps, t / steps) for name, (n, t) in totals.items()]
    return sorted(rows, key=lambda r: -r[2])


def label_linears(names: list[str], steps: int, layers: int) -> list[str]:
    """Kernel names of `steps` decode steps in launch order, with each launch of the
    kernel that runs the linear layers (the one launched exactly once per linear layer
    and step) labelled by its layer: "name [qkv]" ... "name [lm_head]"."""
    linears = len(PROJECTIONS) * layers + 1
    launches: dict[str, int] = {}
    for name in names:
        launches[name] = launches.get(name, 0) + 1
    index: dict[str, int] = {}
    out = []
    for name in names:
        if launches[name] == steps * linears:
            i = index[name] = index.get(name, -1) + 1
            layer = i % linears
            name += (" [lm_head]" if layer == linears - 1
                     else f" [{PROJECTIONS[layer % len(PROJECTIONS)]}]")
        out.append(name)
    return out


def print_profile(mode: str, rows: list[tuple], step_seconds: float) -> None:
    total = sum(us for _, _, us in rows)
    print(f"profile {mode}: kernels' marginal time {total:.0f} us a step (graph replays back "
          f"to back, PDL on); graphed step {step_seconds * 1e6:.0f} us", flush=True)
    for name, calls, us in rows[:16]:
        print(f"  {us:8.1f} us {100 * us / total:5.1f}% {calls:6.1f}x {us / calls:7.2f} us  "
              f"{name[:70]}", flush=True)


MODES = ("bf16", "int8", "int4")  # the 8B model's weights: dense, or packed by quantize_dense


def bench_8b(bandwidth: float, context: int, hf_tokens: int, profile: bool = False,
             modes: tuple[str, ...] = MODES) -> list[dict]:
    hf, model = build_models(llama3_8b())
    hf_tps = time_transformers(hf, context, hf_tokens)
    del hf
    torch.cuda.empty_cache()
    packs = {mode: {} if mode == "bf16" else
             {name: to_words(quantize_dense(lin.weight, mode))
              for name, lin in linear_modules(model)} for mode in modes}
    rows = []
    for mode, pack in packs.items():
        for name, lin in linear_modules(model):
            lin.packed = pack.get(name)
        roof = bandwidth / weight_bytes(model)
        roof_all = bandwidth / (weight_bytes(model) + model.embed.weight.nbytes)
        b1 = 1 / time_decode(model, 1, context, 64, graphed=True)
        with pdl.disabled():  # the same step, every kernel launched after the last ends
            b1_nopdl = 1 / time_decode(model, 1, context, 64, graphed=True)
        b1_eager = 1 / time_decode(model, 1, context, 16, graphed=False)
        b1_device, b1_nosums, b1_autotuned = 0.0, 0.0, 0.0
        for _ in range(2):  # alternating: the device's time as served, without GemvSums,
            # and with the autotuner's picks instead of the device's table
            b1_device = max(b1_device, 1 / time_replays(model, context, 64))
            with sums_disabled():
                b1_nosums = max(b1_nosums, 1 / time_replays(model, context, 64))
            with gemv_table.disabled():
                b1_autotuned = max(b1_autotuned, 1 / time_replays(model, context, 64))
        b64 = 64 / time_decode(model, 64, context, 16, graphed=True)
        rows.append(dict(model="llama3-8b-shape", mode=mode, weight_gb=weight_bytes(model) / 1e9,
                         roofline_tps=roof, batch1_tps=b1, batch1_nopdl_tps=b1_nopdl,
                         batch1_eager_tps=b1_eager, batch1_device_tps=b1_device,
                         batch1_device_nosums_tps=b1_nosums,
                         batch1_device_autotuned_tps=b1_autotuned,
                         pct_roofline=100 * b1 / roof, pct_roofline_all=100 * b1 / roof_all,
                         batch64_tps=b64,
                         transformers_tps=hf_tps, x_transformers=b1 / hf_tps))
        print_rows(rows[-1:])
        if profile:
            print_profile(mode, profile_step(model, context), 1 / b1)
    for _, lin in linear_modules(model):
        lin.packed = None
    return rows


DEFAULT_CONFIGS = {"graphs": (False, None), "eager": (True, None), "int4": (False, "int4")}


def bench_default(path: str, configs: list[str], repeats: int = 3) -> list[dict]:
    """The real default model through the engine, batch 1 and 32, in `configs` (keys of
    DEFAULT_CONFIGS: bf16 with graphs, bf16 eager, int4 packed with graphs); each timing
    `repeats` times in a row, the median reported beside every run (the host's share of a
    step makes single runs noisy)."""
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    rows = []
    for eager, quantization in (DEFAULT_CONFIGS[c] for c in configs):
        # (no prefix caching: repeated prompts are computed each time, as before it)
        llm = LLM(path, enforce_eager=eager, max_num_seqs=32, kv_cache_memory_gb=2.0,
                  quantization=quantization, enable_prefix_caching=False)
        answer = llm.generate(["What is the capital of France?"],
                              SamplingParams(max_tokens=16, temperature=0.0), chat=True)[0].text
        prompts = [llm.encode(f"Write a long story about the number {i}.") for i in range(32)]
        weights = "Q4_1 packed" if quantization else "bf16 dense, the default"
        row = dict(model=f"default (SmolLM2-135M, {weights})", mode="eager" if eager else "graphs",
                   pdl=bool(pdl.ENABLED), answer=answer)
        ahead = llm.engine.launch_ahead
        for batch, tokens in ((1, 256), (32, 128)):
            params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
            llm.generate(prompts[:batch], SamplingParams(max_tokens=4, ignore_eos=True))
            runs: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(repeats):
                for on in (True, False) if ahead else (False,):
                    llm.engine.launch_ahead = on
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    out = llm.generate(prompts[:batch], params)
                    runs[on].append(sum(len(c.token_ids) for c in out)
                                    / (time.perf_counter() - start))
            llm.engine.launch_ahead = ahead
            served = runs[ahead]
            row[f"batch{batch}_tps"] = statistics.median(served)
            row[f"batch{batch}_runs"] = [round(r) for r in served]
            if ahead:
                row[f"batch{batch}_in_turn_tps"] = statistics.median(runs[False])
        if not eager:  # the same model's decode step alone: the rest is host-side engine work
            row["step_only_batch1_tps"] = 1 / time_decode(llm.engine.model, 1, 256, 64, True)
        rows.append(row)
        print_rows(rows[-1:])
        del llm
        torch.cuda.empty_cache()
    return rows


def bench_graph_costs(path: str, context: int) -> list[dict]:
    """`graph_costs` of the default model at batches 1-16 and Q up to 9 (8 drafts), its
    weights in bf16 and Q4_1-packed."""
    from server.engine.llm import LLM

    rows = []
    for quantization in (None, "int4"):
        llm = LLM(path, enforce_eager=True, max_num_seqs=1, kv_cache_memory_gb=0.5,
                  quantization=quantization, enable_prefix_caching=False)
        weights = "Q4_1 packed" if quantization else "bf16 dense"
        costs = graph_costs(llm.engine.model, context, (1, 2, 4, 8, 16), 9)
        print_graph_costs(f"default model, {weights}", costs)
        rows += [dict(model=f"default (SmolLM2-135M, {weights})", batch=b, query=q,
                      device_us=seconds * 1e6) for (b, q), seconds in sorted(costs.items())]
        del llm
        torch.cuda.empty_cache()
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v!r}"
                        for k, v in r.items()), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="the default model's GGUF file (engine benchmark)")
    parser.add_argument("--context", type=int, default=256, help="tokens already in each sequence")
    parser.add_argument("--hf-tokens", type=int, default=32, help="new tokens for transformers")
    parser.add_argument("--default-configs", nargs="*", default=list(DEFAULT_CONFIGS),
                        choices=list(DEFAULT_CONFIGS), help="engine runs of the default model")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each default-model measurement (median reported)")
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES),
                        help="the 8B model's weight modes to time")
    parser.add_argument("--profile", action="store_true",
                        help="also print each 8B mode's per-kernel marginal device time of "
                        "a graphed batch-1 step")
    parser.add_argument("--graph-costs", action="store_true",
                        help="with --gguf: also the default model's device time of a step by "
                        "batch and tokens a sequence (decode against verification)")
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_decode needs a CUDA device")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows = [] if args.skip_8b else bench_8b(bandwidth, args.context, args.hf_tokens,
                                            args.profile, tuple(args.modes))
    if args.gguf:
        rows += bench_default(args.gguf, args.default_configs, args.repeats)
        if args.graph_costs:
            rows += bench_graph_costs(args.gguf, args.context)
    tuned = tuned_configs()
    for entry in tuned:
        if entry["kernel"] == "mma_gemv":  # (int4/int8 decode: the picks explain spreads)
            print("tuned", entry, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth,
                       "rows": rows, "tuned": tuned}, f, indent=1)


if __name__ == "__main__":
    main()
