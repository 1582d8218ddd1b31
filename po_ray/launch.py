"""Run one training: check storage, join or start Ray, build the TorchTrainer, fit, return the summary."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import ray
from ray.train import CheckpointConfig, ControllerError, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

from po_ray.checkpoint import has_checkpoint
from po_ray.config import Config, ConfigError, to_dict
from po_ray.losses import build_loss
from po_ray.losses.registry import import_loss_plugins
from po_ray.model import check_model_sources
from po_ray.reference import resolve_strategy
from po_ray.tracking import resolve_tracking_uri

# Environment the Train controller and workers must see as the driver does.
FORWARDED_ENV = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "MLFLOW_TRACKING_URI", "PYTHONPATH", "HF_HOME", "HF_HUB_OFFLINE")
MIN_FREE_BYTES = 200 * 2**20
# How long Ray Train's controller waits for its workers' placement group before one start attempt fails.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class NodeWaitTimeout(TimeoutError):
    """The cluster lacked the workers' resources for longer than run.node_wait_s (a node lost, none back)."""


def storage_root(cfg: Config) -> Path:
    if "://" in cfg.run.storage_path:
        raise ConfigError(
            f"run.storage_path: {cfg.run.storage_path!r}: po_ray writes its ledger, summary, reference cache and "
            "exported model with plain file I/O, so give a POSIX path; on a cluster mount the bucket or share "
            "(EFS/FSx/NFS/GCS FUSE) on every node and point storage_path at the mount"
        )
    return Path(cfg.run.storage_path).expanduser().resolve()


def run_dir_for(cfg: Config) -> Path:
    return storage_root(cfg) / cfg.run.name


