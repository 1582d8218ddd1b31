"""Batching pairs for one forward pass: chosen and rejected rows stacked, right-padded."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from po_ray.data.encode import TokenizedPair


def collate(pairs: Sequence[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``B`` pairs -> one batch of ``2B`` sequences, padded only to this batch's longest row.

    Returns
      * ``input_ids`` ``(2B, L)`` long: rows ``0..B-1`` are prompt + chosen, rows ``B..2B-1``
        prompt + rejected (pair ``i`` is rows ``i`` and ``B + i``), right-padded with ``pad_token_id``;
      * ``attention_mask`` ``(2B, L)`` long: 1 on real tokens;
      * ``completion_mask`` ``(2B, L)`` bool: True exactly where ``input_ids`` holds a completion
        token. The log-prob of ``input_ids[:, t]`` comes from the logits at ``t - 1``, so to score
        completions use ``logits[:, :-1]`` against ``input_ids[:, 1:]`` under ``completion_mask[:, 1:]``
        (every completion follows at least one prompt token, so none sits at ``t = 0``);
      * ``pair_ids`` ``(B,)`` long.

    One concatenated batch means policy and reference each run one forward per micro-batch.
    """
    if not pairs:
        raise ValueError("collate needs at least one pair")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    length = max(len(prompt) + len(completion) for prompt, completion in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (prompt, completion) in enumerate(rows):
        end = len(prompt) + len(completion)
        input_ids[i, :end] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, :end] = 1
        completion_mask[i, len(prompt):end] = True
    pair_ids = torch.tensor([p.pair_id for p in pairs], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "pair_ids": pair_ids,
    }
