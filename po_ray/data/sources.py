"""Reading raw preference rows from local files, ``save_to_disk`` folders or the Hugging Face hub.

Every source yields ``Record``s in file order: the row's location (for error messages), a stable
``pair_id`` (0-based position in the source) and either the row's values or the ``DataError`` that
stopped it being read. Problems with the file as a whole are raised as fatal ``DataError``s.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from po_ray.config import BUNDLED_DIR, DEMO_DATA, DataConfig
from po_ray.data.errors import FILE_ROW, DataError

DEMO_FILE = BUNDLED_DIR / "demo" / "pairs.jsonl"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
BATCH_ROWS = 1024


@dataclass(frozen=True)
class Record:
    """One raw row. ``row`` is 1-based (line number for JSON Lines); ``pair_id`` is 0-based."""

    row: int
    pair_id: int
    values: dict | None
    error: DataError | None = None


@dataclass(frozen=True)
class Fields:
    """The column names holding prompt, chosen and rejected (``data.*_field``)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"

    @classmethod
    def from_config(cls, data_cfg: DataConfig) -> Fields:
        return cls(data_cfg.prompt_field, data_cfg.chosen_field, data_cfg.rejected_field)


def open_source(path: str, split: str, fields: Fields) -> tuple[str, Iterator[Record]]:
    """``(label, records)`` for a data path; ``label`` names the source in error messages."""
    if path == DEMO_DATA:
        if not DEMO_FILE.exists():
            raise _fatal(str(DEMO_FILE), "is missing; regenerate it with `python -m po_ray.data.demo`", "missing_file")
        return str(DEMO_FILE), _jsonl_records(DEMO_FILE, str(DEMO_FILE))
    local = Path(path).expanduser()
    if local.is_dir():
        return _disk_source(local, split, fields)
    if local.is_file():
        readers = {".jsonl": _jsonl_records, ".json": _json_records}
        if local.suffix in readers:
            return path, readers[local.suffix](local, path)
        if local.suffix == ".parquet":
            return path, _parquet_records(local, path, fields)
        raise _fatal(path, f"unsupported file type {local.suffix!r}; use .jsonl, .json, .parquet or a "
                     "save_to_disk folder", "unsupported_file")
    if local.suffix in FILE_SUFFIXES or path.startswith((".", "/", "~")):
        raise _fatal(path, "no such file or folder", "missing_file")
    return _hub_source(path, split, fields)


def _fatal(label: str, problem: str, reason: str, field: str = "file") -> DataError:
    return DataError(label, FILE_ROW, field, problem, reason=reason, fatal=True)


def _empty(label: str) -> DataError:
    return _fatal(label, "is empty: it has no rows", "empty_file")


# ---------------------------------------------------------------------------------------------
# JSON Lines and JSON


def _jsonl_records(path: Path, label: str) -> Iterator[Record]:
    """One record per non-blank line. Lines are decoded one by one so a bad byte names its line."""
    pair_id = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw.strip():
                continue  # blank lines (a trailing newline, spacing) are not rows
            yield _parse_line(raw, line_no, pair_id, label)
            pair_id += 1
    if pair_id == 0:
        raise _empty(label)


def _parse_line(raw: bytes, line_no: int, pair_id: int, label: str) -> Record:
    def bad(problem: str, reason: str) -> Record:
        return Record(line_no, pair_id, None, DataError(label, line_no, "line", problem, reason=reason))

    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        return bad(f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line", "not_utf8")
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        return bad(f"not valid JSON: {e.msg} at column {e.pos + 1}", "malformed_json")
    if not isinstance(values, dict):
        return bad(f"expected a JSON object, got a JSON {_json_type(values)}", "malformed_json")
    return Record(line_no, pair_id, values)


def _json_records(path: Path, label: str) -> Iterator[Record]:
    """A JSON array of objects (rows are 1-based indices), or JSON Lines under a .json name.

    ``datasets.Dataset.to_json`` writes JSON Lines by default, hence the second case.
    """
    raw = path.read_bytes()
    if not raw.lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(b"["):
        yield from _jsonl_records(path, label)
        return
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise _fatal(label, f"not valid UTF-8: byte 0x{raw[e.start]:02x} on line {line}", "not_utf8") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fatal(label, f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})", "malformed_json") from None
    if not values:
        raise _empty(label)
    for index, item in enumerate(values):
        if isinstance(item, dict):
            yield Record(index + 1, index, item)
        else:
            err = DataError(label, index + 1, "record", f"expected a JSON object, got a JSON {_json_type(item)}",
                            reason="malformed_json")
            yield Record(index + 1, index, None, err)


