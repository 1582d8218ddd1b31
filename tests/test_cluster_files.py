"""The cluster definitions in cluster/: they parse, authenticate every node, publish nothing, mount the
shared storage, and give each worker the 8 GPUs the shipped 35B configs are planned for."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from po_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SHARED = "/mnt/shared"
GPUS_PER_WORKER = 8
WORKER_NODES = 4


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kuberay(kind: str) -> dict:
    docs = [d for p in sorted((CLUSTER / "kuberay").glob("*.yaml")) for d in load_docs(p) if d.get("kind") == kind]
    assert len(docs) == 1, f"expected one {kind} in cluster/kuberay, found {len(docs)}"
    return docs[0]


def ray_cluster_specs() -> dict[str, dict]:
    return {"RayCluster": kuberay("RayCluster")["spec"], "RayJob": kuberay("RayJob")["spec"]["rayClusterSpec"]}


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_cluster_yaml_parses(path):
    assert load_docs(path), f"{path} is empty"


def test_no_secret_value_and_no_public_service_anywhere():
    for path in sorted(CLUSTER.rglob("*.yaml")):
        text = path.read_text()
        assert not re.search(r"\b(LoadBalancer|NodePort)\b", text), f"{path} publishes a service"
        for node in walk(load_docs(path)):
            if isinstance(node, dict) and node.get("name") == "RAY_AUTH_TOKEN":
                assert "value" not in node and "valueFrom" in node, f"{path}: the token must come from a Secret"
        assert not re.search(r"RAY_AUTH_TOKEN=(?![%$])", text), f"{path} holds a literal token"


# ---- ray up (AWS) ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_aws_yaml_passes_rays_own_schema(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(aws)))


def test_aws_every_node_gets_the_token_from_the_secret(aws):
    run_options = aws["docker"]["run_options"]  # docker run options shared by head and workers
    assert "-e RAY_AUTH_MODE=token" in run_options
    env_files = [o.split(maxsplit=1)[1] for o in run_options if o.startswith("--env-file")]
    assert len(env_files) == 1
    writes_token = [c for c in aws["initialization_commands"] if "RAY_AUTH_TOKEN=" in c]
    assert len(writes_token) == 1
    assert env_files[0] in writes_token[0] and "secretsmanager get-secret-value" in writes_token[0]
    assert "umask 077" in writes_token[0]
    for key in ("head_run_options", "worker_run_options"):
        assert not any("RAY_AUTH" in o for o in aws["docker"].get(key, [])), f"{key} must not override the token"


def test_aws_publishes_nothing_but_ssh_to_one_range(aws):
    head_start = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    rules = aws["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    assert all(ip["CidrIp"] != "0.0.0.0/0" for r in rules for ip in r["IpRanges"])


def test_aws_mounts_shared_storage_on_every_node(aws):
    assert f"-v {SHARED}:{SHARED}" in aws["docker"]["run_options"]
    assert any("mount -t nfs4" in c and f" {SHARED}" in c for c in aws["initialization_commands"])


def test_aws_nodes_log_in_to_the_images_registry(aws):
    # pull_before_run pulls the private ECR image on every node: each host logs in first.
    registry = aws["docker"]["image"].split("/")[0]
    assert registry.endswith(".amazonaws.com") and aws["docker"]["pull_before_run"] is True
    logins = [c for c in aws["initialization_commands"] if "docker login" in c]
    assert len(logins) == 1
    region = aws["provider"]["region"]
    assert re.fullmatch(
        rf"aws ecr get-login-password --region {re.escape(region)} \| docker login --username AWS "
        rf"--password-stdin {re.escape(registry)}", logins[0]), logins[0]


def test_aws_installs_nothing_at_run_time(aws):
    # The image is the whole environment: no package manager runs on a node or in a container.
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                for c in aws.get(key, [])]
    for command in commands:
        assert not re.search(r"\b(apt-get|apt|yum|dnf|pip|conda)\b +install", command), command


def kib_bytes(text: str) -> int:
    """docker's --shm-size (b, k, m, g) and Kubernetes' quantities (Ki, Mi, Gi, Ti), both powers of 1024."""
    number, unit = re.fullmatch(r"(\d+)([bkmgt]?)i?b?", str(text).lower()).groups()
    return int(number) * 1024 ** "bkmgt".index(unit or "b")


def start_option(command: str, name: str) -> str:
    (value,) = re.findall(rf"--{name}=(\S+)", command)
    return value


def test_aws_object_store_fits_in_each_nodes_shm(aws):
    # Ray's object store is a file in /dev/shm (docker's --shm-size); left to itself Ray sizes it
    # from RAM (30 %, at most 200 GB), more than /dev/shm holds, and falls back to disk.
    docker = aws["docker"]
    for run_key, start_key in (("head_run_options", "head_start_ray_commands"),
                               ("worker_run_options", "worker_start_ray_commands")):
        (shm,) = [o.split("=", 1)[1] for o in docker[run_key] if o.startswith("--shm-size=")]
        (start,) = [c for c in aws[start_key] if "ray start" in c]
        store = int(start_option(start, "object-store-memory"))
        assert 75 * 2**20 <= store <= kib_bytes(shm) // 2, (run_key, store, shm)  # half left to NCCL, torch


def test_kuberay_object_store_fits_in_each_pods_shm():
    for name, spec in ray_cluster_specs().items():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            store = int(group["rayStartParams"]["object-store-memory"])
            pod = group["template"]["spec"]
            (container,) = pod["containers"]
            shm_volume = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
            (volume,) = [v for v in pod["volumes"] if v["name"] == shm_volume]
            assert volume["emptyDir"]["medium"] == "Memory"
            shm = kib_bytes(volume["emptyDir"]["sizeLimit"])
            assert 75 * 2**20 <= store <= shm // 2, (name, store, shm)
            # A memory-backed emptyDir counts against the container's memory limit: leave most of it.
            assert shm <= kib_bytes(container["resources"]["limits"]["memory"]) // 4, name


def job_submissions(markdown: str) -> list[str]:
    """Every `ray job submit …` command in the file's code blocks, continuation lines joined."""
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", markdown, flags=re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if "ray job submit" in line]
    return commands


