"""`qtrain plan`: a per-device memory model of a QLoRA run, from the recipe and the model's config.json.

    plan = plan_recipe(recipe, Target("cuda", world=2, capacity=24 * 2**30))
    plan.peak, plan.needed, plan.fits, suggestions(plan)

`planned_peak_mib` is what a run prints in its header and stores in summary.json beside the
measured peak.
"""

from qtrain.plan.estimate import Plan, estimate
from qtrain.plan.planner import planned_peak_mib, plan_recipe
from qtrain.plan.target import Target, parse_memory
from qtrain.plan.verdict import Suggestion, suggestions

__all__ = ["Plan", "Suggestion", "Target", "estimate", "parse_memory", "plan_recipe", "planned_peak_mib",
           "suggestions"]
