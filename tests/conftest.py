"""Shared fixtures. Tests run on 2 loaded cores: one torch thread keeps them fast and repeatable."""
from __future__ import annotations

import io
import os
import shutil
import subprocess

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from scripts import serve, train
from scripts.client import Settings
from scripts.inprocess import load_handler, make_context, run_batch  # noqa: F401 (re-exported for tests)
from scripts.serve import free_ports  # noqa: F401 (re-exported for tests)


# tests/e2e needs the real cluster that `make e2e-k8s` starts (k8s/cluster/e2e.sh sets this).
collect_ignore = [] if os.environ.get("E2E_CLUSTER_SCRIPT") else ["e2e"]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)
    yield


def png(pixels: np.ndarray, mode: str = "L") -> bytes:
    """An image as PNG bytes, the way a client sends it."""
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def tiny_train(model: str, out, *extra: str) -> dict:
    """Train a tiny configuration (1 epoch on a subset, 1 thread) and return the saved checkpoint."""
    limit = {"cnn": "300", "lstm": "400", "transformer": "1500"}[model]
    argv = ["--model", model, "--epochs", "1", "--limit", limit, "--threads", "1", "--no-progress",
            "--no-tensorboard", "--output-dir", str(out), "--bleu-samples", "20", *extra]
    assert train.main(argv) == 0
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict:
    """One tiny trained checkpoint per model, shared by the tests that only read them."""
    root = tmp_path_factory.mktemp("ckpt")
    return {m: root / m / "checkpoint.pt" for m in ("cnn", "lstm", "transformer")
            if tiny_train(m, root / m) is not None}


# ----------------------------------------------------------------------------- archives

def make(*args, **kw) -> subprocess.CompletedProcess:
    from scripts.common import ROOT

    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, **kw)


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

def server_config(run_dir, store, auth=True, models=None) -> serve.ServerConfig:
    return serve.ServerConfig(run_dir=run_dir, model_store=store, ports=dict(zip(serve.PORTS, free_ports(5))),
                              auth=auth, models=models)


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


def settings(cfg: serve.ServerConfig, **kw) -> Settings:
    return Settings(host=cfg.host, ports=dict(cfg.ports), timeout=kw.pop("timeout", 30), key_file=cfg.key_file, **kw)
