"""A Ray node dies mid-run (issue #6 §3): on a real multi-node cluster on this machine, a head with no
CPUs (the driver's) and two worker nodes with one CPU and one `train_slot` each, so the demo's two
Train workers, each asking for a slot, sit on different nodes. After the first checkpoint one worker
node is killed outright (its raylet, its Ray processes and the Train worker on it, as a crashed
machine loses them):

- a new node with the same resources joins while the run waits → the run resumes from the last
  checkpoint and finishes; the steps it trained again are the same pairs with the same losses;
- no node joins → `train()` fails once run.node_wait_s has passed, with a message naming the missing
  resources and the setting, instead of Ray Train's default of waiting for ever.

The unit test of the message needs no cluster."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from po_ray.checkpoint import CHECKPOINT_SNAPSHOT, STATE_FILE  # noqa: E402
from po_ray.cli import resolve_config_path  # noqa: E402
from po_ray.config import load_config  # noqa: E402
from po_ray.launch import NodeWaitTimeout, node_wait_message  # noqa: E402

SLOT = "train_slot"
STEPS = 60  # ~0.2 s a step here: room to kill the node well before the end
EVERY = 10  # checkpoint interval
KILL_AFTER = EVERY + 3  # steps trained when the node dies: some after the checkpoint, to be trained again
COMMON = [
    "optimizer.scheduler=constant",
    "optimizer.warmup_steps=0",
    "train.eval_every=0",
    "train.log_every=10",
    f"checkpoint.every_steps={EVERY}",
    "checkpoint.export_model=false",
    "tracking.enabled=false",
    "run.max_failures=2",
    f"train.max_steps={STEPS}",
    f"scaling.resources_per_worker={{{SLOT}: 1}}",
]
RUN_S = 240  # deadlines, generous for two shared cores; polled, never slept out


def test_message_names_the_missing_resources_and_the_setting():
    text = node_wait_message("r", 2, {"CPU": 1, SLOT: 1}, {"CPU": 1.0, SLOT: 1.0, "memory": 8e9}, 20)
    assert "run.node_wait_s=20 s" in text and "2 × {CPU: 1, train_slot: 1}" in text
    assert "Live nodes have {CPU: 1, train_slot: 1}: missing {CPU: 1, train_slot: 1}" in text
    # Enough in total but split across nodes: nothing is missing, the packing is the problem.
    text = node_wait_message("r", 2, {"CPU": 2}, {"CPU": 4.0}, 5)
    assert "missing" not in text and "no node has room for a whole worker" in text


# ---- the cluster ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeCluster:
    """ray.cluster_utils.Cluster with this test's topology; every node's files under one private folder."""

    def __init__(self, base: Path):
        from ray.cluster_utils import Cluster

        self.base = base
        self.cluster = Cluster()
        # The head holds the driver, the Train controller (0 CPUs) and the dashboard for the State API.
        self.cluster.add_node(num_cpus=0, temp_dir=str(base), include_dashboard=True,
                              dashboard_host="127.0.0.1", dashboard_port=_free_port())
        self.workers = [self.add_worker(), self.add_worker()]

    def add_worker(self):
        node = self.cluster.add_node(num_cpus=1, resources={SLOT: 1}, temp_dir=str(self.base))
        self.cluster.wait_for_nodes()
        return node

    def node_of(self, pid: int):
        """The worker node whose raylet spawned process ``pid``."""
        ancestors = {p.pid for p in psutil.Process(pid).parents()}
        for node in self.cluster.worker_nodes:
            raylets = node.all_processes.get("raylet", [])
            if any(info.process.pid in ancestors for info in raylets):
                return node
        raise AssertionError(f"process {pid} belongs to no worker node")

    def kill(self, node) -> None:
        """As if the machine died: SIGKILL every Ray process of the node and the workers it spawned."""
        children = [p for info in node.all_processes.get("raylet", [])
                    for p in _children(info.process.pid)]
        self.cluster.remove_node(node, allow_graceful=False)
        for p in children:
            try:
                p.kill()
            except psutil.Error:
                pass

    def ours(self) -> list:
        """Live processes started for this cluster: their command lines name its private folder."""
        out = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(str(self.base) in arg for arg in p.info["cmdline"] or ()):
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def shutdown(self) -> list[str]:
        seen = self.ours()
        self.cluster.shutdown()
        _, alive = psutil.wait_procs(seen, timeout=30)
        for p in alive:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=15)
        return [f"{p.pid}" for p in alive]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _children(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@pytest.fixture
def cluster(monkeypatch):
    from ray._private.authentication.authentication_token_setup import (
        enable_token_auth_by_default,
        ensure_token_if_auth_enabled,
    )

    if ray.is_initialized():  # another module's local Ray: this test needs its own cluster
        ray.shutdown()
    # As ray.init does for a new local cluster: token auth unless RAY_AUTH_MODE says otherwise; the
    # nodes started below inherit the mode, and the token comes from ~/.ray/auth_token.
    enable_token_auth_by_default()
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    # Short and private: Ray's Unix sockets live under the temp dir (path limit ~107 bytes).
    base = Path(tempfile.mkdtemp(prefix="poray-nl-", dir="/tmp"))
    c = NodeCluster(base)
    monkeypatch.setenv("RAY_ADDRESS", c.cluster.address)  # train() joins this cluster
    try:
        yield c
    finally:
        ray.shutdown()
        survivors = c.shutdown()
        if not survivors:
            shutil.rmtree(base, ignore_errors=True)
        assert not survivors, f"processes outlived the teardown (left {base}): {survivors}"


# ---- helpers ----------------------------------------------------------------------------------------


def demo_config(tmp: Path, name: str, *extra: str):
    return load_config(resolve_config_path("demo"), [*COMMON, f"run.storage_path={tmp}", f"run.name={name}", *extra])


def ledger(run_dir: Path) -> dict[int, dict[int, dict]]:
    """rank -> step -> {pair_ids, loss}, asserting each step appears once per rank."""
    out: dict[int, dict[int, dict]] = {}
    for path in sorted((run_dir / "ledger").glob("rank*.jsonl")):
        steps: dict[int, dict] = {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            assert row["step"] not in steps, f"{path}: step {row['step']} recorded twice"
            steps[row["step"]] = row
        out[int(path.stem.removeprefix("rank"))] = steps
    return out


def poll(what: str, probe, deadline_s: float, thread: threading.Thread | None = None, result: dict | None = None):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        if thread is not None and not thread.is_alive():
            pytest.fail(f"training ended while waiting for {what}: {result}")
        time.sleep(0.2)
    pytest.fail(f"{what} not seen within {deadline_s:.0f} s")


def start_training(cfg) -> tuple[threading.Thread, dict]:
    from po_ray.launch import ensure_ray, train

    ensure_ray(cfg)  # in the main thread, as the CLI does
    result: dict = {}

    def target():
        try:
            result["summary"] = train(cfg)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def kill_a_node_after_the_first_checkpoint(c: NodeCluster, run_dir: Path, thread, result) -> dict:
    """Wait until Ray Train has registered a checkpoint and steps past it were trained, then kill the
    node of rank 1. Returns what the run looked like at that moment.

    Registered, not merely written: a checkpoint the workers wrote but whose report the controller
    had not yet collected when a worker died is not restored, and the run would start over."""

    def ready():
        rows = ledger(run_dir).get(1, {}) if (run_dir / "ledger").is_dir() else {}
        return max(rows, default=0) >= KILL_AFTER and (run_dir / CHECKPOINT_SNAPSHOT).exists()

    poll(f"step {KILL_AFTER} after a registered checkpoint", ready, RUN_S, thread, result)
    victim = int((run_dir / "pids" / "rank1").read_text())
    c.kill(c.node_of(victim))
    before = {"ledger": ledger(run_dir), "victim": victim,
              "eval_before_mtime": (run_dir / "eval_before.json").stat().st_mtime_ns}
    poll(f"rank 1's worker (pid {victim}) gone with its node", lambda: not _alive(victim), 30)
    assert max(before["ledger"][1]) < STEPS, "the run finished before the node was killed"
    return before


def latest_registered_checkpoint_step(run_dir: Path) -> int:
    """The step of the checkpoint Ray Train restores from: the latest one its controller registered,
    from the snapshot it keeps in the run folder, and the step po_ray saved in that checkpoint."""
    snapshot = json.loads((run_dir / CHECKPOINT_SNAPSHOT).read_text())
    folder = run_dir / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    return json.loads((folder / STATE_FILE).read_text())["step"]


def waiting_for_slots() -> bool:
    """Ray Train's new worker group is waiting for a placement group that asks for the slots."""
    from ray.util import placement_group_table

    return any(pg["state"] == "PENDING" and any(SLOT in b for b in pg["bundles"].values())
               for pg in placement_group_table().values())


