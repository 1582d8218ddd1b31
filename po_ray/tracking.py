"""MLflow tracking: runs, nesting, secret redaction and buffering through outages.

This is the only module that imports mlflow, and it imports it lazily, so `redact` and the URI
helpers stay cheap for the CLI. Every call goes through an ``MlflowClient`` with an explicit run
id (never the fluent active-run API), so a study's parent run and its trial runs coexist in one
process without leaking into each other.

A tracking failure never stops training. Each logging call becomes a record in an ordered queue
that is pushed at once while the store answers. When it does not, ``Tracker`` warns once per
outage with the reason, keeps the records in memory and appends them to
``<fallback_dir>/tracking_fallback.jsonl``, retries at most every ``retry_interval_s`` and pushes
the queue in order when the store is back. Records the store rejects outright (a changed param on
resume, a bad metric name, a missing artifact file) are dropped with a warning naming them, so one
bad value never blocks the rest. ``replay_fallback`` pushes whatever a run could not deliver.

Fallback file: one JSON object per line, each naming its tracker (one per Tracker object):
``header`` (experiment, run name, run id, parent, tags), then the undelivered records (``start``,
``params``, ``metrics``, ``tags``, ``artifact``, ``artifacts``, ``text``, ``dict``, ``end``)
numbered by ``seq``, and ``flushed`` markers (``upto`` a seq, with the run id) written whenever
records that are in the file were delivered, so a replay pushes only what is still missing.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from po_ray.config import flatten

logger = logging.getLogger(__name__)

FALLBACK_FILE = "tracking_fallback.jsonl"
REDACTED = "***"

# MLflow's limits (mlflow.utils.validation), copied so importing this module does not import
# mlflow; tests check they still match.
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000

# MLflow's REST client retries a refused connection 7 times with exponential back-off and waits
# 120 s for a reply: minutes per call while a server is down. The Tracker keeps its own retry
# schedule, so one attempt should cost seconds. Set only where the user has not chosen values.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}

# Error codes that mean "the store answered and refused this record": retrying cannot help.
_REJECTION_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "BAD_REQUEST",
}
# Not in that list on purpose: authentication and permission errors. Records stay buffered (and in
# the fallback file), so they can be replayed once the credentials are fixed.

_URI_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*:")
_REMOTE_PATH = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")

# ---------------------------------------------------------------------------------------------
# Tracking URIs


def default_tracking_uri(run_dir: str | os.PathLike) -> str:
    """``sqlite:////abs/run_dir/mlflow.db``: a local store in the run folder (created), absolute so
    every worker and the driver open the same file whatever their working directory."""
    if _REMOTE_PATH.match(str(run_dir)):
        raise ValueError(
            f"run folder {run_dir} is remote storage, where a local SQLite MLflow store cannot "
            "live; set tracking.tracking_uri to a tracking server (http://host:5000) or a local "
            "sqlite:////abs/path/mlflow.db"
        )
    folder = Path(run_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return "sqlite:///" + (folder / "mlflow.db").as_posix()


def resolve_tracking_uri(tracking_cfg: Any, run_dir: str | os.PathLike) -> str:
    """``tracking_cfg.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else `default_tracking_uri(run_dir)`; relative SQLite and file
    paths are made absolute (against the cwd) so every process agrees; servers are unchanged.

    A bare path ending in .db/.sqlite is taken as a SQLite file, any other bare path as a folder.
    """
    # The config wins; else the environment MLflow itself honours; else a store in the run folder.
    uri = (tracking_cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")).strip()
    if not uri:
        return default_tracking_uri(run_dir)
    if uri.startswith("sqlite:///"):
        path, sep, query = uri[len("sqlite:///") :].partition("?")
        if path in ("", ":memory:"):
            return uri
        db = Path(path).expanduser().resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        return "sqlite:///" + db.as_posix() + sep + query
    if uri.startswith("file:"):
        path = uri[len("file://") :] if uri.startswith("file://") else uri[len("file:") :]
        return Path(path).expanduser().resolve().as_uri()
    if _URI_SCHEME.match(uri):
        return uri  # http(s)://, databricks, postgresql://…: nothing to resolve
    path = Path(uri).expanduser().resolve()
    if path.suffix in (".db", ".sqlite"):
        path.parent.mkdir(parents=True, exist_ok=True)
        return "sqlite:///" + path.as_posix()
    return path.as_uri()


def _local_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store go next to the database, not into MLflow's default ./mlruns
    (relative to whichever process happened to create the experiment)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///") :].partition("?")[0]
    if path in ("", ":memory:"):
        return None
    return (Path(path).parent / "mlartifacts").as_uri()


def mlflow_server_command(
    host: str,
    port: int,
    backend_uri: str,
    artifacts_dir: str | os.PathLike,
    *,
    workers: int = 1,
    allowed_hosts: str | None = None,
) -> list[str]:
    """argv for an MLflow tracking server that also proxies artifacts (clients upload through it,
    so they need no access to the artifact store).

    ``allowed_hosts`` (comma-separated Host headers, e.g. ``mlflow,mlflow:5000``) is needed when
    clients reach the server by a name other than localhost or a private IP. Run it with
    ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` in the environment to skip the job-runner process
    that plain tracking does not use.
    """
    destination = str(artifacts_dir)
    if not _URI_SCHEME.match(destination):
        destination = str(Path(destination).expanduser().resolve())
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", host,
        "--port", str(port),
        "--backend-store-uri", backend_uri,
        "--serve-artifacts",
        "--artifacts-destination", destination,
        "--workers", str(workers),
    ]  # fmt: skip
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


# ---------------------------------------------------------------------------------------------
# Secrets

_SECRET_WORDS = re.compile(
    r"(?<![a-z0-9])(token|password|passwd|secret|api_?key|credentials?|access_?key|private_?key|"
    r"authorization)(?![a-z0-9])"
)
# Tokenizer vocabulary is not a secret: pad_token, special_tokens, eos_token_id, …
_NOT_SECRET = re.compile(
    r"(?<![a-z0-9])((pad|eos|bos|unk|sep|cls|mask|special)_tokens?|tokens?_ids?)(?![a-z0-9])"
)
# Shapes of well-known credentials, redacted wherever they appear.
_TOKEN_SHAPES = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|"
    r"github_pat_[A-Za-z0-9_]{20,}|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9\-]{10,})\b"
)
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+):[^/\s@]+@")
_URL_SECRET_QUERY = re.compile(
    r"([?&](?:token|access_token|api_key|apikey|key|sig|signature|password|secret)=)[^&\s]+", re.I
)


def is_secret_key(key: str) -> bool:
    """True for names like HF_TOKEN, db.password, openai_api_key, aws_secret_access_key."""
    return bool(_SECRET_WORDS.search(_NOT_SECRET.sub(" ", key.lower().replace("-", "_"))))


def redact_text(text: str) -> str:
    """``text`` with credentials in URLs, well-known token shapes and the values of secret-named
    environment variables replaced by ***."""
    text = _URL_PASSWORD.sub(rf"\1:{REDACTED}@", text)
    text = _URL_SECRET_QUERY.sub(rf"\1{REDACTED}", text)
    text = _TOKEN_SHAPES.sub(REDACTED, text)
    for value in _secret_env_values():
        text = text.replace(value, REDACTED)
    return text


def _secret_env_values() -> list[str]:
    # Short values ("1", "true") would redact half of every config; real secrets are long.
    values = {v for k, v in os.environ.items() if len(v) >= 8 and is_secret_key(k)}
    return sorted(values, key=len, reverse=True)


def redact(d: dict) -> dict:
    """Copy of a (nested) dict with secrets replaced by ***: every non-empty value under a
    secret-looking key, and secret-looking text inside other values (see `redact_text`)."""
    return {
        k: REDACTED if is_secret_key(str(k)) and v not in (None, "") else _redact_value(v)
        for k, v in d.items()
    }


def _redact_value(v: Any) -> Any:
    if isinstance(v, dict):
        return redact(v)
    if isinstance(v, list):
        return [_redact_value(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_redact_value(x) for x in v)
    if isinstance(v, str):
        return redact_text(v)
    return v


# ---------------------------------------------------------------------------------------------
# The tracker


def _never_raises(method):
    """Tracking must not kill training: a bug or surprise in here becomes a warning."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - deliberately broad, see above
            logger.warning("MLflow tracking: %s failed and was skipped: %s", method.__name__, _reason(e))
            return None

    return guarded


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return redact_text(text[:500])


def _is_rejection(e: BaseException) -> bool:
    """The store answered and refused (retrying cannot help), as opposed to not answering."""
    code = getattr(e, "error_code", None)
    if code is not None:
        return code in _REJECTION_CODES
    return isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, TypeError, ValueError))


_file_lock = threading.Lock()


def _append_lines(path: Path, records: list[dict]) -> None:
    data = "".join(json.dumps(r, default=str) + "\n" for r in records).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock:
        # One O_APPEND write per batch keeps lines whole when several processes share the file.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


class Tracker:
    """One MLflow run, logged to from one process (rank 0, or the study driver for its parent
    run). No method raises; see the module docstring for what happens when the store is down.

    ``run_id`` resumes an existing run (a new one is created, with a warning, if the store does
    not know it); ``parent_run_id`` nests the new run under a parent (a study's trials).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        *,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: dict | None = None,
        fallback_dir: str | os.PathLike | None = None,
        retry_interval_s: float = 30.0,
    ):
        for key, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.tags = {str(k): _truncate(str(v), MAX_TAG_VALUE_CHARS) for k, v in redact(tags or {}).items()}
        self.retry_interval_s = retry_interval_s
        self.fallback_path = None
        if fallback_dir:
            self.fallback_path = Path(fallback_dir).expanduser().resolve() / FALLBACK_FILE

        self._id = uuid.uuid4().hex
        self._lock = threading.RLock()
        self._client = None
        self._run_ready = False  # the run exists in the store (created or found)
        self._resumed = False  # …and it existed before this tracker
        self._queue: list[dict] = []  # records not yet delivered, in order
        self._next_seq = 0
        self._delivered_seq = -1  # the last record delivered (or rejected)
        self._persisted_seq = -1  # the last record appended to the fallback file
        self._header_written = False
        self._outage: str | None = None  # the reason while the store is unreachable
        self._last_attempt = -math.inf
        self.metrics_delivered = 0  # metric values the store accepted

    # --- public API: each call queues one record and tries to deliver it --------------------

    @_never_raises
    def start(self) -> str | None:
        """Create the run (or resume ``run_id``, marking it RUNNING again). Returns the run id, or
        None while the store is unreachable and no ``run_id`` was given (the run is then created
        when the store comes back, and ``self.run_id`` is set)."""
        self._submit({"op": "start"})
        return self.run_id

    @_never_raises
    def log_params(self, params: dict) -> None:
        """Log a (nested) dict as params: keys dotted (``loss.beta``), values as strings cut to
        MLflow's limit, secrets replaced by ***."""
        flat = redact(flatten(params))
        values = {str(k): _truncate(str(v), MAX_PARAM_VALUE_CHARS) for k, v in flat.items()}
        self._submit({"op": "params", "params": values})

    @_never_raises
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log one step's scalars (names like ``rewards/accuracies`` kept as they are)."""
        values, unusable = {}, []
        for key, value in metrics.items():
            try:
                values[str(key)] = float(value)
            except (TypeError, ValueError):
                unusable.append(str(key))
        if unusable:
            logger.warning("MLflow tracking: step %s: skipped non-numeric values: %s", step, unusable)
        if values:
            self._submit({"op": "metrics", "step": int(step), "timestamp": _now_ms(), "metrics": values})

    @_never_raises
    def set_tags(self, tags: dict) -> None:
        values = {str(k): _truncate(str(v), MAX_TAG_VALUE_CHARS) for k, v in redact(tags).items()}
        self._submit({"op": "tags", "tags": values})

    @_never_raises
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._submit({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    @_never_raises
    def log_artifacts(self, dir: str | os.PathLike, artifact_path: str | None = None) -> None:  # noqa: A002
        self._submit({"op": "artifacts", "dir": str(Path(dir).resolve()), "artifact_path": artifact_path})

    @_never_raises
    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit({"op": "text", "text": str(text), "artifact_file": artifact_file})

    @_never_raises
    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        """Log columns of equal length as an MLflow table (a .json artifact shown as a table in the UI);
        logging to the same file again appends the rows."""
        plain = json.loads(json.dumps(data, default=str))
        self._submit({"op": "table", "data": plain, "artifact_file": artifact_file})

    @_never_raises
    def log_dict(self, d: dict, artifact_file: str) -> None:
        """Log a dict as a .json or .yaml artifact (secrets redacted, non-JSON values as str)."""
        plain = json.loads(json.dumps(redact(d), default=str))
        self._submit({"op": "dict", "dict": plain, "artifact_file": artifact_file})

    @_never_raises
    def end(self, status: str = "FINISHED") -> None:
        """Mark the run terminated after a last delivery attempt; if the store is still down, say
        where the undelivered records are and how to replay them."""
        self._submit({"op": "end", "status": status}, force=True)
        with self._lock:
            if not self._queue:
                return
            n = len(self._queue)
            uri = redact_text(self.tracking_uri)
            if self.fallback_path is None:
                logger.warning(
                    "MLflow at %s is still unreachable at the end of the run (%s): %d record(s) were "
                    "not logged and are lost (no fallback_dir was given).",
                    uri, self._outage, n,
                )  # fmt: skip
            else:
                logger.warning(
                    "MLflow at %s is still unreachable at the end of the run (%s): %d record(s) were "
                    "not logged. They are kept in %s; once the server is back, push them with:\n"
                    "  python -c \"from po_ray.tracking import replay_fallback; "
                    "replay_fallback('%s', '%s')\"",
                    uri, self._outage, n, self.fallback_path, self.fallback_path, uri,
                )  # fmt: skip

    # --- delivery ---------------------------------------------------------------------------

    def _submit(self, record: dict, force: bool = False) -> None:
        with self._lock:
            record["seq"] = self._next_seq
            self._next_seq += 1
            self._queue.append(record)
            if self._outage is not None:
                self._persist()
            # While healthy, every record goes out at once; during an outage, at most one
            # attempt per retry interval (each costs a timeout or a refused connection).
            self._flush(force=force or self._outage is None)

    def _flush(self, force: bool, raise_errors: bool = False) -> bool:
        """Deliver queued records in order; True when the queue is empty afterwards."""
        if not self._queue:
            return True
        now = time.monotonic()
        if not force and now - self._last_attempt < self.retry_interval_s:
            return False
        self._last_attempt = now
        delivered_before = self._delivered_seq
        try:
            while self._queue:
                n = self._deliver_next()
                self._delivered_seq = self._queue[n - 1]["seq"]
                del self._queue[:n]
        except Exception as e:  # noqa: BLE001 - any failure to reach the store is an outage
            if raise_errors:
                raise
            self._begin_outage(e)
            return False
        finally:
            # Only deliveries of records that are in the file need a marker there.
            if self._header_written and delivered_before < min(self._delivered_seq, self._persisted_seq):
                self._mark_delivered()
        if self._outage is not None:
            logger.warning(
                "MLflow at %s is reachable again: the buffered records were delivered in order.",
                redact_text(self.tracking_uri),
            )
            self._outage = None
        return True

    def _begin_outage(self, e: Exception) -> None:
        if self._outage is None:
            self._outage = _reason(e)
            where = f", and appended to {self.fallback_path}" if self.fallback_path else ""
            logger.warning(
                "MLflow at %s is unreachable (%s). Training continues: records are buffered in memory%s; "
                "retrying at most every %gs and delivering them in order when it is back.",
                redact_text(self.tracking_uri), self._outage, where, self.retry_interval_s,
            )  # fmt: skip
        self._persist()

    def _persist(self) -> None:
        """Append records not yet in the fallback file (the header first)."""
        if self.fallback_path is None:
            return
        records = []
        if not self._header_written:
            records.append({
                "tracker": self._id,
                "op": "header",
                "tracking_uri": redact_text(self.tracking_uri),
                "experiment_name": self.experiment_name,
                "run_name": self.run_name,
                "run_id": self.run_id,
                "parent_run_id": self.parent_run_id,
                "tags": self.tags,
            })  # fmt: skip
        records += [{"tracker": self._id, **r} for r in self._queue if r["seq"] > self._persisted_seq]
        if not records:
            return
        try:
            _append_lines(self.fallback_path, records)
        except OSError as e:
            logger.warning("MLflow tracking: cannot write the fallback file %s: %s", self.fallback_path, e)
            return
        self._header_written = True
        self._persisted_seq = self._queue[-1]["seq"] if self._queue else self._persisted_seq

    def _mark_delivered(self) -> None:
        """Tell a later replay which records (and which run) need nothing more."""
        marker = {"tracker": self._id, "op": "flushed", "upto": self._delivered_seq, "run_id": self.run_id}
        try:
            _append_lines(self.fallback_path, [marker])
        except OSError as e:
            logger.warning("MLflow tracking: cannot write the fallback file %s: %s", self.fallback_path, e)

    def _deliver_next(self) -> int:
        """Deliver the head of the queue; returns how many records it consumed (consecutive
        metric records go out as one batch). Raises when the store does not answer."""
        self._ensure_run()
        head = self._queue[0]
        if head["op"] == "metrics":
            from mlflow.entities import Metric

            batch, total = [head], len(head["metrics"])
            for record in self._queue[1:]:
                if record["op"] != "metrics" or total + len(record["metrics"]) > _MAX_METRICS_PER_BATCH:
                    break
                batch.append(record)
                total += len(record["metrics"])
            items = [Metric(k, v, r["timestamp"], r["step"]) for r in batch for k, v in r["metrics"].items()]
            self.metrics_delivered += self._log_batch("metrics", items, _MAX_METRICS_PER_BATCH)
            return len(batch)
        try:
            self._deliver_one(head)
        except Exception as e:
            if not _is_rejection(e):
                raise
            logger.warning("MLflow tracking: cannot log %s, skipped: %s", head["op"], _reason(e))
        return 1

    def _deliver_one(self, record: dict) -> None:
        from mlflow.entities import Param, RunTag

        client, run_id, op = self._client, self.run_id, record["op"]
        if op == "start":
            if self._resumed:
                client.update_run(run_id, status="RUNNING")
        elif op == "params":
            params = [Param(k, v) for k, v in record["params"].items()]
            self._log_batch("params", params, _MAX_PARAMS_TAGS_PER_BATCH)
        elif op == "tags":
            tags = [RunTag(k, v) for k, v in record["tags"].items()]
            self._log_batch("tags", tags, _MAX_PARAMS_TAGS_PER_BATCH)
        elif op == "artifact":
            client.log_artifact(run_id, record["path"], record["artifact_path"])
        elif op == "artifacts":
            client.log_artifacts(run_id, record["dir"], record["artifact_path"])
        elif op == "text":
            client.log_text(run_id, record["text"], record["artifact_file"])
        elif op == "dict":
            client.log_dict(run_id, record["dict"], record["artifact_file"])
        elif op == "table":
            client.log_table(run_id, record["data"], record["artifact_file"])
        elif op == "end":
            client.set_terminated(run_id, status=record["status"])
        else:
            raise ValueError(f"unknown tracking record {op!r}")

    def _log_batch(self, kind: str, items: list, limit: int) -> int:
        """log_batch in chunks; when the store refuses a chunk, retry its items one by one and
        skip only those it refuses. Returns how many items were accepted."""
        accepted = 0
        for i in range(0, len(items), limit):
            chunk = items[i : i + limit]
            try:
                self._client.log_batch(self.run_id, **{kind: chunk}, synchronous=True)
                accepted += len(chunk)
                continue
            except Exception as e:
                if not _is_rejection(e):
                    raise
            refused = []
            for item in chunk:
                try:
                    self._client.log_batch(self.run_id, **{kind: [item]}, synchronous=True)
                    accepted += 1
                except Exception as e:
                    if not _is_rejection(e):
                        raise
                    refused.append(f"{item.key} ({_reason(e)[:200]})")
            if refused:
                logger.warning("MLflow tracking: the store refused %s, skipped: %s", kind, "; ".join(refused))
        return accepted

    def _ensure_run(self) -> None:
        if self._run_ready:
            return
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.run_id:
            try:
                self._client.get_run(self.run_id)
                self._resumed = True
            except Exception as e:
                if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                logger.warning(
                    "MLflow at %s has no run %s to resume; starting a new run %r instead.",
                    redact_text(self.tracking_uri), self.run_id, self.run_name,
                )  # fmt: skip
                self.run_id = None
        if not self.run_id:
            tags = dict(self.tags)
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            run = self._client.create_run(self._experiment_id(), run_name=self.run_name or None, tags=tags)
            self.run_id = run.info.run_id
            if self._header_written:
                self._mark_delivered()  # records the new run id before anything is delivered to it
        self._run_ready = True

    def _experiment_id(self) -> str:
        experiment = self._client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            location = _local_artifact_location(self.tracking_uri)
            return self._client.create_experiment(self.experiment_name, artifact_location=location)
        except Exception as e:
            if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
            # Another trial created it between our lookup and create.
            return self._client.get_experiment_by_name(self.experiment_name).experiment_id


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------
# Replay


def replay_fallback(path: str | os.PathLike, tracking_uri: str) -> int:
    """Push the undelivered records of a fallback file to ``tracking_uri``; returns how many metric
    values were delivered. Runs the store does not know (another store, a lost server) are
    created anew. Replaying twice pushes nothing the second time. Raises RuntimeError naming the
    reason if the store cannot be reached (run it again later)."""
    path = Path(path)
    trackers: dict[str, dict] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: skipped a line that is not JSON (cut short by a crash?)", path, lineno)
            continue
        entry = trackers.setdefault(
            record.pop("tracker"), {"header": None, "records": {}, "upto": -1, "run_id": None}
        )
        op = record["op"]
        if op == "header":
            entry["header"] = record
            entry["run_id"] = entry["run_id"] or record.get("run_id")
        elif op == "flushed":
            entry["upto"] = max(entry["upto"], record["upto"])
            entry["run_id"] = record.get("run_id") or entry["run_id"]
        else:
            entry["records"][record["seq"]] = record

    delivered = 0
    for tracker_id, entry in trackers.items():
        pending = [r for seq, r in sorted(entry["records"].items()) if seq > entry["upto"]]
        if not pending:
            continue
        header = entry["header"]
        if header is None:
            logger.warning("%s: records of tracker %s have no header line; skipped", path, tracker_id)
            continue
        tracker = Tracker(
            tracking_uri,
            header["experiment_name"],
            header["run_name"],
            run_id=entry["run_id"],
            parent_run_id=header.get("parent_run_id"),
            tags=header.get("tags"),
        )
        # Continue as the tracker that wrote these records, so its delivery markers land in
        # this file under its id and a second replay skips what this one delivered.
        tracker._id, tracker.fallback_path, tracker._header_written = tracker_id, path, True
        tracker._queue, tracker._delivered_seq = pending, entry["upto"]
        tracker._persisted_seq = pending[-1]["seq"]
        try:
            tracker._flush(force=True, raise_errors=True)
        except Exception as e:
            raise RuntimeError(
                f"replaying {path} into {redact_text(tracking_uri)} stopped: {_reason(e)}. What was "
                "delivered is marked in the file; run the replay again when the store is reachable."
            ) from e
        finally:
            delivered += tracker.metrics_delivered
    return delivered
