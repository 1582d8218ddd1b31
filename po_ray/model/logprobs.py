"""Per-token completion log-probs and over-optimisation signals, taken in chunks over the tokens.

A 35B model with a 256k vocabulary turns 8k completion tokens into an 8 GiB fp32 (tokens, vocab)
log-softmax, more than the rest of the step needs. So only completion positions are projected, a
chunk of them at a time, and nothing of size (tokens, vocab) is kept for backward: a chunk's
forward takes the label log-probs and the statistics in one pass over its logits and keeps only
the log-normalisers; backward recomputes the chunk's logits and turns them in place into their
gradient (``_ChunkLogps``).

The signals follow Shi et al. 2024 (arXiv 2410.11677), docs ALGORITHMS "Over-optimisation signals":
at position t with next-token distribution p_t and K_t its k most likely tokens,
``mass_t = Σ_{i∈K_t} p_t(i)`` and ``H_t = −Σ q log q`` with q = p_t restricted to K_t, renormalised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LogpOutput:
    """Per-sequence results of ``completion_logps``; every field is ``(N,)``."""

    logps: Tensor
    """Summed completion log-probs (fp32); carries gradient."""
    tokens: Tensor
    """Completion tokens scored (float)."""
    entropy_sum: Tensor
    """Sum over completion tokens of the full next-token entropy (detached)."""
    topk_entropy_sum: Tensor
    """Sum over completion tokens of the top-k renormalised entropy (detached)."""
    topk_mass_sum: Tensor
    """Sum over completion tokens of the top-k probability mass (detached)."""


def token_stats(logp: Tensor, topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Entropy, top-k entropy and top-k mass of each row of log-probs: ``(T, V) -> 3 × (T,)``.

    ``topk`` at or above the vocabulary size takes every token: mass 1, top-k entropy = entropy.
    """
    # entr(p) = −p log p with entr(0) = 0, so tokens a model masks to −inf add nothing instead of NaN.
    entropy = torch.special.entr(logp.exp()).sum(-1)
    top = logp.topk(min(topk, logp.shape[-1]), dim=-1, sorted=False).values
    topk_mass = top.exp().sum(-1)
    log_q = top - top.logsumexp(-1, keepdim=True)
    topk_entropy = torch.special.entr(log_q.exp()).sum(-1)
    return entropy, topk_entropy, topk_mass


@dataclass(frozen=True)
class Head:
    """The LM head as the log-probs see it: ``logits = softcap(multiplier · (states @ weight.T + bias))``,
    with ``softcap(z) = c · tanh(z / c)`` when ``softcap`` is set (Gemma 2/3) and the identity otherwise."""

    weight: Tensor
    """``(V, H)``."""
    bias: Tensor | None = None
    multiplier: float = 1.0
    """Cohere's ``logit_scale``, or 1 / Granite's ``logits_scaling``."""
    softcap: float | None = None


