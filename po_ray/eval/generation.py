"""Generation-based evaluation: sample responses to held-out prompts from the policy and the
reference, score them under both models and a judge, and summarise.

Works on DeepSpeed ZeRO-3 engines of ``po_ray.engine.LogpModel`` (or a bare ``LogpModel`` in one
process). Under ZeRO-3 every forward gathers parameters collectively, so every rank runs the same
number of generate calls and scoring forwards (a rank short of prompts repeats a dummy one and
drops its results), and ``generate(synced_gpus=True)`` keeps stepping until every rank's batch is
done. The results of all ranks are gathered, so every rank returns the same metrics.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

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
class Prompt:
    """A held-out prompt: its token ids and, for a conversational row, its messages."""

    ids: tuple[int, ...]
    messages: tuple[tuple[str, str], ...] = ()
    """``(role, content)`` pairs of a conversational prompt; empty for plain text."""

    def conversation(self) -> list[dict] | None:
        """The messages as ``[{role, content}]`` for a judge, or None for a plain-text prompt."""
        return [{"role": r, "content": c} for r, c in self.messages] or None


@dataclass(frozen=True)
class Sample:
    """One sampled response to one prompt, with its scores (plain values: it crosses ranks pickled)."""

    prompt_index: int
    sample_index: int
    prompt_ids: tuple
    response_ids: tuple
    """Policy's response (at eval.temperature / top_p): generated ids up to and including the first EOS."""
    ref_response_ids: tuple
    """The reference model's response to the same prompt, drawn with the same random numbers."""
    logps: float
    """log π(response | prompt), teacher-forced."""
    ref_logps: float
    """log π_ref(response | prompt) of the policy's response."""
    tokens: float
    entropy_sum: float
    topk_entropy_sum: float
    topk_mass_sum: float
    cut_off: bool
    """The response reached max_new_tokens without an EOS (otherwise its last token is its first EOS)."""
    kl_logps: float
    """log π(y') of a response y' drawn from π itself (temperature 1, no top-p), for the Monte-Carlo
    KL; y' is this sample's response when eval.temperature is 1 and top_p 1, else a draw of its own."""
    kl_ref_logps: float
    """log π_ref(y')."""
    kl_tokens: float
    """Tokens of y'."""
    reward: float | None = None
    ref_reward: float | None = None

    @property
    def log_ratio(self) -> float:
        """log π(y|x) − log π_ref(y|x) of this response: one sample's term, not a KL."""
        return self.logps - self.ref_logps

    @property
    def content_ids(self) -> tuple:
        """The response without its trailing EOS: what distinct-n and the repetition rate count."""
        return self.response_ids if self.cut_off else self.response_ids[:-1]


def held_out_prompts(eval_pairs: Sequence, num_prompts: int) -> list[Prompt]:
    """The first ``num_prompts`` distinct prompts of the held-out pairs, in their order."""
    seen: dict[tuple, Prompt] = {}
    for pair in eval_pairs:
        ids = tuple(pair.prompt_ids)
        seen.setdefault(ids, Prompt(ids, tuple(pair.prompt_messages)))
        if len(seen) == num_prompts:
            break
    if not seen:
        raise ValueError("eval: no held-out prompts; set data.eval_path or a data.eval_fraction > 0")
    return list(seen.values())


def hf_model_of(engine):
    """The Hugging Face model inside a LogpModel engine (or a bare LogpModel)."""
    return getattr(engine, "module", engine).model


