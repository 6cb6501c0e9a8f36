"""Eval: ROUGE against rouge-score itself, perplexity = exp(loss), the loss against a hand-written NLL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qtrain.checkpoint.adapter_io import save_adapter
from qtrain.config import recipe_from_dict
from qtrain.data import build_datasets, collate
from qtrain.errors import CheckpointError, DataError
from qtrain.eval.references import references
from qtrain.eval.rouge import ROUGE_TYPES, rouge_scores
from qtrain.eval.run import EvalOptions, evaluate_recipe
from qtrain.infer.sampling import SamplingConfig
from qtrain.models.load import load_model
from qtrain.peft.inject import inject_lora
from lora_helpers import randomize_lora_b

CPU = torch.device("cpu")
TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "data" / "quickstart" / "tokenizer"
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def test_rouge_equals_rouge_score_and_the_hand_count():
    from rouge_score import rouge_scorer

    preds = ["the cat was on the mat", "a dog ran\nin the park"]
    refs = ["the cat sat on the mat", "the dog runs\nin a park today"]
    ours = rouge_scores(preds, refs)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    for key in ROUGE_TYPES:
        expected = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(preds, refs)) / 2
        assert ours[key] == pytest.approx(expected, abs=1e-12)
    # Pair 1 by hand: unigrams 5 of 6 shared -> F1 5/6; bigrams the-cat, on-the, the-mat: 3 of 5 -> 0.6.
    one = rouge_scores(preds[:1], refs[:1])
    assert one["rouge1"] == pytest.approx(5 / 6) and one["rouge2"] == pytest.approx(0.6)
    assert rouge_scores(["same words here"], ["same words here"]) == {k: 1.0 for k in ROUGE_TYPES}


def _recipe(tmp_path, fmt: str = "instruction", **data):
    rows = [{"prompt": f"Add {i} and {i}.\n", "response": f"It is {2 * i}."} for i in range(40)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return recipe_from_dict({
        "output_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"from_config": dict(TINY_LLAMA), "tokenizer": str(TOKENIZER_DIR), "dtype": "float32"},
        "quant": {"method": "none"}, "peft": {"r": 4, "alpha": 8},
        "data": {"path": str(path), "format": fmt, "max_len": 64, "packing": False, "eval_split": 0.2, **data},
        "train": {"micro_batch_size": 3},
    })


def _adapter_for(recipe, tokenizer, out) -> str:
    from qtrain.train.setup import resolve_base_dir

    base = resolve_base_dir(recipe, tokenizer)
    model = load_model(base, torch.float32, CPU, None)
    inject_lora(model, recipe.peft)
    randomize_lora_b(model, seed=2, std=0.1)
    save_adapter(model, recipe.peft, str(base), out)
    return str(out), model


def _hand_nll(model, examples, pad_id: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            batch = collate([ex], pad_id)
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
            labels = batch["labels"][0, 1:]
            keep = labels != -100
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def test_eval_reports_loss_perplexity_and_rouge(tmp_path, tokenizer):
    recipe = _recipe(tmp_path)
    adapter, trained = _adapter_for(recipe, tokenizer, tmp_path / "adapter")
    opts = EvalOptions(adapter=adapter, out_dir=str(tmp_path / "ev"), sampling=SamplingConfig(max_new_tokens=6))
    report = evaluate_recipe(recipe, opts)
    assert report["perplexity"] == math.exp(report["eval_loss"])
    data = build_datasets(recipe.data, tokenizer, recipe.seed)
    assert report["eval_loss"] == pytest.approx(_hand_nll(trained, data.eval, tokenizer.pad_token_id), rel=1e-5)
    assert report["eval_sequences"] == 8 and report["generation"]["rows"] == 8
    assert set(report["rouge"]) == set(ROUGE_TYPES) and all(0 <= v <= 1 for v in report["rouge"].values())
    assert json.loads((tmp_path / "ev" / "eval.json").read_text()) == report
    rows = [json.loads(line) for line in (tmp_path / "ev" / "eval_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["prompt"].startswith("Add ") and rows[0]["reference"].startswith("It is")
    base = evaluate_recipe(recipe, EvalOptions(no_adapter=True, out_dir=str(tmp_path / "ev0"), generate=False))
    assert base["rouge"] is None and base["eval_loss"] != report["eval_loss"]


def test_references_are_the_held_out_rows_with_their_exact_prompts(tmp_path, tokenizer):
    recipe = _recipe(tmp_path)
    refs = references(recipe.data, tokenizer, recipe.seed)
    data = build_datasets(recipe.data, tokenizer, recipe.seed)   # packing off: one example per eval row
    assert len(refs.rows) == len(data.eval) == 8
    for ref, ex in zip(refs.rows, data.eval):
        n = len(ref.prompt_ids)
        assert ex.input_ids[:n] == ref.prompt_ids and ex.labels[n] != -100 and set(ex.labels[:n]) == {-100}
        assert tokenizer.decode(ex.input_ids[n:-1]) == ref.reference


def test_summarization_references_use_the_training_prompt_template(tmp_path, tokenizer):
    from qtrain.config.schema import DataConfig
    from qtrain.data import SUMMARIZATION_PROMPT

    rows = [{"dialogue": f"A: hi {i}\nB: bye {i}", "summary": f"They greet {i}."} for i in range(10)]
    path = tmp_path / "dialog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    refs = references(DataConfig(path=str(path), format="summarization", eval_split=0.3), tokenizer, 0)
    assert len(refs.rows) == 3
    for ref in refs.rows:
        row = rows[ref.row - 1]
        prompt = SUMMARIZATION_PROMPT.format(dialogue=row["dialogue"])
        assert ref.prompt_ids == [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
        assert ref.reference == row["summary"]
    assert references(DataConfig(path=str(path), format="text"), tokenizer, 0).rows == []


def test_eval_bad_inputs(tmp_path, tokenizer):
    recipe = _recipe(tmp_path)
    with pytest.raises(CheckpointError, match="adapter dir not found.*--no-adapter"):
        evaluate_recipe(recipe, EvalOptions(generate=False))
    with pytest.raises(DataError, match="eval split is empty"):
        evaluate_recipe(_recipe(tmp_path, eval_split=0.0), EvalOptions(no_adapter=True, generate=False))
