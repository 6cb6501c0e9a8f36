"""Evaluation: loss/perplexity over the eval split, ROUGE on generated answers."""

from qtrain.eval.perplexity import LossResult, eval_loss
from qtrain.eval.rouge import ROUGE_TYPES, rouge_scores

__all__ = ["ROUGE_TYPES", "LossResult", "eval_loss", "rouge_scores"]
