"""The benchmark's pure helpers: padding, FLOPs/MFU arithmetic, step timing and the result shape.
No timings are asserted; the benchmarks themselves live in bench/."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import _common as common  # noqa: E402
import vs_trl  # noqa: E402


def test_padding_fraction_by_hand():
    # Batch 1 pads to 5: (5-5)+(5-3) = 2 of 10; batch 2 pads to 4: (4-1)+(4-4)+(4-2) = 5 of 12.
    assert common.padding_fraction([[5, 3], [1, 4, 2]]) == pytest.approx(7 / 22)
    assert common.padding_fraction([[4, 4, 4]]) == 0.0
    assert common.padding_fraction([]) == 0.0


def test_dpo_step_flops_and_mfu():
    # Policy fwd+bwd 6 FLOPs per parameter per token, live reference +2: body on all tokens, head on completions.
    flops = common.dpo_step_flops(body_params=10, head_params=100, real_tokens=7, completion_tokens=3,
                                  live_reference=True)
    assert flops == 8 * (10 * 7 + 100 * 3)
    assert common.dpo_step_flops(body_params=10, head_params=100, real_tokens=7, completion_tokens=3,
                                 live_reference=False) == 6 * (70 + 300)
    assert common.mfu(25.0, 100.0) == 0.25


def test_step_durations_skip_warmup():
    ends = [10.0, 11.5, 13.0, 16.0]
    assert common.step_durations(ends, warmup=1) == [1.5, 1.5, 3.0]
    assert common.step_durations(ends, warmup=2) == [1.5, 3.0]
    with pytest.raises(ValueError):
        common.step_durations(ends, warmup=0)
    assert common.median([3.0, 1.0, 2.0]) == 2.0 and common.median([1.0, 4.0]) == 2.5


def test_spec_never_truncates():
    for spec in vs_trl.SPECS.values():
        assert spec.max_prompt_length == spec.prompt_words[1] + 1  # + BOS
        assert spec.max_completion_length == spec.completion_words[1] + 1  # + EOS
        assert spec.max_length >= spec.max_prompt_length + spec.max_completion_length
        assert spec.num_pairs == spec.max_steps * spec.batch_pairs
        assert spec.batch_pairs % 2 == 0  # split evenly over 2 workers


def test_synthetic_words_are_distinct_letters():
    words = vs_trl.synthetic_words(500, seed=3)
    assert len(set(words)) == 500 and all(len(w) == 4 and w.isalpha() and w.islower() for w in words)
    assert words == vs_trl.synthetic_words(500, seed=3)


def test_pair_rows_match_collate_order():
    from po_ray.data import TokenizedPair, collate

    pairs = [TokenizedPair(0, (2, 5), (6, 3), (7, 8, 3)), TokenizedPair(1, (2,), (9, 3), (3,))]
    rows = vs_trl.pair_rows(pairs)
    batch = collate(pairs, pad_token_id=0)
    assert [r for r, _ in rows] == batch["attention_mask"].sum(1).tolist()
    assert [c for _, c in rows] == batch["completion_mask"].sum(1).tolist()


def _fake_result(name, tokens_per_s, rss, step):
    return {"name": name, "completion_tokens_per_s": tokens_per_s, "tokens_per_s": 2 * tokens_per_s,
            "step_s_median": step, "step_s": [step], "mfu": 0.1, "padding_fraction": 0.2,
            "peak_rss_bytes": rss, "peak_pss_bytes": rss // 2, "peak_single_rss_bytes": rss // 4,
            "wall_s": 10.0, "losses": [0.6931, 0.69]}


def test_ratios_and_report_shape():
    results = {"trl": _fake_result("trl", 100.0, 1000, 2.0), "po_ray_1w": _fake_result("po_ray_1w", 150.0, 700, 1.0),
               "po_ray_2w": _fake_result("po_ray_2w", 120.0, 1400, 1.5),
               "po_ray_1w_pre": _fake_result("po_ray_1w_pre", 200.0, 600, 0.75)}
    r = vs_trl.ratios(results)
    assert r["tokens_per_s_ratio"] == pytest.approx(1.5)
    assert r["peak_rss_ratio"] == pytest.approx(0.7)
    assert r["tokens_per_s_ratio_2w"] == pytest.approx(1.2)
    assert r["precomputed_step_time_saving"] == pytest.approx(0.25)
    json.dumps(r)  # the last printed line must be JSON
    text = vs_trl.markdown({"results": results, "ratios": r, "profile": {"top_ops": [
        {"op": "aten::mm", "self_cpu_ms_per_step": 12.0, "share": 0.5, "calls_per_step": 3}]}})
    assert "| trl | 100 |" in text and "`aten::mm`" in text and "tokens_per_s_ratio" in text


def test_plot_vs_trl_reads_labelled_runs(tmp_path):
    import plot_vs_trl

    good = tmp_path / "after.json"
    good.write_text(json.dumps({"ratios": {"tokens_per_s_ratio": 1.8, "peak_pss_ratio": 0.9, "peak_rss_ratio": 1.1}}))
    runs = plot_vs_trl.load_runs([f"after={good}"])
    assert runs == [("after", {"tokens_per_s_ratio": 1.8, "peak_pss_ratio": 0.9, "peak_rss_ratio": 1.1})]
    plot_vs_trl.plot(runs, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match=r"'after\.json': expected LABEL=PATH"):
        plot_vs_trl.load_runs(["after.json"])
    partial = tmp_path / "only_trl.json"
    partial.write_text(json.dumps({"ratios": {}}))
    with pytest.raises(SystemExit, match=r"only_trl\.json: no tokens_per_s_ratio, peak_pss_ratio, peak_rss_ratio"):
        plot_vs_trl.load_runs([f"x={partial}"])
