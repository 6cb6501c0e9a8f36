"""The comparison report's table and plots, from hand-made results (no training)."""

from __future__ import annotations

from qtrain.eval.compare import own_keys, variant_data, variant_settings
from qtrain.eval.report import (HEADER, human_bytes, label, markdown_table, plot_loss_curves, plot_rouge,
                                plot_rouge_vs_trainable, table_rows)
from qtrain.config.schema import Recipe

ROUGE = {"rouge1": 0.5, "rouge2": 0.25, "rougeL": 0.4, "rougeLsum": 0.41}


def results():
    return [{"variant": "base", "eval_loss": 7.5, "rouge": {k: 0.0 for k in ROUGE}},
            {"variant": "full", "trainable_params": 1000, "total_params": 1000, "artifact_bytes": 4 * 2**20,
             "peak_memory_mib": 812.4, "train_seconds": 35.26, "final_train_loss": 0.5, "eval_loss": 0.6,
             "rouge": ROUGE},
            {"variant": "qlora", "trainable_params": 25, "total_params": 1000, "artifact_bytes": 3000,
             "peak_memory_mib": 700.0, "train_seconds": 20.0, "final_train_loss": 1.0, "eval_loss": 1.1,
             "rouge": None}]


def test_rows_hold_each_variants_figures_and_dashes_for_what_it_lacks():
    rows = table_rows(results())
    assert all(len(r) == len(HEADER) for r in rows)
    base, full, qlora = rows
    assert base[:8] == ["base (untouched)", "0", "0", "—", "—", "—", "—", "7.5000"]
    assert full[1:8] == ["1,000", "100.000", "4.0 MiB", "812", "35.3", "0.5000", "0.6000"]
    assert full[8:] == ["0.5000", "0.2500", "0.4000", "0.4100"]
    assert qlora[2:4] == ["2.500", "2.9 KiB"] and qlora[8:] == ["—"] * 4


def test_markdown_table_is_header_rule_and_one_line_per_variant():
    lines = markdown_table(results()).splitlines()
    assert len(lines) == 2 + 3 and lines[1] == "|" + "---|" * len(HEADER)
    assert lines[3].startswith("| full fine-tune | 1,000 |")


def test_human_bytes():
    assert [human_bytes(n) for n in (None, 512, 2048, 5 * 2**30)] == ["—", "512 B", "2.0 KiB", "5.0 GiB"]


def test_plots_are_written_only_when_there_is_something_to_draw(tmp_path):
    (tmp_path / "a.png").write_bytes(b"an earlier run's plot")
    (tmp_path / "b.png").write_bytes(b"an earlier run's plot")
    assert plot_loss_curves({"full": []}, tmp_path / "a.png") is None
    assert plot_rouge([r for r in results() if r["variant"] == "qlora"], tmp_path / "b.png") is None
    assert plot_loss_curves({"full": [(1, 3.0), (2, 2.0)], "lora": [(1, 3.1)]}, tmp_path / "c.png").is_file()
    assert plot_rouge(results(), tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()


def test_variants_set_method_base_and_learning_rate():
    r = Recipe()
    r.train.lr, r.compare.full_lr, r.compare.method_lr = 3e-3, 1e-4, {"prompt_tuning": 3e-2}
    assert variant_settings("full", r) == {"peft.method": "full", "quant.method": "none", "train.lr": 1e-4}
    assert variant_settings("lora@none", r) == {"peft.method": "lora", "quant.method": "none", "train.lr": 3e-3}
    assert variant_settings("qlora", r) == {"peft.method": "lora", "quant.method": "nf4", "train.lr": 3e-3}
    assert variant_settings("ia3", r)["quant.method"] == r.quant.method == "nf4"  # the recipe's base
    assert variant_settings("prompt_tuning", r)["train.lr"] == 3e-2
    assert variant_settings("base", r) == {"quant.method": "none"}
    r.compare.full_lr = None
    assert variant_settings("full", r)["train.lr"] == 3e-3


def test_a_variant_keeps_only_the_peft_keys_its_method_reads(tmp_path):
    raw = {"output_dir": "x", "peft": {"method": "lora", "r": 8, "alpha": 16, "num_virtual_tokens": 4}}
    r = Recipe()
    ia3 = variant_data(raw, "ia3", r, tmp_path)
    assert ia3["peft"] == {"method": "ia3"} and ia3["output_dir"] == str(tmp_path / "ia3")
    assert variant_data(raw, "lora@nf4", r, tmp_path)["peft"] == {"method": "lora", "r": 8, "alpha": 16}
    assert variant_data(raw, "prompt_tuning", r, tmp_path)["peft"] == {"method": "prompt_tuning",
                                                                       "num_virtual_tokens": 4}
    assert raw["peft"]["r"] == 8  # the user's dict is untouched
    # the compare recipe itself is checked as its own method's recipe: other methods' keys are theirs
    assert own_keys(raw)["peft"] == {"method": "lora", "r": 8, "alpha": 16}


def test_labels_name_the_method_and_its_base():
    assert [label(v) for v in ("base", "full", "lora@none", "qlora", "ia3", "prompt_tuning@nf4")] == [
        "base (untouched)", "full fine-tune", "LoRA (16-bit base)", "LoRA (NF4 base)", "(IA)³",
        "prompt tuning (NF4 base)"]


def test_rouge_vs_trainable_plot_needs_a_trained_scored_variant(tmp_path):
    assert plot_rouge_vs_trainable(results()[:1], tmp_path / "a.png") is None
    assert plot_rouge_vs_trainable(results(), tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
