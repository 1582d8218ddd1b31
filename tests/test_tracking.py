"""po_ray.tracking against real MLflow stores: a SQLite file, and a real `mlflow server` on loopback
that is down at start, killed mid-run and restarted. Everything is read back with MlflowClient."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from po_ray.config import TrackingConfig
from po_ray.tracking import (
    FALLBACK_FILE,
    MAX_PARAM_VALUE_CHARS,
    REDACTED,
    Tracker,
    default_tracking_uri,
    mlflow_server_command,
    redact,
    replay_fallback,
    resolve_tracking_uri,
)

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


@pytest.fixture(autouse=True)
def _fast_http_failures(monkeypatch):
    # A refused connection should fail at once so outage tests take seconds.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@pytest.fixture
def warnings_seen(caplog):
    caplog.set_level(logging.WARNING, logger="po_ray.tracking")

    def messages(containing: str) -> list[str]:
        ours = [r.getMessage() for r in caplog.records if r.name == "po_ray.tracking"]
        return [m for m in ours if containing in m]

    return messages


def _steps(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# URIs


def test_default_tracking_uri_is_absolute_sqlite_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri("runs/demo")
    assert uri == f"sqlite:///{tmp_path.resolve()}/runs/demo/mlflow.db"
    assert uri.startswith("sqlite:////")
    assert (tmp_path / "runs" / "demo").is_dir()


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path.resolve()
    assert resolve_tracking_uri(TrackingConfig(), "r") == f"sqlite:///{root}/r/mlflow.db"
    server = "http://127.0.0.1:5000"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri=server), "r") == server
    relative = TrackingConfig(tracking_uri="sqlite:///db/m.db")
    assert resolve_tracking_uri(relative, "r") == f"sqlite:///{root}/db/m.db"
    assert (root / "db").is_dir()
    absolute = f"sqlite:///{root}/elsewhere.db"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri=absolute), "r") == absolute
    bare = TrackingConfig(tracking_uri="store/x.db")
    assert resolve_tracking_uri(bare, "r") == f"sqlite:///{root}/store/x.db"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="mlruns"), "r") == (root / "mlruns").as_uri()
    with pytest.raises(ValueError, match="tracking.tracking_uri"):
        resolve_tracking_uri(TrackingConfig(), "s3://bucket/runs/demo")


# ---------------------------------------------------------------------------------------------
# Secrets


def test_redact_keys_values_and_urls(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "abcdefgh12345678")
    monkeypatch.setenv("SOME_FLAG", "abcdefgh-not-secret")
    cfg = {
        "hf_token": "abcdefgh12345678",
        "db": {"password": "hunter22", "user": "me"},
        "openai_api_key": "x" * 10,
        "AWS_SECRET_ACCESS_KEY": "y" * 10,
        "credentials": {"a": 1},
        "empty_token": "",
        "model": {"tokenizer": "gpt2", "pad_token_id": 0, "max_new_tokens": 64, "name": "tiny"},
        "data": {"path": "https://host/data?token=abcdefgh12345678&x=1", "note": "SOME_FLAG is fine"},
        "uri": "postgresql://alice:s3cret@db:5432/mlflow",
        "pasted": "key hf_" + "a" * 30 + " done",
        "flag": "abcdefgh-not-secret",
        "list": ["abcdefgh12345678", 3],
    }
    out = redact(cfg)
    assert out["hf_token"] == out["db"]["password"] == out["openai_api_key"] == REDACTED
    assert out["AWS_SECRET_ACCESS_KEY"] == out["credentials"] == REDACTED
    assert out["empty_token"] == ""  # nothing to hide, and it shows the token is unset
    assert out["db"]["user"] == "me"
    assert out["model"] == cfg["model"]  # tokenizer vocabulary is not a secret
    assert out["data"]["path"] == f"https://host/data?token={REDACTED}&x=1"
    assert out["data"]["note"] == "SOME_FLAG is fine"
    assert out["uri"] == f"postgresql://alice:{REDACTED}@db:5432/mlflow"
    assert out["pasted"] == f"key {REDACTED} done"
    assert out["flag"] == "abcdefgh-not-secret"  # the env var's name is not secret-like
    assert out["list"] == [REDACTED, 3]
    assert cfg["db"]["password"] == "hunter22"  # the input is untouched


# ---------------------------------------------------------------------------------------------
# Local SQLite store


def test_local_store_params_metrics_tags_artifacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray ./mlruns would land here
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue123")
    uri = default_tracking_uri(tmp_path / "run")
    tracker = Tracker(uri, "exp", "demo", tags={"kind": "unit"}, fallback_dir=tmp_path / "run")
    run_id = tracker.start()
    assert run_id
    tracker.log_params({
        "loss": {"name": "dpo", "beta": 0.1},
        "optimizer": {"betas": (0.9, 0.999)},
        "data": {"path": "hub/ds?token=hf_secretvalue123"},
        "hub": {"hf_token": "hf_secretvalue123"},
        "long": "z" * (MAX_PARAM_VALUE_CHARS + 500),
    })  # fmt: skip
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step, "rewards/accuracies": 0.5 + 0.1 * step}, step=step)
    tracker.set_tags({"model_dir": "/x/model", "api_key": "k" * 12})
    artifact = tmp_path / "notes.txt"
    artifact.write_text("hello")
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "table.csv").write_text("a,b\n1,2\n")
    tracker.log_artifact(artifact)
    tracker.log_artifacts(folder, artifact_path="report")
    tracker.log_text("summary text", "summary.txt")
    tracker.log_dict({"steps": 3, "password": "pw"}, "summary.json")
    tracker.end()

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "demo"
    params = run.data.params
    assert params["loss.name"] == "dpo" and params["loss.beta"] == "0.1"
    assert params["optimizer.betas"] == "(0.9, 0.999)"
    assert params["hub.hf_token"] == REDACTED
    assert "hf_secretvalue123" not in json.dumps(params)
    assert len(params["long"]) == MAX_PARAM_VALUE_CHARS
    assert _steps(client, run_id, "loss") == {1: 1.0, 2: 0.5, 3: pytest.approx(1 / 3)}
    accuracies = _steps(client, run_id, "rewards/accuracies")
    assert accuracies == {s: pytest.approx(0.5 + 0.1 * s) for s in (1, 2, 3)}
    assert run.data.tags["kind"] == "unit" and run.data.tags["model_dir"] == "/x/model"
    assert run.data.tags["api_key"] == REDACTED
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert listed == {"notes.txt", "report", "summary.txt", "summary.json"}
    assert [a.path for a in client.list_artifacts(run_id, "report")] == ["report/table.csv"]
    assert json.loads(Path(client.download_artifacts(run_id, "summary.json", str(tmp_path))).read_text()) == {
        "steps": 3,
        "password": REDACTED,
    }
    # Artifacts sit next to the database, not in ./mlruns of whoever created the experiment.
    assert run.info.artifact_uri.startswith((tmp_path / "run" / "mlartifacts").resolve().as_uri())
    assert not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "run" / FALLBACK_FILE).exists()  # nothing failed, nothing buffered
    assert mlflow.active_run() is None  # the fluent API was never touched


def test_parent_and_nested_child_runs(tmp_path):
    uri = default_tracking_uri(tmp_path)
    parent = Tracker(uri, "study", "study-1")
    parent_id = parent.start()
    parent.log_params({"study": {"trials": 2}})
    children = []
    for i, method in enumerate(["dpo", "ipo"]):
        child = Tracker(uri, "study", f"trial-{i}", parent_run_id=parent_id, tags={"method": method})
        child.start()
        child.log_params({"loss": {"name": method}})
        child.log_metrics({"loss": float(i)}, step=1)
        child.set_tags({"stop_reason": "max_steps"})
        child.end()
        children.append(child.run_id)
    parent.log_text("| trial | loss |", "summary.md")
    parent.end()

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("study")
    nested = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert {r.info.run_id for r in nested} == set(children)
    for i, run_id in enumerate(children):
        run = client.get_run(run_id)
        assert run.data.params == {"loss.name": ["dpo", "ipo"][i]}
        assert run.data.metrics == {"loss": float(i)}
        assert run.data.tags["stop_reason"] == "max_steps"
    assert client.get_run(parent_id).data.params == {"study.trials": "2"}
    assert "mlflow.parentRunId" not in client.get_run(parent_id).data.tags


def test_resume_continues_the_same_run_and_skips_only_refused_values(tmp_path, warnings_seen):
    uri = default_tracking_uri(tmp_path)
    first = Tracker(uri, "exp", "r")
    run_id = first.start()
    first.log_params({"train": {"max_steps": 2}, "seed": 0})
    first.log_metrics({"loss": 1.0}, step=1)
    first.end("FAILED")

    again = Tracker(uri, "exp", "r", run_id=run_id)
    assert again.start() == run_id
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
    # MLflow params cannot change; the changed one is refused, the rest still land.
    again.log_params({"train": {"max_steps": 4}, "seed": 0, "new": "yes"})
    again.log_metrics({"loss": 0.5, "bad|name": 1.0}, step=2)
    again.log_artifact(tmp_path / "missing.txt")
    again.log_metrics({"loss": 0.25}, step=3)
    again.end()

    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.max_steps": "2", "seed": "0", "new": "yes"}
    assert _steps(MlflowClient(uri), run_id, "loss") == {1: 1.0, 2: 0.5, 3: 0.25}
    assert warnings_seen("refused params") and "train.max_steps" in warnings_seen("refused params")[0]
    assert warnings_seen("refused metrics") and "bad|name" in warnings_seen("refused metrics")[0]
    assert warnings_seen("cannot log artifact") and "missing.txt" in warnings_seen("cannot log artifact")[0]
    assert not warnings_seen("is unreachable")  # a refusal is not an outage


def test_unknown_run_id_starts_a_new_run(tmp_path, warnings_seen):
    uri = default_tracking_uri(tmp_path)
    tracker = Tracker(uri, "exp", "r", run_id="0" * 32)
    run_id = tracker.start()
    assert run_id and run_id != "0" * 32
    assert warnings_seen("no run")


class _Flaky:
    """A real client that can be switched off, counting the calls made while off."""

    def __init__(self, client):
        self.client, self.down, self.calls_while_down = client, False, 0

    def __getattr__(self, name):
        method = getattr(self.client, name)

        def call(*args, **kwargs):
            if self.down:
                self.calls_while_down += 1
                raise ConnectionError("[Errno 111] Connection refused")
            return method(*args, **kwargs)

        return call


def test_outage_buffers_in_order_retries_on_schedule_and_warns_once(tmp_path, warnings_seen):
    uri = default_tracking_uri(tmp_path)
    tracker = Tracker(uri, "exp", "r", fallback_dir=tmp_path, retry_interval_s=3600)
    run_id = tracker.start()
    flaky = tracker._client = _Flaky(tracker._client)
    tracker.log_metrics({"loss": 1.0}, step=1)
    flaky.down = True
    for step in range(2, 6):
        tracker.log_metrics({"loss": float(step)}, step=step)
    # One attempt failed, then nothing is tried until the retry interval has passed.
    assert flaky.calls_while_down == 1
    assert len(warnings_seen("is unreachable")) == 1
    assert "Connection refused" in warnings_seen("is unreachable")[0]
    lines = [json.loads(x) for x in (tmp_path / FALLBACK_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines if x["op"] == "metrics"] == [2, 3, 4, 5]
    flaky.down = False
    tracker.retry_interval_s = 0
    tracker.log_metrics({"loss": 6.0}, step=6)  # delivers the backlog, then itself
    after_recovery = (tmp_path / FALLBACK_FILE).read_text()
    tracker.log_metrics({"loss": 7.0}, step=7)
    tracker.end()
    # Once the store is back, the file is left alone: no line per later record.
    assert (tmp_path / FALLBACK_FILE).read_text() == after_recovery
    assert _steps(MlflowClient(uri), run_id, "loss") == {s: float(s) for s in range(1, 8)}
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    assert warnings_seen("reachable again")
    assert replay_fallback(tmp_path / FALLBACK_FILE, uri) == 0  # everything was delivered


def test_tracker_never_raises_on_a_broken_store(tmp_path, warnings_seen):
    tracker = Tracker("nonsense-scheme://nowhere", "exp", "r", fallback_dir=tmp_path)
    assert tracker.start() is None
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0, "text": "not a number"}, step=1)
    tracker.log_artifact(tmp_path / "missing.txt")
    tracker.end()
    assert len(warnings_seen("is unreachable")) == 1
    assert warnings_seen("non-numeric")
    assert warnings_seen("replay_fallback(")  # the end says how to push what is left


def test_fallback_file_replays_into_a_store(tmp_path, warnings_seen):
    down = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    tracker = Tracker(
        down, "exp", "offline", tags={"kind": "replay"}, fallback_dir=tmp_path, retry_interval_s=0
    )
    assert tracker.start() is None
    tracker.log_params({"loss": {"beta": 0.1}, "hub": {"token": "hf_secretvalue123"}})
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step, "topk_entropy": 2.0}, step=step)
    tracker.log_text("done", "summary.txt")
    tracker.end()
    fallback = tmp_path / FALLBACK_FILE
    assert str(fallback) in warnings_seen("still unreachable")[0]
    assert "hf_secretvalue123" not in fallback.read_text()

    uri = default_tracking_uri(tmp_path / "store")
    assert replay_fallback(fallback, uri) == 6
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.run_name == "offline" and run.info.status == "FINISHED"
    assert run.data.params == {"loss.beta": "0.1", "hub.token": REDACTED}
    assert run.data.tags["kind"] == "replay"
    assert _steps(client, run.info.run_id, "loss") == {1: 1.0, 2: 0.5, 3: pytest.approx(1 / 3)}
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["summary.txt"]
    assert replay_fallback(fallback, uri) == 0  # a second replay pushes nothing
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_replay_of_an_unreachable_store_says_so(tmp_path):
    tracker = Tracker(f"http://127.0.0.1:{_free_port()}", "exp", "r", fallback_dir=tmp_path)
    tracker.log_metrics({"loss": 1.0}, step=1)
    with pytest.raises(RuntimeError, match="run the replay again"):
        replay_fallback(tmp_path / FALLBACK_FILE, f"http://127.0.0.1:{_free_port()}")


def test_limits_match_mlflow():
    from mlflow.utils import validation

    from po_ray import tracking

    assert tracking.MAX_PARAM_VALUE_CHARS == validation.MAX_PARAM_VAL_LENGTH
    assert tracking.MAX_TAG_VALUE_CHARS == validation.MAX_TAG_VAL_LENGTH
    assert tracking._MAX_PARAMS_TAGS_PER_BATCH == validation.MAX_PARAMS_TAGS_PER_BATCH
    assert tracking._MAX_METRICS_PER_BATCH == validation.MAX_METRICS_PER_BATCH


# ---------------------------------------------------------------------------------------------
# A real tracking server on loopback


class _Server:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts in tmp_path."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        cmd = mlflow_server_command(
            "127.0.0.1", self.port, f"sqlite:///{self.root / 'server.db'}", self.root / "artifacts"
        )
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = (self.root / "server.log").open("ab")
        # A session of its own, so stop() can signal the CLI and its uvicorn child together.
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)  # poll interval, not a wait for an event
        pytest.fail(f"mlflow server not ready after {timeout_s}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        os.killpg(self.proc.pid, sig)  # the group we started: the CLI and its uvicorn child
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def log(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")[-4000:]


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    srv = _Server(root, _free_port())
    yield srv
    srv.stop()


@pytest.mark.integration
def test_server_logs_and_reads_back_over_http(server, tmp_path):
    server.start()
    parent = Tracker(server.uri, "http-exp", "study")
    parent_id = parent.start()
    child = Tracker(server.uri, "http-exp", "trial-0", parent_run_id=parent_id)
    run_id = child.start()
    child.log_params({"loss": {"name": "dpo", "beta": 0.1}, "hf_token": "abc"})
    for step in range(1, 4):
        child.log_metrics({"loss": 1.0 / step, "rewards/accuracies": 0.5}, step=step)
    report = tmp_path / "report.md"
    report.write_text("# report")
    child.log_artifact(report)
    child.log_dict({"steps": 3}, "summary.json")
    child.end()
    parent.end()

    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"loss.name": "dpo", "loss.beta": "0.1", "hf_token": REDACTED}
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert _steps(client, run_id, "loss") == {1: 1.0, 2: 0.5, 3: pytest.approx(1 / 3)}
    assert _steps(client, run_id, "rewards/accuracies") == {1: 0.5, 2: 0.5, 3: 0.5}
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert {a.path for a in client.list_artifacts(run_id)} == {"report.md", "summary.json"}
    # Uploaded through the server into its artifacts destination.
    assert list((server.root / "artifacts").rglob("report.md"))


@pytest.mark.integration
def test_server_down_at_start_then_started(server, tmp_path, warnings_seen):
    tracker = Tracker(server.uri, "late-exp", "late", fallback_dir=tmp_path, retry_interval_s=0)
    assert tracker.start() is None
    tracker.log_params({"loss": {"beta": 0.1}})
    for step in range(1, 4):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert len(warnings_seen("is unreachable")) == 1

    server.start()
    for step in range(4, 7):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert tracker.run_id
    tracker.end()

    client = MlflowClient(server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"loss.beta": "0.1"}
    assert _steps(client, tracker.run_id, "loss") == {s: float(s) for s in range(1, 7)}
    assert warnings_seen("reachable again")
    assert len(warnings_seen("is unreachable")) == 1
    assert replay_fallback(tmp_path / FALLBACK_FILE, server.uri) == 0  # nothing left to push


@pytest.mark.integration
def test_server_killed_mid_run_and_restarted(server, tmp_path, warnings_seen):
    server.start()
    tracker = Tracker(server.uri, "crash-exp", "crash", fallback_dir=tmp_path, retry_interval_s=0)
    run_id = tracker.start()
    for step in range(1, 4):
        tracker.log_metrics({"loss": float(step)}, step=step)

    server.stop(signal.SIGKILL)
    for step in range(4, 7):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert len(warnings_seen("is unreachable")) == 1
    buffered = [json.loads(x) for x in (tmp_path / FALLBACK_FILE).read_text().splitlines()]
    assert [x["step"] for x in buffered if x["op"] == "metrics"] == [4, 5, 6]

    server.start()  # same port, same backend
    for step in range(7, 9):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.end()

    client = MlflowClient(server.uri)
    assert _steps(client, run_id, "loss") == {s: float(s) for s in range(1, 9)}
    assert client.get_run(run_id).info.status == "FINISHED"
    assert warnings_seen("reachable again")
    assert replay_fallback(tmp_path / FALLBACK_FILE, server.uri) == 0
