"""The real thing, small: 2 Ray workers, DeepSpeed ZeRO-3 on gloo, the tiny Llama, the demo pairs.

One uninterrupted run is the reference the fault and resume tests are compared with: same seed,
same data order, constant learning rate, so the pairs each step trains on must match exactly.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray")

from po_ray.cli import resolve_config_path  # noqa: E402
from po_ray.config import ConfigError, load_config  # noqa: E402

REFERENCE_STEPS = 100
COMMON = [
    "optimizer.scheduler=constant",
    "optimizer.warmup_steps=0",
    "train.eval_every=0",
    "train.log_every=10",
    "checkpoint.every_steps=10",
    "run.max_failures=2",
]


PLUGINS = Path(__file__).parent / "plugins"  # loss plugins the fault tests load with loss.plugins


@pytest.fixture(scope="module")
def ray_session():
    from po_ray.launch import ensure_ray

    # The driver and the workers (started now, inheriting this environment) import the plugins.
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS), old_path]))
    sys.path.insert(0, str(PLUGINS))
    ensure_ray(load_config(resolve_config_path("demo")))
    yield
    ray.shutdown()
    sys.path.remove(str(PLUGINS))
    if old_path is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old_path


def demo_config(tmp: Path, name: str, *extra: str):
    return load_config(
        resolve_config_path("demo"), [*COMMON, f"run.storage_path={tmp}", f"run.name={name}", *extra]
    )


def ledger(run_dir: Path) -> dict[int, dict[int, dict]]:
    """rank -> step -> {pair_ids, loss}, asserting each step appears once per rank."""
    out: dict[int, dict[int, dict]] = {}
    for path in sorted((run_dir / "ledger").glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        steps: dict[int, dict] = {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            assert row["step"] not in steps, f"{path}: step {row['step']} recorded twice"
            steps[row["step"]] = row
        out[rank] = steps
    return out


@pytest.fixture(scope="module")
def reference_run(ray_session, tmp_path_factory):
    from po_ray.launch import train

    tmp = tmp_path_factory.mktemp("runs")
    cfg = demo_config(tmp, "reference", f"train.max_steps={REFERENCE_STEPS}")
    summary = train(cfg)
    return cfg, summary, Path(summary["run_dir"])


def test_two_workers_zero3_learn_track_and_export(reference_run):
    cfg, summary, run_dir = reference_run
    # ZeRO-3 really partitions: each of the 2 ranks holds about half of the parameters.
    fractions = summary["param_fraction_per_rank"]
    assert len(fractions) == 2 and all(0.4 <= f <= 0.6 for f in fractions), fractions
    # Real learning on held-out pairs, not just on the training batches.
    before, after = summary["eval_before"], summary["final"]
    assert after["eval/rewards/accuracies"] >= 0.75, after
    assert after["eval/loss"] < before["eval/loss"] - 0.1, (before["eval/loss"], after["eval/loss"])
    assert after["eval/logps/accuracies"] > before["eval/logps/accuracies"] + 0.2

    # The last checkpoint records where the data stream stands and the config that made it.
    state = json.loads(sorted(run_dir.glob("checkpoint_*/trainer_state.json"))[-1].read_text())
    assert state["step"] == REFERENCE_STEPS and state["world_size"] == 2
    assert state["pairs_consumed"] == REFERENCE_STEPS * 2 * cfg.train.micro_batch_size
    assert state["config"]["loss"]["beta"] == cfg.loss.beta

    # MLflow holds the resolved config and every step's metrics.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["loss.beta"] == "0.1"
    assert run.data.params["scaling.num_workers"] == "2"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, REFERENCE_STEPS + 1))
    assert client.get_metric_history(run.info.run_id, "topk_entropy")

    # The exported model is a plain Hugging Face model that loads and generates.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(summary["model_dir"])
    assert (model_dir / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def assert_same_steps(run_dir: Path, reference_dir: Path, steps: int) -> None:
    got, want = ledger(run_dir), ledger(reference_dir)
    assert sorted(got) == [0, 1]
    for rank in (0, 1):
        assert sorted(got[rank]) == list(range(1, steps + 1)), f"rank {rank} steps"
        for step in range(1, steps + 1):
            assert got[rank][step]["pair_ids"] == want[rank][step]["pair_ids"], f"rank {rank} step {step}"
            assert got[rank][step]["loss"] == pytest.approx(want[rank][step]["loss"], abs=1e-4)
    seen = [i for rank in (0, 1) for s in range(1, steps + 1) for i in got[rank][s]["pair_ids"]]
    assert len(seen) == len(set(seen)), "a pair was trained twice within the epoch"


def test_resume_continues_with_the_next_unseen_pair(reference_run, tmp_path):
    from po_ray.launch import train

    _, _, reference_dir = reference_run
    train(demo_config(tmp_path, "resumed", "train.max_steps=20"))
    summary = train(demo_config(tmp_path, "resumed", "train.max_steps=30"), resume=True)
    assert_same_steps(Path(summary["run_dir"]), reference_dir, 30)


def test_a_truncated_shard_sends_the_resume_to_the_previous_checkpoint(reference_run, tmp_path):
    from po_ray.launch import train

    _, _, reference_dir = reference_run
    train(demo_config(tmp_path, "damaged", "train.max_steps=20", "checkpoint.export_model=false"))
    run_dir = tmp_path / "damaged"
    latest = next(c for c in run_dir.glob("checkpoint_*")
                  if c.is_dir() and json.loads((c / "trainer_state.json").read_text())["step"] == 20)
    shard = latest / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    summary = train(demo_config(tmp_path, "damaged", "train.max_steps=30", "checkpoint.export_model=false"), resume=True)
    assert summary["resumed_from_steps"] == [10]
    assert_same_steps(run_dir, reference_dir, 30)
    warning = (f"[po-ray] WARNING: checkpoint {latest} is damaged: deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt "
               f"has {size // 2} bytes, rank 1 wrote {size} (truncated or overwritten); trying the previous checkpoint")
    assert poll_worker_logs(warning), "rank 0 never warned about the damaged checkpoint"


def poll_worker_logs(text: str, timeout_s: float = 60) -> bool:
    """Whether a worker printed ``text``: Ray writes each worker's stdout to the session's logs/*.out."""
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if any(text in p.read_text(errors="replace") for p in logs.glob("*.out")):
            return True
        time.sleep(0.5)
    return False


def test_killed_worker_restarts_from_last_checkpoint(reference_run, tmp_path):
    from po_ray.launch import train

    _, _, reference_dir = reference_run
    cfg = demo_config(tmp_path, "killed", "train.max_steps=30")
    run_dir = tmp_path / "killed"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=train(cfg)), daemon=True)
    thread.start()
    deadline = time.time() + 600
    victim = None
    while time.time() < deadline and victim is None:
        rows = (run_dir / "ledger" / "rank1.jsonl").read_text().splitlines() if (run_dir / "ledger" / "rank1.jsonl").exists() else []
        if rows and json.loads(rows[-1])["step"] >= 15:
            victim = int((run_dir / "pids" / "rank1").read_text())
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.2)
    assert victim is not None, "training never reached step 15"
    thread.join(timeout=900)
    assert "summary" in result, "training did not finish after the worker was killed"
    assert int((run_dir / "pids" / "rank1").read_text()) != victim, "the worker group was not restarted"
    assert_same_steps(run_dir, reference_dir, 30)


def test_reference_free_loss_loads_no_reference(ray_session, tmp_path):
    from po_ray.launch import train

    summary = train(demo_config(tmp_path, "simpo", "loss.name=simpo", "loss.beta=2.0", "train.max_steps=3",
                                "checkpoint.export_model=false"))
    assert summary["reference_strategy"] == "none"
    assert summary["final"]["loss"] > 0
    with pytest.raises(ConfigError, match="reference-free"):
        train(demo_config(tmp_path, "simpo2", "loss.name=simpo", "reference.strategy=sharded"))


def test_precomputed_reference_equals_sharded(ray_session, tmp_path):
    from po_ray.launch import train

    runs, table_mtimes = {}, []
    for strategy in ("sharded", "precomputed", "precomputed"):
        name = f"{strategy}-{len(runs)}"
        summary = train(demo_config(tmp_path, name, f"reference.strategy={strategy}", "train.max_steps=4",
                                    "checkpoint.export_model=false"))
        runs[name] = ledger(Path(summary["run_dir"]))
        table_mtimes.append([p.stat().st_mtime_ns for p in (tmp_path / "reference_cache").glob("*/logps.safetensors")])
    sharded, first, second = runs.values()
    for rank in (0, 1):
        for step in range(1, 5):
            assert first[rank][step]["loss"] == pytest.approx(sharded[rank][step]["loss"], abs=1e-5)
            assert second[rank][step]["loss"] == pytest.approx(sharded[rank][step]["loss"], abs=1e-5)
    # Computed once by the first precomputed run, reused (not rewritten) by the second.
    assert table_mtimes[0] == [] and len(table_mtimes[1]) == 1 and table_mtimes[2] == table_mtimes[1]


