"""docker/compose.yaml and its entry-point scripts: structure checked with PyYAML, scripts run against
stand-in `ray`/`mlflow` commands that record how they were called (no Ray or MLflow starts here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
SCRIPTS = ["entrypoint-head.sh", "entrypoint-worker.sh", "entrypoint-mlflow.sh"]
IMAGE_SCRIPT_DIR = "/opt/po_ray/docker/"  # where the Dockerfile puts them
# Read by processes the scripts start (Ray itself, the trainer), not by the scripts.
CONSUMED_BY_THE_PROCESSES = {"MLFLOW_TRACKING_URI"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def script_of(service: dict) -> str:
    (entry,) = service["entrypoint"]
    assert entry.startswith(IMAGE_SCRIPT_DIR), entry
    return entry[len(IMAGE_SCRIPT_DIR):]


def by_script(compose: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        out.setdefault(script_of(service), []).append(name)
    return out


def ray_nodes(compose: dict) -> list[dict]:
    roles = by_script(compose)
    return [compose["services"][n] for n in roles["entrypoint-head.sh"] + roles["entrypoint-worker.sh"]]


def variables_read(script: str) -> tuple[set[str], set[str]]:
    """(all environment variables the script reads, those it requires with ${VAR:?...})."""
    text = (DOCKER / script).read_text()
    names = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", text))
    required = set(re.findall(r"\$\{([A-Z][A-Z0-9_]+):\?", text))
    return names, required


def test_services(compose):
    roles = by_script(compose)
    assert len(roles["entrypoint-head.sh"]) == 1
    assert len(roles["entrypoint-worker.sh"]) == 2
    assert len(roles["entrypoint-mlflow.sh"]) == 1
    assert set(roles) == set(SCRIPTS)


def test_shared_storage_on_every_ray_node(compose):
    assert {"shared", "mlflow-db", "mlflow-artifacts"} <= set(compose["volumes"])
    for node in ray_nodes(compose):
        storage = node["environment"]["PO_RAY_STORAGE"]
        assert f"shared:{storage}" in node["volumes"]
    mlflow = compose["services"][by_script(compose)["entrypoint-mlflow.sh"][0]]
    env = mlflow["environment"]
    assert f"mlflow-db:{env['MLFLOW_DB_DIR']}" in mlflow["volumes"]
    assert f"mlflow-artifacts:{env['MLFLOW_ARTIFACTS_DESTINATION']}" in mlflow["volumes"]


def test_token_required_on_every_ray_node(compose):
    for node in ray_nodes(compose):
        env = node["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        # ${VAR:?message}: compose refuses to start when RAY_AUTH_TOKEN is unset or empty.
        assert re.fullmatch(r"\$\{RAY_AUTH_TOKEN:\?[^}]+\}", env["RAY_AUTH_TOKEN"])


def test_ports_bound_to_loopback_only(compose):
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert published, "the dashboard and MLflow should be reachable from the host"
    for port in published:
        if isinstance(port, dict):
            assert port.get("host_ip") == "127.0.0.1", port
        else:
            assert str(port).startswith("127.0.0.1:"), port


def test_services_run_unprivileged(compose):
    for name, service in compose["services"].items():
        assert service.get("user") not in (None, "root", "0"), name


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_exist_are_executable_and_parse(script):
    path = DOCKER / script
    assert path.is_file() and os.access(path, os.X_OK)
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert script in (DOCKER / "Dockerfile").read_text(), "the Dockerfile must copy it into the image"


def test_compose_sets_what_the_scripts_read(compose):
    for name, service in compose["services"].items():
        names, required = variables_read(script_of(service))
        env = set(service.get("environment", {}))
        assert required <= env, f"{name}: compose must set {sorted(required - env)}"
        unknown = env - names - CONSUMED_BY_THE_PROCESSES
        assert not unknown, f"{name}: compose sets {sorted(unknown)}, which its script never reads (a typo?)"


def test_docker_compose_config_accepts_it_and_refuses_without_token():
    docker = shutil.which("docker")
    probe = docker and subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if not probe or probe.returncode != 0:
        pytest.skip("no `docker compose` plugin here (docker CLI missing or without compose)")
    env = {**os.environ, "RAY_AUTH_TOKEN": "test-token"}
    subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], env=env, check=True)
    env.pop("RAY_AUTH_TOKEN")
    refused = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], env=env,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "RAY_AUTH_TOKEN" in refused.stderr


# ---- the scripts, run against stand-ins -----------------------------------------------------------

STAND_IN = """#!/usr/bin/env bash
# Records the call; `ray health-check` answers with HEALTH_RC.
printf '%s\\n' "$$" > "$RECORD.pid"
printf '%s\\n' "$@" > "$RECORD.args"
env > "$RECORD.env"
if [ "${1:-}" = health-check ]; then exit "${HEALTH_RC:-0}"; fi
"""


@pytest.fixture
def stand_ins(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ray", "mlflow"):
        (bin_dir / tool).write_text(STAND_IN)
        (bin_dir / tool).chmod(0o755)
    base = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "RECORD": str(tmp_path / "call"),
        "PO_RAY_STORAGE": str(tmp_path / "shared"),
    }

    def run(script: str, **env: str):
        proc = subprocess.Popen([str(DOCKER / script)], env={**base, **env}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=60)
        record = tmp_path / "call"
        args = (record.with_suffix(".args").read_text().splitlines()
                if record.with_suffix(".args").exists() else None)
        called_env = (dict(line.split("=", 1) for line in record.with_suffix(".env").read_text().splitlines()
                           if "=" in line) if record.with_suffix(".env").exists() else {})
        pid = int(record.with_suffix(".pid").read_text()) if record.with_suffix(".pid").exists() else None
        return proc, out, err, args, called_env, pid

    return run


def test_head_script_execs_ray_start_with_the_environment(stand_ins, tmp_path):
    proc, _, err, args, env, pid = stand_ins(
        "entrypoint-head.sh", RAY_AUTH_TOKEN="secret-1", RAY_NODE_IP="127.0.0.1",
        RAY_GCS_PORT="6390", RAY_DASHBOARD_PORT="8270", RAY_NUM_CPUS="3",
    )
    assert proc.returncode == 0, err
    assert pid == proc.pid  # exec: ray replaced the script, so a signal to this pid stops Ray
    assert args[:2] == ["start", "--head"]
    assert "--node-ip-address=127.0.0.1" in args
    assert "--port=6390" in args and "--dashboard-port=8270" in args and "--num-cpus=3" in args
    assert "--dashboard-host=127.0.0.1" in args  # the node's address, never 0.0.0.0
    assert args[-1] == "--block"
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "secret-1"
    assert (tmp_path / "shared").is_dir()


def test_scripts_refuse_to_start_without_a_token(stand_ins):
    for script in ("entrypoint-head.sh", "entrypoint-worker.sh"):
        proc, _, err, args, _, _ = stand_ins(script, RAY_NODE_IP="127.0.0.1")
        assert proc.returncode != 0 and "RAY_AUTH_TOKEN" in err
        assert args is None  # ray was never called


def test_worker_script_waits_for_the_head_then_execs(stand_ins):
    proc, _, err, args, env, pid = stand_ins(
        "entrypoint-worker.sh", RAY_AUTH_TOKEN="secret-1", RAY_NODE_IP="127.0.0.1",
        RAY_HEAD_ADDRESS="127.0.0.1:6390", RAY_NUM_CPUS="2", RAY_RESOURCES='{"worker_1": 1}',
    )
    assert proc.returncode == 0, err
    assert pid == proc.pid
    assert args == ["start", "--address=127.0.0.1:6390", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    '--resources={"worker_1": 1}', "--block"]
    assert env["RAY_AUTH_TOKEN"] == "secret-1"


def test_worker_script_gives_up_when_no_head_answers(stand_ins):
    proc, _, err, args, _, _ = stand_ins(
        "entrypoint-worker.sh", RAY_AUTH_TOKEN="secret-1", RAY_NODE_IP="127.0.0.1",
        RAY_HEAD_ADDRESS="127.0.0.1:6390", RAY_HEAD_WAIT_S="0", HEALTH_RC="1",
    )
    assert proc.returncode == 1 and "no Ray head answered at 127.0.0.1:6390" in err
    assert args[0] == "health-check"  # the last call was the probe, never `ray start`


def test_mlflow_script_execs_the_server_on_sqlite(stand_ins, tmp_path):
    proc, _, err, args, _, pid = stand_ins(
        "entrypoint-mlflow.sh", MLFLOW_HOST="127.0.0.1", MLFLOW_PORT="5055",
        MLFLOW_DB_DIR=str(tmp_path / "db"), MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "artifacts"),
        MLFLOW_ALLOWED_HOSTS="mlflow:5055",
    )
    assert proc.returncode == 0, err
    assert pid == proc.pid
    def value(flag: str) -> str:
        return args[args.index(flag) + 1]

    assert args[0] == "server"
    assert value("--host") == "127.0.0.1" and value("--port") == "5055"
    assert value("--backend-store-uri") == f"sqlite:///{tmp_path}/db/mlflow.db"
    assert "--serve-artifacts" in args and value("--artifacts-destination") == str(tmp_path / "artifacts")
    assert value("--allowed-hosts") == "mlflow:5055"
    assert (tmp_path / "db").is_dir() and (tmp_path / "artifacts").is_dir()
