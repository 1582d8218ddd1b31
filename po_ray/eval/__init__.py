"""Generation-based evaluation: what the policy actually generates on held-out prompts.

``metrics`` (pure functions: lengths, Monte-Carlo KL, distinct-n, win rate), ``judges`` (the judge
registry and the reward-model judge), ``generation`` (sampling and scoring under ZeRO-3),
``in_training`` (the training loop's one call) and ``launch`` (`po-ray eval`, imported on demand).

``generation`` (and with it DeepSpeed) is imported on first use of its names, so the study driver
can check scores against ``metrics`` without loading DeepSpeed.
"""

from po_ray.eval.judges import available_judges, build_judge, register_judge

_FROM_GENERATION = ("Prompt", "Sample", "generation_eval", "held_out_prompts", "summarize")

__all__ = ["available_judges", "build_judge", "register_judge", *_FROM_GENERATION]


def __getattr__(name: str):
    if name in _FROM_GENERATION:
        from po_ray.eval import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'po_ray.eval' has no attribute {name!r}")
