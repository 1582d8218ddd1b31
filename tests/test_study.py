"""Study and method-space files: loading, errors that name file and key, grids, overrides, Tune spaces."""

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from po_ray.config import load_config
from po_ray.study import (
    SPACES_DIR,
    Dimension,
    MethodSpace,
    StudyError,
    count_trials,
    expand_grid,
    format_value,
    load_method,
    load_study,
    to_tune_space,
    trial_overrides,
)

METHOD_FILES = sorted(p for p in SPACES_DIR.glob("*.yaml") if not p.stem.startswith("robustness"))
STUDY_FILES = sorted(SPACES_DIR.glob("robustness-*.yaml"))
EXPECTED_METHODS = {
    "dpo", "ln_dpo", "ipo", "hinge", "simpo", "cdpo", "robust", "rdpo", "orpo", "dpo_nll", "dpo_poet", "simpo_poet",
}  # fmt: skip


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def raw_cells(space: dict) -> int:
    """Cells of a pure grid counted straight from the YAML mapping."""
    return math.prod(len(spec["grid"]) for spec in space.values())


@pytest.fixture
def study_dir(tmp_path):
    """A study folder with its own base config and two method files."""
    write(tmp_path / "base.yaml", {"train": {"max_steps": 100}, "optimizer": {"lr": 1.0e-6}})
    write(
        tmp_path / "m_dpo.yaml",
        {
            "method": "m_dpo",
            "fixed": {"loss.name": "dpo"},
            "space": {"loss.beta": {"grid": [0.1, 0.5]}, "optimizer.lr": {"grid": [1.0e-6, 3.0e-6, 1.0e-5]}},
        },
    )
    write(
        tmp_path / "m_simpo.yaml",
        {
            "method": "m_simpo",
            "fixed": {"loss.name": "simpo", "reference.strategy": "none"},
            "space": {"loss.beta": {"grid": [2.0, 10.0]}, "loss.options.gamma": {"grid": [0.5, 1.0]}},
        },
    )
    return tmp_path


def study_file(study_dir: Path, **changes) -> Path:
    raw = {
        "name": "s",
        "base_config": "base.yaml",
        "base_overrides": {"train.max_steps": 30},
        "methods": ["m_dpo", "m_simpo"],
        "seeds": [0, 1],
        "score": {"metric": "eval/rewards/accuracies", "mode": "max", "epsilon": 0.05},
        "max_concurrent_trials": 2,
        "stopping": {"signal": "topk_mass", "patience": 4, "min_steps": 3, "asha": True},
        "storage_path": "runs",
    }
    raw.update(changes)
    raw = {k: v for k, v in raw.items() if v is not None}
    return write(study_dir / "study.yaml", raw)


# ---------------------------------------------------------------------------------------------
# Shipped files


def test_every_method_is_shipped():
    assert {p.stem for p in METHOD_FILES} == EXPECTED_METHODS


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: p.stem)
def test_shipped_method_file_loads_and_expands(path):
    raw = yaml.safe_load(path.read_text())
    method = load_method(path)  # every fixed and space value checked against the default run config
    assert method.name == path.stem
    cells = expand_grid(method)
    assert len(cells) == raw_cells(raw["space"])
    assert len({tuple(sorted(c.items())) for c in cells}) == len(cells)
    assert all(set(c) == set(raw["space"]) for c in cells)
    # every cell makes a valid run config carrying the method's fixed values
    study = _bare_study(method)
    for cell in cells:
        cfg = load_config(None, trial_overrides(study, method, cell))
        assert cfg.loss.name == raw["fixed"]["loss.name"]
        assert cfg.loss.beta == cell["loss.beta"] and cfg.optimizer.lr == cell["optimizer.lr"]


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: p.stem)
def test_shipped_method_cells_build_their_loss(path):
    # The config does not know the losses' knobs; the registry does. A misspelt knob or a value
    # out of its range must fail here, not in a trial on the cluster.
    from po_ray.losses import build_loss, loss_needs_reference

    method = load_method(path)
    study = _bare_study(method)
    for cell in expand_grid(method):
        cfg = load_config(None, trial_overrides(study, method, cell))
        build_loss(cfg.loss)
        if cfg.reference.strategy == "none":
            assert not loss_needs_reference(cfg.loss)


