"""Metrics of generated responses: plain numbers from lists, no models, no ranks.

Every function takes all samples (already gathered from every rank), so the numbers are exact
whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def length_stats(lengths: Sequence[int], cut_off: Sequence[bool]) -> dict[str, float]:
    """Response lengths (generated tokens, EOS included) -> mean, median, p90 and share cut off.

    Quantiles interpolate linearly between order statistics (``torch.quantile``'s default, as
    numpy's), so the median of an even count is the mean of the two middle lengths.
    ``length_hit_limit`` is the share of responses cut off: ``cut_off[i]`` marks response i as
    having reached max_new_tokens without an EOS. One that ends with EOS exactly at the limit
    finished on its own and is not counted.
    """
    x = torch.tensor(list(lengths), dtype=torch.float64)
    if x.numel() == 0 or len(cut_off) != x.numel():
        raise ValueError(f"length_stats needs one cut_off flag per response, at least one; got {x.numel()}, {len(cut_off)}")
    return {
        "length_mean": float(x.mean()),
        "length_median": float(torch.quantile(x, 0.5)),
        "length_p90": float(torch.quantile(x, 0.9)),
        "length_hit_limit": sum(map(bool, cut_off)) / len(cut_off),
    }


def monte_carlo_kl(logps: Sequence[float], ref_logps: Sequence[float], tokens: Sequence[float]) -> dict[str, float]:
    """KL(π ‖ π_ref) from responses sampled from π, scored under both models (teacher-forced).

    ``logps``/``ref_logps`` are each response's summed log-probs log π(y|x), log π_ref(y|x); then
    KL ≈ mean over samples of Σ_t [log π(y_t) − log π_ref(y_t)] (``kl_per_sequence``), and
    ``kl_per_token`` divides the summed log-ratios by the summed token counts (longer responses
    weigh more, as in a token-level average). A single sample's estimate can be negative; the mean
    over many is not, in expectation.

    Unbiased only when the responses are exact samples of π: temperature 1, no top-p/top-k
    truncation. Samples from a sharpened or truncated π' estimate E_π'[log π − log π_ref] instead,
    which is not KL(π ‖ π_ref) (``generation_eval`` draws separate T=1 samples for it then).
    """
    lp, ref, n = (torch.tensor(list(v), dtype=torch.float64) for v in (logps, ref_logps, tokens))
    if not lp.numel() == ref.numel() == n.numel() or lp.numel() == 0:
        raise ValueError(f"monte_carlo_kl needs equal, non-empty lists; got {lp.numel()}, {ref.numel()}, {n.numel()}")
    ratio = lp - ref
    return {"kl_per_sequence": float(ratio.mean()), "kl_per_token": float(ratio.sum() / n.sum())}


def token_weighted_mean(sums: Sequence[float], tokens: Sequence[float]) -> float:
    """Σ sums / Σ tokens: a per-token average from per-response sums (top-k entropy, top-k mass)."""
    return float(torch.tensor(list(sums), dtype=torch.float64).sum() / torch.tensor(list(tokens), dtype=torch.float64).sum())


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """The ``len - n + 1`` contiguous n-grams of one sequence (none if it is shorter than n)."""
    tokens = tuple(tokens)
    return [tokens[i : i + n] for i in range(len(tokens) - n + 1)]


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n over all responses (Li et al. 2016): unique n-grams / total n-grams (0 if none)."""
    grams = [g for seq in sequences for g in ngrams(seq, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Share of n-grams that repeat an n-gram seen earlier in the same response (0 if none).

    Pooled over responses: Σ (n-grams − unique n-grams) / Σ n-grams. Unlike distinct-n, two
    responses saying the same thing once each count no repetition; a response stuck in a loop does.
    """
    total = repeated = 0
    for seq in sequences:
        grams = ngrams(seq, n)
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


def win_rate(scores: Sequence[float], ref_scores: Sequence[float], same: Sequence[bool] = ()) -> float:
    """Share of paired comparisons the policy's response wins by the judge's score; ties count 0.5.

    ``same[i]`` marks pair i as one response against itself: a tie whatever the scores, since a
    batched judge pads the two copies differently and the last bits of its scores differ.
    """
    if len(scores) != len(ref_scores) or not scores or (same and len(same) != len(scores)):
        raise ValueError(f"win_rate needs equal, non-empty lists; got {len(scores)}, {len(ref_scores)}, {len(same)}")
    same = same or [False] * len(scores)
    points = [0.5 if eq or s == r else 1.0 if s > r else 0.0 for s, r, eq in zip(scores, ref_scores, same)]
    return sum(points) / len(points)


def first_response(generated: Sequence[int], eos_ids: set[int]) -> list[int]:
    """Generated ids up to and including the first EOS (all of them if there is none)."""
    out = []
    for token in generated:
        out.append(int(token))
        if token in eos_ids:
            break
    return out


def gen_metric_names(settings) -> set[str]:
    """The ``gen/…`` names ``generation.summarize`` reports with these eval settings (for checking a study's score)."""
    names = ["length_mean", "length_median", "length_p90", "length_hit_limit", "ref_length_mean", "kl_per_sequence",
             "kl_per_token", "entropy", "topk_entropy", "topk_mass", "repetition_rate",
             *(f"distinct_{n}" for n in range(1, settings.distinct_n + 1))]
    if settings.judge:
        names += ["reward_mean", "ref_reward_mean", "win_rate"]
    return {f"gen/{n}" for n in names}