def run_in_thread(cfg) -> tuple[threading.Thread, dict]:
    from po_ray.launch import train

    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=train(cfg)), daemon=True)
    thread.start()
    return thread, result


FAULTY = ["loss.name=dpo_faulty", "loss.plugins=[po_ray_test_losses]", "run.max_failures=0", "train.max_steps=12"]


def test_non_finite_steps_are_skipped_and_counted_then_stop_the_run(reference_run, tmp_path):
    from safetensors.torch import load_file

    from po_ray.launch import train

    _, _, reference_dir = reference_run
    want = ledger(reference_dir)
    # One micro-batch per step, so a worker's n-th training call is step n: a NaN loss at step 3,
    # a finite loss with NaN gradients at step 5.
    summary = train(demo_config(tmp_path, "skips", *FAULTY, "loss.options.nan_loss_call=3",
                                "loss.options.nan_grad_call=5", "train.max_skipped_steps=2"))
    got = ledger(Path(summary["run_dir"]))
    for rank in (0, 1):
        assert {s for s, row in got[rank].items() if row.get("skipped")} == {3, 5}
        assert [got[rank][s]["pair_ids"] for s in range(1, 13)] == [want[rank][s]["pair_ids"] for s in range(1, 13)]
        assert [got[rank][s]["loss"] for s in (1, 2)] == pytest.approx([want[rank][s]["loss"] for s in (1, 2)], abs=1e-4)
    assert summary["final"]["skipped_steps"] == 2 and summary["final"]["loss"] > 0
    # Neither step reached the weights: NaN gradients applied once would have made them NaN.
    weights = load_file(Path(summary["model_dir"]) / "model.safetensors")
    assert all(bool(t.isfinite().all()) for t in weights.values())

    # Past the limit the run stops, naming the step and its pairs (all ranks'), before any checkpoint of
    # that step. A checkpoint after every step, all kept: none of them ever holds a NaN weight.
    with pytest.raises(Exception) as failure:
        train(demo_config(tmp_path, "too-many", *FAULTY, "loss.options.nan_grad_call=2",
                          "loss.options.nan_loss_call=4", "train.max_skipped_steps=1",
                          "checkpoint.every_steps=1", "checkpoint.keep_last=20"))
    pairs = sorted(want[0][4]["pair_ids"] + want[1][4]["pair_ids"])
    assert f"non-finite loss at step 4 (pairs {pairs}): 2 steps skipped, more than train.max_skipped_steps=1" in str(
        failure.value)
    saved = {json.loads((c / "trainer_state.json").read_text())["step"]: c
             for c in (tmp_path / "too-many").glob("checkpoint_*") if c.is_dir()}  # not Ray's snapshot file
    assert sorted(saved) == [1, 2, 3]  # step 2 skipped (NaN gradient) is saved with untouched weights; 4 never
    for step, folder in saved.items():
        for name, tensor in fp32_weights(folder).items():
            assert bool(tensor.isfinite().all()), f"checkpoint of step {step}: {name} holds NaN/inf"


