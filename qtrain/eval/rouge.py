"""ROUGE-1/2/L/Lsum F1, averaged over rows, computed by the `rouge-score` package (stemming on)."""

from __future__ import annotations

from typing import Sequence

from qtrain.errors import ConfigError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigError("ROUGE needs the rouge-score package: pip install rouge-score") from None
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean F1 (0..1) of each ROUGE type over aligned (prediction, reference) pairs.

    rougeLsum treats newlines as sentence boundaries, as rouge-score does; texts are passed as is.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge_scores needs at least one pair")
    scorer = _scorer()
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        # rouge-score's argument order is (target, prediction).
        scores = scorer.score(ref, pred)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: total / len(predictions) for key, total in totals.items()}