@pytest.mark.parametrize("doc", ["README.md", "cluster/README.md"])
def test_documented_submissions_pass_literal_values(doc):
    # `ray job submit -- ARGS` quotes each argument for the head's shell (shlex.join), so a $VAR in
    # them, quoted or not here, would reach po_ray as the text "$VAR", never as its value there.
    commands = job_submissions((ROOT / doc).read_text())
    assert commands, f"{doc} shows no `ray job submit`"
    for command in commands:
        entrypoint = command.split(" -- ", 1)[1]
        assert "$" not in entrypoint, command


def test_aws_gpu_workers_have_8_gpus(aws):
    workers = {n: t for n, t in aws["available_node_types"].items() if n != aws["head_node_type"]}
    assert len(workers) == 1
    (worker,) = workers.values()
    assert worker["resources"]["GPU"] == GPUS_PER_WORKER
    assert worker["min_workers"] == worker["max_workers"] == WORKER_NODES
    assert aws["available_node_types"][aws["head_node_type"]]["resources"] == {"CPU": 0}
    assert "--gpus all" in aws["docker"]["worker_run_options"]


# ---- KubeRay -----------------------------------------------------------------------------------

def test_kuberay_token_on_every_node_and_the_submitter():
    secret = None
    for name, spec in ray_cluster_specs().items():
        assert spec["authOptions"]["mode"] == "token", name
        secret = spec["authOptions"]["secretName"]
        for template in pod_templates(spec):
            for container in template["spec"]["containers"]:
                for env in container.get("env", []):
                    assert not env["name"].startswith("RAY_AUTH"), "authOptions sets the token; do not override it"
    submitter = kuberay("RayJob")["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    env = {e["name"]: e for e in submitter["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}


def test_kuberay_services_are_cluster_internal():
    for name, spec in ray_cluster_specs().items():
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP", name
        assert head.get("enableIngress") is False, name


def test_kuberay_every_ray_pod_mounts_the_shared_claim():
    pvc = kuberay("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for name, spec in ray_cluster_specs().items():
        for template in pod_templates(spec):
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                      for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v}
            assert list(claims.values()) == [pvc["metadata"]["name"]], name
            for container in template["spec"]["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert mounts.get(SHARED) in claims, f"{name}: {container['name']} does not mount {SHARED}"


def test_kuberay_workers_have_8_gpus_and_the_planned_shape():
    for name, spec in ray_cluster_specs().items():
        (group,) = spec["workerGroupSpecs"]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == WORKER_NODES, name
        (container,) = group["template"]["spec"]["containers"]
        for kind in ("requests", "limits"):
            assert int(container["resources"][kind]["nvidia.com/gpu"]) == GPUS_PER_WORKER, name


def test_rayjob_cluster_is_the_raycluster():
    specs = ray_cluster_specs()
    assert specs["RayJob"] == specs["RayCluster"]


def test_network_policy_selects_every_ray_pod():
    selector = kuberay("NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
    templates = [t for spec in ray_cluster_specs().values() for t in pod_templates(spec)]
    templates.append(kuberay("RayJob")["spec"]["submitterPodTemplate"])
    for template in templates:
        assert selector.items() <= template["metadata"]["labels"].items()


@pytest.mark.parametrize("name", ["command-r-35b-dpo", "qwen2.5-32b-dpo"])
def test_shipped_configs_match_the_cluster_shape(name):
    cfg = load_config(ROOT / "po_ray" / "configs" / f"{name}.yaml")
    assert cfg.scaling.num_workers == WORKER_NODES * GPUS_PER_WORKER
    assert cfg.run.storage_path.startswith(SHARED + "/")
