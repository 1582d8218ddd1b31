"""docker/: compose.yaml and its entry-point scripts, the Dockerfile and its base-image check.
Structure is checked with PyYAML, the scripts run against stand-in `ray`/`mlflow` commands that
record how they were called (no Ray or MLflow starts here), and the image's file layout is rebuilt
from the Dockerfile's COPY lines to load a study the way the container does."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

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
        storage = node["environment"]["SHARED_DIR"]
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


def service_named(compose: dict, script: str) -> tuple[str, dict]:
    (name,) = by_script(compose)[script]
    return name, compose["services"][name]


def published(service: dict) -> dict[int, tuple[str, int]]:
    """container port -> (host address, host port) of the service's "HOST_IP:HOST_PORT:CONTAINER_PORT" entries."""
    out = {}
    for entry in service.get("ports", []):
        host_ip, host_port, container_port = str(entry).split(":")
        out[int(container_port)] = (host_ip, int(host_port))
    return out


def test_ray_nodes_reach_the_head_at_its_gcs_port(compose):
    head_name, head = service_named(compose, "entrypoint-head.sh")
    assert head.get("hostname", head_name) == head_name  # the name the others resolve is its own
    for name in by_script(compose)["entrypoint-worker.sh"]:
        env = compose["services"][name]["environment"]
        assert env["RAY_HEAD_ADDRESS"] == f"{head_name}:{head['environment']['RAY_GCS_PORT']}", name
        assert compose["services"][name]["depends_on"][head_name]["condition"] == "service_healthy"


def test_dashboard_published_at_its_port(compose):
    _, head = service_named(compose, "entrypoint-head.sh")
    port = int(head["environment"]["RAY_DASHBOARD_PORT"])
    assert published(head) == {port: ("127.0.0.1", port)}  # the README's http://127.0.0.1:8265


def test_every_ray_node_tracks_to_the_mlflow_service(compose):
    mlflow_name, mlflow = service_named(compose, "entrypoint-mlflow.sh")
    env = mlflow["environment"]
    port = int(env["MLFLOW_PORT"])
    assert mlflow.get("hostname", mlflow_name) == mlflow_name
    uris = {node["environment"]["MLFLOW_TRACKING_URI"] for node in ray_nodes(compose)}
    assert len(uris) == 1, uris
    uri = urlparse(uris.pop())
    assert (uri.scheme, uri.hostname, uri.port) == ("http", mlflow_name, port)
    # Published at the same port on the host's loopback, and the server accepts the Host headers of
    # both ways in: the nodes' (mlflow:5000) and a browser's on the host (127.0.0.1 / localhost).
    assert published(mlflow) == {port: ("127.0.0.1", port)}
    allowed = set(env["MLFLOW_ALLOWED_HOSTS"].split(","))
    assert {uri.netloc, f"127.0.0.1:{port}", f"localhost:{port}"} <= allowed, allowed
    health = next(arg for arg in mlflow["healthcheck"]["test"] if "/health" in arg)
    assert f"{uri.scheme}://{uri.netloc}/health" in health


def test_mlflow_runs_one_server_process_on_sqlite(compose):
    _, mlflow = service_named(compose, "entrypoint-mlflow.sh")
    env = mlflow["environment"]
    assert "MLFLOW_BACKEND_STORE_URI" not in env  # the script's default: SQLite in MLFLOW_DB_DIR
    assert env["MLFLOW_WORKERS"] == "1"  # SQLite: one process owns the database


def docker_bytes(text: str) -> int:
    """compose's byte values (shm_size, mem_limit): a number with b, k, m or g, in powers of 1024."""
    number, unit = re.fullmatch(r"(\d+)([bkmg]?)b?", str(text).lower()).groups()
    return int(number) * 1024 ** "bkmg".index(unit or "b")


def test_object_store_fits_in_each_nodes_shm(compose):
    # Ray's object store is a file in /dev/shm; a store larger than it makes Ray fall back to disk.
    for node in ray_nodes(compose):
        store = int(node["environment"]["RAY_OBJECT_STORE_MEMORY"])
        shm = docker_bytes(node["shm_size"])
        assert 75 * 2**20 <= store <= shm // 2, (store, shm)  # Ray's minimum; half left to torch and NCCL
        if "mem_limit" in node:  # /dev/shm counts against it: leave most of it to the processes
            assert shm <= docker_bytes(node["mem_limit"]) // 4, node["mem_limit"]


def test_worker_nodes_fit_one_train_worker_each(compose):
    # Ray Train packs workers onto as few nodes as fit: with room for two on one node, the demo's two
    # ranks would share it instead of running ZeRO-3 across both worker nodes.
    from po_ray.cli import resolve_config_path
    from po_ray.config import load_config

    demo = load_config(resolve_config_path("demo"))
    per_worker = demo.scaling.cpus_per_worker
    workers = [compose["services"][n] for n in by_script(compose)["entrypoint-worker.sh"]]
    assert len(workers) == demo.scaling.num_workers
    for worker in workers:
        assert per_worker <= float(worker["environment"]["RAY_NUM_CPUS"]) < 2 * per_worker
    _, head = service_named(compose, "entrypoint-head.sh")
    assert head["environment"]["RAY_NUM_CPUS"] == "0"


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
        "SHARED_DIR": str(tmp_path / "shared"),
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
        RAY_GCS_PORT="6390", RAY_DASHBOARD_PORT="8270", RAY_NUM_CPUS="3", RAY_OBJECT_STORE_MEMORY="1073741824",
    )
    assert proc.returncode == 0, err
    assert pid == proc.pid  # exec: ray replaced the script, so a signal to this pid stops Ray
    assert args[:2] == ["start", "--head"]
    assert "--node-ip-address=127.0.0.1" in args
    assert "--port=6390" in args and "--dashboard-port=8270" in args and "--num-cpus=3" in args
    assert "--object-store-memory=1073741824" in args
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


