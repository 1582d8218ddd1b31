"""The judge registry: a name -> ``judge(prompts, responses) -> list[float]``, one score per response.

A judge scores text (prompt and response decoded without special tokens); higher is better. Adding
one is one decorated function in a module listed in ``eval.plugins``::

    @register_judge("short_is_good")
    def short_is_good(prompts, responses):
        return [-float(len(r)) for r in responses]

A judge may also take keyword-only settings, filled from the config by name: ``model_path``
(eval.judge_model), ``trust_remote_code`` (eval.judge_trust_remote_code), ``batch_size``
(eval.batch_size) and ``device`` (the worker's torch device). The built-in ``reward_model`` judge
uses all four.

A judge that also takes a keyword-only ``conversations`` gets, with each call, one entry per
response: the prompt as a list of ``{role, content}`` messages for a conversational row, or None
for plain text. The ``reward_model`` judge uses it to render the conversation with the reward
model's own chat template.

Every score must be a finite number, one per response; anything else is an error naming the judge.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from functools import lru_cache, partial

import torch

Judge = Callable[[list[str], list[str]], list[float]]
SETTINGS = ("model_path", "trust_remote_code", "batch_size", "device")
CONVERSATIONS = "conversations"  # a per-call keyword, not a setting: the prompts' messages

_REGISTRY: dict[str, Callable[..., list[float]]] = {}


def register_judge(name: str) -> Callable:
    """Decorator registering ``fn(prompts, responses, *, <settings>) -> list[float]`` under ``name``."""

    def decorator(fn: Callable) -> Callable:
        params = list(inspect.signature(fn).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        unknown = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in (*SETTINGS, CONVERSATIONS)]
        if len(positional) != 2 or unknown:
            raise TypeError(
                f"register_judge({name!r}): {fn.__qualname__} must look like fn(prompts, responses, *, setting=...), "
                f"with settings among {', '.join(SETTINGS)} (and {CONVERSATIONS})" + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            )
        existing = _REGISTRY.get(name)
        # A re-import registers the same function again; another function under a taken name is a mistake.
        if existing is not None and (existing.__module__, existing.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"register_judge: {name!r} is already registered by {existing.__module__}; pick another name")
        _REGISTRY[name] = fn
        return fn

    return decorator


def available_judges() -> list[str]:
    return sorted(_REGISTRY)


def import_judge_plugins(eval_cfg) -> None:
    """Import the modules named in ``eval.plugins`` so their ``@register_judge`` calls run."""
    for module in eval_cfg.plugins:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"eval.plugins: cannot import {module!r}: {e}; is it installed on every node?") from None


def build_judge(eval_cfg, device: torch.device | str = "cpu") -> Judge | None:
    """The judge named by ``eval.judge`` with its settings bound (None when eval.judge is empty)."""
    if not eval_cfg.judge:
        return None
    import_judge_plugins(eval_cfg)
    try:
        fn = _REGISTRY[eval_cfg.judge]
    except KeyError:
        raise ValueError(
            f"eval.judge: unknown judge {eval_cfg.judge!r}; registered: {', '.join(available_judges())} "
            "(a judge from your own module is registered when eval.plugins imports it)"
        ) from None
    values = {"model_path": eval_cfg.judge_model, "trust_remote_code": eval_cfg.judge_trust_remote_code,
              "batch_size": eval_cfg.batch_size, "device": torch.device(device)}
    wanted = inspect.signature(fn).parameters
    return partial(fn, **{k: v for k, v in values.items() if k in wanted})


def run_judge(judge: Judge, prompts: Sequence[str], responses: Sequence[str], *,
              conversations: Sequence[list[dict] | None] | None = None, name: str = "") -> list[float]:
    """Call ``judge`` once on all responses; check it gave one finite number per response.

    ``conversations`` (one per response, None for plain text) is passed only to a judge that takes
    it. ``name`` (eval.judge) is what the errors call the judge. A NaN or infinite score would make
    the mean reward NaN and count as a loss in the win rate, silently, so it is refused.
    """
    name = name or getattr(judge, "__name__", type(judge).__name__)
    extra = {CONVERSATIONS: list(conversations or [None] * len(responses))} if _takes_conversations(judge) else {}
    scores = judge(list(prompts), list(responses), **extra)
    try:
        scores = list(scores)
    except TypeError:
        raise ValueError(f"eval.judge {name!r} returned {type(scores).__name__}; it must return a list of floats, "
                         "one per response") from None
    if len(scores) != len(responses):
        raise ValueError(f"eval.judge {name!r} returned {len(scores)} scores for {len(responses)} responses; "
                         "it must give one each")
    out = []
    for i, score in enumerate(scores):
        try:
            value = float(score)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"eval.judge {name!r} gave score {score!r} to response {i} ({responses[i][:60]!r}); "
                             "every score must be a finite number")
        out.append(value)
    return out


def _takes_conversations(judge: Judge) -> bool:
    try:
        return CONVERSATIONS in inspect.signature(judge).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


@register_judge("reward_model")
def reward_model(prompts, responses, *, conversations=None, model_path: str, trust_remote_code: bool = False,
                 batch_size: int = 8, device: torch.device = torch.device("cpu")) -> list[float]:
    """A Hugging Face sequence-classification reward model (one label) scoring each response, in
    batches; its score is the label's logit.

    A conversational prompt is rendered with the reward model's own chat template, the response as
    the final assistant message: reward models are trained on their template's text, not on the
    policy's. A plain-text prompt, or any prompt when the reward model's tokenizer has no chat
    template, is scored as the text pair (prompt, response).
    """
    model, tokenizer = _load_reward_model(model_path, trust_remote_code, str(device))
    conversations = conversations or [None] * len(responses)
    encoded = [reward_model_inputs(tokenizer, p, r, c) for p, r, c in zip(prompts, responses, conversations)]
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            enc = tokenizer.pad(encoded[i : i + batch_size], padding=True, return_tensors="pt").to(device)
            scores += model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0].float().tolist()
    return scores


def reward_model_inputs(tokenizer, prompt: str, response: str, conversation: list[dict] | None) -> dict:
    """One (prompt, response) as the reward model's ``input_ids``/``attention_mask`` (unpadded)."""
    if conversation and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([*conversation, {"role": "assistant", "content": response}], tokenize=False)
        # The template writes the special tokens (BOS, turn markers) itself.
        enc = tokenizer(text, add_special_tokens=False, truncation=True)
    else:
        enc = tokenizer(prompt, response, truncation=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@lru_cache(maxsize=2)
def _load_reward_model(path: str, trust_remote_code: bool, device: str):
    """Loaded once per worker process and kept: every eval of a run reuses it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from po_ray.model.build import zero3_off

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # A whole copy on each worker: while the policy's ZeRO-3 config is alive, transformers would
    # otherwise partition this model too, and a partitioned model needs every rank in each forward.
    with zero3_off():
        model = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=trust_remote_code, use_safetensors=True,
            # fp32 on CPU; on GPU the checkpoint's own dtype.
            dtype=torch.float32 if device == "cpu" else "auto",
        )
    if model.config.num_labels != 1:
        raise ValueError(f"eval.judge_model: {path} has {model.config.num_labels} labels; a reward model has exactly 1")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # it reads the score at the last non-pad token
    return model.to(device).eval(), tokenizer
