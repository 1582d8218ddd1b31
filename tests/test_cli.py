import json

import pytest

from po_ray.cli import main, resolve_config_path
from po_ray.config import ConfigError


def test_validate_data_ok_and_bad(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": "name a fruit", "chosen": "apple", "rejected": "red"}) + "\n" for _ in range(3)))
    assert main(["validate-data", str(good)]) == 0
    assert "3" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n{not json\n"
                   + json.dumps({"prompt": "p", "chosen": "", "rejected": "b"}) + "\n")
    assert main(["validate-data", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:2:" in out and f"{bad}:3: chosen:" in out

    assert main(["validate-data", str(bad), "data.on_bad_row=skip"]) == 0


def test_config_errors_exit_2_with_the_key(tmp_path, capsys):
    from po_ray.config import SHIPPED_CONFIGS
    from po_ray.losses import available_losses

    assert main(["train", "--config", "demo", "loss.beta=-1"]) == 2
    assert capsys.readouterr().err == (
        f"po-ray: config error: {resolve_config_path('demo')}: loss.beta: must be > 0, got -1.0\n")
    assert main(["train", "--config", "no-such-config"]) == 2
    shipped = ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml")))
    assert capsys.readouterr().err == ("po-ray: config error: config 'no-such-config': no such file, and no shipped "
                                       f"config of that name (shipped: {shipped})\n")
    assert main(["train", "--config", "demo", "loss.name=dpoo", f"run.storage_path={tmp_path}"]) == 2
    assert capsys.readouterr().err == (
        f"po-ray: error: loss.name: unknown loss 'dpoo'; registered: {', '.join(available_losses())} (a loss from "
        "your own module is registered when that module is imported)\n")
    assert main(["train", "--config", "simpo", "reference.strategy=sharded", f"run.storage_path={tmp_path}"]) == 2
    assert capsys.readouterr().err == (
        "po-ray: config error: reference.strategy: loss 'simpo' is reference-free, so a sharded reference would be "
        "loaded for nothing; set reference.strategy=auto or none\n")


def test_missing_models_are_refused_before_any_worker_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["train", "--config", "demo", f"run.storage_path={tmp_path}"]
    not_there = "is not an existing folder and not a hub name like 'org/model'; check the path (relative paths are " \
                "from the working directory)"
    assert main([*base, f"model.name_or_path={tmp_path}/no-such-model"]) == 2
    assert capsys.readouterr().err == (
        f"po-ray: config error: model.name_or_path: '{tmp_path}/no-such-model' {not_there}\n")
    (tmp_path / "empty").mkdir()
    assert main([*base, f"reference.name_or_path={tmp_path}/empty"]) == 2
    assert capsys.readouterr().err == (
        f"po-ray: config error: reference.name_or_path: {tmp_path}/empty has no config.json, so it is not a Hugging "
        "Face model folder; point it at a save_pretrained folder (po-ray exports one per run) or a hub name\n")
    assert main([*base, "model.name_or_path=no-such-org/no-such-model"]) == 2
    assert capsys.readouterr().err == (
        "po-ray: config error: model.name_or_path: 'no-such-org/no-such-model' is not a local folder and the hub "
        "cannot serve it (We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
        "in the cached files.); check the name or the path (relative to the working directory), HF_TOKEN for gated "
        "models, and HF_HUB_OFFLINE\n")
    assert main([*base, "model.tokenizer=./no/such/tokenizer"]) == 2
    assert capsys.readouterr().err == f"po-ray: config error: model.tokenizer: './no/such/tokenizer' {not_there}\n"
    assert not list(tmp_path.glob("*/ledger"))  # nothing ran


def test_a_failed_run_is_summed_up_by_its_root_causes():
    from po_ray.cli import _root_causes

    class WorkerGroupError(Exception):  # the shape of Ray Train's, without starting Ray
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors: <tracebacks>")
            self.worker_failures = failures

    def task_error(msg):
        try:
            raise RuntimeError("Traceback (most recent call last):\n  File ...\n" + msg) from FloatingPointError(msg)
        except RuntimeError as e:
            return e

    nan = "non-finite loss at step 4 (pairs [1, 2])"
    error = WorkerGroupError({1: task_error(nan), 0: task_error(nan), 2: ValueError("data.jsonl:3: chosen: empty")})
    assert _root_causes(error) == f"{nan} (rank 0, 1); data.jsonl:3: chosen: empty (rank 2)"


def test_resume_without_a_run_is_an_error(tmp_path, capsys):
    assert main(["train", "--config", "demo", "--resume", f"run.storage_path={tmp_path}"]) == 2
    assert capsys.readouterr().err == (
        f"po-ray: config error: --resume: no checkpoint of run 'demo' under {tmp_path}; nothing to resume\n")
    # A checkpoint folder that Ray Train never registered is not one to resume from.
    (tmp_path / "demo" / "checkpoint_2026-12-03_10-00-00.000000").mkdir(parents=True)
    assert main(["train", "--config", "demo", "--resume", f"run.storage_path={tmp_path}"]) == 2
    assert capsys.readouterr().err.endswith("; nothing to resume\n")


def test_unwritable_storage_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--config", "demo", f"run.storage_path={blocker}/sub"]) == 2
    assert capsys.readouterr().err == (
        f"po-ray: config error: run.storage_path: cannot write to {blocker}/sub/demo: Not a directory; choose a "
        "writable folder\n")
    assert not (blocker.parent / "sub").exists()


def test_a_nearly_full_disk_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import shutil

    import po_ray.launch

    asked = []

    def disk_usage(path):  # the disk under storage_path has 50 MiB left
        asked.append(path)
        return shutil._ntuple_diskusage(total=2**40, used=2**40 - 50 * 2**20, free=50 * 2**20)

    monkeypatch.setattr(po_ray.launch.shutil, "disk_usage", disk_usage)
    assert main(["train", "--config", "demo", f"run.storage_path={tmp_path}"]) == 2
    assert capsys.readouterr().err == (
        f"po-ray: config error: run.storage_path: only 50 MiB free under {tmp_path}/demo, less than the 200 MiB a run "
        "needs at the least (checkpoints need more); free space or point storage_path elsewhere\n")
    assert asked == [tmp_path / "demo"]
    assert not list(tmp_path.glob("*/ledger"))  # nothing ran


# ---- secrets stay off the screen ---------------------------------------------------------------------

PASSWORD, TOKEN = "hunter2-correct-horse", "tok-9f8e7d6c5b4a"


def test_the_train_summary_prints_no_secret(capsys, monkeypatch):
    import po_ray.launch

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    summary = {"eval_before": {"eval/loss": 0.6931}, "final": {"eval/loss": 0.5}, "run_dir": "/runs/demo",
               "model_dir": "/runs/demo/model", "mlflow_run_id": "abc123",
               "tracking_uri": f"https://alice:{PASSWORD}@mlflow.internal:5000/?token={TOKEN}"}
    monkeypatch.setattr(po_ray.launch, "train", lambda cfg, resume: summary)
    assert main(["train", "--config", "demo"]) == 0
    out = capsys.readouterr().out
    assert out == "\n".join([
        "",
        "=== po-ray: training finished ===",
        "held-out loss".ljust(48) + " 0.693 -> 0.500",
        "run folder (checkpoints, ledger, summary)".ljust(48) + " /runs/demo",
        "exported Hugging Face model".ljust(48) + " /runs/demo/model",
        "MLflow tracking URI".ljust(48) + " https://alice:***@mlflow.internal:5000/?token=***  (run abc123)",
    ]) + "\n"
    assert PASSWORD not in out and TOKEN not in out


@pytest.mark.parametrize("error, printed", [
    (ConfigError, "po-ray: config error: "),
    (ValueError, "po-ray: error: "),
])
def test_error_messages_print_no_secret(error, printed, capsys, monkeypatch):
    import po_ray.launch

    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def train(cfg, resume):
        raise error(f"tracking.tracking_uri: http://bob:{PASSWORD}@10.0.0.5:5000 refused the token {TOKEN}")

    monkeypatch.setattr(po_ray.launch, "train", train)
    assert main(["train", "--config", "demo"]) == 2
    err = capsys.readouterr().err
    assert err == f"{printed}tracking.tracking_uri: http://bob:***@10.0.0.5:5000 refused the token ***\n"


def test_a_failed_run_prints_no_secret(capsys, monkeypatch):
    import po_ray.launch

    class WorkerGroupError(Exception):  # the shape of Ray Train's
        worker_failures = {0: RuntimeError(f"AKIAABCDEFGHIJKLMNOP rejected: http://u:{PASSWORD}@s3.internal")}

    monkeypatch.setattr(po_ray.launch, "train", lambda cfg, resume: (_ for _ in ()).throw(WorkerGroupError()))
    assert main(["train", "--config", "demo"]) == 1
    assert capsys.readouterr().err == ("po-ray: the Ray Train run failed: *** rejected: http://u:***@s3.internal "
                                       "(rank 0)\n(full worker tracebacks above)\n")


def test_plan_prints_a_verdict(capsys):
    rc = main(["plan", "--config", "command-r-35b-dpo", "--nodes", "4", "--gpus-per-node", "8", "--gpu-memory", "80GB"])
    out = capsys.readouterr().out
    assert rc == 0 and "fits" in out and "smallest cluster" in out
    assert main(["plan", "--config", "demo", "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory", "eighty"]) == 2


def test_config_keys(capsys):
    assert main(["config-keys"]) == 0
    assert "loss.beta" in capsys.readouterr().out
