"""Prompt embeddings (`SamplingParams.pooling`): the final hidden states pooled as
transformers computes them, whatever the chunking, batching, prefix cache or preemption."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams
from tests.test_engine import GREEDY, mixed_prompts

ATOL = 1e-5  # float32 on both sides, unit vectors: summation order only


def hf_embeddings(hf: torch.nn.Module, prompts: list[list[int]], pooling: str) -> list[torch.Tensor]:
    """transformers' final (normed) hidden states of each prompt, pooled, of unit length."""
    found = []
    with torch.no_grad():
        for prompt in prompts:
            hidden = hf.model(torch.tensor([prompt])).last_hidden_state[0].float()
            pooled = hidden[-1] if pooling == "last" else hidden.mean(0)
            found.append(torch.nn.functional.normalize(pooled, dim=0))
    return found


def assert_close(got: list[list[float]], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(torch.tensor(g), e, atol=ATOL, rtol=0)
        assert torch.tensor(g).norm().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_embeddings_match_transformers(arch: str, tiny_model_dir) -> None:
    """Both poolings, prompts of 1 to 90 tokens computed in chunks of 16 beside one another
    (gemma3: its window layers see 8 tokens)."""
    path = tiny_model_dir(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", num_kv_blocks=128, block_size=4,
              max_num_batched_tokens=16, debug_check_integrity=True)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 5, 13, 90)]
    for pooling in ("last", "mean"):
        assert_close(llm.embed(prompts, pooling), hf_embeddings(hf, prompts, pooling))
    assert llm.engine.blocks.num_free_blocks == 128


def test_embeddings_beside_generation_change_neither(tiny_model_dir) -> None:
    """Requests for embeddings batched with generating ones: the generated tokens are those
    generated alone, the embeddings those computed alone; each embedding request ends with
    its prompt's step (one token generated, as for any request)."""
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=256, block_size=4,
              max_num_batched_tokens=32, debug_check_integrity=True)
    prompts = mixed_prompts(8)
    alone_tokens = [c.token_ids for c in llm.generate(prompts[:4], GREEDY)]
    alone_embeddings = llm.embed(prompts[4:], "mean")
    pooled = SamplingParams(max_tokens=1, temperature=0.0, pooling="mean")
    together = llm.generate(prompts, [GREEDY] * 4 + [pooled] * 4)
    assert [c.token_ids for c in together[:4]] == alone_tokens
    assert all(c.embedding is None for c in together[:4])
    for c, e in zip(together[4:], alone_embeddings, strict=True):
        assert len(c.token_ids) == 1 and c.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(c.embedding), torch.tensor(e), atol=ATOL,
                                   rtol=0)


def test_mean_embeddings_skip_the_prefix_cache_last_ones_take_it(tiny_model_dir) -> None:
    """A mean embedding computes its whole prompt even when its blocks are cached; a last
    one takes the cached blocks and computes the last position alone: the same vectors."""
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=128, block_size=4,
              enable_prefix_caching=True)
    prompt = mixed_prompts(6)[5]
    for pooling in ("mean", "last"):
        first = llm.embed([prompt], pooling)[0]
        engine = llm.engine
        engine.add_request("again", prompt, SamplingParams(max_tokens=1, temperature=0.0,
                                                           pooling=pooling))
        outputs = [out for _ in range(4) if engine.has_unfinished() for out in engine.step()]
        final = outputs[-1]
        assert final.finished and final.request_id == "again"
        cached = len(prompt) - 1 - (len(prompt) - 1) % 4
        assert final.num_cached_tokens == (0 if pooling == "mean" else cached) and cached > 0
        torch.testing.assert_close(torch.tensor(final.embedding), torch.tensor(first),
                                   atol=ATOL, rtol=0)


def test_mean_embeddings_survive_preemption(tiny_model_dir) -> None:
    """Requests preempted while computing their prompts in chunks of 8 pool each position
    once: the embeddings of an engine with room for all."""
    path = str(tiny_model_dir("llama"))
    prompts = mixed_prompts(6)
    roomy = LLM(path, dtype="float32", num_kv_blocks=256, block_size=4)
    small = LLM(path, dtype="float32", num_kv_blocks=24, block_size=4,
                max_num_batched_tokens=8, debug_check_integrity=True)
    params = [GREEDY if i % 2 else SamplingParams(max_tokens=1, temperature=0.0,
                                                  pooling="mean") for i in range(6)]
    expected = roomy.generate(prompts, params)
    got = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    for g, e, p in zip(got, expected, params, strict=True):
        assert g.token_ids == e.token_ids
        if p.pooling:
            torch.testing.assert_close(torch.tensor(g.embedding), torch.tensor(e.embedding),
                                       atol=ATOL, rtol=0)
    assert small.engine.blocks.num_free_blocks == 24


def test_pooling_names_are_checked() -> None:
    with pytest.raises(ValueError, match="pooling must be one of last, mean"):
        SamplingParams(pooling="cls")


def test_a_base_model_checkpoint_embeds_and_does_not_generate(tmp_path) -> None:
    """A decoder saved without its head (`MistralModel.save_pretrained`, as embedding models
    built on decoders such as E5-Mistral are: tensors without the `model.` prefix, no
    `lm_head`, an untied config) loads, embeds as transformers' base model computes it, and
    refuses to generate text."""
    from transformers import AutoModel

    from tests.tiny_models import tiny_config, tiny_tokenizer

    hf = AutoModel.from_config(tiny_config("mistral")).eval()
    hf.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", num_kv_blocks=64, block_size=4)
    assert not llm.engine.model.config.generates
    prompts = [[5, 9, 11], list(range(3, 40))]
    with torch.no_grad():
        expected = [torch.nn.functional.normalize(
            hf(torch.tensor([p])).last_hidden_state[0, -1], dim=0) for p in prompts]
    assert_close(llm.embed(prompts), expected)
    with pytest.raises(ValueError, match="no language-model head"):
        llm.generate(prompts, GREEDY)