def test_shipped_method_files_set_the_documented_knobs():
    def load(name):
        return load_method(name)

    assert load("ln_dpo").fixed["loss.averaged"] is True and load("dpo").fixed["loss.averaged"] is False
    assert "loss.options.gamma" in load("simpo").space and load("simpo").fixed["reference.strategy"] == "none"
    assert load("orpo").fixed["reference.strategy"] == "none"
    for name in ("cdpo", "robust"):
        eps = load(name).space["loss.options.label_smoothing"].values
        assert all(0 <= e < 0.5 for e in eps)
    assert "loss.options.alpha" in load("rdpo").space and "loss.nll_alpha" in load("dpo_nll").space
    assert load("dpo_poet").fixed["data.poet"] is True and load("simpo_poet").fixed["data.poet"] is True
    assert load("dpo").fixed["data.poet"] is False


def _expected_study_trials(path: Path) -> int:
    """Count a study's trials from the raw YAML: per method item, the method file's grid with the
    study's per-key replacements (null removes a key), times the seeds."""
    raw = yaml.safe_load(path.read_text())
    total = 0
    for item in raw["methods"]:
        name, replace = (item, {}) if isinstance(item, str) else (item["method"], item.get("space", {}))
        space = dict(yaml.safe_load((path.parent / f"{name}.yaml").read_text())["space"])
        for key, spec in replace.items():
            if spec is None:
                space.pop(key)
            else:
                space[key] = spec
        total += raw_cells(space)
    return total * len(raw.get("seeds", [0]))


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.stem)
def test_shipped_study_file_with_its_base_config(path):
    base = (path.parent / yaml.safe_load(path.read_text())["base_config"]).resolve()
    if not base.is_file():
        pytest.skip(f"base config {base} is not written yet")
    study = load_study(path)
    assert study.name == path.stem
    assert count_trials(study) == _expected_study_trials(path)


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.stem)
def test_shipped_study_file_against_default_config(path, tmp_path):
    # The same study pointed at an empty base config, so its methods, spaces, overrides and
    # stopping are checked even before the real base config exists (methods resolve to SPACES_DIR).
    raw = yaml.safe_load(path.read_text())
    write(tmp_path / "base.yaml", "{}\n")
    copy = write(tmp_path / path.name, {**raw, "base_config": "base.yaml"})
    study = load_study(copy)
    assert [m.name for m in study.methods] == [i if isinstance(i, str) else i["method"] for i in raw["methods"]]
    assert count_trials(study) == _expected_study_trials(path)
    assert study.score.metric == raw["score"]["metric"]
    assert study.stopping.patience == raw["stopping"]["patience"]


def test_demo_study_is_small():
    raw = yaml.safe_load((SPACES_DIR / "robustness-demo.yaml").read_text())
    assert [i["method"] if isinstance(i, dict) else i for i in raw["methods"]] == ["dpo", "ln_dpo", "simpo"]
    assert _expected_study_trials(SPACES_DIR / "robustness-demo.yaml") == 12  # 2x2 + 2x2 + 2x2x1, one seed
    assert raw["max_concurrent_trials"] == 1 and raw["base_overrides"]["train.max_steps"] == 30


def _bare_study(method: MethodSpace):
    from po_ray.study import StudySpec

    return StudySpec(
        name="t", path=Path("t.yaml"), base_config=Path("-"), base_overrides=(), config=load_config(), methods=(method,)
    )


# ---------------------------------------------------------------------------------------------
# Loading a study


def test_load_study_fields(study_dir):
    study = load_study(study_file(study_dir))
    assert study.name == "s" and study.study_dir == "runs/s"
    assert study.base_config == (study_dir / "base.yaml").resolve()
    assert [m.name for m in study.methods] == ["m_dpo", "m_simpo"]
    assert study.seeds == (0, 1) and study.max_concurrent_trials == 2
    assert (study.score.metric, study.score.mode, study.score.epsilon) == ("eval/rewards/accuracies", "max", 0.05)
    assert (study.stopping.signal, study.stopping.patience, study.stopping.min_steps) == ("topk_mass", 4, 3)
    assert study.stopping.drop_fraction == 0.2  # not set: the run config's default
    assert study.asha is True
    assert study.config.train.max_steps == 30 and study.config.early_stopping.patience == 4
    assert study.trial_resources == {"CPU": 1}
    # (2 x 3 + 2 x 2) cells x 2 seeds
    assert count_trials(study) == (6 + 4) * 2


