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