def response_seed(seed: int, stream: str, prompt_index: int, sample_index: int) -> int:
    """The seed of one response's random stream: a hash of (eval.seed, stream, prompt, sample).

    Per response, not per batch or rank, so a response is the same whatever the batch size or the
    number of workers; ``stream`` tells the evaluated samples ("sample") from the KL's ("kl").
    """
    digest = hashlib.blake2b(f"{seed}/{stream}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds must fit in a signed 64-bit int


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``(B, V) -> (B, V)``: logits outside the nucleus set to −inf (Holtzman et al. 2020).

    The nucleus is the smallest set of most probable tokens whose probability reaches ``top_p``
    (the most probable token always stays), as transformers' TopPLogitsWarper keeps it.
    """
    if top_p >= 1:
        return logits
    ascending, order = logits.sort(dim=-1)
    below = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
    below[..., -1] = False
    return logits.masked_fill(below.scatter(-1, order, below), -math.inf)


class PerResponseSampler(LogitsProcessor):
    """Sampling with one random stream per batch row, by the Gumbel-max trick.

    ``argmax(logits / T + g)`` with ``g`` i.i.d. standard Gumbel noise is an exact draw from
    ``softmax(logits / T)`` (restricted to the top-p nucleus), so greedy decoding of these scores
    samples. Each row's noise comes from its own generator seeded by ``response_seed``, so its
    tokens do not depend on which rows share the batch (transformers' own sampling draws one
    ``torch.multinomial`` for the whole batch from the global RNG).
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        self.seeds, self.temperature, self.top_p = list(seeds), temperature, top_p
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:  # on the device of the scores, known only now
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        logits = nucleus(scores.float() / self.temperature, self.top_p)
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
        return logits + gumbel


def generate(engine, prompts: Sequence[Sequence[int]], *, temperature: float, top_p: float, max_new_tokens: int,
             seeds: Sequence[int], pad_token_id: int, eos_ids: set[int], synced: bool, device) -> list[list[int]]:
    """Sample one response per prompt: ``B`` prompts -> ``B`` id lists, each cut after its first EOS.

    Prompts are left-padded (a decoder continues from the last position). ``seeds[i]`` seeds row
    i's sampling (see ``PerResponseSampler``); temperature 0 is greedy. Only these settings shape
    the samples: the checkpoint's generation_config (top_k, repetition penalty, min_length, bad or
    suppressed words, forced tokens, …) is set aside for the call, see ``_only_these_settings``.
    """
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        attention_mask[i, width - len(p) :] = 1
    # Greedy decoding throughout; sampling is the processor's noise, so no transformers warper runs.
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids),
                              pad_token_id=pad_token_id, use_cache=True)
    processors = LogitsProcessorList([PerResponseSampler(seeds, temperature, top_p)] if temperature > 0 else [])
    model = hf_model_of(engine)
    with torch.no_grad(), _only_these_settings(model):
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=config, logits_processor=processors, synced_gpus=synced)
    return [first_response(row, eos_ids) for row in out[:, width:].tolist()]


@contextmanager
def _only_these_settings(model):
    """Give ``model`` a blank generation_config for one generate call.

    transformers fills every field a passed GenerationConfig leaves unset from the model's own
    generation_config (a checkpoint's generation_config.json), so a fresh config alone would still
    inherit its top_k, repetition_penalty, bad_words_ids, suppress_tokens, … The blank one leaves
    only transformers' neutral global defaults under ours.
    """
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


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


def samples_are_exact(settings) -> bool:
    """Whether the evaluated samples are draws from the policy itself (temperature 1, top_p 1), so
    the Monte-Carlo KL can use them; otherwise it needs draws of its own."""
    return settings.temperature == 1 and settings.top_p >= 1


def generation_eval(policy, reference, prompts: Sequence[Prompt], tokenizer, settings, *, judge: Judge | None = None,
                    rank: int = 0, world: int = 1, device="cpu") -> tuple[dict[str, float], list[Sample]]:
    """Sample, score and summarise; collective under ZeRO-3 (every rank calls it with the same arguments).

    Returns the ``gen/…`` metrics (see ``summarize``) and every rank's samples, ordered by
    (prompt, sample). ``settings`` is the config's ``eval`` section. Each response's randomness is
    its own (``response_seed``), shared by policy and reference, so the samples and metrics do not
    depend on the number of workers or eval.batch_size.
    """
    rows = [(p, s) for p in range(len(prompts)) for s in range(settings.samples_per_prompt)]
    mine = shard_evenly(rows, world, rank)
    size = settings.batch_size
    n_batches = -(-len(rows) // (world * size))
    eos_ids = eos_ids_of(policy, tokenizer)
    pad = tokenizer.pad_token_id
    common = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=pad, eos_ids=eos_ids,
                  synced=world > 1 and dist.is_initialized(), device=device)

    def draw(engine, batch_rows, stream, temperature, top_p):
        seeds = [response_seed(settings.seed, stream, p, s) for p, s in batch_rows]
        return generate(engine, [prompts[p].ids for p, _ in batch_rows], temperature=temperature, top_p=top_p,
                        seeds=seeds, **common)

    def score(batch_rows, responses):
        batch = collate_responses([prompts[p].ids for p, _ in batch_rows], responses, pad, device)
        with torch.no_grad():
            return run(policy, batch), run(reference, batch)

    samples: list[Sample] = []
    for b in range(n_batches):
        chunk = mine[b * size : (b + 1) * size]
        batch_rows = chunk or rows[:1]  # a rank out of prompts repeats one: every rank runs every forward
        responses = draw(policy, batch_rows, "sample", settings.temperature, settings.top_p)
        ref_responses = draw(reference, batch_rows, "sample", settings.temperature, settings.top_p)
        scored, ref_scored = score(batch_rows, responses)
        if samples_are_exact(settings):
            kl_scored, kl_ref_scored = scored, ref_scored
        else:
            kl_scored, kl_ref_scored = score(batch_rows, draw(policy, batch_rows, "kl", 1.0, 1.0))
        for i, (p, s) in enumerate(chunk):
            samples.append(Sample(
                prompt_index=p, sample_index=s, prompt_ids=tuple(prompts[p].ids), response_ids=tuple(responses[i]),
                ref_response_ids=tuple(ref_responses[i]), logps=float(scored.logps[i]),
                ref_logps=float(ref_scored.logps[i]), tokens=float(scored.tokens[i]),
                entropy_sum=float(scored.entropy_sum[i]), topk_entropy_sum=float(scored.topk_entropy_sum[i]),
                topk_mass_sum=float(scored.topk_mass_sum[i]), cut_off=responses[i][-1] not in eos_ids,
                kl_logps=float(kl_scored.logps[i]), kl_ref_logps=float(kl_ref_scored.logps[i]),
                kl_tokens=float(kl_scored.tokens[i]),
            ))  # fmt: skip
    if judge is not None and samples:
        samples = judge_samples(judge, samples, prompts, tokenizer, name=settings.judge)
    everyone = _gather(samples, world)
    everyone.sort(key=lambda s: (s.prompt_index, s.sample_index))
    return summarize(everyone, settings), everyone


