"""Step metrics reduce exactly: pair- and token-weighted, whatever way the batch is split over ranks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from po_ray.metrics import finalize, pack, step_metrics


def _side(logps, tokens, entropy, topk_entropy, topk_mass):
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return SimpleNamespace(
        logps=t(logps),
        tokens=t(tokens),
        entropy_sum=t(entropy),
        topk_entropy_sum=t(topk_entropy),
        topk_mass_sum=t(topk_mass),
    )


# Three pairs with very different lengths, so token weighting and pair weighting disagree.
CHOSEN = _side([-10.0, -40.0, -3.0], [5, 20, 1], [5.0, 60.0, 0.5], [2.0, 30.0, 0.25], [4.0, 10.0, 1.0])
REJECTED = _side([-12.0, -30.0, -9.0], [4, 10, 2], [8.0, 10.0, 3.0], [4.0, 5.0, 1.0], [2.0, 9.0, 1.5])
REF_CHOSEN = torch.tensor([-11.0, -42.0, -2.0])
REF_REJECTED = torch.tensor([-11.0, -30.0, -10.0])
LOSS = SimpleNamespace(
    losses=torch.tensor([0.5, 1.0, 3.0], requires_grad=True),
    chosen_rewards=torch.tensor([0.1, 0.2, -0.1]),
    rejected_rewards=torch.tensor([0.0, 0.2, 0.3]),  # pair 1 is a tie: not an accurate pair
    terms={"nll": torch.tensor([2.0, 2.0, 3.0])},
)


def _select(ns: SimpleNamespace, idx: list[int]) -> SimpleNamespace:
    pick = lambda v: v[idx] if isinstance(v, torch.Tensor) else {k: t[idx] for k, t in v.items()}  # noqa: E731
    return SimpleNamespace(**{k: pick(v) for k, v in vars(ns).items()})


def _metrics(idx: list[int], with_reference: bool = True) -> dict:
    return step_metrics(
        loss_out=_select(LOSS, idx),
        chosen=_select(CHOSEN, idx),
        rejected=_select(REJECTED, idx),
        ref_chosen_logps=REF_CHOSEN[idx] if with_reference else None,
        ref_rejected_logps=REF_REJECTED[idx] if with_reference else None,
    )


def _reduce(metrics: dict) -> dict[str, float]:
    return finalize(*pack(metrics))


def test_values_by_hand():
    got = _reduce(_metrics([0, 1, 2]))
    tokens_c, tokens_r = 26, 16
    expected = {
        "loss": 4.5 / 3,
        "rewards/chosen": 0.2 / 3,
        "rewards/rejected": 0.5 / 3,
        "rewards/margins": (0.1 + 0.0 - 0.4) / 3,
        "rewards/accuracies": 1 / 3,
        "logps/chosen": -53 / 3,
        "logps/rejected": -51 / 3,
        "lengths/chosen": 26 / 3,
        "lengths/rejected": 16 / 3,
        "tokens": 42.0,  # a total, not a mean
        "entropy": (65.5 + 21.0) / 42,
        "entropy/chosen": 65.5 / tokens_c,
        "entropy/rejected": 21.0 / tokens_r,
        "topk_entropy": (32.25 + 10.0) / 42,
        "topk_mass": (15.0 + 12.5) / 42,
        "topk_mass/chosen": 15.0 / tokens_c,
        # ρ per token: chosen (1 + 2 − 1) = 2, rejected (−1 + 0 + 1) = 0.
        "logratio_per_token": 2.0 / 42,
        "logratio_per_token/chosen": 2.0 / tokens_c,
        "logratio_per_token/rejected": 0.0,
        "loss/nll": 7.0 / 3,
    }
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    assert set(got) >= set(expected)


@pytest.mark.parametrize("split", [([0], [1, 2]), ([1], [0, 2]), ([0, 1], [2])])
def test_two_ranks_reduce_to_the_whole_batch(split):
    whole = _reduce(_metrics([0, 1, 2]))
    names_a, packed_a = pack(_metrics(split[0]))
    names_b, packed_b = pack(_metrics(split[1]))
    assert names_a == names_b  # the column order is the same on every rank
    gathered = finalize(names_a, packed_a + packed_b)  # what an all-reduce SUM hands every rank
    assert gathered.keys() == whole.keys()
    for name in whole:
        assert gathered[name] == pytest.approx(whole[name], abs=1e-9), name

    # The exact reduction is not a mean of the ranks' means: the ranks are unequal, so that would differ.
    a, b = finalize(names_a, packed_a), finalize(names_b, packed_b)
    for name in ("entropy", "loss", "logratio_per_token"):
        assert (a[name] + b[name]) / 2 != pytest.approx(whole[name], abs=1e-6), name


def test_without_reference_there_is_no_log_ratio():
    got = _reduce(_metrics([0, 1, 2], with_reference=False))
    assert not any(name.startswith("logratio") for name in got)
    assert got["loss"] == pytest.approx(1.5)


def test_one_reference_side_only_is_an_error():
    with pytest.raises(ValueError, match="both"):
        step_metrics(
            loss_out=LOSS, chosen=CHOSEN, rejected=REJECTED, ref_chosen_logps=REF_CHOSEN, ref_rejected_logps=None
        )


def test_loss_terms_per_pair_or_batch_mean():
    scalar = SimpleNamespace(**{**vars(LOSS), "terms": {"odds": torch.tensor(0.25)}})
    m = step_metrics(loss_out=scalar, chosen=CHOSEN, rejected=REJECTED, ref_chosen_logps=None, ref_rejected_logps=None)
    assert m["loss/odds"][0].item() == pytest.approx(0.75) and m["loss/odds"][1].item() == 3
    wrong = SimpleNamespace(**{**vars(LOSS), "terms": {"bad": torch.ones(2)}})
    with pytest.raises(ValueError, match="loss term 'bad'"):
        step_metrics(loss_out=wrong, chosen=CHOSEN, rejected=REJECTED, ref_chosen_logps=None, ref_rejected_logps=None)


def test_everything_is_detached_fp64():
    for total, count in _metrics([0, 1, 2]).values():
        assert total.dtype == count.dtype == torch.float64
        assert not total.requires_grad


def test_finalize_empty_count_and_shape():
    out = finalize(["entropy", "tokens"], torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert math.isnan(out["entropy"]) and out["tokens"] == 0.0
    with pytest.raises(ValueError, match="expected"):
        finalize(["a"], torch.zeros(2, 2))
