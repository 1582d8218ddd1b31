"""Checkpoint completeness: every rank's manifest and file sizes are checked on load, a damaged
checkpoint is refused naming the file, and the previous registered one is used instead.

No DeepSpeed here: a stand-in engine writes and reads one real torch file per rank the way
DeepSpeed's does (through ``engine.checkpoint_engine.load``), and the ranks' folders are merged into
one checkpoint folder as Ray Train merges them on upload.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from po_ray.checkpoint import (
    CHECKPOINT_SNAPSHOT,
    IncompleteCheckpoint,
    check_complete,
    has_checkpoint,
    load_checkpoint,
    pick_complete,
    registered_checkpoints,
    save_checkpoint,
)


def shard_name(rank: int) -> str:
    return f"deepspeed/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


class TorchFileEngine:
    """DeepSpeed's own checkpoint engine in miniature: torch.load with weights_only=False."""

    def load(self, path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)


class StandInEngine:
    """The two engine calls po_ray's checkpoint code makes; one shard file per rank."""

    def __init__(self, rank: int, payload=None):
        self.rank = rank
        self.payload = {"fp32_flat": torch.arange(4.0) + rank} if payload is None else payload
        self.checkpoint_engine = TorchFileEngine()
        self.loaded = None

    def save_checkpoint(self, save_dir, tag):
        shard = Path(save_dir) / shard_name(self.rank)
        shard.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.payload, shard)
        if self.rank == 0:  # as DeepSpeed: only rank 0 writes `latest`
            (Path(save_dir) / "latest").write_text(tag)

    def load_checkpoint(self, load_dir, tag, **_):
        self.loaded = self.checkpoint_engine.load(str(Path(load_dir) / shard_name(self.rank)), map_location="cpu")
        return load_dir, {}


def write_checkpoint(root: Path, name: str, step: int, world_size: int = 2, payloads=None) -> Path:
    """Each rank writes into its own folder; then the folders are merged, as Ray Train uploads them."""
    merged = root / name
    for rank in range(world_size):
        own = root / f"{name}-rank{rank}"
        engine = StandInEngine(rank, (payloads or {}).get(rank))
        save_checkpoint(engine, own, step=step, rank=rank, world_size=world_size, state={"pairs_consumed": 4 * step})
        shutil.copytree(own, merged, dirs_exist_ok=True)
        shutil.rmtree(own)
    return merged


