import os

# Tests never reach a hub, and Ray/tokenizers stay quiet and single-host.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")


import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_zero3_leak_between_tests():
    """A test that builds a ZeRO-3 model leaves transformers' global "ZeRO-3 is on" switch set while the
    model lives; later tests that build plain models would then be partitioned. Reset it after each test."""
    yield
    module = sys.modules.get("transformers.integrations.deepspeed")
    if module is not None:
        module.unset_hf_deepspeed_config()
