"""Generation-based evaluation: the metric functions against hand computations, sampling and scoring
on the tiny Llama in one process, judges (a tiny reward model built from a config), the MLflow
samples table, and (integration) `po-ray eval` on 2 ZeRO-3 workers."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from po_ray.config import ConfigError, GenerationEvalConfig, ModelConfig, load_config
from po_ray.data import load_tokenizer
from po_ray.engine import LogpModel
from po_ray.eval import generation_eval, register_judge
from po_ray.eval.generation import Prompt, Sample, collate_responses, held_out_prompts, summarize
from po_ray.eval.judges import build_judge, run_judge
from po_ray.eval.metrics import (
    distinct_n,
    first_response,
    length_stats,
    monte_carlo_kl,
    repetition_rate,
    token_weighted_mean,
    win_rate,
)
from po_ray.model import build_model

# ---------------------------------------------------------------------------------------------
# Pure metrics, against numbers worked out by hand


def test_length_stats_by_hand():
    # sorted [1, 2, 3, 4, 10]: median the 3rd; p90 at rank 0.9·4 = 3.6 -> 4 + 0.6·(10 − 4) = 7.6
    assert length_stats([10, 3, 1, 4, 2], [True, False, False, False, False]) == pytest.approx(
        {"length_mean": 4.0, "length_median": 3.0, "length_p90": 7.6, "length_hit_limit": 0.2}
    )
    # even count: the median is the mean of the middle two; p90 at rank 2.7 -> 6 + 0.7·2
    stats = length_stats([8, 2, 6, 4], [True, False, True, False])
    assert stats == pytest.approx({"length_mean": 5.0, "length_median": 5.0, "length_p90": 7.4, "length_hit_limit": 0.5})
    with pytest.raises(ValueError):
        length_stats([], [])
    with pytest.raises(ValueError, match="one cut_off flag per response"):
        length_stats([3, 4], [True])


def test_monte_carlo_kl_by_hand():
    # log-ratios 1 and −2 over 2 + 3 tokens: per sequence −0.5, per token −1/5
    kl = monte_carlo_kl([-3.0, -6.0], [-4.0, -4.0], [2, 3])
    assert kl == pytest.approx({"kl_per_sequence": -0.5, "kl_per_token": -0.2})
    assert monte_carlo_kl([-1.5, -2.5], [-1.5, -2.5], [1, 4]) == {"kl_per_sequence": 0.0, "kl_per_token": 0.0}
    with pytest.raises(ValueError):
        monte_carlo_kl([1.0], [1.0, 2.0], [1])


def test_token_weighted_mean_by_hand():
    assert token_weighted_mean([3.0, 1.0], [2, 6]) == pytest.approx(0.5)


def test_distinct_n_and_repetition_by_hand():
    seqs = [[1, 2, 1, 2], [1, 3]]
    # unigrams: 6 in all, {1, 2, 3} distinct
    assert distinct_n(seqs, 1) == pytest.approx(3 / 6)
    # bigrams: (1,2) (2,1) (1,2) | (1,3) -> 3 distinct of 4
    assert distinct_n(seqs, 2) == pytest.approx(3 / 4)
    # within a response only: (1,2) repeats once in the first; the second has none
    assert repetition_rate(seqs, 2) == pytest.approx(1 / 4)
    # two responses saying the same once each: no repetition, but not distinct either
    assert repetition_rate([[5, 6], [5, 6]], 1) == 0.0 and distinct_n([[5, 6], [5, 6]], 1) == 0.5
    assert distinct_n([[1]], 2) == 0.0 and repetition_rate([[1]], 2) == 0.0  # too short for a bigram


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(0.5)  # tie, loss, win
    assert win_rate([2.0, 2.0, 5.0, 0.0], [1.0, 1.0, 1.0, 1.0]) == pytest.approx(0.75)
    # the same response on both sides is a tie even when a batched judge's last bits differ
    assert win_rate([1.0, 2.0], [1.0 + 1e-7, 1.0], same=[True, True]) == 0.5
    assert win_rate([1.0, 2.0], [1.0 + 1e-7, 1.0], same=[False, False]) == 0.5  # a loss and a win
    with pytest.raises(ValueError):
        win_rate([], [])
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0], same=[True, False])


def test_first_response_keeps_the_first_eos_and_nothing_after():
    assert first_response([5, 7, 2, 9, 2], {2}) == [5, 7, 2]
    assert first_response([5, 7, 9], {2}) == [5, 7, 9]
    assert first_response([3, 5], {2, 3}) == [3]


def _sample(response, ref_response, logps, ref_logps, reward=None, ref_reward=None, i=0, cut_off=False):
    """A sample whose KL draw is its own response (as at temperature 1)."""
    n = float(len(response))
    return Sample(i, 0, (1,), tuple(response), tuple(ref_response), logps, ref_logps, n, 2.0 * n, n, 0.5 * n,
                  cut_off, logps, ref_logps, n, reward, ref_reward)


def test_summarize_combines_the_metrics():
    # EOS is 2 and max_new_tokens 3. A ends with EOS exactly at the limit (finished, not cut off); B
    # used the whole budget without one (cut off). Their KL draws are other responses (as at a
    # temperature below 1): log-ratios 1.5 over 2 tokens and 0.5 over 3, while the evaluated
    # responses' own log-ratios are 1 and −1.
    a = replace(_sample([4, 4, 2], [4, 2], -3.0, -4.0, 1.0, 0.0, 0), kl_logps=-5.0, kl_ref_logps=-6.5, kl_tokens=2.0)
    b = replace(_sample([5, 6, 5], [5, 2], -2.0, -1.0, 0.0, 0.0, 1, cut_off=True), kl_logps=-1.0, kl_ref_logps=-1.5,
                kl_tokens=3.0)
    m = summarize([a, b], GenerationEvalConfig(max_new_tokens=3, distinct_n=2))
    assert m["gen/length_mean"] == 3.0 and m["gen/length_hit_limit"] == 0.5  # B only
    assert m["gen/ref_length_mean"] == 2.0
    assert m["gen/kl_per_sequence"] == pytest.approx(1.0) and m["gen/kl_per_token"] == pytest.approx(2.0 / 5)
    assert m["gen/entropy"] == pytest.approx(2.0) and m["gen/topk_mass"] == pytest.approx(0.5)
    # Counted without the EOS: A is [4, 4], B [5, 6, 5]. Unigrams 4 4 5 6 5: 3 distinct of 5;
    # bigrams (4,4) | (5,6) (6,5): 3 of 3, none repeated.
    assert m["gen/distinct_1"] == pytest.approx(3 / 5) and m["gen/distinct_2"] == pytest.approx(1.0)
    assert m["gen/repetition_rate"] == 0.0
    # unigram repetition: one repeated 4 in A, one repeated 5 in B, of 5 unigrams
    assert summarize([a, b], GenerationEvalConfig(max_new_tokens=3, distinct_n=1))["gen/repetition_rate"] == 0.4
    assert m["gen/reward_mean"] == 0.5 and m["gen/win_rate"] == pytest.approx(0.75)  # a win, a tie
    assert "gen/win_rate" not in summarize([replace(s, reward=None, ref_reward=None) for s in (a, b)],
                                           GenerationEvalConfig())


def test_sample_log_ratio_and_content():
    s = _sample([7, 8, 2], [7, 2], -3.0, -4.5)
    assert s.log_ratio == 1.5 and s.content_ids == (7, 8)
    assert replace(s, response_ids=(7, 8, 9), cut_off=True).content_ids == (7, 8, 9)


# ---------------------------------------------------------------------------------------------
# Sampling and scoring on the tiny Llama, one process


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def _tiny(tokenizer, seed: int = 0, eos_bias: float = 0.0) -> LogpModel:
    model = build_model(ModelConfig(), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        dtype=torch.float32, seed=seed)
    if eos_bias:
        # A random-init model almost never says EOS; a bias on its logit makes lengths vary.
        old = model.lm_head
        head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            head.weight.copy_(old.weight)
            head.bias.zero_()
            head.bias[tokenizer.eos_token_id] = eos_bias
        model.lm_head = head
    return LogpModel(model, chunk_size=16, topk=5).eval()


def _prompts(tokenizer, n: int = 5) -> list[tuple[int, ...]]:
    texts = ["what is the capital of france", "say hello", "count to three please", "why", "name a colour red or blue"]
    return [Prompt(tuple(tokenizer(t).input_ids)) for t in texts[:n]]


class CountingJudge:
    """Scores a response by its length; remembers every (prompt, response) it was asked about."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []
        self.calls = 0

    def __call__(self, prompts, responses):
        self.calls += 1
        self.seen += list(zip(prompts, responses))
        return [float(len(r)) for r in responses]