# ---- the Dockerfile ------------------------------------------------------------------------------

DOCKERFILE = DOCKER / "Dockerfile"
CONSTRAINTS = DOCKER / "constraints.txt"
WORKDIR = "/opt/po_ray"


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), flags=re.M))


def copies(stage: str | None = None) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY, in the stage named ``stage`` (all stages when None)."""
    text, out, current = DOCKERFILE.read_text(), [], None
    for line in text.splitlines():
        if m := re.match(r"FROM \S+ AS (\S+)", line):
            current = m.group(1)
        elif line.startswith("COPY ") and stage in (None, current):
            *sources, dest = [w for w in line.split()[1:] if not w.startswith("--")]
            out.append((sources, dest))
    return out


def pinned_torch() -> str:
    (version,) = re.findall(r"^torch==(\S+)$", CONSTRAINTS.read_text(), flags=re.M)
    return version


def test_gpu_base_is_the_devel_image_of_the_pinned_torch():
    # DeepSpeed JIT-compiles fused Adam with nvcc and CPU Adam with g++: the -runtime image has neither.
    image = dockerfile_args()["GPU_BASE_IMAGE"]
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(pinned_torch())}-cuda[\d.]+-cudnn\d+-devel(@sha256:[0-9a-f]{{64}})?",
                        image), image
    cpu = dockerfile_args()["CPU_BASE_IMAGE"]
    assert cpu.startswith("python:3.11.") and "slim" not in cpu, cpu  # -slim has no g++


def test_build_checks_the_base_before_installing():
    text = DOCKERFILE.read_text()
    final = text[text.index("AS final"):]
    check = final.index('check-image.py "${VARIANT}"')
    assert check < final.index("pip install")
    # Nothing from apt but ssh and rsync, and those only from the dated snapshot.
    installs = re.findall(r"apt-get install[^\n]*", text)
    assert installs == ["apt-get install -y --no-install-recommends openssh-client rsync \\"], installs
    assert "snapshot.ubuntu.com/ubuntu/${UBUNTU_SNAPSHOT}" in text
    assert re.fullmatch(r"\d{8}T\d{6}Z", dockerfile_args()["UBUNTU_SNAPSHOT"])


def test_dockerignore_sends_every_copied_path():
    kept = {line[1:] for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines() if line.startswith("!")}
    for sources, _ in copies():
        for src in sources:
            parts = Path(src).parts
            assert any("/".join(parts[:i]) in kept for i in range(1, len(parts) + 1)), f"{src} is not sent to the build"


def run_check_image(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DOCKER / "check-image.py"), *args], capture_output=True, text=True)


def test_check_image_accepts_the_tested_environment():
    torch = pytest.importorskip("torch")
    if torch.version.cuda is not None or not shutil.which("g++"):
        pytest.skip("needs the CPU build of torch and g++, as in the CPU image")
    done = run_check_image("cpu", "--constraints", str(CONSTRAINTS))
    assert done.returncode == 0, done.stderr  # this venv's torch is the one constraints.txt pins


def test_check_image_names_what_differs(tmp_path):
    torch = pytest.importorskip("torch")
    other = tmp_path / "constraints.txt"
    other.write_text(CONSTRAINTS.read_text().replace(f"torch=={pinned_torch()}", "torch==1.0.0"))
    done = run_check_image("cpu", "--constraints", str(other))
    assert done.returncode == 1
    assert f"the base image has torch {torch.__version__}; {other} pins torch==1.0.0" in done.stderr
    if torch.version.cuda is None:
        done = run_check_image("gpu", "--constraints", str(CONSTRAINTS))
        assert done.returncode == 1 and "is a CPU build; the GPU image needs a CUDA build" in done.stderr


def image_layout(root: Path) -> Path:
    """The final stage's COPY lines replayed under ``root``: the image's WORKDIR, as a folder here."""
    assert f"WORKDIR {WORKDIR}" in DOCKERFILE.read_text()
    workdir = root / WORKDIR.lstrip("/")
    ignore = shutil.ignore_patterns("__pycache__")
    for sources, dest in copies("final"):
        target = workdir / dest
        for src in sources:
            into = target / Path(src).name if dest.endswith("/") else target
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, into, ignore=ignore, dirs_exist_ok=True)
            else:
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, into)
    return workdir


def test_readme_study_loads_in_the_image_layout(tmp_path, monkeypatch):
    # The compose section's `po-ray sweep --study PATH`, loaded from a copy of what the image holds,
    # from another working folder, with no tune_spaces beside the installed package (site-packages).
    import po_ray.study as study

    section = (ROOT / "README.md").read_text().split("### A local cluster with docker compose")[1]
    (path,) = re.findall(r"--study (\S+)", section)
    assert path.startswith(WORKDIR + "/"), path
    image = image_layout(tmp_path / "image").parent.parent  # the image's /
    monkeypatch.setattr(study, "SPACES_DIR", tmp_path / "site-packages" / "tune_spaces")
    elsewhere = tmp_path / "job"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = study.load_study(image / path.lstrip("/"), ["storage_path=/mnt/shared/po_ray_runs"])
    assert {m.name for m in spec.methods} == {"dpo", "ln_dpo", "simpo"}
    assert all(m.path.is_relative_to(image) for m in spec.methods)
    assert spec.base_config.is_relative_to(image) and spec.storage_path == "/mnt/shared/po_ray_runs"
