"""From a data path to checked, tokenised pairs: the train/eval split, skip accounting, validation."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from itertools import islice

from transformers import PreTrainedTokenizerBase

from po_ray.config import DataConfig
from po_ray.data.encode import RawLengths, TokenizedPair, build_pair, encode_examples
from po_ray.data.errors import DataError, SkipReport
from po_ray.data.formats import Where, parse_row
from po_ray.data.sources import BATCH_ROWS, Fields, open_source

logger = logging.getLogger(__name__)

Result = tuple[TokenizedPair, RawLengths] | DataError


def encode_source(
    path: str, split: str, data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> Iterator[Result]:
    """``(pair, raw lengths)`` or the row's ``DataError``, for every row of a source, in order.

    Row problems are yielded, so the caller decides to stop, skip or collect; problems with the
    file or set-up are raised (fatal ``DataError``).
    """
    if data_cfg.add_eos and tokenizer.eos_token_id is None:
        raise ValueError("data.add_eos is on but the tokenizer has no EOS token; set data.add_eos=false "
                         "or choose a tokenizer with one (model.tokenizer)")
    fields = Fields.from_config(data_cfg)
    label, records = open_source(path, split, fields)
    while chunk := list(islice(records, BATCH_ROWS)):  # chunks: batched tokenisation, bounded memory
        results: dict[int, Result] = {}
        examples = []
        for record in chunk:
            if record.error is not None:
                results[record.pair_id] = record.error
                continue
            try:
                examples.append(parse_row(record.values, Where(label, record.row), record.pair_id, fields, tokenizer))
            except DataError as err:
                if err.fatal:
                    raise
                results[record.pair_id] = err
        for example, ids in zip(examples, encode_examples(examples, tokenizer)):
            try:
                results[example.pair_id] = build_pair(example, ids, data_cfg, tokenizer.eos_token_id, label)
            except DataError as err:
                results[example.pair_id] = err
        for record in chunk:
            yield results[record.pair_id]


def read_pairs(
    path: str, split: str, data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[TokenizedPair], SkipReport]:
    """All good pairs of one source. A bad row raises, or with ``on_bad_row=skip`` is counted."""
    pairs, report = [], SkipReport()
    for result in encode_source(path, split, data_cfg, tokenizer):
        report.rows += 1
        if isinstance(result, DataError):
            if data_cfg.on_bad_row != "skip":
                raise result
            report.skip(result)
        else:
            pairs.append(result[0])
    report.kept = len(pairs)
    if report.skipped:
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(report.skipped.items()))
        logger.warning("%s: skipped %d of %d rows (%s); first: %s", path, report.total_skipped, report.rows, counts,
                       report.examples[0])
    return pairs, report


def holdout_ids(num_rows: int, fraction: float, seed: int) -> frozenset[int]:
    """The pair_ids (0-based row positions) held out for evaluation: a seeded sample.

    Drawn from row positions, not from the rows that survived checks, so the split stays put when
    ``on_bad_row`` or the tokenizer changes which rows are kept. At least one row stays in training.
    """
    if fraction <= 0 or num_rows < 2:
        return frozenset()
    count = min(num_rows - 1, max(1, round(fraction * num_rows)))
    return frozenset(random.Random(seed).sample(range(num_rows), count))


def load_pairs(
    data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> tuple[list[TokenizedPair], list[TokenizedPair], SkipReport]:
    """``(train, eval, report)``, each list in source order.

    Eval pairs come from ``data.eval_path`` (split ``data.eval_split``) when set, else a
    ``data.eval_fraction`` hold-out of the training rows chosen by ``seed``.
    """
    train, report = read_pairs(data_cfg.path, data_cfg.split, data_cfg, tokenizer)
    if data_cfg.eval_path:
        eval_pairs, eval_report = read_pairs(data_cfg.eval_path, data_cfg.eval_split, data_cfg, tokenizer)
        return train, eval_pairs, report.merge(eval_report)
    held_out = holdout_ids(report.rows, data_cfg.eval_fraction, seed)
    return (
        [p for p in train if p.pair_id not in held_out],
        [p for p in train if p.pair_id in held_out],
        report,
    )


# ---------------------------------------------------------------------------------------------
# validate-data


def validate_data_file(
    path: str, data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, split: str = "train"
) -> dict:
    """Check a data source without training, collecting every problem rather than the first.

    Returns ``{"rows", "kept", "skipped": {reason: n}, "errors": [message, ...],
    "lengths": {"prompt"|"chosen"|"rejected": {"p50", "p90", "p99", "max"}},
    "truncated": {"prompt"|"chosen"|"rejected": n}}``. Lengths are token counts before truncation
    (completions with EOS), to choose the max_*_length settings; ``truncated`` counts the kept
    pairs each limit cuts. With ``on_bad_row=skip`` bad rows are counted in ``skipped``, not
    ``errors``; a problem with the whole file is always an error.
    """
    rows, skipped, errors = 0, {}, []
    lengths: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    truncated = {"prompt": 0, "chosen": 0, "rejected": 0}
    try:
        for result in encode_source(path, split, data_cfg, tokenizer):
            rows += 1
            if isinstance(result, DataError):
                if data_cfg.on_bad_row == "skip":
                    skipped[result.reason] = skipped.get(result.reason, 0) + 1
                else:
                    errors.append(str(result))
                continue
            pair, raw = result
            for name, kept_ids in (("prompt", pair.prompt_ids), ("chosen", pair.chosen_ids),
                                   ("rejected", pair.rejected_ids)):
                lengths[name].append(getattr(raw, name))
                truncated[name] += len(kept_ids) < getattr(raw, name)
    except DataError as err:
        errors.append(str(err))
    return {
        "rows": rows,
        "kept": len(lengths["prompt"]),
        "skipped": skipped,
        "errors": errors,
        "lengths": {name: percentiles(values) for name, values in lengths.items()},
        "truncated": truncated,
    }


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank p50/p90/p99 and max of ``values`` (all 0 when empty)."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    rank = lambda q: ordered[min(len(ordered) - 1, max(0, -(-q * len(ordered) // 100) - 1))]  # noqa: E731
    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1]}


def format_summary(summary: dict, max_errors: int = 20) -> str:
    """A ``validate_data_file`` result as text for ``po-ray validate-data``."""
    skipped = summary["skipped"]
    lines = [f"rows: {summary['rows']}  kept: {summary['kept']}  skipped: {sum(skipped.values())}"]
    if skipped:
        lines.append("skipped by reason: " + ", ".join(f"{r}: {n}" for r, n in sorted(skipped.items())))
    lines.append(f"{'tokens (before truncation)':<28}{'p50':>7}{'p90':>7}{'p99':>7}{'max':>7}{'truncated':>11}")
    for name, stats in summary["lengths"].items():
        cut = summary.get("truncated", {}).get(name, 0)
        lines.append(f"  {name:<26}" + "".join(f"{stats[k]:>7}" for k in ("p50", "p90", "p99", "max")) + f"{cut:>11}")
    errors = summary["errors"]
    if errors:
        lines.append(f"errors: {len(errors)}")
        lines += [f"  {message}" for message in errors[:max_errors]]
        if len(errors) > max_errors:
            lines.append(f"  ... and {len(errors) - max_errors} more")
    else:
        lines.append("no errors")
    return "\n".join(lines)
