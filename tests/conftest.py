"""Test-wide settings: offline Hub, strict plugin loading, threads matched to cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COMPATZOO_STRICT_PLUGINS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see compatzoo/cli.py

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Each test sees the installed plugins, not registrations made by another test."""
    from compatzoo.registry import reset_registry

    reset_registry()
    yield
    reset_registry()
