"""Chunked completion log-probs and top-k signals against the naive full log-softmax."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig

from po_ray.config import ModelConfig
from po_ray.model import build_model, completion_logps, logprobs, policy_forward, token_stats
from po_ray.model.logprobs import Head

N, L, H, V = 3, 12, 8, 17


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, L, H, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 2).requires_grad_()
    input_ids = torch.randint(0, V, (N, L), generator=g)
    # Ragged: a long completion, a short one in the middle (right padding after it), and one row
    # whose completion starts at position 1.
    mask = torch.zeros(N, L, dtype=torch.long)
    mask[0, 4:] = 1
    mask[1, 6:9] = 1
    mask[2, 1:] = 1
    return hidden, weight, input_ids, mask


def _naive_logps(hidden, weight, input_ids, mask):
    """Sum over completion tokens of the full (N, L, V) fp32 log-softmax: (N,)."""
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    picked = logp[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (picked * mask[:, 1:]).sum(-1)


def _naive_signals(hidden, weight, mask, k):
    """ALGORITHMS.md formulas at every completion position, summed per row: 3 × (N,)."""
    p = torch.softmax((hidden @ weight.T).double(), dim=-1)[:, :-1]  # predicts positions 1..L-1
    entropy = -(p * p.log()).sum(-1)
    top = p.sort(dim=-1, descending=True).values[..., :k]
    mass = top.sum(-1)
    q = top / mass[..., None]
    topk_entropy = -(q * q.log()).sum(-1)
    m = mask[:, 1:].double()
    return [(x * m).sum(-1) for x in (entropy, topk_entropy, mass)]


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_chunked_logps_and_grads_equal_naive(chunk_size):
    hidden, weight, input_ids, mask = _inputs()
    out = completion_logps(hidden, Head(weight), input_ids, mask, chunk_size=chunk_size, topk=3)
    expected = _naive_logps(hidden, weight, input_ids, mask)
    torch.testing.assert_close(out.logps, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.tokens, torch.tensor([8.0, 3.0, 11.0]))

    upstream = torch.tensor([0.3, -1.0, 2.0])  # distinct per-row weights catch rows mixed up in backward
    grads = torch.autograd.grad((out.logps * upstream).sum(), [hidden, weight])
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [hidden, weight])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_head_with_bias_multiplier_and_softcap_gives_the_naive_logps_and_grads(softcap):
    hidden, weight, input_ids, mask = _inputs(seed=5)
    bias = torch.randn(V, generator=torch.Generator().manual_seed(6)).requires_grad_()
    head = Head(weight, bias, multiplier=0.7, softcap=softcap)
    out = completion_logps(hidden, head, input_ids, mask, chunk_size=4, topk=3)
    logits = 0.7 * (hidden @ weight.T + bias)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, dim=-1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    expected = (logp * mask[:, 1:]).sum(-1)
    torch.testing.assert_close(out.logps, expected, atol=1e-5, rtol=1e-6)
    upstream = torch.tensor([0.3, -1.0, 2.0])
    grads = torch.autograd.grad((out.logps * upstream).sum(), [hidden, weight, bias])
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [hidden, weight, bias])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 16])
def test_signals_match_the_formulas(k):
    hidden, weight, input_ids, mask = _inputs(seed=1)
    out = completion_logps(hidden, Head(weight), input_ids, mask, chunk_size=5, topk=k)
    entropy, topk_entropy, mass = _naive_signals(hidden.detach(), weight.detach(), mask, k)
    torch.testing.assert_close(out.entropy_sum.double(), entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.topk_entropy_sum.double(), topk_entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.topk_mass_sum.double(), mass, atol=1e-5, rtol=0)
    for signal in (out.entropy_sum, out.topk_entropy_sum, out.topk_mass_sum):
        assert not signal.requires_grad


@pytest.mark.parametrize("block_elements", [1, 2 * V, 3 * V + 1])
def test_signals_taken_in_row_blocks_match_the_formulas(monkeypatch, block_elements):
    # Blocks of 1, 2 and 3 rows (one row when the block is smaller than a row) within chunks of 5.
    monkeypatch.setattr(logprobs, "ROW_BLOCK_ELEMENTS", block_elements)
    hidden, weight, input_ids, mask = _inputs(seed=3)
    out = completion_logps(hidden, Head(weight), input_ids, mask, chunk_size=5, topk=3)
    expected = _naive_signals(hidden.detach(), weight.detach(), mask, 3)
    for got, want in zip((out.entropy_sum, out.topk_entropy_sum, out.topk_mass_sum), expected):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_signals_off_keeps_the_logps_and_skips_the_statistics(monkeypatch):
    calls = []
    monkeypatch.setattr(logprobs, "token_stats", lambda *a: calls.append(a) or token_stats(*a))
    hidden, weight, input_ids, mask = _inputs()
    out = completion_logps(hidden, Head(weight), input_ids, mask, chunk_size=5, topk=3, signals=False)
    assert calls == []
    torch.testing.assert_close(out.logps, _naive_logps(hidden, weight, input_ids, mask), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.tokens, torch.tensor([8.0, 3.0, 11.0]))
    for signal in (out.entropy_sum, out.topk_entropy_sum, out.topk_mass_sum):
        torch.testing.assert_close(signal, torch.zeros(N))


@pytest.mark.parametrize("k", [V, V + 5])
def test_k_at_least_vocab_keeps_everything(k):
    hidden, weight, input_ids, mask = _inputs(seed=2)
    out = completion_logps(hidden, Head(weight), input_ids, mask, chunk_size=4, topk=k)
    torch.testing.assert_close(out.topk_mass_sum, out.tokens)  # mass 1 at every token
    torch.testing.assert_close(out.topk_entropy_sum, out.entropy_sum)


def test_token_stats_of_known_distributions():
    uniform = torch.full((1, 8), 1 / 8).log()
    entropy, topk_entropy, mass = token_stats(uniform, topk=2)
    torch.testing.assert_close(entropy, torch.log(torch.tensor([8.0])))
    torch.testing.assert_close(topk_entropy, torch.log(torch.tensor([2.0])))
    torch.testing.assert_close(mass, torch.tensor([0.25]))
    # A token masked to -inf (probability 0) adds nothing instead of NaN.
    masked = torch.log_softmax(torch.tensor([[0.0, 0.0, float("-inf")]]), -1)
    entropy, topk_entropy, mass = token_stats(masked, topk=3)
    torch.testing.assert_close(entropy, torch.log(torch.tensor([2.0])))
    torch.testing.assert_close(topk_entropy, torch.log(torch.tensor([2.0])))
    torch.testing.assert_close(mass, torch.tensor([1.0]))


def test_projects_only_completion_positions_a_chunk_at_a_time_and_recomputes_in_backward(monkeypatch):
    hidden, weight, input_ids, mask = _inputs()
    seen: list[int] = []
    projected = logprobs._logits

    def spy(states, head):
        seen.append(states.shape[0])
        return projected(states, head)

    monkeypatch.setattr(logprobs, "_logits", spy)
    out = completion_logps(hidden, Head(weight), input_ids, mask, chunk_size=5, topk=3)
    assert seen == [5, 5, 5, 5, 2]  # 22 completion tokens, never more than 5 at once
    forward_calls = len(seen)
    out.logps.sum().backward()
    # Backward recomputed every chunk's logits: the forward did not keep them alive.
    assert len(seen) == 2 * forward_calls


def test_without_grad_equals_with_grad():
    hidden, weight, input_ids, mask = _inputs()
    with_grad = completion_logps(hidden, Head(weight), input_ids, mask, chunk_size=3, topk=4)
    with torch.no_grad():
        without = completion_logps(hidden, Head(weight), input_ids, mask, chunk_size=3, topk=4)
    assert without.logps.grad_fn is None
    for name in ("logps", "tokens", "entropy_sum", "topk_entropy_sum", "topk_mass_sum"):
        torch.testing.assert_close(getattr(without, name), getattr(with_grad, name).detach())


def test_rows_without_completion_score_zero():
    hidden, weight, input_ids, mask = _inputs()
    mask[1] = 0
    out = completion_logps(hidden, Head(weight), input_ids, mask, chunk_size=4, topk=3)
    assert out.tokens[1] == 0 and out.logps[1] == 0 and out.entropy_sum[1] == 0
    empty = completion_logps(hidden, Head(weight), input_ids, torch.zeros_like(mask), chunk_size=4, topk=3)
    assert empty.logps.tolist() == [0.0, 0.0, 0.0] and empty.tokens.tolist() == [0.0, 0.0, 0.0]


def test_completion_at_position_zero_is_an_error():
    hidden, weight, input_ids, mask = _inputs()
    mask[0, 0] = 1
    with pytest.raises(ValueError, match="position 0"):
        completion_logps(hidden, Head(weight), input_ids, mask, chunk_size=4, topk=3)


# ---- policy_forward on real (tiny) Hugging Face models -------------------------------------------


def _batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (4, 10), generator=g)
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 4:] = 1
    # Row 1 is right-padded: shorter, its padding neither attended nor scored.
    input_ids[1, 7:] = 0
    attention_mask[1, 7:] = 0
    completion_mask[1, 7:] = 0
    completion_mask[2, :6] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def _naive_policy_logps(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
    picked = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (picked * batch["completion_mask"][:, 1:]).sum(-1)


def _tiny_llama(**overrides):
    cfg = ModelConfig(config_overrides=overrides)
    return build_model(cfg, vocab_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2, dtype=torch.float32, seed=0)


def _check_policy_forward(model, vocab):
    batch = _batch(vocab)
    out = policy_forward(model, batch, chunk_size=5, topk=4)
    expected = _naive_policy_logps(model, batch)
    torch.testing.assert_close(out.logps, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.tokens, batch["completion_mask"][:, 1:].sum(-1).float())
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.logps.sum(), params)
    want = torch.autograd.grad(expected.sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}], ids=["untied", "tied"])
def test_policy_forward_equals_naive_on_tiny_llama(overrides):
    model = _tiny_llama(**overrides)
    if overrides:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    _check_policy_forward(model, vocab=40)


def test_policy_forward_with_gradient_checkpointing():
    model = build_model(
        ModelConfig(gradient_checkpointing=True),
        vocab_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2, dtype=torch.float32, seed=0,
    )
    assert model.is_activation_checkpointing
    model.train()  # transformers checkpoints layers only in training mode
    _check_policy_forward(model, vocab=40)


_SMALL = dict(
    vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0,
)


@pytest.mark.parametrize(
    "config",
    [
        CohereConfig(**_SMALL, logit_scale=0.37),
        Gemma2Config(**_SMALL, final_logit_softcapping=2.0, attn_implementation="eager"),
        GraniteConfig(**_SMALL, logits_scaling=3.0),
    ],
    ids=["cohere-logit_scale", "gemma2-softcapping", "granite-logits_scaling"],
)
def test_policy_forward_applies_the_models_logit_scaling(config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # logits of a few units, so that a missed scaling or softcap shows
        model.get_output_embeddings().weight.mul_(50)
    _check_policy_forward(model, vocab=40)

    # The scaling matters here: the bare head gives clearly different log-probs.
    batch = _batch(40)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        bare = completion_logps(
            hidden, Head(model.get_output_embeddings().weight), batch["input_ids"], batch["completion_mask"], chunk_size=5, topk=4
        )
        assert (bare.logps - _naive_policy_logps(model, batch)).abs().max() > 0.1
