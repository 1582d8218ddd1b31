"""Generation-based evaluation: sample responses to held-out prompts from the policy and the
reference, score them under both models and a judge, and summarise.

Works on DeepSpeed ZeRO-3 engines of ``po_ray.engine.LogpModel`` (or a bare ``LogpModel`` in one
process). Under ZeRO-3 every forward gathers parameters collectively, so every rank runs the same
number of generate calls and scoring forwards (a rank short of prompts repeats a dummy one and
drops its results), and ``generate(synced_gpus=True)`` keeps stepping until every rank's batch is
done. The results of all ranks are gathered, so every rank returns the same metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from po_ray.engine import run
from po_ray.eval.judges import Judge, run_judge
from po_ray.eval.metrics import (
    distinct_n,
    first_response,
    length_stats,
    monte_carlo_kl,
    repetition_rate,
    token_weighted_mean,
    win_rate,
)
from po_ray.sampler import shard_evenly


@dataclass(frozen=True)
class Sample:
    """One sampled response to one prompt, with its scores (plain values: it crosses ranks pickled)."""

    prompt_index: int
    sample_index: int
    prompt_ids: tuple
    response_ids: tuple
    """Policy's response: generated ids up to and including the first EOS."""
    ref_response_ids: tuple
    """The reference model's response to the same prompt, drawn with the same seed."""
    logps: float
    """log π(response | prompt), teacher-forced."""
    ref_logps: float
    """log π_ref(response | prompt) of the policy's response."""
    tokens: float
    entropy_sum: float
    topk_entropy_sum: float
    topk_mass_sum: float
    reward: float | None = None
    ref_reward: float | None = None

    @property
    def kl(self) -> float:
        return self.logps - self.ref_logps


def held_out_prompts(eval_pairs: Sequence, num_prompts: int) -> list[tuple[int, ...]]:
    """The first ``num_prompts`` distinct prompts of the held-out pairs, in their order."""
    seen: dict[tuple, None] = {}
    for pair in eval_pairs:
        seen.setdefault(tuple(pair.prompt_ids), None)
        if len(seen) == num_prompts:
            break
    if not seen:
        raise ValueError("eval: no held-out prompts; set data.eval_path or a data.eval_fraction > 0")
    return list(seen)


def hf_model_of(engine):
    """The Hugging Face model inside a LogpModel engine (or a bare LogpModel)."""
    return getattr(engine, "module", engine).model


def generate(engine, prompts: Sequence[Sequence[int]], settings, *, pad_token_id: int, eos_ids: set[int], seed: int,
             synced: bool, device) -> list[list[int]]:
    """Sample one response per prompt: ``B`` prompts -> ``B`` id lists, each cut after its first EOS.

    Prompts are left-padded (a decoder continues from the last position). Every other sampling knob a
    checkpoint's generation_config may set (top_k, repetition penalty, …) is neutralised, so the
    samples come from the model's own distribution at ``settings.temperature`` / ``top_p``.
    """
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        attention_mask[i, width - len(p) :] = 1
    greedy = settings.temperature == 0
    sampling = {} if greedy else {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    # A private RNG stream: the same seed gives policy and reference the same random numbers, and
    # the training RNG is left where it was.
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = hf_model_of(engine).generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=not greedy,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=sorted(eos_ids),
            pad_token_id=pad_token_id,
            use_cache=True,
            synced_gpus=synced,
            **sampling,
        )
    return [first_response(row, eos_ids) for row in out[:, width:].tolist()]


def collate_responses(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int,
                      device) -> dict[str, torch.Tensor]:
    """``N`` (prompt, response) id lists -> right-padded ``input_ids``/``attention_mask``/``completion_mask`` ``(N, L)``."""
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        completion_mask[i, len(p) : len(row)] = True
    return {k: v.to(device) for k, v in
            {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}.items()}


