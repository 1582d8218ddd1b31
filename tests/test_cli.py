import json

from po_ray.cli import main


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
    assert main(["train", "--config", "demo", "loss.beta=-1"]) == 2
    assert "loss.beta: must be > 0" in capsys.readouterr().err
    assert main(["train", "--config", "no-such-config"]) == 2
    assert "no shipped config" in capsys.readouterr().err
    assert main(["train", "--config", "demo", "loss.name=dpoo", f"run.storage_path={tmp_path}"]) == 2
    assert "loss.name: unknown loss 'dpoo'" in capsys.readouterr().err
    assert main(["train", "--config", "simpo", "reference.strategy=sharded", f"run.storage_path={tmp_path}"]) == 2
    assert "reference-free" in capsys.readouterr().err


def test_missing_models_are_refused_before_any_worker_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["train", "--config", "demo", f"run.storage_path={tmp_path}"]
    assert main([*base, f"model.name_or_path={tmp_path}/no-such-model"]) == 2
    assert "model.name_or_path: " in (err := capsys.readouterr().err) and "not an existing folder" in err
    (tmp_path / "empty").mkdir()
    assert main([*base, f"reference.name_or_path={tmp_path}/empty"]) == 2
    assert "reference.name_or_path: " in (err := capsys.readouterr().err) and "has no config.json" in err
    assert main([*base, "model.name_or_path=no-such-org/no-such-model"]) == 2
    assert "model.name_or_path: 'no-such-org/no-such-model' is not a local folder and the hub cannot serve it" in (
        capsys.readouterr().err)
    assert main([*base, "model.tokenizer=./no/such/tokenizer"]) == 2
    assert "model.tokenizer: './no/such/tokenizer' is not an existing folder" in capsys.readouterr().err
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
    assert "nothing to resume" in capsys.readouterr().err


def test_unwritable_storage_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--config", "demo", f"run.storage_path={blocker}/sub"]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_plan_prints_a_verdict(capsys):
    rc = main(["plan", "--config", "command-r-35b-dpo", "--nodes", "4", "--gpus-per-node", "8", "--gpu-memory", "80GB"])
    out = capsys.readouterr().out
    assert rc == 0 and "fits" in out and "smallest cluster" in out
    assert main(["plan", "--config", "demo", "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory", "eighty"]) == 2


def test_config_keys(capsys):
    assert main(["config-keys"]) == 0
    assert "loss.beta" in capsys.readouterr().out