def test_a_causal_lm_checkpoint_without_its_head_embeds(tiny_model_dir, tmp_path) -> None:
    """A `LlamaForCausalLM` checkpoint whose untied head is not in its files (an embedding
    model's, saved from the base model under the causal LM's config) embeds as the full
    checkpoint does, and does not generate."""
    import shutil

    from safetensors.torch import load_file, save_file

    source = tiny_model_dir("llama")
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, tmp_path / file.name)
    for file in source.glob("*.safetensors"):
        tensors = {k: v for k, v in load_file(file).items() if k != "lm_head.weight"}
        save_file(tensors, tmp_path / file.name, metadata={"format": "pt"})
    whole = LLM(str(source), dtype="float32", num_kv_blocks=64, block_size=4)
    headless = LLM(str(tmp_path), dtype="float32", num_kv_blocks=64, block_size=4)
    assert whole.engine.model.config.generates and not headless.engine.model.config.generates
    prompts = mixed_prompts(3)
    for got, expected in zip(headless.embed(prompts, "mean"), whole.embed(prompts, "mean"),
                             strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="no language-model head"):
        headless.generate(prompts, GREEDY)


@pytest.mark.parametrize(("named", "used"), [("mean", "mean"), ("last", "last"), (None, "last")])
def test_the_pooling_a_sentence_transformers_directory_names(tiny_model_dir, tmp_path,
                                                             named, used) -> None:
    """`modules.json` + the Pooling module's config (sentence-transformers' layout) set the
    model's pooling, which `embed` uses unless told; cls, which is not computed here, is
    refused unless a pooling is given."""
    import json
    import shutil

    from server.models.loader import sentence_transformers_pooling

    shutil.copytree(tiny_model_dir("llama"), tmp_path, dirs_exist_ok=True)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    flags = {"pooling_mode_mean_tokens": named == "mean",
             "pooling_mode_lasttoken": named == "last", "pooling_mode_cls_token": False}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(flags))
    assert sentence_transformers_pooling(tmp_path) == named
    # (no prefix cache: a prompt found in it computes only its tail, which dense float32
    # products may round differently, so calls would not compare exactly)
    llm = LLM(str(tmp_path), dtype="float32", num_kv_blocks=64, block_size=4,
              enable_prefix_caching=False)
    prompts = mixed_prompts(3)
    assert llm.embed(prompts) == llm.embed(prompts, used)
    assert llm.embed(prompts) != llm.embed(prompts, "mean" if used == "last" else "last")
    flags["pooling_mode_cls_token"], flags["pooling_mode_mean_tokens"] = True, False
    flags["pooling_mode_lasttoken"] = False
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(flags))
    cls = LLM(str(tmp_path), dtype="float32", num_kv_blocks=64, block_size=4,
              enable_prefix_caching=False)
    with pytest.raises(ValueError, match="name cls pooling"):
        cls.embed(prompts)
    assert cls.embed(prompts, "last") == llm.embed(prompts, "last")


def test_the_pooling_a_gguf_names(tiny_model_dir, tmp_path) -> None:
    """A GGUF's `{arch}.pooling_type` (llama.cpp's: 1 mean, 3 last) sets the model's
    pooling."""
    from tests.tiny_models import save_tiny_gguf

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    for kind, name in ((1, "mean"), (3, "last"), (2, "cls"), (None, None)):
        path = save_tiny_gguf(hf, tmp_path / f"pool{kind}.gguf", pooling_type=kind)
        llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4)
        assert llm.engine.model.config.pooling == name


@pytest.mark.parametrize("speculative", ["ngram", "draft-model", None])
def test_embeddings_beside_speculation_and_a_hybrid_cache(tiny_model_dir, tmp_path,
                                                          speculative) -> None:
    """With n-gram drafting or a draft model drafting, the embeddings and the greedy tokens
    batched beside them are those of the plain engine; with a sink + window cache on two of
    the three layers (None), which frees a prompt's early blocks as its chunks of 16 go,
    those of the same cache computing each prompt in one step."""
    from tests.tiny_models import save_tiny_model

    path = str(tiny_model_dir("llama"))
    common = dict(dtype="float32", num_kv_blocks=256, block_size=4)
    if speculative is None:
        hybrid = dict(sliding_window=8, num_sink_tokens=4, full_attention_layers=(2,))
        plain = LLM(path, **common, **hybrid, max_num_batched_tokens=512)
        other = LLM(path, **common, **hybrid, max_num_batched_tokens=16)
    else:
        config = dict(speculative=speculative, num_speculative_tokens=3)
        if speculative == "draft-model":
            config["speculative_model"] = str(save_tiny_model(
                "llama", tmp_path, seed=1, num_hidden_layers=1))
        plain = LLM(path, **common, max_num_batched_tokens=16)
        other = LLM(path, **common, **config, max_num_batched_tokens=16)
    prompts = mixed_prompts(8)
    params = [GREEDY if i % 2 else SamplingParams(max_tokens=1, temperature=0.0,
                                                  pooling="mean") for i in range(8)]
    expected, got = plain.generate(prompts, params), other.generate(prompts, params)
    assert max(map(len, prompts)) > 16 + 8  # (chunks, and blocks left behind the window)
    for g, e in zip(got, expected, strict=True):
        assert g.token_ids == e.token_ids
        if e.embedding is not None:
            torch.testing.assert_close(torch.tensor(g.embedding), torch.tensor(e.embedding),
                                       atol=ATOL, rtol=0)
