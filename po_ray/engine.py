"""DeepSpeed engines for the policy and the sharded reference.

The HF model is wrapped in ``LogpModel`` so that one ``engine(batch)`` call runs the decoder body
and the chunked log-prob head inside DeepSpeed's forward: ZeRO-3 then gathers and releases the
partitioned weights (lm_head included, once per chunk) exactly as for an ordinary forward.
"""

from __future__ import annotations

import deepspeed
import torch
from torch import nn

from po_ray.model import LogpOutput, build_model, policy_forward


class LogpModel(nn.Module):
    """(input_ids, attention_mask, completion_mask) (2B, L) -> LogpOutput fields, each (2B,)."""

    def __init__(self, model: nn.Module, *, chunk_size: int, topk: int, signals: bool = True):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.topk = topk
        self.signals = signals

    def forward(self, input_ids, attention_mask, completion_mask):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
        out = policy_forward(self.model, batch, chunk_size=self.chunk_size, topk=self.topk, signals=self.signals)
        return out.logps, out.tokens, out.entropy_sum, out.topk_entropy_sum, out.topk_mass_sum


def run(engine, batch: dict) -> LogpOutput:
    """One forward of a LogpModel engine on a collated batch."""
    fields = engine(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    return LogpOutput(*fields)


def build_engine(model_cfg, *, ds_config: dict, tokenizer, dtype, seed: int, chunk_size: int, topk: int, train: bool,
                 signals: bool = True):
    """Build (HF model, DeepSpeed engine). ``train=False`` gives an inference-only engine (no optimiser);
    ``signals=False`` one whose forward skips the entropy / top-k statistics (a reference's)."""
    hf_model = build_model(
        model_cfg,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype=dtype,
        seed=seed,
        ds_config=ds_config,
    )
    wrapped = LogpModel(hf_model, chunk_size=chunk_size, topk=topk, signals=signals)
    if train:
        params = [p for p in wrapped.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=wrapped, model_parameters=params, config=ds_config)
    else:
        wrapped.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=wrapped, config=ds_config)
        engine.eval()
    return hf_model, engine


def split_pairs(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) -> chosen (B,), rejected (B,): collate puts chosen rows first."""
    half = t.shape[0] // 2
    return t[:half], t[half:]