def fp32_weights(folder: Path) -> dict:
    """The full fp32 weights of a ZeRO-3 checkpoint, merged from every rank's shards by DeepSpeed's
    own recovery script (zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="deepspeed")
    assert state, f"{folder}: no weights"
    return state


def test_kill_during_checkpoint_write_resumes_from_the_previous_checkpoint(reference_run, tmp_path):
    _, _, reference_dir = reference_run
    flag = tmp_path / "rank1-blocked-in-checkpoint"
    cfg = demo_config(tmp_path, "ckpt-kill", "train.max_steps=30", "loss.name=dpo_slow_checkpoint",
                      "loss.plugins=[po_ray_test_losses]", "loss.options.block_checkpoint_step=20",
                      f"loss.options.block_flag={flag}")
    thread, result = run_in_thread(cfg)
    deadline = time.time() + 600
    while time.time() < deadline and not flag.exists():
        time.sleep(0.2)
    assert flag.exists(), "rank 1 never reached the checkpoint of step 20"
    victim = int((tmp_path / "ckpt-kill" / "pids" / "rank1").read_text())
    os.kill(victim, signal.SIGKILL)
    half_written = Path(flag.read_text())
    assert (half_written / "deepspeed").is_dir() and not (half_written / "COMPLETE.rank1").exists()
    thread.join(timeout=900)
    assert "summary" in result, "training did not finish after the kill"
    # The half-written step-20 checkpoint never counted: the run went back to step 10's.
    assert result["summary"]["resumed_from_steps"] == [10]
    assert_same_steps(tmp_path / "ckpt-kill", reference_dir, 30)


def test_no_secret_reaches_the_summary_or_the_run_folder(ray_session, tmp_path):
    """An MLflow URI with a password (its server down here: training goes on, buffering)."""
    from po_ray.launch import _free_port, train

    password = "hunter2-correct-horse"
    port = _free_port()
    summary = train(demo_config(tmp_path, "secret", "train.max_steps=2", "checkpoint.export_model=false",
                                f"tracking.tracking_uri=http://alice:{password}@127.0.0.1:{port}"))
    assert summary["tracking_uri"] == f"http://alice:***@127.0.0.1:{port}"
    texts = [p for p in (tmp_path / "secret").rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", "")]
    assert any(p.name == "summary.json" for p in texts) and any(p.name == "trainer_state.json" for p in texts)
    for path in texts:
        assert password not in path.read_text(errors="replace"), path