def test_policy_equal_to_reference_gives_zero_kl_and_even_win_rate(tokenizer):
    policy, reference = _tiny(tokenizer, eos_bias=4.0), _tiny(tokenizer, eos_bias=4.0)  # same weights, two copies
    settings = GenerationEvalConfig(enabled=True, num_prompts=5, samples_per_prompt=3, batch_size=4, max_new_tokens=12)
    judge = CountingJudge()
    metrics, samples = generation_eval(policy, reference, _prompts(tokenizer), tokenizer, settings, judge=judge)
    assert len(samples) == 15
    assert [(s.prompt_index, s.sample_index) for s in samples] == [(p, k) for p in range(5) for k in range(3)]
    assert abs(metrics["gen/kl_per_sequence"]) < 1e-6 and abs(metrics["gen/kl_per_token"]) < 1e-6
    assert all(abs(s.log_ratio) < 1e-6 for s in samples)
    assert metrics["gen/win_rate"] == 0.5  # same seed, same model: every comparison is a tie
    assert all(s.response_ids == s.ref_response_ids for s in samples)
    # The judge saw each of the 15 policy and 15 reference responses exactly once.
    assert len(judge.seen) == 30 and judge.calls == 1
    assert metrics["gen/reward_mean"] == pytest.approx(sum(len(t) for _, t in judge.seen[:15]) / 15)


