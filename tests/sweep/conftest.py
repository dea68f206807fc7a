"""Fixtures of the sweep tests: the rings task with hooks, in the test's folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import HOOKED_TASK


@pytest.fixture
def hooked(tmp_path: Path) -> str:
    """`hooked.py:task` in the test's folder: the rings task with the hooks of HOOKED_TASK."""
    (tmp_path / "hooked.py").write_text(HOOKED_TASK)
    return "hooked.py:task"
