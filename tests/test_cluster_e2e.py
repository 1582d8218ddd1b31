"""The compose topology, on the host: the same entry-point scripts start one Ray head, two Ray worker
nodes (separate `ray start` processes) and an MLflow server, each with the environment its service
has in docker/compose.yaml (token auth, CPUs and resources, object store, MLflow's address, workers)
and only what a host needs changed: service names become 127.0.0.1 and fixed ports free ones, volume
mount points become folders here, and every server binds 127.0.0.1 (RAY_NODE_IP / MLFLOW_HOST); what
compose gives a container (its own /tmp and port space, cpus, mem_limit, shm_size) is approximated
by a temp dir and agent port per node, or not at all. The demo is submitted with `ray job submit`
(refused without the token) as the README does, with only run.storage_path on the shared volume: it
must reach SUCCEEDED with its two ranks on different worker nodes (multi-node ZeRO-3, which compose's
one CPU per worker makes so), and its run is read back over HTTP from the MLflow server whose address
the nodes carry.

Everything started here is stopped here, by pid, never with `ray stop` (other tests' Ray may be
running): each script runs in its own session, and teardown signals its process group, then every
process seen descending from the four entry points (Ray puts workers in process groups of their own
and the job's driver in a session of its own) or carrying this cluster's tag in its environment.
Each node has its own --temp-dir under a private folder, as each container has its own /tmp."""

from __future__ import annotations

import json
import os
import re
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
import yaml

pytestmark = pytest.mark.integration

psutil = pytest.importorskip("psutil")
requests = pytest.importorskip("requests")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
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


def interpolate(value: str, env: dict[str, str]) -> str:
    """compose's ${VAR}, ${VAR:-default} and ${VAR:?message} against ``env``."""
    def one(m: re.Match) -> str:
        name, op, arg = m.groups()
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{COMPOSE}: {name} is required: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(:[?-])?([^}]*)\}", one, value)


