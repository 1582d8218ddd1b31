"""Generation-based evaluation: the metric functions against hand computations, sampling and scoring
on the tiny Llama in one process, judges (a tiny reward model built from a config), the MLflow
samples table, and (integration) `po-ray eval` on 2 ZeRO-3 workers."""

from __future__ import annotations

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
    assert metrics["gen/length_mean"] == pytest.approx(sum(lengths) / len(lengths))
    assert metrics["gen/length_hit_limit"] == pytest.approx(sum(n == 10 for n in lengths) / len(lengths))
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
    torch.manual_seed(12345)  # the caller's RNG state must not matter
    _, b = generation_eval(policy, policy, _prompts(tokenizer), tokenizer, settings)
    _, c = generation_eval(policy, policy, _prompts(tokenizer), tokenizer, replace(settings, seed=4))
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    assert [s.response_ids for s in a] != [s.response_ids for s in c]


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


def test_cli_parses_eval():
    from po_ray.cli import build_parser, format_eval_result

    args = build_parser().parse_args(["eval", "--model", "runs/x/model", "--config", "demo", "eval.num_prompts=4"])
    assert args.model == "runs/x/model" and args.overrides == ["eval.num_prompts=4"]
    text = format_eval_result({"model": "m", "reference": "r", "metrics": {"gen/kl_per_token": 0.25},
                               "samples_path": "/o/samples.jsonl", "num_samples": 3})
    assert "gen/kl_per_token" in text and "0.2500" in text and "/o/samples.jsonl" in text and "/o/eval.json" in text


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
    assert m["gen/length_mean"] == pytest.approx(sum(r["tokens"] for r in rows) / 5)
    assert json.loads((tmp_path / "eval-equal" / "eval" / "eval.json").read_text())["metrics"] == m


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
