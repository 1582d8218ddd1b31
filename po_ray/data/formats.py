"""Turning one raw row into prompt / chosen / rejected texts, checking it on the way.

Two formats, told apart per row by the type of the chosen value:

* plain: three strings;
* conversational: chosen and rejected are lists of ``{role, content}`` messages. The prompt is a
  separate message list, or, when there is none, the messages chosen and rejected share at the
  start. Texts come from the tokenizer's chat template; the completion is what the template
  renders after the prompt (``add_generation_prompt=True``).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from po_ray.data.errors import DataError
from po_ray.data.sources import Fields

ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class Example:
    """A checked row as texts. ``templated``: the prompt came from a chat template (which adds BOS).
    ``prompt_messages``: a conversational row's prompt as ``(role, content)`` pairs (empty for plain
    text), kept so a judge can render the conversation with its own chat template."""

    pair_id: int
    row: int
    prompt: str
    chosen: str
    rejected: str
    templated: bool
    prompt_messages: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Where:
    """Where a row came from, to build ``DataError``s that point at it."""

    file: str
    row: int

    def error(self, field: str, problem: str, reason: str, fatal: bool = False) -> DataError:
        return DataError(self.file, self.row, field, problem, reason=reason, fatal=fatal)


def parse_row(values: dict, where: Where, pair_id: int, fields: Fields, tokenizer: PreTrainedTokenizerBase) -> Example:
    """Check one row and render its texts; raises ``DataError`` naming the bad field."""
    chosen = _present(values, fields.chosen, where)
    rejected = _present(values, fields.rejected, where)
    if isinstance(chosen, list):
        messages, prompt, chosen_text, rejected_text = _conversational(values, where, fields, tokenizer)
        return Example(pair_id, where.row, prompt, chosen_text, rejected_text, templated=True,
                       prompt_messages=tuple((m["role"], m["content"]) for m in messages))
    prompt = _present(values, fields.prompt, where)
    for name, value in ((fields.prompt, prompt), (fields.chosen, chosen), (fields.rejected, rejected)):
        if not isinstance(value, str):
            raise where.error(name, f"expected a string, got {_describe(value)}", "not_a_string")
    for name, value in ((fields.chosen, chosen), (fields.rejected, rejected)):
        if not value.strip():
            raise where.error(name, "is empty", "empty_completion")
    if chosen == rejected:
        raise where.error(fields.rejected, f"is identical to {fields.chosen}, so the pair says nothing", "identical")
    return Example(pair_id, where.row, prompt, chosen, rejected, templated=False)


def _present(values: dict, name: str, where: Where):
    if name not in values or values[name] is None:
        state = "is null" if name in values else f"is missing (the row has {', '.join(map(str, values)) or 'no keys'})"
        raise where.error(name, state, "missing_field")
    return values[name]


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


# ---------------------------------------------------------------------------------------------
# Conversational rows


def _conversational(values: dict, where: Where, fields: Fields, tokenizer) -> tuple[list[dict], str, str, str]:
    """``(prompt messages, prompt text, chosen text, rejected text)`` of a conversational row."""
    chosen = _messages(values[fields.chosen], fields.chosen, where)
    rejected = _messages(values.get(fields.rejected), fields.rejected, where)
    prompt_value = values.get(fields.prompt)
    if isinstance(prompt_value, list):
        prompt = _messages(prompt_value, fields.prompt, where)
        if not prompt:
            raise where.error(fields.prompt, "is an empty message list", "bad_messages")
    else:
        # No prompt messages (a string prompt next to message lists, as in UltraFeedback-binarized,
        # repeats the first user turn): the prompt is what both completions share at the start.
        shared = _shared_prefix(chosen, rejected)
        if shared == 0:
            raise where.error(fields.chosen, f"shares no leading messages with {fields.rejected} and there is no "
                              f"{fields.prompt} message list, so the prompt is unknown", "bad_messages")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    for name, completion in ((fields.chosen, chosen), (fields.rejected, rejected)):
        _check_completion(completion, name, where)
    if chosen == rejected:
        raise where.error(fields.rejected, f"is identical to {fields.chosen}, so the pair says nothing", "identical")
    if not getattr(tokenizer, "chat_template", None):
        raise where.error(fields.chosen, "is a message list, but the tokenizer has no chat template; use a chat "
                          "model's tokenizer (model.tokenizer) or give plain strings", "no_chat_template", fatal=True)
    prompt_text = _render(tokenizer, prompt, where, fields.prompt, add_generation_prompt=True)
    return (
        prompt,
        prompt_text,
        _completion_text(tokenizer, prompt, prompt_text, chosen, where, fields.chosen),
        _completion_text(tokenizer, prompt, prompt_text, rejected, where, fields.rejected),
    )


def _messages(value, name: str, where: Where) -> list[dict]:
    """Validated ``[{role, content}]`` reduced to those two keys (other keys would not compare)."""
    if not isinstance(value, list):
        raise where.error(name, f"expected a list of messages like the other fields, got {_describe(value)}",
                          "bad_messages")
    out = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise where.error(name, f"message {i}: expected an object with role and content, got {_describe(message)}",
                              "bad_messages")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            problem = "has no role" if role is None else f"role {role!r} is not one of {', '.join(ROLES)}"
            raise where.error(name, f"message {i}: {problem}", "bad_messages")
        if not isinstance(content, str):
            problem = "has no content" if content is None else f"content must be a string, got {_describe(content)}"
            raise where.error(name, f"message {i}: {problem}", "bad_messages")
        out.append({"role": role, "content": content})
    return out


def _shared_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _check_completion(completion: list[dict], name: str, where: Where) -> None:
    if not completion:
        raise where.error(name, "is empty: it has no messages after the prompt", "empty_completion")
    if completion[0]["role"] != "assistant":
        raise where.error(name, f"the completion starts with a {completion[0]['role']!r} message; it must start "
                          "with an 'assistant' message", "bad_messages")
    for i, message in enumerate(completion, start=1):
        if message["role"] == "assistant" and not message["content"].strip():
            raise where.error(name, f"is empty: completion message {i} has no text", "empty_completion")


def _render(tokenizer, messages: list[dict], where: Where, name: str, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # the template's own checks (role order, ...) raise jinja/template errors
        raise where.error(name, f"the chat template rejects these messages: {e}", "bad_messages") from None


def _completion_text(tokenizer, prompt: list[dict], prompt_text: str, completion: list[dict], where: Where,
                     name: str) -> str:
    full = _render(tokenizer, prompt + completion, where, name)
    if not full.startswith(prompt_text):
        raise where.error(name, "the chat template does not render the prompt as a prefix of prompt + completion, "
                          "so the completion tokens cannot be told apart", "template_mismatch")
    text = full[len(prompt_text):]
    # Templates often put a newline after the end-of-turn token; the model should stop at EOS, so
    # whitespace after it is dropped rather than trained on (and add_eos then sees a final EOS).
    eos = tokenizer.eos_token
    if eos and text.rstrip().endswith(eos):
        text = text.rstrip()
    return text
