"""po_ray.data: reading, checking, tokenising, truncating, POET, collating, splitting, the demo set."""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from po_ray.config import DataConfig, ModelConfig
from po_ray.data import (
    DataError,
    TokenizedPair,
    collate,
    format_summary,
    holdout_ids,
    load_pairs,
    load_tokenizer,
    poet_truncate,
    truncate_pair,
    validate_data_file,
)
from po_ray.data.demo import DEMO_PAIRS, SKILLS, generate_pairs
from po_ray.data.load import percentiles
from po_ray.data.sources import DEMO_FILE
from po_ray.data.tokenizer import build_word_tokenizer

GOOD = {"prompt": "name a fruit", "chosen": "apple", "rejected": "tiger"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


def ids(tok, text: str) -> tuple[int, ...]:
    return tuple(tok(text, add_special_tokens=False)["input_ids"])


def write_jsonl(path: Path, rows: list) -> str:
    """Rows are dicts (dumped as JSON) or raw bytes/str lines written as they are."""
    with open(path, "wb") as f:
        for row in rows:
            line = row if isinstance(row, bytes) else (row if isinstance(row, str) else json.dumps(row)).encode()
            f.write(line + b"\n")
    return str(path)


def load_one(path: str, tok, **cfg) -> list[TokenizedPair]:
    """All pairs of ``path`` (no hold-out)."""
    train, held_out, _ = load_pairs(DataConfig(path=path, eval_fraction=0.0, **cfg), tok, seed=0)
    assert held_out == []
    return train


def error_of(path: str, tok, **cfg) -> str:
    with pytest.raises(DataError) as info:
        load_one(path, tok, **cfg)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# DataError


def test_data_error_format_and_pickling():
    err = DataError("pairs.jsonl", 7, "chosen", "is empty", reason="empty_completion")
    assert str(err) == "pairs.jsonl:7: chosen: is empty"
    assert (err.file, err.row, err.field, err.problem) == ("pairs.jsonl", 7, "chosen", "is empty")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.reason == "empty_completion" and not again.fatal


# ---------------------------------------------------------------------------------------------
# Bad rows: one exact message each


USER = {"role": "user", "content": "name a fruit"}
APPLE, TIGER = {"role": "assistant", "content": "apple"}, {"role": "assistant", "content": "tiger"}

# name: (rows, expected message after "file:", config overrides)
BAD_ROWS = {
    "malformed_line": ([GOOD, '{"prompt": "a",'],
                       "2: line: not valid JSON: Expecting property name enclosed in double quotes at column 16", {}),
    "not_an_object": ([GOOD, "[1, 2]"], "2: line: expected a JSON object, got a JSON array", {}),
    "non_utf8": ([GOOD, b'{"prompt": "a", "chosen": "b\xff", "rejected": "c"}'],
                 "2: line: not valid UTF-8: byte 0xff at byte 29 of the line", {}),
    "missing_field": ([GOOD, {"prompt": "a", "chosen": "b"}], "2: rejected: is missing (the row has prompt, chosen)",
                      {}),
    "null_field": ([GOOD, {**GOOD, "prompt": None}], "2: prompt: is null", {}),
    "non_string": ([GOOD, {**GOOD, "chosen": 5}], "2: chosen: expected a string, got int 5", {}),
    "empty_completion": ([GOOD, {**GOOD, "rejected": "  "}], "2: rejected: is empty", {}),
    "identical": ([GOOD, {**GOOD, "rejected": "apple"}],
                  "2: rejected: is identical to chosen, so the pair says nothing", {}),
    # different texts, same tokens: both words are unknown to the tiny vocabulary
    "identical_tokens": ([{**GOOD, "chosen": "zzyzx", "rejected": "qwxq"}],
                         "1: rejected: has the same tokens as chosen after tokenisation and truncation "
                         "(data.max_completion_length=512)", {}),
    "no_room": ([{**GOOD, "chosen": "apple apple apple apple"}],
                "1: prompt: prompt + completion cannot fit in data.max_length=4: the completion alone keeps 5 tokens "
                "and at least one prompt token must precede it; raise data.max_length or lower "
                "data.max_completion_length", {"max_length": 4, "max_completion_length": 8}),
    "line_numbers_count_blank_lines": ([GOOD, "", {**GOOD, "chosen": ""}], "3: chosen: is empty", {}),
    "wrong_role": ([{"prompt": [USER], "chosen": [{"role": "bot", "content": "apple"}], "rejected": [TIGER]}],
                   "1: chosen: message 1: role 'bot' is not one of system, user, assistant, tool, developer", {}),
    "missing_content": ([{"chosen": [USER, {"role": "assistant"}], "rejected": [USER, TIGER]}],
                        "1: chosen: message 2: has no content", {}),
    "completion_not_assistant": ([{"prompt": [USER], "chosen": [USER], "rejected": [TIGER]}],
                                 "1: chosen: the completion starts with a 'user' message; it must start with an "
                                 "'assistant' message", {}),
    "empty_assistant_message": ([{"prompt": [USER], "chosen": [{"role": "assistant", "content": " "}],
                                  "rejected": [TIGER]}], "1: chosen: is empty: completion message 1 has no text", {}),
    "no_shared_prompt": ([{"chosen": [APPLE], "rejected": [TIGER]}],
                         "1: chosen: shares no leading messages with rejected and there is no prompt message list, "
                         "so the prompt is unknown", {}),
    "template_rejects": ([{"prompt": [{"role": "tool", "content": "x"}], "chosen": [APPLE], "rejected": [TIGER]}],
                         "1: prompt: the chat template rejects these messages: unknown role tool; expected system, "
                         "user or assistant", {}),
    "mixed_formats": ([{"prompt": "a", "chosen": [APPLE], "rejected": "c"}],
                      "1: rejected: expected a list of messages like the other fields, got str 'c'", {}),
    "empty_file": ([], "0: file: is empty: it has no rows", {}),
    "blank_file": (["", "  "], "0: file: is empty: it has no rows", {}),
}


@pytest.mark.parametrize("name", BAD_ROWS)
def test_each_bad_row_names_file_row_and_field(tmp_path, tok, name):
    rows, expected, cfg = BAD_ROWS[name]
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    assert error_of(path, tok, **cfg) == f"{path}:{expected}"


def test_a_prompt_with_no_tokens_is_an_error(tmp_path):
    no_bos = build_word_tokenizer(["apple", "tiger"])
    no_bos.backend_tokenizer.post_processor = None
    path = write_jsonl(tmp_path / "p.jsonl", [{**GOOD, "prompt": ""}])
    assert error_of(path, no_bos) == (f"{path}:1: prompt: has no tokens and the tokenizer adds no BOS, so nothing "
                                      "precedes the first completion token to predict it from; give a prompt")


def test_validate_collects_every_problem_in_row_order(tmp_path, tok):
    path = write_jsonl(tmp_path / "many.jsonl", [
        GOOD, {**GOOD, "chosen": ""}, "{oops", GOOD, {**GOOD, "rejected": "apple"}, {"prompt": "a"},
    ])
    summary = validate_data_file(path, DataConfig(), tok)
    assert summary["rows"] == 6 and summary["kept"] == 2 and summary["skipped"] == {}
    assert summary["errors"] == [
        f"{path}:2: chosen: is empty",
        f"{path}:3: line: not valid JSON: Expecting property name enclosed in double quotes at column 2",
        f"{path}:5: rejected: is identical to chosen, so the pair says nothing",
        f"{path}:6: chosen: is missing (the row has prompt)",
    ]
    text = format_summary(summary)
    assert "rows: 6  kept: 2  skipped: 0" in text and "errors: 4" in text and summary["errors"][2] in text


def test_validate_reports_lengths_before_truncation(tmp_path, tok):
    path = write_jsonl(tmp_path / "lengths.jsonl", [{**GOOD, "chosen": " ".join(["apple"] * n)} for n in range(1, 11)])
    summary = validate_data_file(path, DataConfig(max_completion_length=4), tok)
    assert summary["errors"] == [] and summary["kept"] == 10
    # chosen: 1..10 words + EOS = 2..11 tokens; prompt: BOS + 3 words
    assert summary["lengths"]["chosen"] == {"p50": 6, "p90": 10, "p99": 11, "max": 11}
    assert summary["lengths"]["prompt"] == {"p50": 4, "p90": 4, "p99": 4, "max": 4}
    assert summary["truncated"] == {"prompt": 0, "chosen": 7, "rejected": 0}
    assert percentiles(list(range(100, 0, -1))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([]) == {"p50": 0, "p90": 0, "p99": 0, "max": 0}


def test_skip_mode_counts_and_logs_each_reason(tmp_path, tok, caplog):
    path = write_jsonl(tmp_path / "skip.jsonl", [
        GOOD, {**GOOD, "chosen": ""}, {**GOOD, "rejected": " "}, "{oops", b'{"prompt": "\xfe"}',
        {**GOOD, "rejected": "apple"}, {"prompt": "x", "chosen": "y"}, {**GOOD, "chosen": 3},
        {**GOOD, "chosen": "banana"},
    ])
    cfg = DataConfig(path=path, on_bad_row="skip", eval_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="po_ray.data"):
        train, _, report = load_pairs(cfg, tok, seed=0)
    expected = {"empty_completion": 2, "malformed_json": 1, "not_utf8": 1, "identical": 1, "missing_field": 1,
                "not_a_string": 1}
    assert report.skipped == expected
    assert (report.rows, report.kept) == (9, 2)
    assert [p.pair_id for p in train] == [0, 8]  # pair_id is the row's position, not the count kept
    assert report.examples[0] == f"{path}:2: chosen: is empty" and len(report.examples) == 5
    assert "skipped 7 of 9 rows" in caplog.text and "empty_completion: 2" in caplog.text

    summary = validate_data_file(path, replace(cfg, path=""), tok)
    assert summary["errors"] == [] and summary["skipped"] == expected and summary["kept"] == 2
    assert "skipped by reason: empty_completion: 2" in format_summary(summary)


def test_file_level_problems_are_fatal_even_when_skipping(tmp_path, tok):
    path = write_jsonl(tmp_path / "empty.jsonl", [])
    assert error_of(path, tok, on_bad_row="skip") == f"{path}:0: file: is empty: it has no rows"
    missing = str(tmp_path / "nope.jsonl")
    assert error_of(missing, tok) == f"{missing}:0: file: no such file or folder"
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\n")
    assert error_of(str(csv), tok) == (f"{csv}:0: file: unsupported file type '.csv'; use .jsonl, .json, .parquet "
                                       "or a save_to_disk folder")
    summary = validate_data_file(path, DataConfig(on_bad_row="skip"), tok)
    assert summary["errors"] == [f"{path}:0: file: is empty: it has no rows"] and summary["rows"] == 0


def test_conversational_rows_need_a_chat_template(tmp_path, tok):
    no_template = build_word_tokenizer(["apple"])
    no_template.chat_template = None
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "apple"}],
           "rejected": [{"role": "assistant", "content": "tiger"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [row])
    with pytest.raises(DataError) as info:
        load_pairs(DataConfig(path=path, on_bad_row="skip", eval_fraction=0.0), no_template, seed=0)
    assert str(info.value) == (f"{path}:1: chosen: is a message list, but the tokenizer has no chat template; "
                               "use a chat model's tokenizer (model.tokenizer) or give plain strings")


# ---------------------------------------------------------------------------------------------
# Tokenisation, EOS, truncation, POET


def test_plain_pair_tokens_with_bos_and_eos(tmp_path, tok):
    (pair,) = load_one(write_jsonl(tmp_path / "p.jsonl", [GOOD]), tok)
    assert pair == TokenizedPair(0, (tok.bos_token_id, *ids(tok, "name a fruit")),
                                 (*ids(tok, "apple"), tok.eos_token_id), (*ids(tok, "tiger"), tok.eos_token_id))


def test_add_eos_off_and_no_double_eos(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{**GOOD, "chosen": "apple <eos>"}])
    (pair,) = load_one(path, tok)
    assert pair.chosen_ids == (*ids(tok, "apple"), tok.eos_token_id)  # already ends with EOS: not added again
    (pair,) = load_one(path, tok, add_eos=False)
    assert pair.rejected_ids == ids(tok, "tiger")


def test_truncate_pair_rules():
    prompt, chosen, rejected = (1, 2, 3, 4, 5, 6), (10, 11, 12, 13), (20, 21)
    # completion keeps its start, prompt keeps its end
    assert truncate_pair(prompt, chosen, rejected, max_prompt_length=4, max_completion_length=3,
                         max_length=100) == ((3, 4, 5, 6), (10, 11, 12), (20, 21))
    # max_length cuts the prompt further, beside the longer completion
    assert truncate_pair(prompt, chosen, rejected, max_prompt_length=6, max_completion_length=8,
                         max_length=6) == ((5, 6), chosen, rejected)
    # nothing left for the prompt
    assert truncate_pair(prompt, chosen, rejected, max_prompt_length=6, max_completion_length=8,
                         max_length=4)[0] == ()
    # a prompt shorter than its room is kept whole (room 8 > 6 tokens, and room 96 under the defaults)
    assert truncate_pair(prompt, chosen, rejected, max_prompt_length=8, max_completion_length=8,
                         max_length=100) == (prompt, chosen, rejected)
    assert truncate_pair(prompt, chosen, rejected, max_prompt_length=512, max_completion_length=512,
                         max_length=1024) == (prompt, chosen, rejected)
    # POET runs before the prompt is fitted, so the prompt gains what POET freed
    assert truncate_pair(prompt, chosen, rejected, max_prompt_length=6, max_completion_length=8, max_length=6,
                         poet=True) == ((3, 4, 5, 6), (10, 11), (20, 21))


def test_truncated_completion_loses_its_eos(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{**GOOD, "chosen": "apple banana cherry"}])
    (pair,) = load_one(path, tok, max_completion_length=2, max_length=5)
    assert pair.chosen_ids == ids(tok, "apple banana")
    assert pair.rejected_ids == (*ids(tok, "tiger"), tok.eos_token_id)
    assert pair.prompt_ids == ids(tok, "name a fruit")  # 5 - 2 = 3 tokens fit: the prompt lost its BOS


def test_poet_truncate_pure():
    assert poet_truncate((1, 2, 3), (4, 5, 6)) == ((1, 2, 3), (4, 5, 6))
    assert poet_truncate([1, 2, 3, 9], [4, 5]) == ((1, 2), (4, 5))
    assert poet_truncate((1,), (4, 5, 6)) == ((1,), (4,))


def test_poet_in_pipeline_cuts_the_longer_and_keeps_equal_pairs(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {**GOOD, "chosen": "apple is great", "rejected": "tiger"},
        {**GOOD, "chosen": "apple", "rejected": "tiger"},
    ])
    long, equal = load_one(path, tok, poet=True)
    assert long.chosen_ids == ids(tok, "apple is")  # cut to 2 tokens: lost its EOS
    assert long.rejected_ids == (*ids(tok, "tiger"), tok.eos_token_id)
    assert equal == load_one(path, tok)[1]


# ---------------------------------------------------------------------------------------------
# Formats and sources


def chat_tokens(tok, pair: TokenizedPair) -> tuple[list[str], list[str], list[str]]:
    return tuple(tok.convert_ids_to_tokens(list(x)) for x in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids))


def test_conversational_with_and_without_a_prompt_list(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": [USER], "chosen": [APPLE], "rejected": [TIGER]},
        {"chosen": [USER, APPLE], "rejected": [USER, TIGER]},
        # a string prompt beside full conversations (UltraFeedback-binarized): the shared messages win
        {"prompt": "name a fruit", "chosen": [USER, APPLE], "rejected": [USER, TIGER]},
    ])
    expected = (["<bos>", "<|user|>", "name", "a", "fruit", "<|assistant|>"], ["apple", "<eos>"], ["tiger", "<eos>"])
    pairs = load_one(path, tok)
    assert [chat_tokens(tok, p) for p in pairs] == [expected] * 3
    # the prompt's messages are kept for the generation eval's judge
    assert [p.prompt_messages for p in pairs] == [(("user", "name a fruit"),)] * 3


def test_conversational_multi_turn_shared_prefix_is_the_prompt(tmp_path, tok):
    turns = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "name a color"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"chosen": turns + [{"role": "assistant", "content": "red"}],
         "rejected": turns + [{"role": "assistant", "content": "dog"}]},
    ])
    prompt, chosen, rejected = chat_tokens(tok, load_one(path, tok)[0])
    assert prompt == ["<bos>", "<|system|>", "be", "nice", "<|user|>", "hi", "<|assistant|>", "hello", "<eos>",
                      "<|user|>", "name", "a", "color", "<|assistant|>"]
    assert (chosen, rejected) == (["red", "<eos>"], ["dog", "<eos>"])
    assert load_one(path, tok)[0].prompt_messages == tuple((t["role"], t["content"]) for t in turns)


def test_column_remap(tmp_path, tok):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "name a fruit", "good": "apple", "bad": "tiger"}])
    remap = {"prompt_field": "question", "chosen_field": "good", "rejected_field": "bad"}
    plain = load_one(write_jsonl(tmp_path / "p.jsonl", [GOOD]), tok)
    assert load_one(path, tok, **remap) == plain
    assert error_of(path, tok) == f"{path}:1: chosen: is missing (the row has question, good, bad)"
    bad = write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "good": "", "bad": "x"}])
    assert error_of(bad, tok, **remap) == f"{bad}:1: good: is empty"


def test_json_parquet_and_save_to_disk_read_the_same_pairs(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD, {"prompt": "pick a color", "chosen": "red", "rejected": "dog"}]
    expected = load_one(write_jsonl(tmp_path / "p.jsonl", rows), tok)
    (tmp_path / "p.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    write_jsonl(tmp_path / "lines.json", rows)  # Dataset.to_json writes JSON Lines under .json
    for name in ("p.json", "lines.json", "p.parquet", "disk"):
        assert load_one(str(tmp_path / name), tok) == expected, name
    assert load_one(str(tmp_path / "dict"), tok, split="test") == expected
    assert error_of(str(tmp_path / "dict"), tok, split="dev") == (
        f"{tmp_path / 'dict'}:0: file: has no split 'dev'; it has train, test (set data.split / data.eval_split)")


def test_json_and_parquet_rows_are_record_indices(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD, GOOD, {**GOOD, "chosen": None}]
    (tmp_path / "p.json").write_text(json.dumps(rows[:1] + [7]))
    assert error_of(str(tmp_path / "p.json"), tok) == (
        f"{tmp_path / 'p.json'}:2: record: expected a JSON object, got a JSON number")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert error_of(str(tmp_path / "p.parquet"), tok) == f"{tmp_path / 'p.parquet'}:3: chosen: is null"
    (tmp_path / "empty.json").write_text("[]")
    assert error_of(str(tmp_path / "empty.json"), tok) == f"{tmp_path / 'empty.json'}:0: file: is empty: it has no rows"


def test_parquet_wrong_column_type_and_missing_column(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "chosen": [1], "rejected": ["b"]}), path)
    assert error_of(str(path), tok, on_bad_row="skip") == (
        f"{path}:0: chosen: column has type int64; expected strings or lists of {{role, content}} messages")
    pq.write_table(pa.table({"prompt": ["a"], "chosen": ["b"]}), path)
    assert error_of(str(path), tok) == f"{path}:0: rejected: no such column; the columns are prompt, chosen " \
                                       "(set data.rejected_field)"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "chosen": pa.array([], pa.string()),
                             "rejected": pa.array([], pa.string())}), path)
    assert error_of(str(path), tok) == f"{path}:0: file: is empty: it has no rows"


def test_parquet_conversational_without_prompt_column(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"chosen": [USER, APPLE], "rejected": [USER, TIGER]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    (pair,) = load_one(str(tmp_path / "chat.parquet"), tok)
    assert chat_tokens(tok, pair)[1] == ["apple", "<eos>"]


# ---------------------------------------------------------------------------------------------
# Collation


def test_collate_stacks_chosen_then_rejected_with_exact_masks():
    pairs = [TokenizedPair(7, (1, 2), (3, 4, 5), (6,)), TokenizedPair(9, (8,), (10,), (11, 12))]
    batch = collate(pairs, pad_token_id=0)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],  # prompt 7 + chosen 7
        [8, 10, 0, 0, 0],  # prompt 9 + chosen 9
        [1, 2, 6, 0, 0],  # prompt 7 + rejected 7
        [8, 11, 12, 0, 0],  # prompt 9 + rejected 9
    ]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch["completion_mask"].tolist() == [
        [False, False, True, True, True],
        [False, True, False, False, False],
        [False, False, True, False, False],
        [False, True, True, False, False],
    ]
    assert batch["pair_ids"].tolist() == [7, 9]
    assert batch["input_ids"].dtype == torch.long and batch["completion_mask"].dtype == torch.bool
    assert batch["attention_mask"].dtype == torch.long


def test_collate_pads_only_to_the_longest_row(tok):
    pairs = [TokenizedPair(0, (1,), (2,), (3,))]
    assert collate(pairs, tok.pad_token_id)["input_ids"].shape == (2, 2)
    with pytest.raises(ValueError):
        collate([], 0)


# ---------------------------------------------------------------------------------------------
# Train / eval split


def test_holdout_is_seeded_and_stable(tmp_path, tok):
    assert holdout_ids(100, 0.1, seed=3) == holdout_ids(100, 0.1, seed=3)
    assert holdout_ids(100, 0.1, seed=3) != holdout_ids(100, 0.1, seed=4)
    assert len(holdout_ids(100, 0.1, seed=3)) == 10
    assert holdout_ids(1, 0.5, seed=0) == frozenset() and len(holdout_ids(2, 0.9, seed=0)) == 1

    rows = [{**GOOD, "chosen": f"apple {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    train, held_out, _ = load_pairs(DataConfig(path=path, eval_fraction=0.25), tok, seed=5)
    again = load_pairs(DataConfig(path=path, eval_fraction=0.25), tok, seed=5)
    assert (train, held_out) == again[:2]
    assert len(held_out) == 10 and {p.pair_id for p in held_out} == holdout_ids(40, 0.25, seed=5)
    assert sorted(p.pair_id for p in train + held_out) == list(range(40))
    # A bad row changes nothing about which good rows are held out.
    rows[3] = {**GOOD, "chosen": ""}
    skipping = load_pairs(DataConfig(path=write_jsonl(path, rows), eval_fraction=0.25, on_bad_row="skip"), tok, 5)
    assert {p.pair_id for p in skipping[1]} == {p.pair_id for p in held_out} - {3}


def test_eval_path_gives_the_eval_split(tmp_path, tok):
    train_path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD])
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{**GOOD, "chosen": "pear"}, {**GOOD, "rejected": ""}])
    cfg = DataConfig(path=train_path, eval_path=eval_path, on_bad_row="skip")
    train, held_out, report = load_pairs(cfg, tok, seed=0)
    assert len(train) == 2 and [p.chosen_ids for p in held_out] == [(*ids(tok, "pear"), tok.eos_token_id)]
    assert (report.rows, report.kept, report.skipped) == (4, 3, {"empty_completion": 1})


# ---------------------------------------------------------------------------------------------
# Tokenizer and demo set


def test_bundled_tokenizer(tok):
    assert load_tokenizer(ModelConfig(name_or_path="tiny-llama")).get_vocab() == tok.get_vocab()
    assert 200 < len(tok) < 1000
    assert None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)
    assert tok("Apple 12")["input_ids"] == [tok.bos_token_id, *ids(tok, "apple"), *ids(tok, "1"), *ids(tok, "2")]


def test_tokenizer_without_pad_pads_with_eos(tmp_path):
    folder = tmp_path / "tok"
    build_word_tokenizer(["apple"]).save_pretrained(str(folder))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(ModelConfig(name_or_path="some/model", tokenizer=str(folder)))
    assert loaded.pad_token == loaded.eos_token == "<eos>"


def test_demo_file_is_what_the_generator_writes(tok):
    lines = DEMO_FILE.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == generate_pairs()  # `python -m po_ray.data.demo` reproduces it
    assert len(lines) == DEMO_PAIRS and DEMO_FILE.stat().st_size < 2_000_000
    assert {json.loads(line)["skill"] for line in lines} == set(SKILLS)


def test_demo_loads_cleanly_and_short(tok):
    train, held_out, report = load_pairs(DataConfig(), tok, seed=0)
    assert report.skipped == {} and len(train) + len(held_out) == DEMO_PAIRS
    assert len(held_out) == round(0.05 * DEMO_PAIRS)
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in train + held_out)
    assert longest <= 48
    assert tok.unk_token_id not in {t for p in train for t in p.prompt_ids + p.chosen_ids + p.rejected_ids}
    assert len({p.chosen_ids for p in train}) > 100  # not one constant reply


def test_data_package_imports_no_ray_deepspeed_or_mlflow():
    code = ("import sys, po_ray.data, po_ray.data.demo; "
            "print(sorted(m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.integration
def test_tiny_llama_learns_the_demo_preference_with_dpo():
    from po_ray.data.demo import run_check

    history = run_check(steps=200, seed=0, eval_every=200)
    assert history[200]["all"] >= 0.8