def judge_samples(judge: Judge, samples: list[Sample], prompts: Sequence[Prompt], tokenizer,
                  name: str = "") -> list[Sample]:
    """Score each policy and reference response once, in one judge call; returns samples with rewards."""
    texts = [decode(tokenizer, s.prompt_ids) for s in samples]
    conversations = [prompts[s.prompt_index].conversation() for s in samples]
    responses = [decode(tokenizer, s.response_ids) for s in samples] + [decode(tokenizer, s.ref_response_ids)
                                                                        for s in samples]
    scores = run_judge(judge, texts + texts, responses, conversations=conversations + conversations, name=name)
    n = len(samples)
    return [replace(s, reward=scores[i], ref_reward=scores[n + i]) for i, s in enumerate(samples)]


def summarize(samples: Sequence[Sample], settings) -> dict[str, float]:
    """``gen/…`` metrics over all samples: lengths (policy; ``ref_length_mean`` for the drift) and the
    share cut off at max_new_tokens, KL per sequence and per token (from draws of the policy at
    temperature 1, see ``Sample.kl_logps``), entropy / top-k entropy / top-k mass per generated
    token, distinct-1…n and the n-gram repetition rate of the responses without their EOS, and with
    a judge the mean rewards and the policy's win rate."""
    if not samples:
        raise ValueError("summarize: no samples")
    tokens = [s.tokens for s in samples]
    out = length_stats([len(s.response_ids) for s in samples], [s.cut_off for s in samples])
    out["ref_length_mean"] = sum(len(s.ref_response_ids) for s in samples) / len(samples)
    out.update(monte_carlo_kl([s.kl_logps for s in samples], [s.kl_ref_logps for s in samples],
                              [s.kl_tokens for s in samples]))
    for name in ("entropy", "topk_entropy", "topk_mass"):
        out[name] = token_weighted_mean([getattr(s, f"{name}_sum") for s in samples], tokens)
    contents = [s.content_ids for s in samples]
    for n in range(1, settings.distinct_n + 1):
        out[f"distinct_{n}"] = distinct_n(contents, n)
    out["repetition_rate"] = repetition_rate(contents, settings.distinct_n)
    if samples[0].reward is not None:
        rewards, ref_rewards = [s.reward for s in samples], [s.ref_reward for s in samples]
        out["reward_mean"] = sum(rewards) / len(rewards)
        out["ref_reward_mean"] = sum(ref_rewards) / len(ref_rewards)
        out["win_rate"] = win_rate(rewards, ref_rewards, [s.response_ids == s.ref_response_ids for s in samples])
    return {f"gen/{k}": v for k, v in out.items()}


def samples_table(samples: Sequence[Sample], tokenizer, step: int) -> dict[str, list]:
    """Columns for an MLflow table: step, prompt, response, length, cut_off, log_ratio (the
    response's log π − log π_ref, one sample's term, not a KL), reward, and the reference's."""
    def none_to_nan(x):
        return math.nan if x is None else x

    return {
        "step": [step] * len(samples),
        "prompt": [decode(tokenizer, s.prompt_ids) for s in samples],
        "response": [decode(tokenizer, s.response_ids) for s in samples],
        "length": [len(s.response_ids) for s in samples],
        "cut_off": [s.cut_off for s in samples],
        "log_ratio": [s.log_ratio for s in samples],
        "reward": [none_to_nan(s.reward) for s in samples],
        "ref_response": [decode(tokenizer, s.ref_response_ids) for s in samples],
        "ref_reward": [none_to_nan(s.ref_reward) for s in samples],
    }


def sample_records(samples: Sequence[Sample], tokenizer) -> list[dict]:
    """One JSON-able dict per sample: its fields plus the decoded texts and log_ratio (for samples.jsonl)."""
    return [{**asdict(s), "log_ratio": s.log_ratio, "prompt": decode(tokenizer, s.prompt_ids),
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