def test_lengths_are_the_generated_token_counts(tokenizer):
    policy, reference = _tiny(tokenizer, eos_bias=4.0), _tiny(tokenizer, seed=1)
    settings = GenerationEvalConfig(num_prompts=5, samples_per_prompt=4, batch_size=3, max_new_tokens=10, seed=7)
    metrics, samples = generation_eval(policy, reference, _prompts(tokenizer), tokenizer, settings)
    eos = tokenizer.eos_token_id
    lengths = [len(s.response_ids) for s in samples]
    assert len(set(lengths)) > 1, "the EOS bias should make some responses stop early"
    for s in samples:
        # EOS, when there, is the last token and counted; a response without one used the whole budget.
        assert eos not in s.response_ids[:-1]
        assert s.response_ids[-1] == eos or len(s.response_ids) == 10
        assert s.tokens == len(s.response_ids)  # the teacher-forced pass scored exactly those tokens
        assert s.cut_off == (eos not in s.response_ids)
    assert metrics["gen/length_mean"] == pytest.approx(sum(lengths) / len(lengths))
    assert metrics["gen/length_hit_limit"] == pytest.approx(sum(eos not in s.response_ids for s in samples) / len(samples))
    assert metrics["gen/kl_per_sequence"] != 0.0  # a different reference: the KL sees it
    # Teacher-forced log-probs equal a plain forward of the full sequence.
    s = samples[0]
    ids = torch.tensor([list(s.prompt_ids) + list(s.response_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(policy.model(input_ids=ids).logits.float(), -1)[0, :-1]
    picked = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(s.prompt_ids) - 1 :]
    assert s.logps == pytest.approx(float(picked.sum()), abs=1e-4)


def test_same_seed_same_samples_and_different_seed_different(tokenizer):
    policy = _tiny(tokenizer, eos_bias=2.0)
    settings = GenerationEvalConfig(num_prompts=5, samples_per_prompt=2, batch_size=4, max_new_tokens=8, seed=3)
    _, a = generation_eval(policy, policy, _prompts(tokenizer), tokenizer, settings)
    torch.manual_seed(12345)  # the caller's RNG state must not matter, nor be moved (training goes on from it)
    state = torch.random.get_rng_state()
    _, b = generation_eval(policy, policy, _prompts(tokenizer), tokenizer, settings)
    assert torch.equal(torch.random.get_rng_state(), state)
    _, c = generation_eval(policy, policy, _prompts(tokenizer), tokenizer, replace(settings, seed=4))
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    assert [s.response_ids for s in a] != [s.response_ids for s in c]


def test_samples_do_not_depend_on_batch_size_or_workers(tokenizer, monkeypatch):
    """Each response has its own random stream: world 1 at batch sizes 4 and 3, and 3 simulated
    ranks at batch size 2, give the same responses and metrics (KL draws included, at T 0.8)."""
    from po_ray.eval import generation as gen

    policy, reference = _tiny(tokenizer, eos_bias=3.0), _tiny(tokenizer, seed=1, eos_bias=3.0)
    settings = GenerationEvalConfig(num_prompts=5, samples_per_prompt=2, batch_size=4, max_new_tokens=8,
                                    temperature=0.8, top_p=0.9, seed=11)
    m1, s1 = generation_eval(policy, reference, _prompts(tokenizer), tokenizer, settings)
    m2, s2 = generation_eval(policy, reference, _prompts(tokenizer), tokenizer, replace(settings, batch_size=3))
    monkeypatch.setattr(gen, "_gather", lambda samples, world: samples)  # each rank keeps its own
    split = [s for r in range(3) for s in generation_eval(policy, reference, _prompts(tokenizer), tokenizer,
                                                           replace(settings, batch_size=2), rank=r, world=3)[1]]
    split.sort(key=lambda s: (s.prompt_index, s.sample_index))
    assert len({s.response_ids for s in s1}) > 3  # really sampled
    for other in (s2, split):
        assert [(s.prompt_index, s.sample_index, s.response_ids, s.ref_response_ids) for s in other] == \
               [(s.prompt_index, s.sample_index, s.response_ids, s.ref_response_ids) for s in s1]
        assert [s.kl_logps for s in other] == pytest.approx([s.kl_logps for s in s1], abs=1e-4)
    assert m2 == pytest.approx(m1, abs=1e-5)
    assert summarize(split, settings) == pytest.approx(m1, abs=1e-5)


def test_the_checkpoint_generation_config_does_not_change_sampling(tokenizer):
    """A checkpoint's generation_config.json (top_k, repetition penalty, min length, bad and
    suppressed words, …) must not change the samples: they are the model's own distribution at
    the eval settings. transformers would apply all of these to a plain generate call."""
    clean, dirty = _tiny(tokenizer, eos_bias=3.0), _tiny(tokenizer, eos_bias=3.0)
    word = tokenizer.convert_tokens_to_ids("the")
    knobs = dict(top_k=1, repetition_penalty=5.0, no_repeat_ngram_size=1, min_new_tokens=6,
                 suppress_tokens=[tokenizer.eos_token_id], bad_words_ids=[[word]], temperature=0.3)
    for key, value in knobs.items():
        setattr(dirty.model.generation_config, key, value)
    settings = GenerationEvalConfig(num_prompts=5, samples_per_prompt=2, max_new_tokens=8, seed=2)
    _, want = generation_eval(clean, clean, _prompts(tokenizer), tokenizer, settings)
    _, got = generation_eval(dirty, dirty, _prompts(tokenizer), tokenizer, settings)
    assert [s.response_ids for s in got] == [s.response_ids for s in want]
    assert any(len(s.response_ids) < 6 for s in want)  # EOS early: what min_new_tokens/suppress_tokens forbid
    assert all(getattr(dirty.model.generation_config, k) == v for k, v in knobs.items())  # put back after
    # The knobs are live: transformers' own sampling with the checkpoint's config never ends early.
    with torch.no_grad():
        out = dirty.model.generate(torch.tensor([list(_prompts(tokenizer)[0].ids)]), do_sample=True, max_new_tokens=8)
    assert out.shape[1] - len(_prompts(tokenizer)[0].ids) == 8 and tokenizer.eos_token_id not in out[0].tolist()[-8:]


def test_nucleus_by_hand():
    from po_ray.eval.generation import nucleus

    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    kept = lambda top_p: torch.isfinite(nucleus(logits, top_p))[0].tolist()  # noqa: E731
    assert kept(0.7) == [True, True, False]  # 0.5 + 0.3 reaches 0.7
    assert kept(0.5) == [True, False, False]  # 0.5 alone reaches it
    assert kept(0.81) == [True, True, True]
    assert kept(0.01) == [True, False, False] and kept(1.0) == [True, True, True]


def test_greedy_batched_left_padded_equals_one_prompt_at_a_time(tokenizer):
    policy = _tiny(tokenizer, eos_bias=1.0)
    prompts = _prompts(tokenizer)
    settings = GenerationEvalConfig(num_prompts=5, batch_size=5, max_new_tokens=6, temperature=0.0)
    _, samples = generation_eval(policy, policy, prompts, tokenizer, settings)
    for s in samples:
        with torch.no_grad():
            out = policy.model.generate(torch.tensor([list(s.prompt_ids)]), do_sample=False, max_new_tokens=6,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert list(s.response_ids) == first_response(out[0, len(s.prompt_ids) :].tolist(), {tokenizer.eos_token_id})


def test_ranks_share_prompts_evenly_and_pad_with_dummies(tokenizer, monkeypatch):
    """Rank r of 3 with 5 prompts: every rank makes the same number of generate calls, keeps only its own."""
    from po_ray.eval import generation as gen

    calls = []
    real_generate = gen.generate
    monkeypatch.setattr(gen, "generate", lambda *a, **k: calls.append(len(a[1])) or real_generate(*a, **k))
    monkeypatch.setattr(gen, "_gather", lambda samples, world: samples)
    policy = _tiny(tokenizer)
    settings = GenerationEvalConfig(num_prompts=5, batch_size=1, max_new_tokens=3)
    kept = {}
    for rank in range(3):
        calls.clear()
        _, samples = generation_eval(policy, policy, _prompts(tokenizer), tokenizer, settings, rank=rank, world=3)
        kept[rank] = [s.prompt_index for s in samples]
        assert len(calls) == 2 * 2  # ceil(5 / 3) batches, policy and reference each
    assert kept == {0: [0, 1], 1: [2, 3], 2: [4]}


def test_collate_responses_marks_only_the_response():
    batch = collate_responses([(1, 2), (3,)], [(7, 8, 9), (6,)], pad_token_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[1, 2, 7, 8, 9], [3, 6, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["completion_mask"].int().tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]


def test_held_out_prompts_are_distinct_and_in_order():
    from po_ray.data import TokenizedPair

    pairs = [TokenizedPair(i, p, (1,), (2,)) for i, p in enumerate([(5, 6), (7,), (5, 6), (8,)])]
    assert held_out_prompts(pairs, 3) == [Prompt((5, 6)), Prompt((7,)), Prompt((8,))]
    assert held_out_prompts(pairs, 1) == [Prompt((5, 6))]
    chat = [TokenizedPair(0, (5,), (1,), (2,), (("user", "hi"),))]
    assert held_out_prompts(chat, 1) == [Prompt((5,), (("user", "hi"),))]  # the judge gets the messages
    assert held_out_prompts(chat, 1)[0].conversation() == [{"role": "user", "content": "hi"}]
    assert Prompt((5,)).conversation() is None
    with pytest.raises(ValueError, match="eval_fraction"):
        held_out_prompts([], 4)


# ---------------------------------------------------------------------------------------------
# Judges


@register_judge("test_evaluate_length")
def _length_judge(prompts, responses):
    return [float(len(r)) for r in responses]


def test_registered_judge_by_name_and_errors():
    judge = build_judge(GenerationEvalConfig(judge="test_evaluate_length"))
    assert run_judge(judge, ["p", "q"], ["ab", ""]) == [2.0, 0.0]
    assert build_judge(GenerationEvalConfig()) is None
    with pytest.raises(ValueError, match="unknown judge 'nope'"):
        build_judge(GenerationEvalConfig(judge="nope"))
    with pytest.raises(TypeError, match="settings among"):
        register_judge("bad")(lambda prompts, responses, *, temperature=1.0: [])
    with pytest.raises(ValueError, match="already registered"):
        register_judge("test_evaluate_length")(lambda prompts, responses: [])
    with pytest.raises(ValueError, match="2 scores for 1 responses"):
        run_judge(lambda p, r: [1.0, 2.0], ["p"], ["r"])
    with pytest.raises(ValueError, match="eval.plugins"):
        build_judge(GenerationEvalConfig(judge="x", plugins=("no_such_module_xyz",)))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None, "high"])
def test_a_judge_must_give_finite_scores(bad):
    with pytest.raises(ValueError, match=r"eval.judge 'mine' gave score .* to response 1 \('bb'\); every score must be a finite"):
        run_judge(lambda p, r: [1.0, bad], ["p", "q"], ["a", "bb"], name="mine")
    with pytest.raises(ValueError, match="eval.judge 'mine' returned 1 scores for 2 responses"):
        run_judge(lambda p, r: [1.0], ["p", "q"], ["a", "bb"], name="mine")
    with pytest.raises(ValueError, match="eval.judge 'mine' returned float"):
        run_judge(lambda p, r: 1.0, ["p"], ["a"], name="mine")


def test_a_nan_judge_stops_the_eval_naming_the_judge(tokenizer):
    @register_judge("test_evaluate_nan")
    def nan_judge(prompts, responses):
        return [math.nan] * len(responses)

    settings = GenerationEvalConfig(num_prompts=2, max_new_tokens=3, judge="test_evaluate_nan")
    policy = _tiny(tokenizer)
    with pytest.raises(ValueError, match="eval.judge 'test_evaluate_nan' gave score nan to response 0"):
        generation_eval(policy, policy, _prompts(tokenizer, 2), tokenizer, settings, judge=build_judge(settings))


def test_conversations_reach_a_judge_that_asks_for_them(tokenizer):
    seen = {}

    def judge(prompts, responses, *, conversations):
        seen["conversations"] = conversations
        return [0.0] * len(responses)

    chat = Prompt(_prompts(tokenizer, 1)[0].ids, (("system", "be brief"), ("user", "say hello")))
    prompts = [chat, _prompts(tokenizer, 2)[1]]  # a conversational and a plain-text prompt
    settings = GenerationEvalConfig(num_prompts=2, max_new_tokens=3)
    policy = _tiny(tokenizer)
    generation_eval(policy, policy, prompts, tokenizer, settings, judge=judge)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hello"}]
    assert seen["conversations"] == [messages, None, messages, None]  # policy's responses, then the reference's
    assert register_judge("test_evaluate_conversations")(judge) is judge  # a keyword the registry accepts


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    """A 2-layer Llama reward model (one label), random init, saved like a hub checkpoint."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=len(tokenizer), num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    folder = tmp_path_factory.mktemp("reward_model")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_reward_model_judge_scores_batches_as_one_by_one(reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    settings = GenerationEvalConfig(judge="reward_model", judge_model=str(reward_model_dir), batch_size=2)
    judge = build_judge(settings)
    prompts = ["say hello", "what is the capital of france", "why"]
    responses = ["hello", "paris is the capital", "because"]
    scores = run_judge(judge, prompts, responses)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    with torch.no_grad():
        alone = [float(model(**tok(p, r, return_tensors="pt")).logits[0, 0]) for p, r in zip(prompts, responses)]
    assert scores == pytest.approx(alone, abs=1e-5)  # padding in a batch changes nothing
    assert len(set(scores)) == 3


def test_reward_model_judge_renders_conversations_with_its_own_chat_template(tmp_path, reward_model_dir, tokenizer):
    """Conversational prompts are scored as the reward model's template renders the whole chat (here
    the bundled template: <bos> <|user|> say hello <|assistant|> hello <eos>); without a template, or
    for plain text, as the text pair."""
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from po_ray.eval import judges

    conversation = [{"role": "user", "content": "say hello"}]
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    rendered = tok.convert_tokens_to_ids(["<bos>", "<|user|>", "say", "hello", "<|assistant|>", "hello", "<eos>"])
    with torch.no_grad():
        by_hand = float(model(input_ids=torch.tensor([rendered])).logits[0, 0])
        as_pair = float(model(**tok("say hello", "hello", return_tensors="pt")).logits[0, 0])
    judge = build_judge(GenerationEvalConfig(judge="reward_model", judge_model=str(reward_model_dir)))
    chat_score, plain_score = run_judge(judge, ["say hello", "say hello"], ["hello", "hello"],
                                        conversations=[conversation, None])
    assert chat_score == pytest.approx(by_hand, abs=1e-5) and plain_score == pytest.approx(as_pair, abs=1e-5)
    assert chat_score != pytest.approx(plain_score, abs=1e-4)  # the formatting matters to the score

    no_template = tmp_path / "no_template"
    shutil.copytree(reward_model_dir, no_template)
    for name in ("chat_template.jinja", "chat_template.json"):
        (no_template / name).unlink(missing_ok=True)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    assert not getattr(AutoTokenizer.from_pretrained(no_template), "chat_template", None)
    judge = build_judge(GenerationEvalConfig(judge="reward_model", judge_model=str(no_template)))
    assert run_judge(judge, ["say hello"], ["hello"], conversations=[conversation]) == pytest.approx([as_pair], abs=1e-5)
    assert judges.reward_model_inputs(tok, "say hello", "hello", None)["input_ids"] == tok("say hello", "hello").input_ids


def test_reward_model_judge_gives_win_rate_half_for_policy_equal_to_reference(tokenizer, reward_model_dir):
    policy = _tiny(tokenizer, eos_bias=3.0)
    settings = GenerationEvalConfig(num_prompts=4, samples_per_prompt=2, max_new_tokens=8, judge="reward_model",
                                    judge_model=str(reward_model_dir))
    metrics, samples = generation_eval(policy, _tiny(tokenizer, eos_bias=3.0), _prompts(tokenizer, 4), tokenizer,
                                       settings, judge=build_judge(settings))
    assert metrics["gen/win_rate"] == 0.5
    assert metrics["gen/reward_mean"] == pytest.approx(metrics["gen/ref_reward_mean"])
    assert all(math.isfinite(s.reward) for s in samples)


# ---------------------------------------------------------------------------------------------
# Config, CLI and the MLflow table


def test_eval_config_keys_are_checked():
    cfg = load_config(None, ["eval.enabled=true", "eval.every_steps=5", "eval.temperature=0.7", "eval.top_p=0.9"])
    assert cfg.eval.enabled and cfg.eval.every_steps == 5 and cfg.eval.temperature == 0.7
    for bad, key in (("eval.temperature=-1", "eval.temperature"), ("eval.top_p=0", "eval.top_p"),
                     ("eval.num_prompts=0", "eval.num_prompts"), ("eval.judge=reward_model", "eval.judge_model")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="eval.enabled: .*held-out prompts"):
        load_config(None, ["eval.enabled=true", "data.eval_fraction=0"])


def test_is_due_every_n_steps_and_at_the_end():
    from po_ray.eval.in_training import is_due

    cfg = load_config(None, ["eval.enabled=true", "eval.every_steps=3", "train.max_steps=7"])
    assert [s for s in range(1, 8) if is_due(cfg, s)] == [3, 6, 7]
    assert [s for s in range(1, 8) if is_due(replace(cfg, eval=replace(cfg.eval, every_steps=0)), s)] == [7]
    assert not any(is_due(replace(cfg, eval=replace(cfg.eval, enabled=False)), s) for s in range(1, 8))


def test_cli_parses_eval_and_prints_the_result():
    from po_ray.cli import build_parser, format_eval_result

    args = build_parser().parse_args(["eval", "--model", "runs/x/model", "--config", "demo", "eval.num_prompts=4"])
    assert args.model == "runs/x/model" and args.overrides == ["eval.num_prompts=4"]
    metrics = {"gen/kl_per_token": 0.25, "gen/length_hit_limit": 0.125, "gen/distinct_2": 0.5, "gen/new_thing": 2.0}
    text = format_eval_result({"model": "m", "reference": "r", "metrics": metrics, "samples_path": "/o/samples.jsonl",
                               "num_samples": 3, "temperature": 0.7, "top_p": 0.9, "kl_from_separate_draws": True,
                               "tracking_uri": "sqlite:////o/mlflow.db", "mlflow_run_id": "abc"})
    lines = text.splitlines()
    assert "sampled at temperature 0.7, top_p 0.9; KL from separate draws at temperature 1, top_p 1" in lines
    assert any(ln.startswith("KL(policy || reference) per token") and ln.endswith("0.2500  (gen/kl_per_token)")
               for ln in lines)
    assert any(ln.startswith("cut off at max_new_tokens (share)") and "0.125" in ln for ln in lines)
    assert any(ln.startswith("distinct-2") for ln in lines) and any(ln.startswith("gen/new_thing") for ln in lines)
    assert "/o/samples.jsonl" in text and "/o/eval.json" in text and "(run abc)" in text and "mlflow ui" in text
    # an eval.json without the newer fields still prints
    assert "0.2500" in format_eval_result({"model": "m", "reference": "r", "metrics": {"gen/kl_per_token": 0.25},
                                           "samples_path": "/o/samples.jsonl", "num_samples": 3})


def test_samples_table_is_logged_to_mlflow_and_appended(tmp_path, tokenizer, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from po_ray.eval.generation import samples_table
    from po_ray.tracking import Tracker, default_tracking_uri

    monkeypatch.chdir(tmp_path)
    samples = [_sample([4, 2], [4, 2], -1.0, -1.5, 0.3, 0.1, 0), _sample([5], [6], -2.0, -2.0, i=1)]
    uri = default_tracking_uri(tmp_path / "run")
    tracker = Tracker(uri, "exp", "gen")
    run_id = tracker.start()
    tracker.log_table(samples_table(samples, tokenizer, step=5), "gen_samples.json")
    tracker.log_table(samples_table(samples[:1], tokenizer, step=10), "gen_samples.json")
    tracker.end()
    path = MlflowClient(uri).download_artifacts(run_id, "gen_samples.json", str(tmp_path))
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["step"] for r in rows] == [5, 5, 10]
    assert [r["length"] for r in rows] == [2, 1, 2]
    assert rows[0]["log_ratio"] == pytest.approx(0.5) and rows[0]["reward"] == pytest.approx(0.3)
    assert {"prompt", "response", "ref_response", "ref_reward"} <= set(rows[0])


# ---------------------------------------------------------------------------------------------
# Integration: 2 Ray workers, DeepSpeed ZeRO-3 on gloo


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    from po_ray.cli import resolve_config_path
    from po_ray.launch import ensure_ray

    ensure_ray(load_config(resolve_config_path("demo")))
    yield
    ray.shutdown()


def _demo(tmp_path: Path, *extra: str):
    from po_ray.cli import resolve_config_path

    return load_config(resolve_config_path("demo"), [f"run.storage_path={tmp_path}", "eval.num_prompts=5",
                                                     "eval.max_new_tokens=8", "eval.batch_size=2", *extra])


@pytest.mark.integration
def test_po_ray_eval_on_two_zero3_workers(ray_session, tmp_path, tokenizer, reward_model_dir):
    """Policy and reference load the same folder: KL 0 and win rate 1/2 under ZeRO-3, with 5 prompts
    on 2 ranks (one rank pads its last batch with a dummy prompt)."""
    from po_ray.eval.launch import evaluate_model

    cfg = _demo(tmp_path, "run.name=eval-equal", "eval.judge=reward_model", f"eval.judge_model={reward_model_dir}",
                f"reference.name_or_path={tmp_path / 'model'}")
    model = build_model(cfg.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        dtype=torch.float32, seed=cfg.train.seed)
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "model")

    result = evaluate_model(cfg, str(tmp_path / "model"))
    m = result["metrics"]
    assert result["num_samples"] == 5
    assert abs(m["gen/kl_per_sequence"]) < 1e-6 and abs(m["gen/kl_per_token"]) < 1e-6
    assert m["gen/win_rate"] == 0.5 and m["gen/reward_mean"] == pytest.approx(m["gen/ref_reward_mean"])
    assert 0 < m["gen/topk_mass"] <= 1 and m["gen/topk_entropy"] > 0
    rows = [json.loads(ln) for ln in Path(result["samples_path"]).read_text().splitlines()]
    assert sorted(r["prompt_index"] for r in rows) == [0, 1, 2, 3, 4]
    assert all(len(r["response_ids"]) == r["tokens"] <= 8 for r in rows)
    assert all(r["cut_off"] == (tokenizer.eos_token_id not in r["response_ids"]) and abs(r["log_ratio"]) < 1e-6 for r in rows)
    assert m["gen/length_hit_limit"] == sum(r["cut_off"] for r in rows) / 5
    assert m["gen/length_mean"] == pytest.approx(sum(r["tokens"] for r in rows) / 5)
    assert json.loads((tmp_path / "eval-equal" / "eval" / "eval.json").read_text())["metrics"] == m


@pytest.mark.integration
def test_po_ray_eval_cli_on_an_exported_model(ray_session, tmp_path, tokenizer, capsys):
    """`po-ray eval --model PATH --config FILE` on 2 ZeRO-3 workers, a model unlike the reference,
    sampled at temperature 0.7 (so the KL has draws of its own): exit 0, the labelled result printed,
    eval.json, and an MLflow run <run.name>-eval with the metrics and the samples table."""
    from mlflow import MlflowClient

    from po_ray.cli import main

    model = build_model(ModelConfig(config_overrides={"hidden_size": 64, "intermediate_size": 128,
                                                      "num_hidden_layers": 2, "num_attention_heads": 4,
                                                      "num_key_value_heads": 2}),
                        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        dtype=torch.float32, seed=123)
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "model")
    config = tmp_path / "eval.yaml"
    config.write_text(f"extends: demo\nrun: {{name: cli, storage_path: {tmp_path}}}\n"
                      "eval: {num_prompts: 5, max_new_tokens: 8, batch_size: 2, temperature: 0.7}\n")

    assert main(["eval", "--model", str(tmp_path / "model"), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "cli" / "eval" / "eval.json").read_text())
    m = result["metrics"]
    assert result["kl_from_separate_draws"] is True and result["num_samples"] == 5
    assert m["gen/kl_per_sequence"] > 0  # another model than the reference
    assert "sampled at temperature 0.7, top_p 1; KL from separate draws at temperature 1, top_p 1" in out
    assert f"{m['gen/kl_per_token']:.4f}  (gen/kl_per_token)" in out and "cut off at max_new_tokens" in out
    assert f"(run {result['mlflow_run_id']})" in out

    client = MlflowClient(result["tracking_uri"])
    assert result["tracking_uri"] == f"sqlite:///{tmp_path / 'cli' / 'mlflow.db'}"  # the training run's store
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.run_name == "cli-eval" and run.info.status == "FINISHED"
    assert run.data.metrics["gen/kl_per_token"] == pytest.approx(m["gen/kl_per_token"])
    assert run.data.params["eval.temperature"] == "0.7"
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "gen_samples.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert len(rows) == 5 and {"log_ratio", "cut_off", "prompt", "response"} <= set(rows[0]) and "kl" not in rows[0]
    assert [r["step"] for r in rows] == [0] * 5
    assert "eval.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.integration
@pytest.mark.parametrize("loss", ["dpo", "simpo"])  # the sharded reference; one built for each eval (none)
def test_training_logs_generation_metrics_and_samples(ray_session, tmp_path, loss):
    from mlflow import MlflowClient

    from po_ray.launch import train

    cfg = _demo(tmp_path, "run.name=gen", "train.max_steps=2", "train.eval_every=0", "eval.enabled=true",
                "eval.every_steps=1", "checkpoint.every_steps=0", "checkpoint.export_model=false", f"loss.name={loss}")
    summary = train(cfg)
    assert summary["reference_strategy"] == {"dpo": "sharded", "simpo": "none"}[loss]
    final = summary["final"]
    assert final["gen/kl_per_token"] != 0.0  # two updates at lr 1e-3 moved the policy off the reference
    assert 0 < final["gen/length_mean"] <= 8 and 0 <= final["gen/distinct_1"] <= 1
    client = MlflowClient(summary["tracking_uri"])
    run_id = summary["mlflow_run_id"]
    assert sorted(x.step for x in client.get_metric_history(run_id, "gen/kl_per_token")) == [1, 2]
    table = json.loads(Path(client.download_artifacts(run_id, "gen_samples.json", str(tmp_path))).read_text())
    steps = [row[table["columns"].index("step")] for row in table["data"]]
    assert steps == [1] * 5 + [2] * 5
    assert sorted(p.name for p in (tmp_path / "gen" / "gen_samples").iterdir()) == ["step_000001.jsonl", "step_000002.jsonl"]


# ---------------------------------------------------------------------------------------------
# Monte-Carlo KL against the exact KL, by enumerating every response of a 5-token vocabulary

V, EOS, PAD, L = 5, 2, 0, 3  # tokens 0..4; EOS 2; responses of at most 3 tokens


class IdTokenizer:
    """Just what generation_eval needs of a tokenizer when there is no judge."""

    eos_token_id, pad_token_id = EOS, PAD

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _peaked_tiny(seed: int, scale: float) -> LogpModel:
    """A tiny Llama over 5 tokens whose output head is scaled up: far from uniform, so the KL is large."""
    model = build_model(ModelConfig(), vocab_size=V, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS,
                        dtype=torch.float32, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return LogpModel(model, chunk_size=16, topk=3).eval()


def _all_responses() -> list[tuple[int, ...]]:
    """Every response generation can end with: EOS after 0..L−1 other tokens, or L tokens (cut off)."""
    others = [t for t in range(V) if t != EOS]
    out = []
    for n in range(L):
        out += [(*body, EOS) for body in itertools.product(others, repeat=n)]
    return out + [body for body in itertools.product(range(V), repeat=L) if EOS not in body[:-1] and body[-1] != EOS]


def _step_logprobs(model: LogpModel, prompt, response) -> torch.Tensor:
    """``(len(response), V)``: the next-token log-softmax before each response token (plain forward)."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits[0].double()
    return logits[len(prompt) - 1 : -1].log_softmax(-1)


def _sampling_logprobs(step: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampler's per-step distribution, written out: softmax(logits / T), then the nucleus (the
    fewest most probable tokens reaching top_p), renormalised."""
    probs = (step / temperature).softmax(-1)
    out = torch.zeros_like(probs)
    for t in range(probs.shape[0]):
        kept, mass = [], 0.0
        for token in probs[t].argsort(descending=True).tolist():
            kept.append(token)
            mass += float(probs[t, token])
            if mass >= top_p:
                break
        out[t, kept] = probs[t, kept] / probs[t, kept].sum()
    return out.log()


def _exact(policy, reference, prompt, temperature=1.0, top_p=1.0):
    """Σ over all responses y of q(y)·[log π(y) − log π_ref(y)] and its variance, q the sampling
    distribution at (temperature, top_p): KL(π ‖ π_ref) when q = π, else what the old estimate targeted."""
    mean = second = total = 0.0
    for y in _all_responses():
        pick = torch.tensor(y)[:, None]
        lp, ref = (_step_logprobs(m, prompt, y).gather(-1, pick).sum().item() for m in (policy, reference))
        q = _sampling_logprobs(_step_logprobs(policy, prompt, y), temperature, top_p).gather(-1, pick).sum().exp().item()
        total += q
        mean += q * (lp - ref)
        second += q * (lp - ref) ** 2
    assert total == pytest.approx(1.0, abs=1e-9)  # the enumeration covers every response
    return mean, second - mean**2


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.6)])
def test_monte_carlo_kl_converges_to_the_exact_kl(temperature, top_p):
    policy, reference = _peaked_tiny(0, 5.0), _peaked_tiny(1, 5.0)
    prompt, n = (1, 3), 2000
    settings = GenerationEvalConfig(num_prompts=1, samples_per_prompt=n, batch_size=1000, max_new_tokens=L,
                                    temperature=temperature, top_p=top_p, seed=5)
    metrics, samples = generation_eval(policy, reference, [Prompt(prompt)], IdTokenizer(), settings)
    kl, var = _exact(policy, reference, prompt)
    se = math.sqrt(var / n)
    assert kl > 20 * se  # a KL the test can tell from 0
    assert metrics["gen/kl_per_sequence"] == pytest.approx(kl, abs=4 * se)
    # The evaluated samples' own log-ratios estimate E_q[log π − log π_ref] for the sampling q.
    target, target_var = _exact(policy, reference, prompt, temperature, top_p)
    own = sum(s.log_ratio for s in samples) / n
    assert own == pytest.approx(target, abs=4 * math.sqrt(target_var / n))
    if (temperature, top_p) != (1.0, 1.0):
        # ... which is not the KL: the estimate from those samples (the old one) would be biased.
        assert abs(target - kl) > 10 * se
        assert [s.kl_logps for s in samples] != [s.logps for s in samples]
    else:
        assert [s.kl_logps for s in samples] == [s.logps for s in samples]  # no second draw needed