def by_script(services: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, service in services.items():
        out.setdefault(Path(service["entrypoint"][0]).name, []).append(name)
    return out


class Cluster:
    """The four entry points, their logs, the ports and the token; `stop` ends all they spawned."""

    def __init__(self, base: Path):
        self.base = base
        self.tag = uuid.uuid4().hex
        self.token = secrets.token_hex(32)
        self.services = yaml.safe_load(COMPOSE.read_text())["services"]
        roles = by_script(self.services)
        (self.head_name,) = roles["entrypoint-head.sh"]
        self.worker_names = roles["entrypoint-worker.sh"]
        (self.mlflow_name,) = roles["entrypoint-mlflow.sh"]
        head_env = self.services[self.head_name]["environment"]
        listening = [head_env[k] for k in ("RAY_GCS_PORT", "RAY_DASHBOARD_PORT", "RAY_CLIENT_SERVER_PORT")]
        listening.append(self.services[self.mlflow_name]["environment"]["MLFLOW_PORT"])
        free = free_ports(len(listening) + len(self.worker_names) + 1)
        # The fixed ports compose's services listen on, each replaced by a free one here.
        self.ports = dict(zip(map(str, listening), map(str, free)))
        self.gcs, self.dash, self.client, self.mlflow_port = free[:len(listening)]
        self.agent_ports = free[len(listening):]  # one per Ray node: each container has its own
        self.logs = base / "logs"
        self.logs.mkdir()
        self.storage = self.volume_folder(self.head_name, head_env["SHARED_DIR"])
        self.runs = self.storage / "po_ray_runs"  # the README's run.storage_path=/mnt/shared/po_ray_runs
        self.procs: dict[str, subprocess.Popen] = {}
        self.roots: list[psutil.Process] = []
        self.seen: set[psutil.Process] = set()

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dash}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def volume_folder(self, service: str, mount_point: str) -> Path:
        """The folder here that stands for the named volume mounted at ``mount_point`` in ``service``."""
        for entry in self.services[service].get("volumes", []):
            volume, _, point = entry.partition(":")
            if point == mount_point:
                return self.base / "volumes" / volume
        raise AssertionError(f"{COMPOSE}: {service} mounts nothing at {mount_point}")

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "MLFLOW_")) or k in ("RAY_USAGE_STATS_ENABLED",)}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env[TAG_VAR] = self.tag
        return env

    def on_this_host(self, service: str, key: str, value: str) -> str:
        """A compose value as it must be here: service names -> 127.0.0.1, fixed ports -> free ones,
        volume mount points -> the folders standing for the volumes."""
        if key.endswith("_PORT") and value in self.ports:
            return self.ports[value]
        names = {*self.services, *(s.get("hostname", n) for n, s in self.services.items()), "127.0.0.1"}

        def endpoint(m: re.Match) -> str:
            host, port = m.groups()
            if port not in self.ports or (host not in names and host != "localhost"):
                return m.group(0)
            return f"{'localhost' if host == 'localhost' else '127.0.0.1'}:{self.ports[port]}"

        value = re.sub(r"([A-Za-z0-9.-]+):(\d+)\b", endpoint, value)
        for entry in self.services[service].get("volumes", []):
            point = entry.partition(":")[2]
            if value == point or value.startswith(point + "/"):
                value = str(self.volume_folder(service, point)) + value[len(point):]
        return value

    def service_env(self, service: str, **host_only: str) -> dict[str, str]:
        """The service's compose environment on this host, plus ``host_only`` (which compose must not set)."""
        compose_env = self.services[service]["environment"]
        clash = set(host_only) & set(compose_env)
        assert not clash, f"{COMPOSE}: {service} sets {sorted(clash)}, which this test replaces"
        env = {k: self.on_this_host(service, k, interpolate(str(v), {"RAY_AUTH_TOKEN": self.token}))
               for k, v in compose_env.items()}
        return {**self.base_env(), **env, **host_only}

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

    def ray_node_env(self, service: str, index: int, **extra: str) -> dict[str, str]:
        return self.service_env(
            service,
            RAY_NODE_IP="127.0.0.1",  # a container binds its own address; here only loopback
            RAY_TEMP_DIR=str(self.base / f"ray-{index}"),  # one per node, as each container has its own /tmp
            RAY_DASHBOARD_AGENT_LISTEN_PORT=str(self.agent_ports[index]),  # and its own ports
            # On SIGTERM a node drains first; the head, which keeps Ray Train's detached actors, never
            # finishes and would wait out the default 30 s.
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5",
            **extra,
        )

    def start_all(self) -> None:
        """In compose's order (workers depend on a healthy head), one at a time, each polled until it
        has joined: on two shared cores, raylets started together can miss Ray's 30 s registration."""
        self.start(self.head_name, "entrypoint-head.sh", self.ray_node_env(self.head_name, 0))
        self.wait_for("Ray head", lambda: len(self.nodes()) == 1, CLUSTER_UP_S)
        for i, name in enumerate(self.worker_names, start=1):
            for attempt in (1, 2):  # compose restarts a worker whose `ray start` failed; so once here
                self.start(name, "entrypoint-worker.sh",
                           self.ray_node_env(name, i, RAY_HEAD_WAIT_S=str(CLUSTER_UP_S)))
                try:
                    self.wait_for(f"Ray worker node {name}", lambda n=i + 1: len(self.nodes()) == n, CLUSTER_UP_S)
                    break
                except pytest.fail.Exception:
                    if attempt == 2 or self.procs[name].poll() is None:
                        raise
        self.start(self.mlflow_name, "entrypoint-mlflow.sh", self.service_env(self.mlflow_name, MLFLOW_HOST="127.0.0.1"))
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
        for group in ([*self.worker_names, self.mlflow_name], [self.head_name]):
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
    # As the README submits it: storage on the shared volume (an absolute path: the driver runs in a
    # job folder of its own, the Train workers elsewhere again); MLflow from the nodes' environment.
    return ["po-ray", "train", "--config", "demo", f"run.storage_path={c.runs}", "run.name=e2e",
            f"train.max_steps={STEPS}", "checkpoint.export_model=false"]


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
    assert set(by_resource) == {"worker_1", "worker_2"}, nodes  # compose's RAY_RESOURCES, one per worker
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
    artifacts = c.volume_folder(c.mlflow_name, c.services[c.mlflow_name]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"])
    assert list(artifacts.rglob("summary.json"))