def test_study_overrides(study_dir):
    path = study_file(study_dir)
    study = load_study(
        path, ["seeds=[0, 1, 2]", "stopping.patience=7", "train.max_steps=12", "base_overrides.train.seed=5"]
    )
    assert study.seeds == (0, 1, 2) and count_trials(study) == 10 * 3
    assert study.stopping.patience == 7
    assert study.config.train.max_steps == 12  # the command line wins over the file's base_overrides
    assert study.config.train.seed == 5
    with pytest.raises(StudyError, match="bogus is neither a study key"):
        load_study(path, ["bogus.x=1"])


def test_grid_order_is_file_order_last_key_fastest(study_dir):
    method = load_method(study_dir / "m_dpo.yaml")
    assert expand_grid(method) == [
        {"loss.beta": 0.1, "optimizer.lr": 1.0e-6},
        {"loss.beta": 0.1, "optimizer.lr": 3.0e-6},
        {"loss.beta": 0.1, "optimizer.lr": 1.0e-5},
        {"loss.beta": 0.5, "optimizer.lr": 1.0e-6},
        {"loss.beta": 0.5, "optimizer.lr": 3.0e-6},
        {"loss.beta": 0.5, "optimizer.lr": 1.0e-5},
    ]
    assert expand_grid(MethodSpace(name="x", path=None)) == [{}]


def test_random_dimensions_count_num_samples_and_do_not_expand(study_dir):
    write(
        study_dir / "m_rand.yaml",
        {
            "method": "m_rand",
            "num_samples": 5,
            "space": {"loss.beta": {"grid": [0.1, 0.2, 0.3]}, "optimizer.lr": {"loguniform": [1.0e-7, 1.0e-5]}},
        },
    )
    study = load_study(study_file(study_dir, methods=["m_rand"], seeds=[0, 1]))
    assert count_trials(study) == 3 * 5 * 2
    with pytest.raises(StudyError, match="optimizer.lr is sampled"):
        expand_grid(study.methods[0])


def test_inline_space_narrows_a_method(study_dir):
    study = load_study(
        study_file(
            study_dir,
            methods=[
                {"method": "m_dpo", "space": {"optimizer.lr": {"grid": [1.0e-5]}}},
                {"method": "m_simpo", "space": {"loss.options.gamma": None}},
            ],
            seeds=[0],
        )
    )
    assert [len(expand_grid(m)) for m in study.methods] == [2 * 1, 2]
    assert "loss.options.gamma" not in study.method("m_simpo").space
    assert count_trials(study) == 4


def test_method_by_path(study_dir):
    path = write(study_dir / "more" / "x.yaml", {"method": "x", "fixed": {"loss.name": "ipo"}, "space": {}})
    for ref in ("more/x.yaml", str(path)):  # relative to the study file, or absolute
        study = load_study(study_file(study_dir, methods=[ref]))
        assert study.methods[0].name == "x" and study.methods[0].path.resolve() == path.resolve()
        assert count_trials(study) == 1 * 2  # an empty space is one cell, times two seeds


# ---------------------------------------------------------------------------------------------
# Trials and Tune


def test_trial_overrides_build_the_trial_config(study_dir):
    study = load_study(study_file(study_dir))
    method = study.method("m_simpo")
    params = {"loss.beta": 10.0, "loss.options.gamma": 0.5, "train.seed": 1}
    overrides = trial_overrides(study, method, params)
    cfg = load_config(study.base_config, overrides)
    assert (cfg.loss.name, cfg.loss.beta, cfg.loss.options) == ("simpo", 10.0, {"gamma": 0.5})
    assert (cfg.reference.strategy, cfg.train.seed, cfg.train.max_steps) == ("none", 1, 30)
    assert cfg.early_stopping.signal == "topk_mass"
    # Tune may hand nested dicts; numpy scalars from its samplers format like Python numbers
    nested = {"loss": {"beta": np.float64(10.0), "options": {"gamma": 0.5}}, "train": {"seed": np.int64(1)}}
    assert trial_overrides(study, method, nested) == overrides


def test_trial_overrides_reject_missing_and_unknown_keys(study_dir):
    study = load_study(study_file(study_dir))
    method = study.method("m_simpo")
    with pytest.raises(StudyError, match="lack loss.options.gamma"):
        trial_overrides(study, method, {"loss.beta": 2.0})
    with pytest.raises(StudyError, match="optimizer.lr, which is not in the method's space"):
        trial_overrides(study, method, {"loss.beta": 2.0, "loss.options.gamma": 1.0, "optimizer.lr": 1e-6})


