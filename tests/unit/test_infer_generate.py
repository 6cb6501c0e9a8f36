"""Decoding: KV-cached batched generation vs plain greedy loops, sampling, streaming, prompt files."""

from __future__ import annotations

import json

import pytest
import torch

from qtrain.checkpoint.adapter_io import save_adapter
from qtrain.config.schema import PeftConfig
from qtrain.errors import ConfigError, DataError
from qtrain.infer.decode import eos_ids, generate_tokens
from qtrain.infer.generate import TextStream, generate_text
from qtrain.infer.load import BaseOptions, load_with_adapters, parse_adapter_args
from qtrain.infer.merge import MergeOptions, merge_to_dir
from qtrain.infer.prompts import encode_prompt, read_prompt_rows
from qtrain.infer.sampling import SamplingConfig, next_tokens, top_p_filter
from qtrain.models.load import load_model
from qtrain.peft.inject import inject_lora
from lora_helpers import randomize_lora_b

CPU = torch.device("cpu")
FP32 = BaseOptions(dtype=torch.float32, quant=None)
PROMPTS = ["What does a fummo eat?\n", "Add 5 and 46.\n", "Reverse the words: cup key bed\n"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_base_dir, tmp_path_factory) -> str:
    model = load_model(tiny_base_dir, torch.float32, CPU, None)
    cfg = PeftConfig(r=8, alpha=16)
    inject_lora(model, cfg)
    randomize_lora_b(model, seed=3, std=0.1)
    return str(save_adapter(model, cfg, str(tiny_base_dir), tmp_path_factory.mktemp("gen") / "adapter"))


@pytest.fixture(scope="module")
def loaded(adapter_dir):
    return load_with_adapters({"a": adapter_dir}, None, FP32)


def _greedy_no_cache(model, prompt: list[int], steps: int, eos: set[int]) -> list[int]:
    """The textbook loop: full forward over everything so far, argmax, stop at EOS."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in eos:
                break
            ids.append(token)
            out.append(token)
    return out


def test_generation_with_an_adapter_equals_greedy_on_the_merged_model(loaded, adapter_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model, aset, tok, _ = loaded
    merge_to_dir(MergeOptions(adapter_dir, str(tmp_path / "merged"), "fp32", None, FP32))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    eos, cfg = eos_ids(model, tok), SamplingConfig(max_new_tokens=12)
    prompts = [encode_prompt(tok, p) for p in PROMPTS]
    ours = generate_tokens(model, prompts, cfg, eos, tok.pad_token_id)  # batched, left-padded, KV cache
    for prompt, got in zip(prompts, ours):
        assert got == _greedy_no_cache(merged, prompt, 12, eos)
    assert any(len(g) > 0 for g in ours)


def test_mixed_adapter_generation_equals_one_adapter_at_a_time(loaded, tokenizer):
    model, aset, tok, _ = loaded
    cfg = SamplingConfig(max_new_tokens=8)
    mixed = generate_text(model, tok, PROMPTS, cfg, aset, ["a", None, "a"])
    with_a = generate_text(model, tok, PROMPTS, cfg, aset, ["a"] * 3)
    base = generate_text(model, tok, PROMPTS, cfg, aset, [None] * 3)
    assert mixed == [with_a[0], base[1], with_a[2]]
    assert with_a != base


def test_sampling_is_reproducible_by_seed_and_top_p_tiny_is_greedy(loaded):
    model, aset, tok, _ = loaded
    sample = SamplingConfig(max_new_tokens=10, temperature=1.5, top_p=0.95, seed=7)
    first = generate_text(model, tok, PROMPTS, sample, aset, ["a"] * 3)
    assert generate_text(model, tok, PROMPTS, sample, aset, ["a"] * 3) == first
    other = SamplingConfig(max_new_tokens=10, temperature=1.5, top_p=0.95, seed=8)
    assert generate_text(model, tok, PROMPTS, other, aset, ["a"] * 3) != first
    nucleus_of_one = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=7)
    greedy = SamplingConfig(max_new_tokens=10)
    assert generate_text(model, tok, PROMPTS, nucleus_of_one, aset, ["a"] * 3) == \
        generate_text(model, tok, PROMPTS, greedy, aset, ["a"] * 3)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.25, 0.15]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[False, True, True, False]]   # 0.5 + 0.25 >= 0.7
    assert torch.isfinite(top_p_filter(logits, 0.75)).tolist() == [[False, True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.76)).sum() == 3
    g = torch.Generator().manual_seed(0)
    draws = {int(next_tokens(logits, SamplingConfig(temperature=1.0, top_p=0.7), g)) for _ in range(200)}
    assert draws == {1, 2}


def test_streamed_text_is_the_final_text(loaded):
    model, aset, tok, _ = loaded
    pieces: list[str] = []
    stream = TextStream(tok, pieces.append)
    [text] = generate_text(model, tok, PROMPTS[:1], SamplingConfig(max_new_tokens=10), aset, ["a"], stream)
    assert "".join(pieces) == text and len(pieces) > 1


def test_bad_generation_options_are_config_errors():
    with pytest.raises(ConfigError) as info:
        SamplingConfig(max_new_tokens=0, temperature=-1, top_p=1.5).check()
    assert all(k in str(info.value) for k in ("--max-new-tokens", "--temperature", "--top-p"))
    assert parse_adapter_args(["x", "y", "n=z"]) == {"default": "x", "default2": "y", "n": "z"}
    with pytest.raises(ConfigError, match="given twice"):
        parse_adapter_args(["n=a", "n=b"])


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_prompt_file_rows_and_their_errors(tmp_path):
    good = _write(tmp_path / "in.jsonl", '{"prompt": "hi"}\n\n{"prompt": "yo", "adapter": null}\n'
                                         '{"prompt": "ok", "adapter": "b"}\n')
    rows = read_prompt_rows(good, ["a", "b"], "a")
    assert [(r.line, r.prompt, r.adapter) for r in rows] == [(1, "hi", "a"), (3, "yo", None), (4, "ok", "b")]
    cases = {
        "": "no rows",
        "\n  \n": "no rows",
        '{"prompt": "hi"}\n{"prompt": "x"\n': "line 2: not valid JSON",
        '["hi"]\n': "line 1: expected a JSON object",
        '{"text": "hi"}\n': "line 1: field 'prompt' is missing (fields present: text)",
        '{"prompt": 3}\n': "line 1: field 'prompt' must be a string",
        '{"prompt": "  "}\n': "line 1: field 'prompt' is empty",
        '{"prompt": "a", "adapter": "zz"}\n': "line 1: adapter 'zz' is not loaded (loaded: a, b)",
    }
    for i, (text, needle) in enumerate(cases.items()):
        path = _write(tmp_path / f"bad{i}.jsonl", text)
        with pytest.raises(DataError) as info:
            read_prompt_rows(path, ["a", "b"], "a")
        assert needle in str(info.value) and str(path) in str(info.value), (text, str(info.value))
    with pytest.raises(DataError, match="file not found"):
        read_prompt_rows(tmp_path / "missing.jsonl", ["a"], "a")
    json.loads('{"prompt": "hi"}')  # the documented row shape is valid JSON
