"""The tokenizer: a hub/local one, or the tiny bundled word-level one used by tests and the demo."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from po_ray.config import BUNDLED_DIR, TINY_MODEL, ModelConfig

BUNDLED_TOKENIZER_DIR = BUNDLED_DIR / "tokenizer"

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>"}
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# One marker token per role; an assistant turn ends with EOS, which is what a completion must learn
# to emit. Other roles (tool, ...) have no marker token, so the template refuses them.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer named by ``model.tokenizer`` (else ``model.name_or_path``), with a pad token.

    ``tiny-llama`` (or nothing) means the bundled word-level tokenizer. A tokenizer without a pad
    token pads with EOS: padded positions are masked out everywhere, so which id fills them is moot.
    """
    name = model_cfg.tokenizer or model_cfg.name_or_path
    if name in ("", TINY_MODEL):
        if not (BUNDLED_TOKENIZER_DIR / "tokenizer.json").exists():
            raise FileNotFoundError(
                f"the bundled tokenizer is missing from {BUNDLED_TOKENIZER_DIR}; "
                "rebuild it with `python -m po_ray.data.demo`"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR))
    else:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {name!r} has neither a pad nor an EOS token; "
                "choose another with model.tokenizer"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over ``words`` (+ letters, digits, punctuation).

    Digits are split one per token so any number can be written; unknown words become ``<unk>``.
    Encoding with special tokens prepends ``<bos>`` (like Llama), never appends ``<eos>``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = list(SPECIAL_TOKENS.values()) + list(ROLE_TOKENS)
    basics = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?;:'\"()-+*/=%&$#@_[]{}<>")
    ordinary = sorted(set(basics) | {w.lower() for w in words} - set(specials))
    vocab = {token: i for i, token in enumerate(specials + ordinary)}

    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    bos = SPECIAL_TOKENS["bos"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    # Registered as special so they are matched in raw text before lower-casing and splitting.
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        **{f"{k}_token": v for k, v in SPECIAL_TOKENS.items()},
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def save_word_tokenizer(words: Iterable[str], out_dir: Path = BUNDLED_TOKENIZER_DIR) -> PreTrainedTokenizerFast:
    """Build the bundled tokenizer and write it with ``save_pretrained``."""
    tokenizer = build_word_tokenizer(words)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