def check_storage(path: Path) -> None:
    """Fail before any worker starts if the output folder cannot be written or the disk is full."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".po_ray_write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.storage_path: cannot write to {path}: {e.strerror}; choose a writable folder") from None
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(
            f"run.storage_path: only {free / 2**20:.0f} MiB free under {path}, less than the {MIN_FREE_BYTES // 2**20} "
            "MiB a run needs at the least (checkpoints need more); free space or point storage_path elsewhere"
        )


def ensure_ray(cfg: Config, *, dashboard: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (e.g. under `ray job submit`), else start a local one.

    ``dashboard``: the local cluster serves Ray's State API (studies need it, see below); a single
    run does without it, and without the dashboard's dozen processes (~300 MiB resident).
    """
    if ray.is_initialized():
        return
    # Ray Train's controller polls workers' reports at this interval (2 s by default), and a report
    # waits for the poll: a shorter interval keeps small, fast steps from idling.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if not cfg.scaling.use_gpu:
        # glibc raises its mmap threshold each time a large block is freed, after which tensors of up
        # to 32 MiB come from the heap and fragment it: a CPU worker's resident memory then grows
        # step by step to ~1.3x its live tensors. A fixed threshold hands larger blocks back to the
        # OS when freed, at the price of page faults when they are allocated again: 8 MiB is the
        # middle of that trade (measured in docs/benchmarks.md). Set the variable to choose otherwise.
        env["MALLOC_MMAP_THRESHOLD_"] = os.environ.get("MALLOC_MMAP_THRESHOLD_", str(8 * 2**20))
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env}, log_to_driver=True)
        return
    # Nothing drains or preempts the node of a local cluster, so Ray Train's preemption watcher
    # (one more actor process per run) has nothing to watch.
    env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    needed = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 1
    options: dict = {"include_dashboard": False}
    if dashboard:
        # When a Train controller dies abruptly (a Tune trial stopped early, a killed driver), Ray
        # Train frees its workers' placement group only after seeing it dead through the State API,
        # which the dashboard serves: keep the dashboard (loopback only) and tell every actor where
        # it is, since other local clusters may share this machine.
        port = _free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        options = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
        **options,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's per-worker entry point (``po_ray.loop.train_loop_per_worker``), imported on the
    workers only: the loop pulls in DeepSpeed (and through it MLflow), which the driver never runs
    and which would add ~200 MiB to its resident memory."""
    from po_ray import loop

    loop.train_loop_per_worker(loop_config)


def build_trainer(cfg: Config, *, loop_extra: dict | None = None, callbacks=(), name: str | None = None,
                  storage_path: str | None = None, bounded_node_wait: bool = False) -> TorchTrainer:
    """``bounded_node_wait``: a worker group start that times out ends the run (see ``fit_waiting_for_nodes``);
    otherwise Ray Train retries it for ever, which Tune trials queueing for each other's resources need."""
    run_dir = Path(storage_path or storage_root(cfg)) / (name or cfg.run.name)
    loop_config = {
        "config": to_dict(cfg),
        "run_dir": str(run_dir),
        # Resolved here: workers run in another cwd, so a relative store path must be made absolute now.
        "tracking_uri": resolve_tracking_uri(cfg.tracking, run_dir) if cfg.tracking.enabled else None,
        "reference_cache_dir": str(Path(cfg.reference.cache_dir).resolve() if cfg.reference.cache_dir
                                   else storage_root(cfg) / "reference_cache"),
        **(loop_extra or {}),
    }
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name or cfg.run.name,
            storage_path=str(storage_path or storage_root(cfg)),
            failure_config=FailureConfig(
                max_failures=cfg.run.max_failures, **({"controller_failure_limit": 0} if bounded_node_wait else {})
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            callbacks=list(callbacks),
            # Train logs every report's full metrics at INFO; our progress line is the readable view.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def train(cfg: Config, *, resume: bool = False) -> dict:
    """Train (or continue) the run ``cfg.run.name``; returns the summary written by rank 0."""
    import_loss_plugins(cfg)
    build_loss(cfg.loss)  # loss name/option errors before anything starts
    resolve_strategy(cfg)
    check_model_sources(cfg)
    run_dir = run_dir_for(cfg)
    check_storage(run_dir)
    summary_path = run_dir / "summary.json"
    if has_checkpoint(run_dir):  # Ray Train's registry, not folders that merely exist
        if summary_path.exists() and json.loads(summary_path.read_text()).get("steps") == cfg.train.max_steps:
            print(f"[po-ray] run {cfg.run.name!r} already finished {cfg.train.max_steps} steps ({run_dir}); "
                  "raise train.max_steps to continue it, or pick a new run.name", flush=True)
            return json.loads(summary_path.read_text())
        print(f"[po-ray] continuing run {cfg.run.name!r} from its last checkpoint in {run_dir}", flush=True)
    elif resume:
        raise ConfigError(f"--resume: no checkpoint of run {cfg.run.name!r} under {run_dir.parent}; nothing to resume")
    ensure_ray(cfg)
    fit_waiting_for_nodes(cfg, build_trainer(cfg, bounded_node_wait=True))
    return json.loads(summary_path.read_text())


def fit_waiting_for_nodes(cfg: Config, trainer: TorchTrainer):
    """Fit; if the workers' resources are missing (a node lost, none joined) for run.node_wait_s, fail saying so.

    After a worker dies, Ray Train's controller starts a new worker group from the last checkpoint,
    and that start waits for a placement group for RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by
    default). A timed-out start is a retryable controller error, retried up to
    FailureConfig.controller_failure_limit times, unlimited by default: with a node gone for good the
    run never ends, only the controller's log shows a timeout each minute. So the timeout is set to node_wait_s and the limit
    (given by build_trainer(bounded_node_wait=True)) to 0: the first wait that runs out ends the run,
    decided inside the controller, which owns the placement group and removes it. A driver-side
    watchdog would have to infer the controller's state from outside and kill it mid-step. The
    controller reads the variable from the driver's environment when fit() creates it (Ray Train
    propagates it), hence set around fit only. The limit also covers a worker group whose node dies
    while it starts (WorkerGroupStartupFailedError); that too now ends the run rather than retrying.
    """
    previous = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = str(cfg.run.node_wait_s)
    try:
        return trainer.fit()
    except ControllerError as e:
        if not isinstance(e.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        per_worker = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
        if cfg.scaling.use_gpu:
            per_worker["GPU"] = per_worker.get("GPU", 1)
        # The cause stays off the inner error: the CLI prints the innermost cause of a ControllerError.
        raise ControllerError(NodeWaitTimeout(node_wait_message(
            cfg.run.name, cfg.scaling.num_workers, per_worker, ray.cluster_resources(), cfg.run.node_wait_s
        ))) from e
    finally:
        if previous is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = previous


def node_wait_message(run: str, num_workers: int, per_worker: dict, cluster: dict, wait_s: float) -> str:
    """Name what is missing: the workers' total need against what the live nodes have now."""
    need = {k: v * num_workers for k, v in per_worker.items()}
    have = {k: cluster.get(k, 0) for k in need}
    short = {k: need[k] - have[k] for k in need if have[k] < need[k]}
    missing = (f"missing {_resources(short)}" if short else
               "enough in total, but in use or split so that no node has room for a whole worker")
    return (
        f"run {run!r}: the cluster could not hold the {num_workers} workers ({num_workers} × {_resources(per_worker)}) "
        f"for run.node_wait_s={wait_s:g} s; a node was lost (or never joined) and none came back with those resources. "
        f"Live nodes have {_resources(have)}: {missing}. Add a node with them, or raise run.node_wait_s; "
        f"`po-ray train --resume` (same run.name) continues from the last checkpoint."
    )


def _resources(r: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in r.items()) + "}"
