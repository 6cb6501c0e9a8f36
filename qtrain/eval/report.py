"""The comparison report: `report.md` (one table row per variant) and PNG plots drawn with matplotlib.

Input is the list of per-variant results `qtrain.eval.compare` collects; nothing here trains or
evaluates. Plots use matplotlib's object API on an Agg canvas (no global pyplot state, no display).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from qtrain.config.methods import METHOD_RULES
from qtrain.config.peft_checks import split_variant
from qtrain.eval.rouge import ROUGE_TYPES

METHOD_LABELS = {"full": "full fine-tune", "lora": "LoRA", "dora": "DoRA", "ia3": "(IA)³",
                 "prompt_tuning": "prompt tuning", "prefix_tuning": "prefix tuning", "bottleneck": "bottleneck adapter",
                 "compacter": "compacter", "bitfit": "BitFit", "freeze": "layer freezing", "diff_pruning": "diff pruning"}


def label(variant: str) -> str:
    """A table/legend label: `base (untouched)`, `full fine-tune`, `LoRA (NF4 base)`, `(IA)³ (16-bit base)`, ..."""
    method, quant = split_variant(variant)
    if method == "base":
        return "base (untouched)"
    name = METHOD_LABELS.get(method, method)
    if quant is None or METHOD_RULES[method].unquantized_base:  # (its base is always 16-bit)
        return name
    return f"{name} ({'NF4' if quant == 'nf4' else '16-bit'} base)"
ROUGE_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}


def human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _num(value: Optional[float], fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _pct(value: Optional[float]) -> str:
    """Three decimals, or three significant digits below 0.1 % (prompt tuning trains ~0.001 %)."""
    if value is None:
        return "—"
    return format(value, ".3f") if value >= 0.1 else format(value, ".3g")


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """One row of table cells per variant, in the order given."""
    rows = []
    for r in results:
        rouge = r.get("rouge") or {}
        trainable, pct = r.get("trainable_params"), trainable_percent(r)
        rows.append([label(r["variant"]),
                     "0" if r["variant"] == "base" else _num(trainable, ","),
                     "0" if r["variant"] == "base" else _pct(pct),
                     human_bytes(r.get("artifact_bytes")),
                     _num(r.get("peak_memory_mib"), ".0f"),
                     _num(r.get("train_seconds"), ".1f"),
                     _num(r.get("final_train_loss"), ".4f"),
                     _num(r.get("eval_loss"), ".4f"),
                     *(_num(rouge.get(k), ".4f") for k in ROUGE_TYPES)])
    return rows


HEADER = ["variant", "trainable params", "trainable %", "artifact on disk", "peak memory (MiB)",
          "train time (s)", "final train loss", "eval loss", *(ROUGE_NAMES[k] for k in ROUGE_TYPES)]


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def write_report(out_dir: Path, results: list[dict[str, Any]], context: dict[str, Any], plots: list[Path]) -> Path:
    """Write report.md (linking `plots`, files in `out_dir`) and compare.json; returns the report's path."""
    from qtrain.checkpoint.atomic import atomic_write_text

    lines = [f"# qtrain compare: {context['recipe']}", "",
             f"Same data ({context['data']}), same budget ({context['steps']} steps of "
             f"{context['global_batch']} sequences), same base ({context['base']}), device {context['device']}.", "",
             markdown_table(results), "",
             "- trainable %: of the model's parameters (an NF4 weight counts as the parameters it stands for).",
             "- artifact on disk: what must be kept per task — the adapter dir, or for full fine-tuning the whole "
             "model dir.",
             "- peak memory: of the training process (peak RSS on CPU, max allocated on CUDA); train time: "
             "wall clock of the whole training run, model loading included.",
             f"- eval loss: mean token NLL over the eval split; ROUGE: F1 (rouge-score, stemming) of greedy "
             f"generations for {context['gen_rows']} eval rows.", ""]
    lines += [f"![{p.name}]({p.name})" for p in plots]
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(lines).rstrip() + "\n")
    atomic_write_text(out_dir / "compare.json", json.dumps({"context": context, "results": results}, indent=2) + "\n")
    return report


def _figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> Optional[Path]:
    """Training loss against step, one line per trained variant; None (and no file at `path`) when there
    is nothing to draw."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        path.unlink(missing_ok=True)  # never leave an earlier run's plot behind
        return None
    fig, ax = _figure()
    for variant, points in curves.items():
        steps, losses = zip(*points)
        ax.plot(steps, losses, label=label(variant), linewidth=1.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (mean token NLL)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
    return path


def plot_rouge(results: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """Grouped bars: ROUGE-1/2/L/Lsum per variant; None (and no file at `path`) when no variant has ROUGE."""
    scored = [r for r in results if r.get("rouge")]
    if not scored:
        path.unlink(missing_ok=True)
        return None
    fig, ax = _figure()
    width = 0.8 / len(scored)
    for i, r in enumerate(scored):
        xs = [k + (i - (len(scored) - 1) / 2) * width for k in range(len(ROUGE_TYPES))]
        bars = ax.bar(xs, [r["rouge"][k] for k in ROUGE_TYPES], width, label=label(r["variant"]))
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(len(ROUGE_TYPES)), [ROUGE_NAMES[k] for k in ROUGE_TYPES])
    ax.set_ylabel("F1")
    ax.set_ylim(0, 1)
    ax.set_title("ROUGE on the eval split")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
    return path


def trainable_percent(result: dict[str, Any]) -> Optional[float]:
    trainable, total = result.get("trainable_params"), result.get("total_params")
    return None if trainable is None or not total else 100.0 * trainable / total


def plot_rouge_vs_trainable(results: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """ROUGE-1 against the trained share of parameters (log x), one point per method: the lecture's
    chart on our data. None (and no file at `path`) with fewer than one trained, scored variant."""
    points = [(trainable_percent(r), r["rouge"]["rouge1"], r) for r in results
              if r.get("rouge") and trainable_percent(r)]
    base = next((r for r in results if r["variant"] == "base" and r.get("rouge")), None)
    if not points:
        path.unlink(missing_ok=True)
        return None
    fig, ax = _figure()
    for pct, score, r in points:
        ax.scatter([pct], [score], s=36, zorder=3)
        ax.annotate(label(r["variant"]), (pct, score), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if base is not None:
        ax.axhline(base["rouge"]["rouge1"], color="grey", linestyle="--", linewidth=1, label=label("base"))
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel("ROUGE-1 (F1)")
    ax.set_title("ROUGE-1 vs trainable parameters")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(str(path))
    return path
