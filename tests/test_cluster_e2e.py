"""The compose topology, on the host: the same entry-point scripts start one Ray head, two Ray worker
nodes (separate `ray start` processes, one CPU each, so the two Train workers of the demo must land
on different nodes: multi-node ZeRO-3) and an MLflow server, with token auth and RAY_NODE_IP /
MLFLOW_HOST 127.0.0.1. The demo is submitted with `ray job submit` (refused without the token), must
reach SUCCEEDED, and its run is read back from that MLflow server over HTTP.

Everything started here is stopped here, by pid, never with `ray stop` (other tests' Ray may be
running): each script runs in its own session, and teardown signals its process group, then every
process seen descending from the four entry points (Ray puts workers in process groups of their own
and the job's driver in a session of its own) or carrying this cluster's tag in its environment.
Each node has its own --temp-dir under a private folder, as each container has its own /tmp."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

psutil = pytest.importorskip("psutil")
requests = pytest.importorskip("requests")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent  # the venv's bin: ray, mlflow, po-ray
TAG_VAR = "PO_RAY_E2E_CLUSTER"
STEPS = 20
CLUSTER_UP_S = 180
JOB_S = 480
STOP_S = 40  # per stage


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class Cluster:
    """The four entry points, their logs, the ports and the token; `stop` ends all they spawned."""

    def __init__(self, base: Path):
        self.base = base
        self.tag = uuid.uuid4().hex
        self.token = secrets.token_hex(32)
        (self.gcs, self.dash, self.client, self.mlflow_port, *self.agent_ports) = free_ports(7)
        self.storage = base / "shared"
        self.runs = self.storage / "runs"
        self.logs = base / "logs"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}
        self.roots: list[psutil.Process] = []
        self.seen: set[psutil.Process] = set()

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dash}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "MLFLOW_")) or k in ("RAY_USAGE_STATS_ENABLED",)}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env[TAG_VAR] = self.tag
        return env

    def node_env(self, **extra: str) -> dict[str, str]:
        return {
            **self.base_env(),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_NODE_IP": "127.0.0.1",
            "PO_RAY_STORAGE": str(self.storage),
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "RAY_OBJECT_STORE_MEMORY": str(128 * 2**20),
            # On SIGTERM a node drains first; the head, which keeps Ray Train's detached actors, never
            # finishes and would wait out the default 30 s.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
            **extra,
        }

    def client_env(self, token: str | None) -> dict[str, str]:
        env = self.base_env()
        # A token-less client must not find one in ~/.ray/auth_token either.
        env["HOME"] = str(self.base / "client-home")
        Path(env["HOME"]).mkdir(exist_ok=True)
        if token is not None:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        return env

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self, name: str, script: str, env: dict[str, str]) -> None:
        log = open(self.logs / f"{name}.log", "ab")
        with log:
            self.procs[name] = subprocess.Popen(
                [str(DOCKER / script)], env=env, cwd=self.base, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.roots.append(psutil.Process(self.procs[name].pid))

    def start_all(self) -> None:
        """One at a time, each polled until it has joined: on two shared cores, raylets started
        together can miss Ray's fixed 30 s registration window."""
        self.start("head", "entrypoint-head.sh", self.node_env(
            RAY_GCS_PORT=str(self.gcs),
            RAY_DASHBOARD_PORT=str(self.dash),
            RAY_CLIENT_SERVER_PORT=str(self.client),
            RAY_DASHBOARD_AGENT_LISTEN_PORT=str(self.agent_ports[0]),
            RAY_TEMP_DIR=str(self.base / "ray-h"),  # one per node, as each container has its own /tmp
            RAY_NUM_CPUS="0",  # drivers only: the Train workers must go to the worker nodes
        ))
        self.wait_for("Ray head", lambda: len(self.nodes()) == 1, CLUSTER_UP_S)
        for i in (1, 2):
            name = f"worker-{i}"
            for attempt in (1, 2):  # compose restarts a worker whose `ray start` failed; so once here
                self.start(name, "entrypoint-worker.sh", self.node_env(
                    RAY_HEAD_ADDRESS=f"127.0.0.1:{self.gcs}",
                    RAY_HEAD_WAIT_S=str(CLUSTER_UP_S),
                    RAY_NUM_CPUS="1",
                    RAY_RESOURCES=json.dumps({f"worker_{i}": 1}),
                    RAY_DASHBOARD_AGENT_LISTEN_PORT=str(self.agent_ports[i]),
                    RAY_TEMP_DIR=str(self.base / f"ray-w{i}"),
                ))
                try:
                    self.wait_for(f"Ray worker node {i}", lambda n=i + 1: len(self.nodes()) == n, CLUSTER_UP_S)
                    break
                except pytest.fail.Exception:
                    if attempt == 2 or self.procs[name].poll() is None:
                        raise
        self.start("mlflow", "entrypoint-mlflow.sh", {
            **self.base_env(),
            "MLFLOW_HOST": "127.0.0.1",
            "MLFLOW_PORT": str(self.mlflow_port),
            "MLFLOW_DB_DIR": str(self.base / "mlflow-db"),
            "MLFLOW_ARTIFACTS_DESTINATION": str(self.base / "mlflow-artifacts"),
            "MLFLOW_WORKERS": "1",
        })
        self.wait_for("MLflow server", lambda: requests.get(f"{self.mlflow_url}/health", timeout=5).ok, CLUSTER_UP_S)

    # ---- state ------------------------------------------------------------------------------------

    def logs_tail(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{tail(p, 2000)}" for p in sorted(self.logs.glob("*.log")))

    def check_running(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode} while the cluster should be up\n{self.logs_tail()}")

    def wait_for(self, what: str, probe, deadline_s: float):
        """Poll `probe` (returns a truthy value when ready) until the deadline; no fixed sleeps."""
        deadline = time.monotonic() + deadline_s
        last = None
        while time.monotonic() < deadline:
            self.check_running()
            self.ours()  # remember what the cluster spawned while its parents still live
            try:
                value = probe()
                if value:
                    return value
            except (requests.RequestException, ValueError, KeyError) as e:
                last = e
            time.sleep(0.5)
        pytest.fail(f"{what} not ready within {deadline_s:.0f} s (last error: {last!r})\n{self.logs_tail()}")

    def nodes(self) -> list[dict]:
        r = requests.get(f"{self.dashboard_url}/api/v0/nodes", params={"detail": "true"},
                         headers=self.headers(), timeout=30)
        r.raise_for_status()
        return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def ours(self) -> list[psutil.Process]:
        """Every live process started for this cluster: the entry points and their descendants (Ray's
        daemons, workers in their own process groups, the job's driver in its own session, MLflow's
        server workers), remembered once seen so orphans are still found after their parent is gone,
        plus any process whose environment carries this cluster's tag."""
        for root in self.roots:
            try:
                self.seen.update([root, *root.children(recursive=True)])
            except psutil.NoSuchProcess:
                continue
        for p in psutil.process_iter():
            try:
                if p not in self.seen and p.environ().get(TAG_VAR) == self.tag:
                    self.seen.add(p)
            except psutil.Error:
                continue
        alive = []
        for p in self.seen:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                continue
        return alive

    # ---- teardown ----------------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Stop all of it; returns a description of whatever is still alive afterwards.

        First as `docker compose down` does: SIGTERM to each service's main process (the entry point
        exec'd `ray start --block` / `mlflow server`), dependents before the head; Ray then drains the
        node (at most RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S) and stops its own processes.
        Then SIGTERM, and after a grace period SIGKILL, to each entry point's process group and to
        every process of this cluster still alive."""
        self.ours()
        for group in (["worker-1", "worker-2", "mlflow"], ["head"]):
            started = [self.procs[name] for name in group if name in self.procs]
            for proc in started:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_S
            for proc in started:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 15)):
            for root in self.roots:  # only while its leader holds the id (never a reused one)
                try:
                    if root.is_running():
                        os.killpg(root.pid, sig)
                except (ProcessLookupError, psutil.Error):
                    pass
            left = self.ours()
            for p in left:
                try:
                    p.send_signal(sig)
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(left, timeout=grace)
            if not alive:
                break
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        survivors = []
        for p in self.ours():
            try:
                survivors.append(f"{p.pid} {' '.join(p.cmdline())[:200]}")
            except psutil.Error:
                continue
        return survivors


@pytest.fixture(scope="module")
def cluster():
    for tool in ("ray", "mlflow", "po-ray"):
        if not (BIN / tool).exists():
            pytest.skip(f"{tool} is not in {BIN}")
    # Short and private: Ray's Unix sockets live under the temp dir (path limit ~107 bytes), and no
    # other test's Ray shares it.
    base = Path(tempfile.mkdtemp(prefix="poray-e2e-", dir="/tmp"))
    c = Cluster(base)
    try:
        c.start_all()
        yield c
    finally:
        survivors = c.stop()
        if not survivors and not os.environ.get("PO_RAY_E2E_KEEP"):  # set it to keep logs and stores
            shutil.rmtree(base, ignore_errors=True)
        assert not survivors, f"processes outlived the teardown (left {base}):\n" + "\n".join(survivors)


def ray_job(c: Cluster, token: str | None, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), "job", *args], env=c.client_env(token), cwd=c.base,
        capture_output=True, text=True, timeout=timeout,
    )


def entrypoint(c: Cluster) -> list[str]:
    # Absolute paths: the driver runs in a job folder of its own, the Train workers elsewhere again.
    return ["po-ray", "train", "--config", "demo", f"run.storage_path={c.runs}", "run.name=e2e",
            f"train.max_steps={STEPS}", f"tracking.tracking_uri={c.mlflow_url}", "checkpoint.export_model=false"]


def submitted_ids(c: Cluster) -> set[str]:
    r = requests.get(f"{c.dashboard_url}/api/jobs/", headers=c.headers(), timeout=30)
    r.raise_for_status()
    return {j.get("submission_id") for j in r.json()}


def test_published_ports_listen_on_loopback_only(cluster):
    # What compose publishes (dashboard + job server, MLflow) is bound to 127.0.0.1 and nothing else.
    c = cluster
    for port in (c.dash, c.mlflow_port):
        bound = {s.laddr.ip for s in psutil.net_connections("inet")
                 if s.status == psutil.CONN_LISTEN and s.laddr.port == port}
        assert bound == {"127.0.0.1"}, (port, bound)


def test_job_server_refuses_clients_without_the_token(cluster):
    c = cluster
    for name, token, status in (("no-token", None, 401), ("wrong-token", "not-" + c.token, 403)):
        sid = f"refused-{name}-{uuid.uuid4().hex[:8]}"
        out = ray_job(c, token, "submit", "--address", c.dashboard_url, "--submission-id", sid, "--no-wait",
                      "--", *entrypoint(c))
        text = out.stdout + out.stderr
        assert out.returncode != 0, f"{name}: submission accepted:\n{text}"
        assert str(status) in text or "Authentication" in text, f"{name}: not an auth refusal:\n{text}"
        assert sid not in submitted_ids(c)
        # The same over plain HTTP, for every endpoint a client uses.
        bad = {} if token is None else {"Authorization": f"Bearer {token}"}
        assert requests.post(f"{c.dashboard_url}/api/jobs/", json={"entrypoint": "true"}, headers=bad,
                             timeout=30).status_code == status
        assert requests.get(f"{c.dashboard_url}/api/jobs/", headers=bad, timeout=30).status_code == status
        assert requests.get(f"{c.dashboard_url}/api/v0/nodes", headers=bad, timeout=30).status_code == status


@pytest.fixture(scope="module")
def finished_job(cluster):
    c = cluster
    sid = f"e2e-{uuid.uuid4().hex[:8]}"
    out = ray_job(c, c.token, "submit", "--address", c.dashboard_url, "--submission-id", sid, "--no-wait",
                  "--", *entrypoint(c))
    assert out.returncode == 0, out.stdout + out.stderr

    def logs() -> str:
        r = requests.get(f"{c.dashboard_url}/api/jobs/{sid}/logs", headers=c.headers(), timeout=30)
        return r.json().get("logs", "")[-6000:] if r.ok else f"(logs: HTTP {r.status_code})"

    def finished():
        r = requests.get(f"{c.dashboard_url}/api/jobs/{sid}", headers=c.headers(), timeout=30)
        r.raise_for_status()
        job = r.json()
        if job["status"] in ("STOPPED", "FAILED"):
            pytest.fail(f"job {sid} {job['status']}: {job.get('message')}\n{logs()}\n{c.logs_tail()}")
        return job if job["status"] == "SUCCEEDED" else None

    job = c.wait_for(f"job {sid} SUCCEEDED", finished, JOB_S)
    # `ray job status` with the token agrees.
    status = ray_job(c, c.token, "status", "--address", c.dashboard_url, sid)
    said = status.stdout + status.stderr
    assert status.returncode == 0 and f"Job '{sid}' succeeded" in said, said
    run_dir = c.runs / "e2e"
    return {"job": job, "run_dir": run_dir, "summary": json.loads((run_dir / "summary.json").read_text())}


def test_demo_job_trains_zero3_across_both_worker_nodes(cluster, finished_job):
    c, job, summary = cluster, finished_job["job"], finished_job["summary"]
    run_dir = finished_job["run_dir"]
    assert summary["steps"] == STEPS
    fractions = summary["param_fraction_per_rank"]
    assert len(fractions) == 2 and all(0.4 <= f <= 0.6 for f in fractions), fractions
    for rank in (0, 1):
        rows = (run_dir / "ledger" / f"rank{rank}.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in rows] == list(range(1, STEPS + 1))

    # Which node ran each rank: the Train worker actors of this job, matched to the pids the ranks wrote.
    nodes = {n["node_id"]: n for n in c.nodes()}
    by_resource = {k: nid for nid, n in nodes.items() for k in n["resources_total"] if k.startswith("worker_")}
    assert set(by_resource) == {"worker_1", "worker_2"}, nodes
    r = requests.get(f"{c.dashboard_url}/api/v0/actors", headers=c.headers(), timeout=30, params={
        "detail": "true", "limit": "1000",
        "filter_keys": ["job_id", "class_name"], "filter_predicates": ["=", "="],
        "filter_values": [job["job_id"], "RayTrainWorker"],
    })
    r.raise_for_status()
    actors = r.json()["data"]["result"]["result"]
    node_of_pid = {a["pid"]: a["node_id"] for a in actors}
    rank_nodes = [node_of_pid.get(int((run_dir / "pids" / f"rank{rank}").read_text())) for rank in (0, 1)]
    assert set(rank_nodes) == {by_resource["worker_1"], by_resource["worker_2"]}, (rank_nodes, actors)


def test_run_is_in_the_clusters_mlflow_server(cluster, finished_job):
    c, summary, run_dir = cluster, finished_job["summary"], finished_job["run_dir"]
    assert summary["tracking_uri"] == c.mlflow_url
    assert not (run_dir / "mlflow.db").exists(), "tracked in a local store instead of the server"
    api = f"{c.mlflow_url}/api/2.0/mlflow"
    run = requests.get(f"{api}/runs/get", params={"run_id": summary["mlflow_run_id"]}, timeout=30).json()["run"]
    assert run["info"]["run_name"] == "e2e" and run["info"]["status"] == "FINISHED", run["info"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["loss.beta"] == "0.1" and params["scaling.num_workers"] == "2"
    history = requests.get(f"{api}/metrics/get-history", timeout=30,
                           params={"run_id": summary["mlflow_run_id"], "metric_key": "loss"}).json()["metrics"]
    assert sorted(m["step"] for m in history) == list(range(1, STEPS + 1))
    # Artifacts go through the server into its own artifact store.
    listed = requests.get(f"{api}/artifacts/list", params={"run_id": summary["mlflow_run_id"]}, timeout=30).json()
    assert "summary.json" in {f["path"] for f in listed.get("files", [])}, listed
    assert list((c.base / "mlflow-artifacts").rglob("summary.json"))