@pytest.mark.parametrize(
    "value", [3e-7, 1e-6, 1e20, 0.1, 2.0, 1, 0, True, False, "none", "yes", "1e-5", [0.9, 0.999], {"gamma": 1e-5}]
)
def test_format_value_reads_back_the_same(value):
    assert yaml.safe_load(format_value(value)) == value
    assert type(yaml.safe_load(format_value(value))) is type(value)


def test_to_tune_space_matches_the_grid(study_dir):
    from ray import tune
    from ray.tune.search.variant_generator import generate_variants

    study = load_study(study_file(study_dir))
    method = study.method("m_dpo")
    space = to_tune_space(method, seeds=study.seeds)
    assert space["loss.beta"] == tune.grid_search([0.1, 0.5])
    variants = [cfg for _, cfg in generate_variants(space)]
    assert len(variants) == 2 * 3 * 2
    cells = [{k: v for k, v in cfg.items() if k != "train.seed"} for cfg in variants]
    assert sorted(map(lambda c: tuple(sorted(c.items())), cells)) == sorted(
        tuple(sorted(c.items())) for c in expand_grid(method) for _ in study.seeds
    )
    for cfg in variants:  # each Tune point is a valid trial
        trial_overrides(study, method, cfg)


def test_to_tune_space_random_kinds():
    from ray.tune.search.variant_generator import generate_variants

    method = MethodSpace(
        name="r",
        path=None,
        space={
            "optimizer.lr": Dimension("loguniform", (1e-7, 1e-5)),
            "loss.beta": Dimension("uniform", (0.1, 0.2)),
            "loss.options.gamma": Dimension("choice", (0.5, 1.0)),
        },
    )
    for _ in range(20):
        (_, cfg), = list(generate_variants(to_tune_space(method)))
        assert 1e-7 <= cfg["optimizer.lr"] <= 1e-5 and 0.1 <= cfg["loss.beta"] <= 0.2
        assert cfg["loss.options.gamma"] in (0.5, 1.0)


# ---------------------------------------------------------------------------------------------
# Errors name the file and the key


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"colour": "red"}, r"study.yaml: unknown key colour"),
        ({"methods": ["nope"]}, r"study.yaml: methods\[0\]: unknown method 'nope'"),
        ({"base_config": "missing.yaml"}, r"study.yaml: base_config: .*missing.yaml does not exist"),
        ({"base_overrides": {"train.max_stepz": 3}}, r"study.yaml: .*unknown key train.max_stepz"),
        ({"base_overrides": {"train.max_steps": 0}}, r"study.yaml: .*train.max_steps: must be > 0"),
        ({"stopping": {"patience": 0}}, r"study.yaml: .*early_stopping.patience: must be >= 1"),
        ({"stopping": {"patiense": 2}}, r"study.yaml: unknown key stopping.patiense"),
        ({"stopping": {"asha": "yes"}}, r"study.yaml: stopping.asha: expected true or false"),
        ({"seeds": []}, r"study.yaml: seeds: expected a non-empty list"),
        ({"seeds": [1, 1]}, r"study.yaml: seeds: expected a non-empty list of distinct"),
        ({"score": {"metric": "x", "mode": "maximum"}}, r"study.yaml: score.mode: expected max or min"),
        ({"score": {"mode": "max"}}, r"study.yaml: score: expected \{metric"),
        ({"score": {"metric": "x", "epsilon": -1}}, r"study.yaml: score.epsilon"),
        ({"max_concurrent_trials": 0}, r"study.yaml: max_concurrent_trials"),
        ({"methods": ["m_dpo", "m_dpo"]}, r"study.yaml: methods: m_dpo appears more than once"),
        ({"methods": []}, r"study.yaml: methods: expected a non-empty list"),
        ({"methods": [{"method": "m_dpo", "space": {"loss.name": {"grid": ["ipo"]}}}]}, r"loss.name: fixed by method"),
        ({"methods": [{"method": "m_dpo", "space": {"loss.averaged": None}}]}, r"null removes a key"),
        ({"methods": [{"method": "m_dpo", "space": {"train.seed": {"grid": [1]}}}]}, r"seeds are set by the study"),
        ({"name": "a/b"}, r"study.yaml: name: must be a non-empty name without '/'"),
        ({"name": None}, r"study.yaml: missing key name"),
    ],
)
def test_study_errors(study_dir, changes, message):
    with pytest.raises(StudyError, match=message):
        load_study(study_file(study_dir, **changes))


