"""The model side of a step: build the (ZeRO-3 aware) HF model, its DeepSpeed config, and the
chunked completion log-probs with the top-k over-optimisation signals."""

from po_ray.model.build import build_model, check_model_sources, resolve_dtype
from po_ray.model.deepspeed_config import build_deepspeed_config
from po_ray.model.logprobs import LogpOutput, completion_logps, policy_forward, token_stats

__all__ = [
    "LogpOutput",
    "build_deepspeed_config",
    "build_model",
    "check_model_sources",
    "completion_logps",
    "policy_forward",
    "resolve_dtype",
    "token_stats",
]
