"""Shared fixtures. Tests run on 2 loaded cores: one torch thread keeps them fast and repeatable."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess

import psutil
import pytest
import torch

from scripts import serve, train
from scripts.client import Settings


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)
    yield


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


# ----------------------------------------------------------------------------- handlers in-process

HANDLER_CLASSES = {
    "cnn": ("handlers.image_classifier", "ImageClassifierHandler"),
    "lstm": ("handlers.text_classifier", "TextClassifierHandler"),
    "transformer": ("handlers.translator", "TranslatorHandler"),
}


def make_context(model: str, model_dir, handler_overrides: dict | None = None, batch_size: int = 8):
    """TorchServe's own Context and RequestProcessor classes, as a worker builds them."""
    import yaml
    from ts.context import Context

    from scripts.common import ROOT

    config = yaml.safe_load((ROOT / "handlers" / "config" / f"{model}.yaml").read_text())
    config["handler"] = {**config.get("handler", {}), **(handler_overrides or {})}
    manifest = {"model": {"modelName": model, "serializedFile": "checkpoint.pt"}}
    ctx = Context(model, str(model_dir), manifest, batch_size, None, "0.12.0", model_yaml_config=config)
    return ctx


def run_batch(handler, ctx, requests: list[dict], request_headers: list[dict] | None = None):
    """Run one batch the way a worker does; returns (answers, [(status, phrase), ...], headers)."""
    from ts.context import RequestProcessor

    ctx.request_processor = [RequestProcessor(h) for h in (request_headers or [{} for _ in requests])]
    raw = handler.handle(requests, ctx)
    assert isinstance(raw, list) and len(raw) == len(requests)
    assert all(isinstance(r, bytes) for r in raw)  # UTF-8 JSON, serialised by the handler
    answers = [json.loads(r) for r in raw]
    statuses = [ctx.get_response_status(i) for i in range(len(requests))]
    headers = [ctx.get_response_headers(i) for i in range(len(requests))]
    return answers, statuses, headers


def load_handler(model: str, checkpoint_path, handler_overrides: dict | None = None):
    import importlib

    module, name = HANDLER_CLASSES[model]
    handler = getattr(importlib.import_module(module), name)()
    ctx = make_context(model, checkpoint_path.parent, handler_overrides)
    handler.initialize(ctx)
    return handler, ctx


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

def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


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
