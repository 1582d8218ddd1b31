"""What the code itself promises about loading untrusted files: read from the source, so a new
loader that forgets the promise fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from po_ray.config import Config

PACKAGE = Path(__file__).resolve().parent.parent / "po_ray"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def calls(attr: str):
    """(file, line, call) for every call of ``<something>.<attr>(...)`` in the package."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
                yield path.relative_to(PACKAGE.parent), node.lineno, node


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_remote_code_is_off_by_default():
    assert Config().model.trust_remote_code is False


def test_torch_load_only_with_weights_only():
    found = list(calls("load"))
    torch_loads = [(f, n, c) for f, n, c in found if isinstance(c.func.value, ast.Name) and c.func.value.id == "torch"]
    assert torch_loads, "expected the checkpoint's RNG load"
    for path, line, call in torch_loads:
        value = keyword(call, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{line}: torch.load without weights_only=True"


@pytest.mark.parametrize("attr", ["from_pretrained"])
def test_hub_loads_never_hard_code_remote_code_and_weights_are_safetensors(attr):
    for path, line, call in calls(attr):
        remote = keyword(call, "trust_remote_code")
        # Either not passed (False) or passed through from the config, never a literal True.
        assert not (isinstance(remote, ast.Constant) and remote.value is True), f"{path}:{line}: trust_remote_code=True"
        loader = call.func.value.id if isinstance(call.func.value, ast.Name) else ""
        if loader.startswith("AutoModel"):
            safetensors = keyword(call, "use_safetensors")
            assert isinstance(safetensors, ast.Constant) and safetensors.value is True, (
                f"{path}:{line}: model weights must load with use_safetensors=True (no pickle)")
