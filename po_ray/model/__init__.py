"""The model side of a step: build the (ZeRO-3 aware) HF model, its DeepSpeed config, and the
chunked completion log-probs with the top-k over-optimisation signals.

Names are imported from their submodule on first use: the driver needs only
``check_model_sources``, and importing ``build`` would load transformers' modelling code with it.
"""

import importlib

_SUBMODULE = {
    "LogpOutput": "logprobs",
    "completion_logps": "logprobs",
    "policy_forward": "logprobs",
    "token_stats": "logprobs",
    "build_model": "build",
    "resolve_dtype": "build",
    "build_deepspeed_config": "deepspeed_config",
    "check_model_sources": "sources",
}

__all__ = sorted(_SUBMODULE)


def __getattr__(name: str):
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_SUBMODULE[name]}"), name)