@pytest.mark.parametrize(
    "method_raw, message",
    [
        ({"method": "m", "fixed": {"loss.nme": "dpo"}}, r"m.yaml: fixed: .*unknown key loss.nme"),
        ({"method": "m", "space": {"loss.beta": {"grid": [0.1, -1.0]}}}, r"space.loss.beta: value -1.0: .*must be > 0"),
        ({"method": "m", "space": {"loss.betta": {"grid": [0.1]}}}, r"m.yaml: space.loss.betta: .*unknown key"),
        ({"method": "m", "space": {"loss.beta": {"gird": [0.1]}}}, r"m.yaml: space.loss.beta: unknown kind"),
        ({"method": "m", "space": {"loss.beta": {"grid": []}}}, r"m.yaml: space.loss.beta: grid needs a non-empty"),
        ({"method": "m", "space": {"loss.beta": {"grid": [0.1, 0.1]}}}, r"lists a value twice"),
        ({"method": "m", "space": {"loss.beta": [0.1, 0.2]}}, r"m.yaml: space.loss.beta: expected one of"),
        ({"method": "m", "space": {"optimizer.lr": {"loguniform": [0, 1.0e-5]}}}, r"loguniform needs low > 0"),
        ({"method": "m", "space": {"optimizer.lr": {"uniform": [2.0e-5, 1.0e-5]}}}, r"uniform needs \[low, high\]"),
        ({"method": "m", "space": {"optimizer.lr": {"uniform": [1.0e-5]}}}, r"uniform needs \[low, high\]"),
        ({"method": "m", "fixed": {"loss.beta": 0.1}, "space": {"loss.beta": {"grid": [0.2]}}}, r"also set in fixed"),
        ({"method": "m", "fixed": {"train.seed": 3}}, r"m.yaml: train.seed: seeds belong to the study"),
        ({"method": "m", "sapce": {}}, r"m.yaml: unknown key sapce"),
        ({"fixed": {}}, r"m.yaml: method: expected the method's name"),
        ({"method": "m", "num_samples": 0}, r"m.yaml: num_samples"),
    ],
)
def test_method_errors(tmp_path, method_raw, message):
    path = write(tmp_path / "m.yaml", method_raw)
    with pytest.raises(StudyError, match=message):
        load_method(path)


def test_study_error_for_a_bad_method_file_names_both_files(study_dir):
    write(study_dir / "m_bad.yaml", {"method": "m_bad", "fixed": {"optimizer.lr": -1.0}})
    with pytest.raises(StudyError, match=r"study.yaml: methods\[0\]: .*m_bad.yaml: fixed: .*optimizer.lr: must be > 0"):
        load_study(study_file(study_dir, methods=["m_bad"]))


def test_space_values_are_checked_in_context(study_dir):
    # A value that is valid alone but not with the rest of the config (one loss, two weights) fails,
    # and a file that is not YAML says so.
    write(study_dir / "broken.yaml", "method: [unclosed\n")
    with pytest.raises(StudyError, match=r"broken.yaml: not valid YAML"):
        load_method(study_dir / "broken.yaml")
    write(study_dir / "m_w.yaml", {"method": "m_w", "space": {"loss.weights": {"grid": [[1.0, 2.0]]}}})
    with pytest.raises(StudyError, match=r"loss.weights: 2 weights for 1 losses"):
        load_study(study_file(study_dir, methods=["m_w"]))


def test_exponent_without_dot_is_a_number(tmp_path):
    path = write(
        tmp_path / "m.yaml",
        "method: m\nfixed: {loss.name: simpo, loss.options.gamma: 5e-1}\n"
        "space:\n  optimizer.lr: {grid: [3e-7, 1e-6]}\n  loss.beta: {loguniform: [1e-2, 1e+1]}\n",
    )
    method = load_method(path)
    assert method.fixed["loss.options.gamma"] == 0.5
    assert method.space["optimizer.lr"].values == (3e-7, 1e-6)
    assert method.space["loss.beta"].values == (0.01, 10.0)
