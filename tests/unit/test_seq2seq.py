"""Encoder-decoder (T5 family) models: loading, LoRA targets, data, loss, generation, merge, eval.

Oracles are transformers' own T5 (unquantized `from_pretrained`, its loss with `labels=`) and
peft (task_type SEQ_2_SEQ_LM) on it; the tiny models are T5 v1.1 / FLAN-T5 style (gated-gelu)
and the original non-gated `relu` variant, built from config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.checkpoint.adapter_io import save_adapter
from qtrain.config import recipe_from_dict
from qtrain.config.schema import DataConfig, ModelConfig, PeftConfig
from qtrain.data import IGNORE_INDEX, SUMMARIZATION_PROMPT, Seq2SeqExample, build_datasets, collate, encode_seq2seq_row
from qtrain.errors import ConfigError, DataError
from qtrain.eval.perplexity import eval_loss
from qtrain.eval.references import references
from qtrain.infer.adapters import AdapterSet
from qtrain.infer.decode import eos_ids, generate_tokens
from qtrain.infer.generate import generate_text
from qtrain.infer.load import BaseOptions, load_with_adapters
from qtrain.infer.merge import MergeOptions, merge_to_dir
from qtrain.infer.prompts import encode_prompt
from qtrain.infer.sampling import SamplingConfig
from qtrain.models.arch import auto_model_class, is_encoder_decoder, read_config
from qtrain.models.build import write_random_base
from qtrain.models.load import load_model
from qtrain.peft.inject import inject_lora
from qtrain.quant.linear import NF4Linear
from qtrain.quant.nf4 import NF4Spec
from qtrain.train.loss import count_trained_tokens, seq2seq_lm_loss_sum
from lora_helpers import randomize_lora_b

CPU = torch.device("cpu")
TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "data" / "quickstart" / "tokenizer"
T5_GATED = {"model_type": "t5", "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_decoder_layers": 2,
            "num_heads": 4, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
T5_RELU = {**T5_GATED, "feed_forward_proj": "relu"}
# Every T5 v1.1 linear but `wo` (T5's feed-forward reads `wo.weight`; LoRALinear exposes the base's).
ATTN_FF = ["q", "k", "v", "o", "wi_0", "wi_1"]
ALL_T5 = ATTN_FF + ["wo"]
ENC = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
DEC = torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(1))
FP32 = BaseOptions(dtype=torch.float32, quant=None)
PROMPTS = ["Summarize: A: hi B: bye", "Add 5 and 46.", "Reverse the words: cup key bed and more words here"]


@pytest.fixture(autouse=True)
def _own_rng():
    """LoRA A init and prepare() draw from torch's global RNG: seed it here and leave it as found."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, tokenizer) -> Path:
    return write_random_base(T5_GATED, tokenizer, 0, torch.float32, tmp_path_factory.mktemp("t5") / "base")


@pytest.fixture(scope="module")
def t5_relu_dir(tmp_path_factory, tokenizer) -> Path:
    return write_random_base(T5_RELU, tokenizer, 0, torch.float32, tmp_path_factory.mktemp("t5relu") / "base")


def _hf(path, dtype=torch.float32):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(str(path), dtype=dtype).eval()


def _logits(model, enc=ENC, dec=DEC):
    with torch.no_grad():
        return model(input_ids=enc, decoder_input_ids=dec).logits.float()


def _randomize_b(model, seed: int = 1, std: float = 0.1):
    randomize_lora_b(model, seed, std)


