"""One 2-rank gloo run serves every Partial FC test that needs real processes."""
from __future__ import annotations

import pytest
import torch

from tests._launch import spawn
from tests.unit.face._workers import run_all


@pytest.fixture(scope="session")
def pfc2(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Per-rank results of ``tests.unit.face._workers.run_all`` on 2 gloo ranks."""
    out = tmp_path_factory.mktemp("pfc2")
    spawn(run_all, 2, str(out), timeout=180)
    # weights_only: a head's state dict must load with torch's safe unpickler
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
