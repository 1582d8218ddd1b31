import pytest

from po_ray.config import Config, ConfigError, field_docs, flatten, load_config, to_dict


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_then_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "c.yaml", "loss: {beta: 0.2}\ntrain: {max_steps: 7}\n")
    cfg = load_config(p, ["loss.beta=0.05", "loss.options.label_smoothing=0.1", "optimizer.betas=[0.8, 0.9]"])
    assert cfg.loss.beta == 0.05 and cfg.train.max_steps == 7
    assert cfg.loss.options == {"label_smoothing": 0.1}
    assert cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.train.seed == Config().train.seed
    with pytest.raises(Exception):
        cfg.loss.beta = 1.0  # frozen


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.bet=1", "unknown key loss.bet"),
        ("los.beta=1", "unknown key los"),
        ("loss.beta=0", "loss.beta: must be > 0"),
        ("train.max_steps=abc", "train.max_steps: expected int"),
        ("train.max_steps=1.5", "train.max_steps: expected int"),
        ("model.trust_remote_code=1", "model.trust_remote_code: expected bool"),
        ("reference.strategy=live", "reference.strategy: 'live' is not one of"),
        ("data.eval_fraction=1.0", "data.eval_fraction: must be in [0, 1)"),
        ("early_stopping.drop_fraction=0", "early_stopping.drop_fraction"),
        ("loss.weights=[1, 2]", "loss.weights: 2 weights for 1 losses"),
        ("nonsense", "expected key=value"),
    ],
)
def test_bad_values_name_the_key_and_file(tmp_path, override, message):
    p = write(tmp_path, "c.yaml", "train: {max_steps: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, [override])
    assert message in str(e.value)
    if "expected key=value" not in message:
        assert str(p) in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "bad.yaml", "loss: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "list.yaml", "- 1\n"))


def test_extends_merges_key_by_key_and_detects_cycles(tmp_path):
    write(tmp_path, "base.yaml", "loss: {name: ipo, beta: 0.5}\ntrain: {max_steps: 9, seed: 3}\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nloss: {beta: 0.25}\n")
    cfg = load_config(child)
    assert (cfg.loss.name, cfg.loss.beta, cfg.train.max_steps, cfg.train.seed) == ("ipo", 0.25, 9, 3)
    shipped = load_config(write(tmp_path, "s.yaml", "extends: demo\nrun: {name: x}\n"))
    assert shipped.model.name_or_path == "tiny-llama" and shipped.run.name == "x"
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="no shipped config"):
        load_config(write(tmp_path, "m.yaml", "extends: nowhere\n"))


def test_every_field_is_documented():
    docs = field_docs()
    keys = set(flatten(to_dict(Config())))
    # dict-valued fields with empty defaults flatten to their own key
    assert keys <= set(docs), sorted(keys - set(docs))
    assert all(docs.values())


def test_docs_config_md_lists_every_key():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    missing = [k for k in field_docs() if f"`{k}`" not in text]
    assert not missing, f"docs/config.md is stale; regenerate with `po-ray config-keys --markdown`: {missing}"
