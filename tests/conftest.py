"""Shared fixtures. Tests run on 2 loaded cores: one torch thread keeps them fast and repeatable."""

from __future__ import annotations

import os
import shutil

import psutil
import pytest
import torch

from scripts import registry, serve
from tests.helpers import make, server_config, tiny_train

# tests/e2e needs the real cluster that `make e2e-k8s` starts (k8s/cluster/e2e.sh sets this).
collect_ignore = [] if os.environ.get("E2E_CLUSTER_SCRIPT") else ["e2e"]

# A test that uses one of these runs the real archiver or a real TorchServe: the `slow` tier.
SLOW_FIXTURES = {"archive_store", "server", "source", "https_source"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict:
    """One tiny trained checkpoint per model, shared by the tests that only read them."""
    root = tmp_path_factory.mktemp("ckpt")
    return {m: root / m / "checkpoint.pt" for m in registry.names() if tiny_train(m, root / m) is not None}


# ----------------------------------------------------------------------------- archives


@pytest.fixture(scope="session")
def archive_store(tiny_checkpoints, tmp_path_factory):
    """`make archive` (the real torch-model-archiver) over copies of the tiny checkpoints.

    Returns (checkpoint dir, store dir)."""
    root = tmp_path_factory.mktemp("archive")
    ckpts, store = root / "checkpoints", root / "store"
    for model, path in tiny_checkpoints.items():
        (ckpts / model).mkdir(parents=True)
        shutil.copy(path, ckpts / model / "checkpoint.pt")
    proc = make("archive", f"CHECKPOINT_DIR={ckpts}", f"STORE={store}")
    assert proc.returncode == 0, proc.stderr
    return ckpts, store


# ----------------------------------------------------------------------------- a real TorchServe


@pytest.fixture(scope="session")
def server(archive_store, tmp_path_factory):
    _, store = archive_store
    cfg = server_config(tmp_path_factory.mktemp("run"), store)
    serve.start(cfg)
    pid = serve.running_pid(cfg)
    procs = serve.server_processes(pid)
    yield cfg
    assert serve.stop(cfg)
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "TorchServe left processes"