def test_each_rank_lists_every_file_it_wrote_with_its_size(tmp_path):
    folder = write_checkpoint(tmp_path, "checkpoint_a", step=10)
    rank0 = json.loads((folder / "MANIFEST.rank0.json").read_text())
    rank1 = json.loads((folder / "MANIFEST.rank1.json").read_text())
    # Rank 0 also writes the trainer state and DeepSpeed's `latest`; the manifest lists itself not.
    assert sorted(rank0["files"]) == ["COMPLETE.rank0", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                      "latest", "rng_rank0.pt", "trainer_state.json"]
    assert sorted(rank1["files"]) == ["COMPLETE.rank1", "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                      "rng_rank1.pt"]
    for manifest in (rank0, rank1):
        assert manifest["files"] == {name: (folder / name).stat().st_size for name in manifest["files"]}
        assert (manifest["world_size"], manifest["step"]) == (2, 10)
    assert rank0["rank"] == 0 and rank1["rank"] == 1
    assert check_complete(folder) == rank0
    assert not list(folder.glob("*.tmp"))


def test_a_complete_checkpoint_loads(tmp_path):
    folder = write_checkpoint(tmp_path, "checkpoint_a", step=10)
    engine = StandInEngine(rank=1)
    state = load_checkpoint(engine, folder, rank=1, world_size=2)
    assert state["step"] == 10 and state["pairs_consumed"] == 40
    assert torch.equal(engine.loaded["fp32_flat"], torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_a_truncated_shard_is_refused_naming_the_file(tmp_path):
    folder = write_checkpoint(tmp_path, "checkpoint_a", step=10)
    shard = folder / shard_name(1)
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    expected = (f"checkpoint {folder} is damaged: deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt has "
                f"{size // 2} bytes, rank 1 wrote {size} (truncated or overwritten)")
    with pytest.raises(IncompleteCheckpoint) as e:
        check_complete(folder)
    assert str(e.value) == expected
    with pytest.raises(IncompleteCheckpoint) as e:  # and load refuses it before DeepSpeed reads a byte
        load_checkpoint(StandInEngine(rank=0), folder, rank=0, world_size=2)
    assert str(e.value) == expected


def test_a_missing_file_is_refused_naming_it(tmp_path):
    folder = write_checkpoint(tmp_path, "checkpoint_a", step=10)
    size = (folder / "rng_rank0.pt").stat().st_size
    (folder / "rng_rank0.pt").unlink()
    with pytest.raises(IncompleteCheckpoint) as e:
        check_complete(folder)
    assert str(e.value) == f"checkpoint {folder} is incomplete: rng_rank0.pt is missing (rank 0 wrote it, {size} bytes)"


def test_a_rank_without_its_manifest_never_finished(tmp_path):
    folder = write_checkpoint(tmp_path, "checkpoint_a", step=10)
    (folder / "MANIFEST.rank1.json").unlink()
    with pytest.raises(IncompleteCheckpoint) as e:
        check_complete(folder)
    assert str(e.value) == (f"checkpoint {folder} is incomplete: ranks [1] never finished writing it "
                            "(no MANIFEST.rank1.json)")
    for manifest in folder.glob("MANIFEST.rank*.json"):
        manifest.unlink()
    with pytest.raises(IncompleteCheckpoint) as e:
        check_complete(folder)
    assert str(e.value) == (f"checkpoint {folder} is incomplete: no rank finished writing it (no "
                            "MANIFEST.rank0.json, the file each rank writes last)")


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    older = write_checkpoint(tmp_path, "checkpoint_10", step=10)
    latest = write_checkpoint(tmp_path, "checkpoint_20", step=20)
    shard = latest / shard_name(0)
    shard.write_bytes(shard.read_bytes()[:100])
    warnings: list[str] = []
    assert pick_complete([latest, latest, older], warn=warnings.append) == older.resolve()
    assert warnings == [f"[po-ray] WARNING: checkpoint {latest.resolve()} is damaged: "
                        f"deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt has 100 bytes, rank 0 wrote "
                        f"{(older / shard_name(0)).stat().st_size} (truncated or overwritten); trying the previous checkpoint"]
    # Nothing usable left: one error with every checkpoint's problem.
    (older / "MANIFEST.rank1.json").unlink()
    with pytest.raises(IncompleteCheckpoint) as e:
        pick_complete([latest, older], warn=lambda _: None)
    assert str(e.value).startswith("no complete checkpoint to resume from: checkpoint ")
    assert f"checkpoint {older.resolve()} is incomplete: ranks [1] never finished writing it" in str(e.value)
    assert str(e.value).endswith("; start a new run (another run.name) or restore the folder")


def test_a_world_size_change_is_refused(tmp_path):
    folder = write_checkpoint(tmp_path, "checkpoint_a", step=10)
    with pytest.raises(RuntimeError) as e:
        load_checkpoint(StandInEngine(rank=0), folder, rank=0, world_size=4)
    assert str(e.value) == (f"checkpoint {folder} was written by 2 workers but this run has 4: ZeRO-3 shards are "
                            "per rank, so resume with scaling.num_workers=2 (or start a new run name)")


# ---- Ray Train's registry: the snapshot decides whether a run resumes, and from which checkpoints --


def ray_snapshot(run_dir: Path, names: list[str], latest: str | None) -> None:
    """Write the snapshot as Ray Train 2.60's checkpoint manager does (its own pydantic model)."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    result = lambda name: _TrainingResultState(checkpoint_dir_name=name, metrics={})  # noqa: E731
    state = _CheckpointManagerState(
        checkpoint_results=[result(n) for n in names], checkpoint_report_indices=list(range(len(names))),
        latest_checkpoint_result=result(latest) if latest else None, pending_training_results=[],
        pending_validation_specs=[], current_report_index=len(names), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[],
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CHECKPOINT_SNAPSHOT).write_text(state.model_dump_json())


def test_the_snapshot_file_is_ray_trains():
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    assert CHECKPOINT_SNAPSHOT == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == "checkpoint_manager_snapshot.json"


def test_a_run_resumes_only_when_ray_train_registered_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    assert not has_checkpoint(run_dir)  # no folder at all
    # A checkpoint folder Ray Train never registered (the run died before every rank reported it).
    (run_dir / "checkpoint_2026-12-03_10-00-00.000000").mkdir(parents=True)
    assert not has_checkpoint(run_dir)
    ray_snapshot(run_dir, [], latest=None)
    assert not has_checkpoint(run_dir)
    ray_snapshot(run_dir, ["checkpoint_a"], latest="checkpoint_a")
    assert has_checkpoint(run_dir)


def test_registered_checkpoints_newest_first(tmp_path):
    run_dir = tmp_path / "run"
    assert registered_checkpoints(run_dir) == []
    ray_snapshot(run_dir, ["checkpoint_10", "checkpoint_20", "checkpoint_30"], latest="checkpoint_30")
    assert registered_checkpoints(run_dir) == [run_dir / "checkpoint_30", run_dir / "checkpoint_20",
                                               run_dir / "checkpoint_10"]