def _adapter(base_dir, out, targets=ATTN_FF, seed=1, std=0.1) -> str:
    model = load_model(base_dir, torch.float32, CPU, None)
    cfg = PeftConfig(r=8, alpha=16, targets=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_lora(model, cfg)
    _randomize_b(model, seed, std)
    return str(save_adapter(model, cfg, str(base_dir), out))


# ---- architecture and loading ----------------------------------------------------------------------


def test_architecture_comes_from_the_recipe_model_section(t5_dir, tokenizer):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    assert is_encoder_decoder(ModelConfig(from_config=dict(T5_GATED), tokenizer=str(TOKENIZER_DIR)))
    assert not is_encoder_decoder(ModelConfig(from_config={"model_type": "llama", "hidden_size": 64}))
    assert is_encoder_decoder(ModelConfig(path=str(t5_dir)))
    assert auto_model_class(read_config(t5_dir)) is AutoModelForSeq2SeqLM
    assert auto_model_class(read_config(t5_dir)) is not AutoModelForCausalLM
    config = json.loads((t5_dir / "config.json").read_text())
    assert config["is_encoder_decoder"] and config["decoder_start_token_id"] == tokenizer.pad_token_id
    with pytest.raises(ConfigError, match="model.from_config"):
        is_encoder_decoder(ModelConfig(from_config={"model_type": "no-such-model"}))


@pytest.mark.parametrize("variant", ["gated", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unquantized_load_equals_transformers_from_pretrained_exactly(t5_dir, t5_relu_dir, variant, dtype):
    base = t5_dir if variant == "gated" else t5_relu_dir
    ours = load_model(base, dtype, CPU, None)
    assert type(ours).__name__ == "T5ForConditionalGeneration"
    assert ours.lm_head.weight is ours.shared.weight is ours.encoder.embed_tokens.weight  # tied, as transformers ties
    assert torch.equal(_logits(ours), _logits(_hf(base, dtype)))


def test_a_checkpoint_with_its_own_lm_head_loads_it_untied_as_transformers_does(t5_dir, tmp_path):
    """FLAN-T5 / T5 v1.1 checkpoints hold lm_head.weight beside shared.weight: transformers then unties them."""
    import shutil

    from safetensors.torch import load_file, save_file

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(t5_dir / name, tmp_path / name)
    tensors = load_file(str(t5_dir / "model.safetensors"))
    tensors["lm_head.weight"] = torch.randn(tensors["shared.weight"].shape, generator=torch.Generator().manual_seed(9))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = load_model(tmp_path, torch.float32, CPU, None)
    assert ours.lm_head.weight is not ours.shared.weight and ours.encoder.embed_tokens.weight is ours.shared.weight
    assert torch.equal(ours.lm_head.weight, tensors["lm_head.weight"])
    assert torch.equal(_logits(ours), _logits(_hf(tmp_path)))


def test_nf4_t5_equals_transformers_t5_holding_our_dequantized_weights(t5_dir):
    ours = load_model(t5_dir, torch.float32, CPU, NF4Spec(64, True))
    quantized = {n: m for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
    # Every attention and wi linear is 4-bit; T5's `wo` (its _keep_in_fp32_modules) and lm_head are not.
    assert len(quantized) == 2 * (4 + 2) + 2 * (8 + 2)
    assert not any(n.endswith(".wo") for n in quantized)
    assert isinstance(ours.encoder.block[0].layer[1].DenseReluDense.wo, nn.Linear)
    bias = ours.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
    assert isinstance(bias, nn.Embedding) and bias.weight.dtype == torch.float32
    hf = _hf(t5_dir)
    with torch.no_grad():
        for name, layer in quantized.items():
            hf.get_submodule(name).weight.copy_(layer.dense_weight(torch.float32))
    torch.testing.assert_close(_logits(ours), _logits(hf), rtol=1e-5, atol=1e-5)
    full = _logits(load_model(t5_dir, torch.float32, CPU, None))
    assert 0 < float((_logits(ours) - full).norm() / full.norm()) < 0.3   # NF4-sized, not broken


# ---- LoRA targets and the peft oracle ---------------------------------------------------------------


def test_t5_targets_by_module_name(t5_dir, t5_relu_dir):
    model = load_model(t5_dir, torch.float32, CPU, NF4Spec(64, True))
    names = inject_lora(model, PeftConfig(r=4, targets=ALL_T5))
    # encoder block: self-attention q,k,v,o + wi_0, wi_1, wo; decoder block adds cross-attention q,k,v,o
    assert len(names) == 2 * 7 + 2 * 11
    assert "decoder.block.1.layer.1.EncDecAttention.q" in names and "encoder.block.0.layer.1.DenseReluDense.wo" in names
    relu = load_model(t5_relu_dir, torch.float32, CPU, None)
    names = inject_lora(relu, PeftConfig(r=4, targets=["q", "v", "wi", "wo"]))
    assert len(names) == 2 * 4 + 2 * 6 and not any(n.endswith("lm_head") for n in names)
    with pytest.raises(ConfigError, match=r"e\.g\. peft\.targets: \[k, o, q, v, wi_0, wi_1, wo\]"):
        inject_lora(load_model(t5_dir, torch.float32, CPU, None), PeftConfig(targets=["q_proj", "v_proj"]))


@pytest.mark.parametrize("quant", [False, True])
def test_fresh_adapter_gives_the_base_logits_exactly(t5_dir, quant):
    spec = NF4Spec(64, True) if quant else None
    base = _logits(load_model(t5_dir, torch.float32, CPU, spec))
    model = load_model(t5_dir, torch.float32, CPU, spec)
    inject_lora(model, PeftConfig(r=8, targets=ATTN_FF))
    assert torch.equal(_logits(model), base)
    _randomize_b(model)
    assert not torch.allclose(_logits(model), base, atol=1e-3)


def _peft_matches_ours(base_dir, tmp_path, targets):
    peft = pytest.importorskip("peft")
    ours = load_model(base_dir, torch.float32, CPU, None)
    cfg = PeftConfig(r=8, alpha=16, targets=list(targets))
    inject_lora(ours, cfg)
    _randomize_b(ours)
    save_adapter(ours, cfg, str(base_dir), tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    hf = peft.PeftModel.from_pretrained(_hf(base_dir), str(tmp_path / "adapter"))
    assert type(hf).__name__ == "PeftModelForSeq2SeqLM"
    hf.eval()
    theirs = _logits(hf)
    torch.testing.assert_close(_logits(ours), theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(theirs, _logits(_hf(base_dir)), atol=1e-3)


def test_peft_loads_our_t5_adapter_and_gives_the_same_logits(t5_dir, tmp_path):
    _peft_matches_ours(t5_dir, tmp_path, ATTN_FF)


@pytest.mark.parametrize("variant", ["gated", "relu"])
def test_peft_oracle_with_lora_on_wo(t5_dir, t5_relu_dir, tmp_path, variant):
    if variant == "gated":
        _peft_matches_ours(t5_dir, tmp_path, ALL_T5)
    else:
        _peft_matches_ours(t5_relu_dir, tmp_path, ["q", "k", "v", "o", "wi", "wo"])


# ---- data -------------------------------------------------------------------------------------------


def _rows(n=20):
    return [{"dialogue": f"#A#: I will bring {i} apples.\n#B#: Thanks!", "summary": f"A brings {i} apples."}
            for i in range(n)]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_summarization_goes_to_the_encoder_and_the_summary_is_the_target(tokenizer):
    row = _rows(1)[0]
    ids, labels = encode_seq2seq_row(row, "summarization", tokenizer, {})
    prompt = SUMMARIZATION_PROMPT.format(dialogue=row["dialogue"])
    assert ids == tokenizer.encode(prompt, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert labels == tokenizer.encode(row["summary"], add_special_tokens=False) + [tokenizer.eos_token_id]
    ids, labels = encode_seq2seq_row({"q": "Add 2 and 3.", "response": "5"}, "instruction", tokenizer, {"prompt": "q"})
    assert ids == tokenizer.encode("Add 2 and 3.", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert IGNORE_INDEX not in labels and labels[-1] == tokenizer.eos_token_id


def test_seq2seq_datasets_and_their_errors(tmp_path, tokenizer):
    path = _write(tmp_path / "d.jsonl", _rows())
    cfg = DataConfig(path=str(path), format="summarization", packing=False, max_len=64, eval_split=0.2)
    data = build_datasets(cfg, tokenizer, 0, encoder_decoder=True)
    assert len(data.train) == 16 and len(data.eval) == 4
    assert all(isinstance(e, Seq2SeqExample) and e.trained_tokens == len(e.labels) for e in data.train)
    assert data.report.trained_tokens == sum(len(e.labels) for e in data.train)
    with pytest.raises(ConfigError, match="data.packing: .*set data.packing: false"):
        build_datasets(DataConfig(path=str(path), format="summarization"), tokenizer, 0, encoder_decoder=True)
    for fmt in ("text", "chat"):
        with pytest.raises(DataError, match=f"data.format: '{fmt}' needs a decoder-only model.*instruction or "
                                            "summarization"):
            build_datasets(DataConfig(path=str(path), format=fmt, packing=False), tokenizer, 0, encoder_decoder=True)
    # max_len bounds the encoder input (and the labels): truncate cuts, drop leaves the row out
    short = DataConfig(path=str(path), format="summarization", packing=False, max_len=10, eval_split=0.0)
    cut = build_datasets(short, tokenizer, 0, encoder_decoder=True)
    assert cut.report.rows_truncated == 20 and all(len(e.input_ids) == 10 for e in cut.train)
    full = build_datasets(DataConfig(path=str(path), format="summarization", packing=False, eval_split=0.0),
                          tokenizer, 0, encoder_decoder=True)
    assert [e.input_ids[:10] for e in full.train] == [e.input_ids for e in cut.train]
    short.overlong = "drop"
    with pytest.raises(DataError, match="no training sequences left.*longer than data.max_len=10"):
        build_datasets(short, tokenizer, 0, encoder_decoder=True)
    # the decoder-only path is untouched by the flag's default
    assert not isinstance(build_datasets(short.__class__(path=str(path), format="summarization", packing=False),
                                         tokenizer, 0).train[0], Seq2SeqExample)


def test_collate_pads_encoder_and_decoder_separately_and_shifts_labels_right():
    batch = collate([Seq2SeqExample([5, 6, 7], [8, 9]), Seq2SeqExample([5], [10, 11, 12, 2])], pad_id=0,
                    decoder_start_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 9, -100, -100], [10, 11, 12, 2]]
    assert batch["decoder_input_ids"].tolist() == [[3, 8, 9, 0], [3, 10, 11, 12]]
    assert collate([Seq2SeqExample([5], [8])], pad_id=0)["decoder_input_ids"].tolist() == [[0]]  # T5: start = pad


# ---- loss and eval ------------------------------------------------------------------------------------


def _examples(tokenizer, n=5):
    return [Seq2SeqExample(*encode_seq2seq_row(r, "summarization", tokenizer, {})) for r in _rows(n)]


def test_loss_is_unshifted_and_equals_transformers_t5_loss(t5_dir, tokenizer):
    model = load_model(t5_dir, torch.float32, CPU, None)
    batch = collate(_examples(tokenizer)[:3] + [Seq2SeqExample([7, 8, 2], [9, 2])], tokenizer.pad_token_id)
    n = count_trained_tokens(batch["labels"], encoder_decoder=True)
    assert n == int((batch["labels"] != IGNORE_INDEX).sum()) > count_trained_tokens(batch["labels"])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        ours = seq2seq_lm_loss_sum(out.logits, batch["labels"])
        # transformers builds decoder_input_ids from labels itself: ours must be the same tensor
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"]).logits
    assert torch.equal(logits, out.logits)
    torch.testing.assert_close(ours / n, out.loss, rtol=1e-6, atol=1e-6)


def test_eval_loss_is_the_token_weighted_nll_and_batch_size_free(t5_dir, tokenizer):
    model = load_model(t5_dir, torch.float32, CPU, None)
    examples = _examples(tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:   # one at a time, no padding anywhere
            logits = model(input_ids=torch.tensor([ex.input_ids]),
                           decoder_input_ids=torch.tensor([[0] + ex.labels[:-1]])).logits[0]
            total += float(F.cross_entropy(logits, torch.tensor(ex.labels), reduction="sum"))
            count += len(ex.labels)
    one = eval_loss(model, examples, tokenizer.pad_token_id, 1, CPU)
    three = eval_loss(model, examples, tokenizer.pad_token_id, 3, CPU)
    assert one.tokens == three.tokens == count and one.perplexity == math.exp(one.loss)
    assert one.loss == pytest.approx(total / count, rel=1e-5) and three.loss == pytest.approx(one.loss, rel=1e-5)


# ---- generation -------------------------------------------------------------------------------------------


def _greedy_no_cache(model, prompt: list[int], steps: int, eos: set[int]) -> list[int]:
    """The textbook loop: encoder + full decoder forward over everything so far, argmax, stop at EOS."""
    dec, out = [model.config.decoder_start_token_id], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([dec])).logits
            token = int(logits[0, -1].argmax())
            if token in eos:
                break
            dec.append(token)
            out.append(token)
    return out


@pytest.fixture(scope="module")
def loaded(t5_dir, tmp_path_factory):
    # A strong adapter: the random tiny T5 alone predicts <pad> at every step.
    adapter = _adapter(t5_dir, tmp_path_factory.mktemp("gen") / "a", std=1.0)
    return load_with_adapters({"a": adapter}, None, FP32)


def test_generation_equals_a_greedy_loop_and_rows_do_not_see_each_other(loaded, tmp_path):
    model, aset, tok, _ = loaded
    eos, cfg = eos_ids(model, tok), SamplingConfig(max_new_tokens=10)
    prompts = [encode_prompt(tok, p, encoder_decoder=True) for p in PROMPTS]
    assert all(p[-1] == tok.eos_token_id and p[0] != tok.bos_token_id for p in prompts)
    batched = generate_tokens(model, prompts, cfg, eos, tok.pad_token_id)
    for prompt, got in zip(prompts, batched):
        assert got == _greedy_no_cache(model, prompt, 10, eos)
        assert generate_tokens(model, [prompt], cfg, eos, tok.pad_token_id) == [got]
    assert len({t for g in batched for t in g} - {tok.pad_token_id}) >= 3   # real tokens, not <pad> over and over
    sample = SamplingConfig(max_new_tokens=10, temperature=1.5, top_p=0.95, seed=7)
    first = generate_text(model, tok, PROMPTS, sample, aset, ["a"] * 3)
    assert generate_text(model, tok, PROMPTS, sample, aset, ["a"] * 3) == first
    assert generate_text(model, tok, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=1.5, seed=8),
                         aset, ["a"] * 3) != first


def test_mixed_adapter_rows_and_swapping_adapters_on_t5(loaded, t5_dir, tmp_path):
    model, aset, tok, _ = loaded
    cfg = SamplingConfig(max_new_tokens=8)
    mixed = generate_text(model, tok, PROMPTS, cfg, aset, ["a", None, "a"])
    with_a = generate_text(model, tok, PROMPTS, cfg, aset, ["a"] * 3)
    base = generate_text(model, tok, PROMPTS, cfg, aset, [None] * 3)
    assert mixed == [with_a[0], base[1], with_a[2]] and with_a != base
    swap = AdapterSet(load_model(t5_dir, torch.float32, CPU, NF4Spec(64, True)))
    swap.add_adapter("a", _adapter(t5_dir, tmp_path / "a", seed=1))
    swap.add_adapter("b", _adapter(t5_dir, tmp_path / "b", seed=2))
    swap.set_adapter("a")
    first = _logits(swap.model)
    swap.set_adapter("b")
    other = _logits(swap.model)
    swap.set_adapter("a")
    assert torch.equal(_logits(swap.model), first) and not torch.allclose(first, other, atol=1e-3)


# ---- merge ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", [None, NF4Spec(64, True)], ids=["fp32-base", "nf4-base"])
def test_merged_t5_loads_in_transformers_and_equals_base_plus_adapter(t5_dir, tmp_path, quant):
    adapter = _adapter(t5_dir, tmp_path / "adapter")
    opts = BaseOptions(dtype=torch.float32, quant=quant)
    report = merge_to_dir(MergeOptions(adapter, str(tmp_path / "merged"), "fp32", None, opts))
    assert report["merged_layers"] == 2 * 6 + 2 * 10 and report["probe_max_abs_logit_diff"] < 1e-4
    model, *_ = load_with_adapters({"a": adapter}, None, opts)
    reference = _logits(model)
    # fp32 rounding of W + s·B·A vs. W·x + s·B·(A·x); T5 v1.1's logits are unscaled (|logit| up to ~10)
    torch.testing.assert_close(_logits(_hf(tmp_path / "merged")), reference, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(reference, _logits(_hf(t5_dir)), atol=1e-2)


# ---- recipe level: qtrain eval and a training step ------------------------------------------------------


def _recipe(tmp_path, **data):
    path = _write(tmp_path / "dialog.jsonl", _rows(24))
    return recipe_from_dict({
        "output_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"from_config": {**T5_GATED, "dropout_rate": 0.0}, "tokenizer": str(TOKENIZER_DIR),
                  "dtype": "float32"},
        "quant": {"method": "nf4"}, "peft": {"r": 4, "alpha": 8, "targets": ATTN_FF},
        "data": {"path": str(path), "format": "summarization", "max_len": 128, "packing": False, "eval_split": 0.25,
                 **data},
        "train": {"micro_batch_size": 4, "grad_accum": 1, "max_steps": 2, "lr": 1e-2, "warmup_steps": 0,
                  "optimizer": "adamw", "gradient_checkpointing": True},
    })


def test_qtrain_eval_on_a_t5_recipe_reports_loss_perplexity_and_rouge(tmp_path, tokenizer):
    from qtrain.eval.run import EvalOptions, evaluate_recipe
    from qtrain.train.setup import resolve_base_dir

    recipe = _recipe(tmp_path)
    base = resolve_base_dir(recipe, tokenizer)
    adapter = _adapter(base, tmp_path / "adapter")
    report = evaluate_recipe(recipe, EvalOptions(adapter=adapter, out_dir=str(tmp_path / "ev"),
                                                 sampling=SamplingConfig(max_new_tokens=6)))
    assert report["perplexity"] == math.exp(report["eval_loss"]) and report["eval_sequences"] == 6
    assert report["generation"]["rows"] == 6 and all(0 <= v <= 1 for v in report["rouge"].values())
    refs = references(recipe.data, tokenizer, recipe.seed, encoder_decoder=True)
    data = build_datasets(recipe.data, tokenizer, recipe.seed, encoder_decoder=True)
    assert [r.prompt_ids for r in refs.rows] == [e.input_ids for e in data.eval]
    rows = [json.loads(x) for x in (tmp_path / "ev" / "eval_generations.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"].startswith("Summarize the following conversation.")
    assert rows[0]["reference"].startswith("A brings")


def test_a_training_step_on_t5_moves_the_adapter_and_its_loss_is_the_seq2seq_loss(tmp_path, tokenizer):
    from qtrain.distributed.env import DistEnv
    from qtrain.train.loop import evaluate, train_step
    from qtrain.train.setup import prepare

    recipe = _recipe(tmp_path)
    s = prepare(recipe, DistEnv())
    assert isinstance(s.data.train[0], Seq2SeqExample)  # prepare() encodes for the encoder-decoder base
    s.model.eval()
    before_eval = evaluate(s)
    expected = eval_loss(s.model, [s.data.train[i] for i in (0, 1, 2, 3)], tokenizer.pad_token_id, 4, CPU)
    s.model.train()   # dropout_rate 0: the step's loss is the eval loss of its batch
    before = {n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}
    result = train_step(s, [[s.data.train[i] for i in (0, 1, 2, 3)]])
    assert result.loss == pytest.approx(expected.loss, rel=1e-5) and result.grad_norm > 0
    assert result.tokens == sum(len(s.data.train[i].input_ids) + len(s.data.train[i].labels) for i in range(4))
    assert any(not p.equal(before[n]) for n, p in s.model.named_parameters() if p.requires_grad)
    assert evaluate(s) != before_eval and math.isfinite(before_eval)
