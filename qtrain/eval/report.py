"""The comparison report: `report.md` (one table row per variant) and PNG plots drawn with matplotlib.

Input is the list of per-variant results `qtrain.eval.compare` collects; nothing here trains or
evaluates. Plots use matplotlib's object API on an Agg canvas (no global pyplot state, no display).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from qtrain.eval.rouge import ROUGE_TYPES

LABELS = {"base": "base (untouched)", "full": "full fine-tune", "lora": "LoRA (16-bit base)",
          "qlora": "QLoRA (NF4 base)"}
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


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """One row of table cells per variant, in the order given."""
    rows = []
    for r in results:
        rouge = r.get("rouge") or {}
        trainable, total = r.get("trainable_params"), r.get("total_params")
        pct = None if trainable is None or not total else 100.0 * trainable / total
        rows.append([LABELS.get(r["variant"], r["variant"]),
                     "0" if r["variant"] == "base" else _num(trainable, ","),
                     "0" if r["variant"] == "base" else _num(pct, ".3f"),
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
        ax.plot(steps, losses, label=LABELS.get(variant, variant), linewidth=1.6)
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
        bars = ax.bar(xs, [r["rouge"][k] for k in ROUGE_TYPES], width, label=LABELS.get(r["variant"], r["variant"]))
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