def eos_ids_of(engine, tokenizer) -> set[int]:
    """The tokenizer's EOS and any the model's generation_config lists (chat models often add one)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(hf_model_of(engine).generation_config, "eos_token_id", None)
    ids |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    if not ids:
        raise ValueError("eval: the tokenizer has no EOS token, so a response could never end; set model.tokenizer")
    return ids


def generation_eval(policy, reference, prompts: Sequence[Sequence[int]], tokenizer, settings, *, judge: Judge | None = None,
                    rank: int = 0, world: int = 1, device="cpu") -> tuple[dict[str, float], list[Sample]]:
    """Sample, score and summarise; collective under ZeRO-3 (every rank calls it with the same arguments).

    Returns the ``gen/…`` metrics (see ``summarize``) and every rank's samples, ordered by
    (prompt, sample). ``settings`` is the config's ``eval`` section.
    """
    rows = [(p, s) for p in range(len(prompts)) for s in range(settings.samples_per_prompt)]
    mine = shard_evenly(rows, world, rank)
    size = settings.batch_size
    n_batches = -(-len(rows) // (world * size))
    eos_ids = eos_ids_of(policy, tokenizer)
    pad = tokenizer.pad_token_id
    samples: list[Sample] = []
    for b in range(n_batches):
        chunk = mine[b * size : (b + 1) * size]
        batch_prompts = [prompts[p] for p, _ in chunk or rows[:1]]
        # Per (rank, batch): different batches draw different numbers, policy and reference the same.
        seed = (settings.seed * 1_000_003 + rank) * 1_000_003 + b
        kw = dict(pad_token_id=pad, eos_ids=eos_ids, seed=seed, synced=world > 1 and dist.is_initialized(),
                  device=device)
        responses = generate(policy, batch_prompts, settings, **kw)
        ref_responses = generate(reference, batch_prompts, settings, **kw)
        batch = collate_responses(batch_prompts, responses, pad, device)
        with torch.no_grad():
            scored, ref_scored = run(policy, batch), run(reference, batch)
        for i, (p, s) in enumerate(chunk):
            samples.append(Sample(
                prompt_index=p, sample_index=s, prompt_ids=tuple(prompts[p]), response_ids=tuple(responses[i]),
                ref_response_ids=tuple(ref_responses[i]), logps=float(scored.logps[i]),
                ref_logps=float(ref_scored.logps[i]), tokens=float(scored.tokens[i]),
                entropy_sum=float(scored.entropy_sum[i]), topk_entropy_sum=float(scored.topk_entropy_sum[i]),
                topk_mass_sum=float(scored.topk_mass_sum[i]),
            ))  # fmt: skip
    if judge is not None and samples:
        samples = judge_samples(judge, samples, tokenizer)
    everyone = _gather(samples, world)
    everyone.sort(key=lambda s: (s.prompt_index, s.sample_index))
    return summarize(everyone, settings), everyone


def judge_samples(judge: Judge, samples: list[Sample], tokenizer) -> list[Sample]:
    """Score each policy and reference response once, in one judge call; returns samples with rewards."""
    prompts = [decode(tokenizer, s.prompt_ids) for s in samples]
    texts = [decode(tokenizer, s.response_ids) for s in samples] + [decode(tokenizer, s.ref_response_ids) for s in samples]
    scores = run_judge(judge, prompts + prompts, texts)
    n = len(samples)
    return [replace(s, reward=scores[i], ref_reward=scores[n + i]) for i, s in enumerate(samples)]


def summarize(samples: Sequence[Sample], settings) -> dict[str, float]:
    """``gen/…`` metrics over all samples: lengths (policy; ``ref_length_mean`` for the drift), KL
    per sequence and per token, entropy / top-k entropy / top-k mass per generated token, distinct-1…n
    and the n-gram repetition rate, and with a judge the mean rewards and the policy's win rate."""
    if not samples:
        raise ValueError("summarize: no samples")
    lengths = [len(s.response_ids) for s in samples]
    tokens = [s.tokens for s in samples]
    out = length_stats(lengths, settings.max_new_tokens)
    out["ref_length_mean"] = sum(len(s.ref_response_ids) for s in samples) / len(samples)
    out.update(monte_carlo_kl([s.logps for s in samples], [s.ref_logps for s in samples], tokens))
    for name in ("entropy", "topk_entropy", "topk_mass"):
        out[name] = token_weighted_mean([getattr(s, f"{name}_sum") for s in samples], tokens)
    responses = [s.response_ids for s in samples]
    for n in range(1, settings.distinct_n + 1):
        out[f"distinct_{n}"] = distinct_n(responses, n)
    out["repetition_rate"] = repetition_rate(responses, settings.distinct_n)
    if samples[0].reward is not None:
        rewards, ref_rewards = [s.reward for s in samples], [s.ref_reward for s in samples]
        out["reward_mean"] = sum(rewards) / len(rewards)
        out["ref_reward_mean"] = sum(ref_rewards) / len(ref_rewards)
        out["win_rate"] = win_rate(rewards, ref_rewards, [s.response_ids == s.ref_response_ids for s in samples])
    return {f"gen/{k}": v for k, v in out.items()}


def samples_table(samples: Sequence[Sample], tokenizer, step: int) -> dict[str, list]:
    """Columns for an MLflow table: step, prompt, response, length, kl, reward, and the reference's."""
    def none_to_nan(x):
        return math.nan if x is None else x

    return {
        "step": [step] * len(samples),
        "prompt": [decode(tokenizer, s.prompt_ids) for s in samples],
        "response": [decode(tokenizer, s.response_ids) for s in samples],
        "length": [len(s.response_ids) for s in samples],
        "kl": [s.kl for s in samples],
        "reward": [none_to_nan(s.reward) for s in samples],
        "ref_response": [decode(tokenizer, s.ref_response_ids) for s in samples],
        "ref_reward": [none_to_nan(s.ref_reward) for s in samples],
    }


def sample_records(samples: Sequence[Sample], tokenizer) -> list[dict]:
    """One JSON-able dict per sample: its fields plus the decoded texts and kl (for samples.jsonl)."""
    return [{**asdict(s), "kl": s.kl, "prompt": decode(tokenizer, s.prompt_ids),
             "response": decode(tokenizer, s.response_ids), "ref_response": decode(tokenizer, s.ref_response_ids)}
            for s in samples]


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _gather(samples: list[Sample], world: int) -> list[Sample]:
    if world == 1 or not dist.is_initialized():
        return list(samples)
    parts: list = [None] * world
    dist.all_gather_object(parts, samples)
    return [s for part in parts for s in part]
