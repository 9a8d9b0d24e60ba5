"""Tasks for the checking processes in test_upload_limits, in a module that imports nothing heavy."""

from __future__ import annotations

import os

import numpy as np

_kept: list[np.ndarray] = []


def keep_megabytes(mb: int) -> int:
    """A check that leaves memory behind (a module global), so its process must be replaced."""
    _kept.append(np.ones(mb * 2**20, np.uint8))
    return os.getpid()
