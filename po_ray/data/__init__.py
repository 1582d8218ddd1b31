"""Preference data: read, check, tokenise (chat templates, truncation, POET) and collate pairs.

Imports neither ray, deepspeed nor mlflow.
"""

from po_ray.data.collate import collate
from po_ray.data.encode import TokenizedPair, poet_truncate, truncate_pair
from po_ray.data.errors import DataError, SkipReport
from po_ray.data.load import format_summary, holdout_ids, load_pairs, validate_data_file
from po_ray.data.tokenizer import load_tokenizer

__all__ = [
    "DataError",
    "SkipReport",
    "TokenizedPair",
    "collate",
    "format_summary",
    "holdout_ids",
    "load_pairs",
    "load_tokenizer",
    "poet_truncate",
    "truncate_pair",
    "validate_data_file",
]
