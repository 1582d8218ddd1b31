"""Per-token completion log-probs and over-optimisation signals, taken in chunks over the tokens.

A 35B model with a 256k vocabulary turns 8k completion tokens into an 8 GiB fp32 (tokens, vocab)
log-softmax, more than the rest of the step needs. So only completion positions are projected, a
chunk of them at a time, each chunk under activation checkpointing: the forward keeps one chunk's
logits alive at a time and backward recomputes them chunk by chunk.

The signals follow Shi et al. 2024 (arXiv 2410.11677), docs ALGORITHMS "Over-optimisation signals":
at position t with next-token distribution p_t and K_t its k most likely tokens,
``mass_t = Σ_{i∈K_t} p_t(i)`` and ``H_t = −Σ q log q`` with q = p_t restricted to K_t, renormalised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


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


def completion_logps(
    hidden: Tensor,
    project: Callable[[Tensor], Tensor],
    input_ids: Tensor,
    completion_mask: Tensor,
    *,
    chunk_size: int,
    topk: int,
) -> LogpOutput:
    """Sum of completion-token log-probs and signal sums per sequence: ``(N, L, H) -> LogpOutput of (N,)``.

    ``hidden`` are the last hidden states, ``project`` maps ``(T, H) -> (T, V)`` logits (the LM head
    with any logit scaling), ``input_ids`` and ``completion_mask`` are ``(N, L)``. The token at
    position t is scored from ``hidden[:, t-1]``, so position 0 can never be a completion token.
    At most ``chunk_size`` positions are projected at once; backward recomputes each chunk.
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

    use_checkpoint = torch.is_grad_enabled()
    token_logps, stats = [], []
    for start in range(0, labels.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        # The stats are filled on the first (forward) call only; backward's recompute skips them.
        slot: list = []
        args = (project, states[chunk], labels[chunk], topk, slot)
        if use_checkpoint:
            token_logps.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
        else:
            token_logps.append(_chunk_logps(*args))
        stats.append(slot[0])

    n = hidden.shape[0]

    def per_row(values: list[Tensor]) -> Tensor:
        flat = torch.cat(values) if values else hidden.new_zeros(0, dtype=torch.float32)
        return hidden.new_zeros(n, dtype=torch.float32).index_add(0, rows, flat)

    entropy, topk_entropy, topk_mass = (per_row([chunk_stats[i] for chunk_stats in stats]) for i in range(3))
    return LogpOutput(
        logps=per_row(token_logps),
        tokens=mask[:, 1:].sum(-1).float(),
        entropy_sum=entropy,
        topk_entropy_sum=topk_entropy,
        topk_mass_sum=topk_mass,
    )


def _chunk_logps(project: Callable, states: Tensor, labels: Tensor, topk: int, slot: list) -> Tensor:
    """(c, H), (c,) -> (c,) log-probs of ``labels``; appends the chunk's (entropy, topk_entropy, topk_mass)."""
    # fp32 log-softmax: bf16 logits lose the small differences that DPO's margins are made of.
    logp = torch.log_softmax(project(states).float(), dim=-1)
    if not slot:
        with torch.no_grad():
            slot.append(token_stats(logp.detach(), topk))
    return logp.gather(-1, labels[:, None]).squeeze(-1)


def policy_forward(model: nn.Module, batch: dict, *, chunk_size: int, topk: int) -> LogpOutput:
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
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head); a causal LM is needed")
    head_forward, scale = head.forward, logit_scaling(model.config)

    def score(hidden: Tensor) -> tuple[Tensor, ...]:
        result = completion_logps(
            hidden,
            lambda states: scale(head_forward(states)),
            batch["input_ids"],
            batch["completion_mask"],
            chunk_size=chunk_size,
            topk=topk,
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


def logit_scaling(config) -> Callable[[Tensor], Tensor]:
    """What a model's forward does to the LM head's logits, as ``(T, V) -> (T, V)``.

    Covers Cohere (``logit_scale``), Granite (``logits_scaling``) and Gemma 2/3
    (``final_logit_softcapping``); a model that rescales logits some other way needs adding here.
    """
    config = config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if scale is None and divide is None and softcap is None:
        return lambda logits: logits

    def apply(logits: Tensor) -> Tensor:
        logits = logits.float()
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply
