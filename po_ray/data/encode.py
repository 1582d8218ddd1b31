"""Token-level rules: EOS, truncation, POET, and the pair the trainer consumes.

Order for each pair: append EOS -> cut completions to max_completion_length (they keep their start,
so a cut completion loses its EOS, truthfully: it did not end there) -> POET (optional) -> cut the
prompt to max_prompt_length and then to what max_length leaves beside the longer completion (the
prompt keeps its end, the part nearest the reply).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from po_ray.config import DataConfig
from po_ray.data.errors import DataError
from po_ray.data.formats import Example, Where
from po_ray.data.sources import Fields


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids; completions include EOS unless cut.

    ``pair_id`` is the row's 0-based position in its source: stable across runs and resumes, so
    the trainer can check each pair is used exactly once per epoch.
    """

    pair_id: int
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    prompt_messages: tuple[tuple[str, str], ...] = ()
    """A conversational row's prompt as ``(role, content)`` pairs; empty for plain text. Only the
    generation eval's judge reads it (to render the conversation with a reward model's template)."""


@dataclass(frozen=True)
class RawLengths:
    """Token counts before truncation (completions with EOS), for ``validate-data`` statistics."""

    prompt: int
    chosen: int
    rejected: int


def poet_truncate(chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """POET (Xiao et al., arXiv 2506.09457): cut both completions to the shorter one's length.

    ``(n,), (m,) -> (k,), (k,)`` with ``k = min(n, m)``. Equal lengths come back unchanged; the
    longer completion loses its tail, EOS included, so neither side wins on length alone.
    """
    k = min(len(chosen_ids), len(rejected_ids))
    return tuple(chosen_ids[:k]), tuple(rejected_ids[:k])


def with_eos(ids: Sequence[int], eos_id: int) -> tuple[int, ...]:
    """``ids`` ending in ``eos_id`` (appended unless already last)."""
    return tuple(ids) if ids and ids[-1] == eos_id else (*ids, eos_id)


def truncate_pair(
    prompt_ids: Sequence[int],
    chosen_ids: Sequence[int],
    rejected_ids: Sequence[int],
    *,
    max_prompt_length: int,
    max_completion_length: int,
    max_length: int,
    poet: bool = False,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Apply the length limits (and POET) to one pair; the prompt may come back empty.

    Completions keep their first ``max_completion_length`` tokens; the prompt keeps its last
    ``min(max_prompt_length, max_length - longest completion)`` tokens, so that prompt + either
    completion fits in ``max_length``. An empty prompt means no room was left for it.
    """
    chosen = tuple(chosen_ids[:max_completion_length])
    rejected = tuple(rejected_ids[:max_completion_length])
    if poet:
        chosen, rejected = poet_truncate(chosen, rejected)
    keep = max(0, min(max_prompt_length, max_length - max(len(chosen), len(rejected))))
    prompt = tuple(prompt_ids[max(0, len(prompt_ids) - keep):]) if keep else ()
    return prompt, chosen, rejected


def encode_examples(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[list[int], list[int], list[int]]]:
    """Token ids of each example's (prompt, chosen, rejected), tokenised in batches (fast tokenizers).

    Plain prompts get the tokenizer's special tokens (e.g. BOS); templated prompts already contain
    them, and completions never get any (EOS is handled by ``with_eos``).
    """
    if not examples:
        return []
    prompts: list[list[int] | None] = [None] * len(examples)
    for templated in (False, True):
        index = [i for i, ex in enumerate(examples) if ex.templated == templated]
        if index:
            ids = tokenizer([examples[i].prompt for i in index], add_special_tokens=not templated)["input_ids"]
            for i, row_ids in zip(index, ids):
                prompts[i] = row_ids
    chosen = tokenizer([ex.chosen for ex in examples], add_special_tokens=False)["input_ids"]
    rejected = tokenizer([ex.rejected for ex in examples], add_special_tokens=False)["input_ids"]
    return list(zip(prompts, chosen, rejected))


def build_pair(
    example: Example,
    ids: tuple[list[int], list[int], list[int]],
    data_cfg: DataConfig,
    eos_id: int | None,
    file: str,
) -> tuple[TokenizedPair, RawLengths]:
    """Apply EOS, truncation and POET to one tokenised example; ``DataError`` if nothing usable is left."""
    fields = Fields.from_config(data_cfg)
    where = Where(file, example.row)
    prompt_ids, chosen_ids, rejected_ids = ids
    for name, completion in ((fields.chosen, chosen_ids), (fields.rejected, rejected_ids)):
        if not completion:
            raise where.error(name, "has no tokens after tokenisation", "empty_completion")
    if not prompt_ids:
        raise where.error(fields.prompt, "has no tokens and the tokenizer adds no BOS, so nothing precedes the "
                          "first completion token to predict it from; give a prompt", "empty_prompt")
    if data_cfg.add_eos and eos_id is not None:
        chosen_ids, rejected_ids = with_eos(chosen_ids, eos_id), with_eos(rejected_ids, eos_id)
    raw = RawLengths(len(prompt_ids), len(chosen_ids), len(rejected_ids))
    prompt, chosen, rejected = truncate_pair(
        prompt_ids,
        chosen_ids,
        rejected_ids,
        max_prompt_length=data_cfg.max_prompt_length,
        max_completion_length=data_cfg.max_completion_length,
        max_length=data_cfg.max_length,
        poet=data_cfg.poet,
    )
    if not prompt:
        longest = max(len(chosen), len(rejected))
        raise where.error(fields.prompt, f"prompt + completion cannot fit in data.max_length={data_cfg.max_length}: "
                          f"the completion alone keeps {longest} tokens and at least one prompt token must precede "
                          "it; raise data.max_length or lower data.max_completion_length", "no_room")
    if chosen == rejected:  # e.g. texts differing only in unknown words, or only past the cut
        limits = f"data.max_completion_length={data_cfg.max_completion_length}" + (", POET" if data_cfg.poet else "")
        raise where.error(fields.rejected, f"has the same tokens as {fields.chosen} after tokenisation and "
                          f"truncation ({limits})", "identical")
    return TokenizedPair(example.pair_id, prompt, chosen, rejected, example.prompt_messages), raw
