"""A tiny seeded llama for the runner's engine-level tests."""

from __future__ import annotations

import pytest

from elasticserve.models.make_model import make_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model("llama", "tiny", str(tmp_path_factory.mktemp("worker") / "llama"), seed=0)
