"""`serve` flags: every one documented with its LEAPFROG_ environment variable, env defaults
applied, explicit flags winning, and the namespace mapped onto both configs."""

from __future__ import annotations

import argparse

import pytest

from server import server_version
from server.api.cli_args import add_arguments, configs_from_args, env_name
from server.api.config import ApiConfig
from server.cli import build_parser
from server.engine.config import EngineConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_every_flag_has_help_and_env_var() -> None:
    parser = _parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 25
    for action in flags:
        flag = action.option_strings[0]
        assert action.help and env_name(flag) in action.help, flag
    for name in ("--max-model-len", "--max-num-seqs", "--max-waiting", "--served-model-name",
                 "--api-key", "--host", "--port", "--speculative", "--quantization"):
        assert name in {a.option_strings[0] for a in flags}


def test_defaults_match_the_configs() -> None:
    engine, api = configs_from_args(_parser().parse_args([]))
    assert engine == EngineConfig()
    assert api == ApiConfig()


def test_flags_and_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEAPFROG_MAX_MODEL_LEN", "1024")
    monkeypatch.setenv("LEAPFROG_API_KEY", "k1")
    monkeypatch.setenv("LEAPFROG_ENFORCE_EAGER", "true")
    monkeypatch.setenv("LEAPFROG_MODEL", "/models/x.gguf")
    args = _parser().parse_args(["--max-model-len", "2048", "--port", "9000", "--drain-timeout",
                                 "2.5", "--speculative", "ngram", "--log-prompts"])
    engine, api = configs_from_args(args)
    assert engine.max_model_len == 2048  # the flag beats the environment
    assert engine.enforce_eager is True and engine.model == "/models/x.gguf"
    assert engine.speculative == "ngram"
    assert api.api_key == "k1" and api.port == 9000 and api.drain_timeout_s == 2.5
    assert api.log_prompts is True


