"""Generation-based evaluation: what the policy actually generates on held-out prompts.

``metrics`` (pure functions: lengths, Monte-Carlo KL, distinct-n, win rate), ``judges`` (the judge
registry and the reward-model judge), ``generation`` (sampling and scoring under ZeRO-3),
``in_training`` (the training loop's one call) and ``launch`` (`po-ray eval`, imported on demand).
"""

from po_ray.eval.generation import Prompt, Sample, generation_eval, held_out_prompts, summarize
from po_ray.eval.judges import available_judges, build_judge, register_judge

__all__ = [
    "Prompt",
    "Sample",
    "available_judges",
    "build_judge",
    "generation_eval",
    "held_out_prompts",
    "register_judge",
    "summarize",
]