def completion_logps(
    hidden: Tensor,
    head: Head,
    input_ids: Tensor,
    completion_mask: Tensor,
    *,
    chunk_size: int,
    topk: int,
    signals: bool = True,
) -> LogpOutput:
    """Sum of completion-token log-probs and signal sums per sequence: ``(N, L, H) -> LogpOutput of (N,)``.

    ``hidden`` are the last hidden states, ``head`` the LM head (with the model's logit scaling),
    ``input_ids`` and ``completion_mask`` are ``(N, L)``. The token at position t is scored from
    ``hidden[:, t-1]``, so position 0 can never be a completion token. At most ``chunk_size``
    positions are projected at once. ``signals=False`` skips the entropy / top-k statistics (their
    sums come back as zeros): a reference model only needs its log-probs.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (model.logprob_chunk_size), got {chunk_size}")
    mask = completion_mask.bool()
    if mask[:, 0].any():
        raise ValueError(
            "completion_mask marks position 0, which no hidden state predicts; every row needs at least "
            "one prompt (or BOS) token before its completion"
        )
    # Completion positions t >= 1, as (row, t-1): the hidden state that predicts the token at t.
    rows, cols = mask[:, 1:].nonzero(as_tuple=True)
    states = hidden[rows, cols]
    labels = input_ids[rows, cols + 1]

    topk = topk if signals else 0
    token_logps, stats = [], []
    for start in range(0, labels.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            token_logps.append(_ChunkLogps.apply(states[chunk], head.weight, head.bias, labels[chunk], head.multiplier,
                                                 head.softcap, topk, stats))
        else:
            token_logps.append(_chunk_forward(states[chunk], labels[chunk], head, topk, stats)[0])

    n = hidden.shape[0]

    def per_row(values: list[Tensor]) -> Tensor:
        zeros = hidden.new_zeros(n, dtype=torch.float32)
        return zeros.index_add(0, rows, torch.cat(values)) if values else zeros  # none: no tokens, or signals off

    entropy, topk_entropy, topk_mass = (per_row([chunk_stats[i] for chunk_stats in stats]) for i in range(3))
    return LogpOutput(
        logps=per_row(token_logps),
        tokens=mask[:, 1:].sum(-1).float(),
        entropy_sum=entropy,
        topk_entropy_sum=topk_entropy,
        topk_mass_sum=topk_mass,
    )


def _logits(states: Tensor, head: Head) -> tuple[Tensor, Tensor | None]:
    """fp32 ``(c, V)`` logits of ``(c, H)`` states, and with a softcap its ``tanh`` (for backward).

    fp32: bf16 logits lose the small differences that DPO's margins are made of. Scaling and
    softcap are applied in place, so the chunk costs one fp32 ``(c, V)`` buffer (two with softcap).
    """
    logits = nn.functional.linear(states, head.weight, head.bias).float()
    if head.multiplier != 1.0:
        logits.mul_(head.multiplier)
    if head.softcap is None:
        return logits, None
    tanh = logits.div_(head.softcap).tanh_()
    return tanh * head.softcap, tanh


def _chunk_forward(states: Tensor, labels: Tensor, head: Head, topk: int, stats: list) -> tuple[Tensor, Tensor]:
    """(c, H), (c,) -> log-probs of ``labels`` (c,) and the log-normaliser (c,); with ``topk`` > 0
    appends the chunk's (entropy, topk_entropy, topk_mass) to ``stats``. One pass over the logits,
    a block of rows at a time, so that logsumexp's and the statistics' temporaries stay small."""
    logits, _ = _logits(states, head)
    rows = max(1, ROW_BLOCK_ELEMENTS // logits.shape[-1])
    block_normalisers, block_stats = [logits.new_zeros(0)], []
    for i in range(0, logits.shape[0], rows):
        block = logits[i : i + rows]
        block_normalisers.append(torch.logsumexp(block, dim=-1))
        if topk:
            block_stats.append(token_stats(block - block_normalisers[-1][:, None], topk))
    log_normaliser = torch.cat(block_normalisers)
    if block_stats:
        stats.append(tuple(torch.cat(parts) for parts in zip(*block_stats)))
    return logits.gather(-1, labels[:, None]).squeeze(-1) - log_normaliser, log_normaliser


# Rows of (rows, vocab) logits taken at once by logsumexp and token_stats, each of which makes a
# few temporaries of its input's size (exp, entr, ...): over a whole chunk those would outweigh
# the chunk's logits themselves; in blocks of ~16M elements they stay small next to them.
ROW_BLOCK_ELEMENTS = 2**24


class _ChunkLogps(torch.autograd.Function):
    """Log-probs of one chunk's labels, keeping only ``(c,)`` log-normalisers for backward.

    Backward recomputes the chunk's logits and turns them, in place, into the gradient
    ``g · (onehot(label) − softmax)``: one ``(c, V)`` buffer per chunk in forward and in backward,
    where autograd through log_softmax and gather would hold four. The head's weight is read at
    backward time: under ZeRO-3 the head's backward hook has gathered it again by then (the whole
    chunk loop runs as the head's forward, see ``_run_as_forward_of``).
    """

    @staticmethod
    def forward(ctx, states, weight, bias, labels, multiplier: float, softcap, topk: int, stats: list):
        head = Head(weight, bias, multiplier, softcap)
        logps, log_normaliser = _chunk_forward(states, labels, head, topk, stats)
        ctx.save_for_backward(states, labels, log_normaliser)
        ctx.head = head
        return logps

    @staticmethod
    def backward(ctx, grad):
        states, labels, log_normaliser = ctx.saved_tensors
        head: Head = ctx.head
        grad_logits, tanh = _logits(states, head)  # turned into the gradient in place, step by step
        grad_logits.sub_(log_normaliser[:, None]).exp_().mul_(-grad[:, None])  # −g · softmax
        grad_logits[torch.arange(labels.numel(), device=labels.device), labels] += grad
        if tanh is not None:  # d softcap(z) / dz = 1 − tanh²
            grad_logits.mul_(tanh.square_().neg_().add_(1))
        if head.multiplier != 1.0:
            grad_logits.mul_(head.multiplier)
        grad_logits = grad_logits.to(head.weight.dtype)
        wants_states, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        return (
            grad_logits @ head.weight if wants_states else None,
            grad_logits.T @ states if wants_weight else None,
            grad_logits.sum(0) if wants_bias else None,
            None, None, None, None, None,
        )  # fmt: skip


def policy_forward(model: nn.Module, batch: dict, *, chunk_size: int, topk: int, signals: bool = True) -> LogpOutput:
    """Completion log-probs of a Hugging Face causal LM on a collated batch: ``(2B, L) -> LogpOutput of (2B,)``.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``completion_mask``. Runs the decoder body
    for the last hidden state, then projects only completion positions, chunk by chunk, with the LM
    head (tied or not) and the logit scaling the model's own forward applies. Under ZeRO-3, call
    this from the forward of the module DeepSpeed wraps (as ``po_ray.engine.LogpModel`` does):
    DeepSpeed resets its parameter-prefetch trace when that root module's forward starts.
    """
    decoder = model.get_decoder()
    out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}'s output embeddings are {type(head).__name__}, not a linear LM head")
    multiplier, softcap = logit_scaling(model.config)

    def score(hidden: Tensor) -> tuple[Tensor, ...]:
        # Inside the head's forward: under ZeRO-3 its weight is gathered here.
        result = completion_logps(
            hidden,
            Head(head.weight, head.bias, multiplier, softcap),
            batch["input_ids"],
            batch["completion_mask"],
            chunk_size=chunk_size,
            topk=topk,
            signals=signals,
        )
        # A tuple of tensors, not the dataclass: ZeRO-3 hooks its backward re-gather onto the outputs.
        return tuple(getattr(result, f.name) for f in fields(result))

    return LogpOutput(*_run_as_forward_of(head, score, hidden))


def _run_as_forward_of(module: nn.Module, fn: Callable, *args):
    """``module(*args)`` with ``fn`` standing in for its forward, so the module's hooks wrap all of ``fn``.

    Why: ZeRO-3 all-gathers a module's partitioned weight on every call of the module. Ranks score
    different numbers of completion tokens, hence different numbers of chunks; one head call per
    chunk would issue unequal numbers of all-gathers across ranks and deadlock. Run as the head's
    forward, the chunk loop costs one gather in forward and one (for the recompute) in backward.
    """
    saved = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args)
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def logit_scaling(config) -> tuple[float, float | None]:
    """What a model's forward does to the LM head's logits: ``(multiplier, softcap)``.

    Covers Cohere (``logit_scale``), Granite (``logits_scaling``) and Gemma 2/3
    (``final_logit_softcapping``); a model that rescales logits some other way needs adding here.
    """
    config = config.get_text_config()
    multiplier = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    return multiplier, (float(softcap) if softcap else None)