def test_model_positional_or_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve MODEL` or vLLM's older `--model MODEL`, either beating LEAPFROG_MODEL; two
    different ones are an error."""
    monkeypatch.setenv("LEAPFROG_MODEL", "/models/env.gguf")
    parse = _parser().parse_args
    assert configs_from_args(parse([]))[0].model == "/models/env.gguf"
    assert configs_from_args(parse(["/m/a.gguf"]))[0].model == "/m/a.gguf"
    assert configs_from_args(parse(["--model", "/m/b", "--port", "1"]))[0].model == "/m/b"
    assert configs_from_args(parse(["/m/a.gguf", "--model", "/m/a.gguf"]))[0].model == "/m/a.gguf"
    with pytest.raises(SystemExit, match="two models"):
        configs_from_args(parse(["/m/a.gguf", "--model", "/m/b"]))


def test_bad_env_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEAPFROG_MAX_NUM_SEQS", "many")
    with pytest.raises(SystemExit, match="LEAPFROG_MAX_NUM_SEQS"):
        _parser()


def test_a_bad_chat_template_ends_serve_before_it_starts() -> None:
    parse = _parser().parse_args
    with pytest.raises(SystemExit, match="--chat-template: .*neither a readable file"):
        configs_from_args(parse(["--chat-template", "/no/such/template.jinja"]))
    with pytest.raises(SystemExit, match="--chat-template: .*does not parse"):
        configs_from_args(parse(["--chat-template", "{{ oops"]))
    engine, _ = configs_from_args(parse(["--chat-template", "{{ messages }}"]))
    assert engine.chat_template == "{{ messages }}"


def test_a_missing_speculative_model_ends_serve_before_it_starts(tmp_path) -> None:
    parse = _parser().parse_args
    with pytest.raises(SystemExit, match="--speculative-model: no such file .*/none.gguf"):
        configs_from_args(parse(["--speculative", "draft-model", "--speculative-model",
                                 str(tmp_path / "none.gguf")]))
    engine, _ = configs_from_args(parse(["--speculative", "draft-model", "--speculative-model",
                                         str(tmp_path)]))
    assert engine.speculative_model == str(tmp_path)


def test_reasoning_parser_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """--reasoning-parser takes a parser's name (LEAPFROG_REASONING_PARSER as its default);
    unset, or empty in the environment, there is none; an unknown name ends serve."""
    parse = _parser().parse_args
    assert configs_from_args(parse([]))[1].reasoning_parser is None
    assert configs_from_args(parse(["--reasoning-parser", "qwen3"]))[1].reasoning_parser == "qwen3"
    with pytest.raises(SystemExit):
        parse(["--reasoning-parser", "granite"])
    monkeypatch.setenv("LEAPFROG_REASONING_PARSER", "deepseek_r1")
    assert configs_from_args(_parser().parse_args([]))[1].reasoning_parser == "deepseek_r1"
    assert configs_from_args(_parser().parse_args(
        ["--reasoning-parser", "qwen3"]))[1].reasoning_parser == "qwen3"
    monkeypatch.setenv("LEAPFROG_REASONING_PARSER", "")
    assert configs_from_args(_parser().parse_args([]))[1].reasoning_parser is None
    help_text = _parser().format_help()
    assert "--reasoning-parser {qwen3,deepseek_r1}" in help_text
    assert "LEAPFROG_REASONING_PARSER" in help_text
    monkeypatch.setenv("LEAPFROG_REASONING_PARSER", "granite")
    with pytest.raises(SystemExit, match="LEAPFROG_REASONING_PARSER='granite': expected one "
                                         "of qwen3, deepseek_r1"):
        _parser()


def test_rope_scaling_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """--rope-scaling takes a JSON object (LEAPFROG_ROPE_SCALING as its default); other JSON,
    or a scaling type the engine does not apply, ends serve before it starts."""
    parse = _parser().parse_args
    yarn = '{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}'
    engine, _ = configs_from_args(parse(["--rope-scaling", yarn]))
    assert engine.rope_scaling == {"rope_type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 32768}
    assert configs_from_args(parse([]))[0].rope_scaling is None
    with pytest.raises(SystemExit):
        parse(["--rope-scaling", "[4]"])
    with pytest.raises(SystemExit, match="--rope-scaling: unsupported rope_scaling type 'x'"):
        configs_from_args(parse(["--rope-scaling", '{"type": "x", "factor": 2}']))
    with pytest.raises(SystemExit, match="needs a positive 'factor'"):
        configs_from_args(parse(["--rope-scaling", '{"rope_type": "linear"}']))
    monkeypatch.setenv("LEAPFROG_ROPE_SCALING", '{"rope_type": "linear", "factor": 2}')
    assert configs_from_args(_parser().parse_args([]))[0].rope_scaling == {
        "rope_type": "linear", "factor": 2}
    monkeypatch.setenv("LEAPFROG_ROPE_SCALING", "yarn")
    with pytest.raises(SystemExit, match="LEAPFROG_ROPE_SCALING"):
        _parser()


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-num-batched-tokens", "0"], "max_num_batched_tokens must be at least 1, got 0"),
    (["--max-num-seqs", "-2"], "max_num_seqs must be at least 1, got -2"),
    (["--block-size", "0"], "block_size must be at least 1"),
    (["--num-kv-blocks", "0"], "num_kv_blocks must be at least 1"),
    (["--max-model-len", "0"], "max_model_len must be at least 1"),
    (["--num-speculative-tokens", "0"], "num_speculative_tokens must be at least 1"),
    (["--max-waiting", "-1"], "max_waiting must be at least 0"),
    (["--prompt-graph-tokens", "-1"], "prompt_graph_tokens must be at least 0"),
    (["--kv-cache-memory-gb", "0"], "kv_cache_memory_gb must be positive, got 0.0"),
    (["--gpu-memory-utilization", "1.5"], r"gpu_memory_utilization must be in \(0, 1\]"),
])
def test_sizes_no_engine_runs_with_are_refused_at_once(flags, message) -> None:
    """A step budget of 0 tokens once left every request waiting forever, the engine
    spinning; such sizes now end `serve` before the model loads, naming the setting (and
    `LLM(...)` with a ValueError)."""
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        configs_from_args(_parser().parse_args(flags))
    field = flags[0].removeprefix("--").replace("-", "_")
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{field: float(flags[1]) if "." in flags[1] or "gb" in field
                        else int(flags[1])})


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"leapfrog {server_version()}"
    assert server_version() != "unknown"  # (the tests run on the installed package)
