"""Shared fixtures: ``local_hub``, a Hub-compatible server on 127.0.0.1 for the Hub round-trip tests,
``fresh_accelerate_state`` for in-process training runs, and ``attributes_file`` for their tiny attribute banks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Under pytest-xdist (the README's `-n 2`), each worker and the processes its tests start take their share of the
# cores: two workers of two threads each on two cores contend, and torch's kernels then run several times slower.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    os.environ.setdefault("MKL_NUM_THREADS", _threads)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory):
    """A :class:`hub_server.LocalHub` (file-backed, temporary folder), running for the whole session.

    ``local_hub.url`` is its endpoint; ``local_hub.env()`` the environment for a subprocess that pushes to or
    pulls from it (HF_ENDPOINT, HF_HUB_DISABLE_XET, HF_TOKEN set; the offline switches removed).
    """
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from hub_server import LocalHub

    hub = LocalHub(tmp_path_factory.mktemp("hub")).start()
    yield hub
    hub.stop()


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator: forget the previous run's singleton state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def attributes_file(tmp_path):
    """``test_train.ATTRIBUTES`` (the tiny train.py runs' attribute banks) as a YAML file; returns its path."""
    import yaml
    from test_train import ATTRIBUTES

    path = tmp_path / "attributes.yaml"
    path.write_text(yaml.safe_dump(ATTRIBUTES), encoding="utf-8")
    return str(path)
