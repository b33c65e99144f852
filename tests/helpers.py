"""Helpers the tests share: inputs as clients send them, tiny training, `make`, server settings.

Fixtures live in conftest.py; everything a test imports comes from here."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import torch
from PIL import Image

from scripts import serve, train
from scripts.client import Settings
from scripts.common import ROOT
from scripts.inprocess import load_handler, make_context, run_batch  # noqa: F401 (re-exported for tests)
from scripts.serve import free_ports  # noqa: F401 (re-exported for tests)


def png(pixels: np.ndarray, mode: str = "L") -> bytes:
    """An image as PNG bytes, the way a client sends it."""
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def tiny_train(model: str, out, *extra: str) -> dict:
    """Train a tiny configuration (1 epoch on a subset, 1 thread) and return the saved checkpoint."""
    limit = {"transformer": "1500"}.get(model, "400")
    # A small subword vocabulary, short pairs and greedy-only test decoding keep the translator tiny.
    small = {
        "transformer": ["--max-tokens", "48", "--vocab-size", "500", "--eval-beam", "1", "--set", "d_model=64"]
    }.get(model, [])
    argv = [
        "--model",
        model,
        "--epochs",
        "1",
        "--limit",
        limit,
        "--threads",
        "1",
        "--no-progress",
        "--no-tensorboard",
        "--output-dir",
        str(out),
        "--bleu-samples",
        "20",
        *small,
        *extra,
    ]
    assert train.main(argv) == 0
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


def make(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, **kw
    )


def server_config(run_dir, store, auth=True, models=None) -> serve.ServerConfig:
    return serve.ServerConfig(
        run_dir=run_dir,
        model_store=store,
        ports=dict(zip(serve.PORTS, free_ports(5), strict=True)),
        auth=auth,
        models=models,
    )


def settings(cfg: serve.ServerConfig, **kw) -> Settings:
    return Settings(host=cfg.host, ports=dict(cfg.ports), timeout=kw.pop("timeout", 30), key_file=cfg.key_file, **kw)
