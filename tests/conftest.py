"""Shared fixtures. Tests run on 2 loaded cores: one torch thread keeps them fast and repeatable."""
from __future__ import annotations

import pytest
import torch

from scripts import train


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