# ---- the tests --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_run_resumes_from_checkpoint_when_a_new_node_joins(cluster, tmp_path):
    cfg = demo_config(tmp_path, "node-back", "run.node_wait_s=180")
    run_dir = tmp_path / "node-back"
    thread, result = start_training(cfg)
    before = kill_a_node_after_the_first_checkpoint(cluster, run_dir, thread, result)

    # The controller noticed, restarted, and is now waiting for room; then capacity returns.
    poll("a restart waiting for a node", waiting_for_slots, RUN_S, thread, result)
    restore_step = latest_registered_checkpoint_step(run_dir)
    assert restore_step % EVERY == 0 and EVERY <= restore_step <= max(before["ledger"][1]), restore_step
    cluster.add_worker()
    thread.join(timeout=RUN_S)
    assert not thread.is_alive(), "training did not finish after a new node joined"
    assert "summary" in result, result.get("error")

    # Resumed, not restarted from scratch: the new workers loaded the checkpoint Ray Train held when
    # the node died (the run's restart history says which), and the evaluation before training
    # (step 0 only) was not rerun.
    assert result["summary"]["resumed_from_steps"] == [restore_step]
    assert (run_dir / "eval_before.json").stat().st_mtime_ns == before["eval_before_mtime"]
    assert int((run_dir / "pids" / "rank1").read_text()) != before["victim"]
    got = ledger(run_dir)
    assert sorted(got) == [0, 1]
    for rank in (0, 1):
        assert sorted(got[rank]) == list(range(1, STEPS + 1)), f"rank {rank} steps"
        # Every step trained before the kill, those after the checkpoint included (trained twice, the
        # second time from the restored checkpoint), has the same pairs and loss as the first time.
        first = before["ledger"][rank]
        assert max(first) >= KILL_AFTER
        for step, row in first.items():
            assert got[rank][step]["pair_ids"] == row["pair_ids"], f"rank {rank} step {step}"
            assert got[rank][step]["loss"] == pytest.approx(row["loss"], abs=1e-4), f"rank {rank} step {step}"
    seen = [i for rank in (0, 1) for s in range(1, STEPS + 1) for i in got[rank][s]["pair_ids"]]
    assert len(seen) == len(set(seen)), "a pair was trained twice within the epoch"
    assert len(seen) == STEPS * 2 * cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps


@pytest.mark.integration
def test_run_fails_clearly_when_no_node_comes_back(cluster, tmp_path):
    from ray.train import ControllerError

    wait_s = 20
    cfg = demo_config(tmp_path, "node-gone", f"run.node_wait_s={wait_s}")
    run_dir = tmp_path / "node-gone"
    thread, result = start_training(cfg)
    kill_a_node_after_the_first_checkpoint(cluster, run_dir, thread, result)

    thread.join(timeout=wait_s + RUN_S)
    assert not thread.is_alive(), "the run hung after losing a node"
    error = result.get("error")
    assert isinstance(error, ControllerError), result
    assert isinstance(error.controller_failure, NodeWaitTimeout), error
    text = str(error.controller_failure)
    assert f"run.node_wait_s={wait_s} s" in text
    assert f"Live nodes have {{CPU: 1, {SLOT}: 1}}: missing {{CPU: 1, {SLOT}: 1}}" in text
    assert not (run_dir / "summary.json").exists()
    assert list(run_dir.glob("checkpoint_*")), "the checkpoint to resume from is kept"
