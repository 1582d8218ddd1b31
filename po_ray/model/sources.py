"""Where the model, reference and tokenizer come from, checked on the driver before any worker starts.

Kept apart from ``build``: it needs only ``AutoConfig``, and the driver should not pay for importing
transformers' modelling code (~100 MiB resident) that only the workers run.
"""

from __future__ import annotations

import re
from pathlib import Path

from transformers import AutoConfig

from po_ray.config import TINY_MODEL, Config, ConfigError

# owner/name or name, as the hub spells repositories; anything else that is not on disk is a typo.
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def check_model_sources(cfg: Config) -> None:
    """Fail on the driver, before any worker starts, when the model, reference or tokenizer cannot be found.

    Reads only config.json (from the folder, the local hub cache, or the hub), so a typo costs
    seconds instead of a cluster start-up. The tokenizer is checked for existence only.
    """
    sources = (("model.name_or_path", cfg.model.name_or_path), ("reference.name_or_path", cfg.reference.name_or_path),
               ("model.tokenizer", cfg.model.tokenizer))
    for key, name in sources:
        if name in ("", TINY_MODEL):
            continue
        path = Path(name).expanduser()
        if path.exists():
            if key != "model.tokenizer" and not (path / "config.json").is_file():
                raise ConfigError(f"{key}: {path} has no config.json, so it is not a Hugging Face model folder; "
                                  "point it at a save_pretrained folder (po-ray exports one per run) or a hub name")
            continue
        if not HUB_NAME.match(name):
            raise ConfigError(f"{key}: {name!r} is not an existing folder and not a hub name like 'org/model'; "
                              "check the path (relative paths are from the working directory)")
        if key != "model.tokenizer":
            try:
                AutoConfig.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
            except (OSError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(
                    f"{key}: {name!r} is not a local folder and the hub cannot serve it ({first}); check the name "
                    "or the path (relative to the working directory), HF_TOKEN for gated models, and HF_HUB_OFFLINE"
                ) from None