def _json_type(value: object) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Arrow-backed sources: parquet, save_to_disk folders, hub datasets


def _parquet_records(path: Path, label: str, fields: Fields) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-parquet file
        raise _fatal(label, f"not a readable parquet file: {e}", "unreadable_file") from None
    columns = check_columns(label, parquet.schema_arrow, fields)
    if parquet.metadata.num_rows == 0:
        raise _empty(label)
    batches = (batch.to_pylist() for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns))
    yield from _numbered(batches)


def _disk_source(folder: Path, split: str, fields: Fields) -> tuple[str, Iterator[Record]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as e:  # not a save_to_disk folder, or a damaged one
        raise _fatal(str(folder), f"not a datasets.save_to_disk folder: {e}", "unreadable_file") from None
    label = str(folder)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise _fatal(label, f"has no split {split!r}; it has {', '.join(loaded)} "
                         "(set data.split / data.eval_split)", "missing_split")
        loaded, label = loaded[split], f"{folder}[{split}]"
    return label, _dataset_records(loaded, label, fields)


def _hub_source(name: str, split: str, fields: Fields) -> tuple[str, Iterator[Record]]:
    import datasets

    label = f"{name}[{split}]"
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset or split: say which and why
        raise _fatal(label, f"cannot load from the Hugging Face hub: {e}", "unreadable_file") from None
    return label, _dataset_records(dataset, label, fields)


def _dataset_records(dataset, label: str, fields: Fields) -> Iterator[Record]:
    columns = check_columns(label, dataset.features.arrow_schema, fields)
    if len(dataset) == 0:
        raise _empty(label)
    dataset = dataset.select_columns(columns)
    batches = (
        [dict(zip(batch, values)) for values in zip(*batch.values())]
        for batch in dataset.iter(batch_size=BATCH_ROWS)
    )
    return _numbered(batches)


def _numbered(batches: Iterator[list[dict]]) -> Iterator[Record]:
    index = 0
    for batch in batches:
        for values in batch:
            yield Record(index + 1, index, values)
            index += 1


def check_columns(label: str, schema, fields: Fields) -> list[str]:
    """The columns to read; a fatal ``DataError`` for a missing column or one of the wrong type.

    A column must hold strings or lists of ``{role, content}`` messages. The prompt column may be
    absent when chosen/rejected are message lists: their shared leading messages are the prompt.
    """
    import pyarrow as pa

    def kind(name: str) -> str | None:
        dtype = schema.field(name).type
        if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
            return "text"
        if (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)) and pa.types.is_struct(dtype.value_type):
            names = {dtype.value_type.field(i).name for i in range(dtype.value_type.num_fields)}
            if {"role", "content"} <= names:
                return "messages"
        return None

    columns = []
    for which, name in (("prompt", fields.prompt), ("chosen", fields.chosen), ("rejected", fields.rejected)):
        if name not in schema.names:
            if which == "prompt" and fields.chosen in schema.names and kind(fields.chosen) == "messages":
                continue
            raise _fatal(label, f"no such column; the columns are {', '.join(schema.names)} "
                         f"(set data.{which}_field)", "missing_column", field=name)
        if kind(name) is None:
            raise _fatal(label, f"column has type {schema.field(name).type}; expected strings or lists of "
                         "{role, content} messages", "column_type", field=name)
        columns.append(name)
    return columns
