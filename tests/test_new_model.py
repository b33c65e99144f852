"""A fourth model added the way README's "Adding your own model" says: a network, a handler, a
TorchServe model config and one registry entry, nothing else. In a copy of the project it is then
trained, archived by the real archiver and served by a real TorchServe, and it answers."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from scripts import registry, serve
from scripts.client import Client
from scripts.common import ROOT
from scripts.registry import load_dataset
from tests.helpers import server_config, settings

pytestmark = pytest.mark.slow

NETWORK = '''
"""A two-layer perceptron over 28x28 images: the smallest image classifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MLPConfig:
    num_classes: int = 10
    image_size: int = 28
    hidden: int = 64


class MLPClassifier(nn.Module):
    config_cls = MLPConfig

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(config.image_size**2, config.hidden), nn.ReLU(), nn.Linear(config.hidden, config.num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
'''

HANDLER = '''
"""The MLP digit classifier: the image classifier's data path, answering with the top label only."""

from handlers.image_classifier import ImageClassifierHandler


class MLPDigitsHandler(ImageClassifierHandler):
    defaults = {**ImageClassifierHandler.defaults, "topk": 1}
'''

CONFIG = """
minWorkers: 1
maxWorkers: 1
batchSize: 4
maxBatchDelay: 5
responseTimeout: 30
handler:
  threads: 1
"""

ENTRY = """
        ModelEntry(
            name="mlp",
            network=MLPClassifier,
            task=ImageTask,
            handler="handlers.mlp_digits:MLPDigitsHandler",
            dataset="mnist",
            train=dict(epochs=3, batch_size=64, lr=3e-3),
            quick=dict(epochs=1, limit=1000),
        ),
"""


def copy_project(dest: Path) -> Path:
    """The project's files (tracked, and new ones not ignored), as a user's checkout would hold them."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def add_model(project: Path) -> None:
    """The four places, and only those."""
    (project / "models" / "mlp.py").write_text(NETWORK.lstrip())
    (project / "handlers" / "mlp_digits.py").write_text(HANDLER.lstrip())
    (project / "handlers" / "config" / "mlp.yaml").write_text(CONFIG.lstrip())
    reg = project / "scripts" / "registry.py"
    text = reg.read_text()
    end = "\n    ]\n}\n"  # the close of REGISTRY's list of entries
    assert text.count(end) == 1, "scripts/registry.py: REGISTRY's list no longer ends as this test expects"
    text = text.replace(end, "\n" + textwrap.indent(textwrap.dedent(ENTRY).strip(), " " * 8) + end)
    text = text.replace(
        "from models.cnn import CNNClassifier\n",
        "from models.cnn import CNNClassifier\nfrom models.mlp import MLPClassifier\n",
    )
    reg.write_text(text)


def run(project: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=project, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr[-3000:]}"
    return proc.stdout


def test_a_fourth_model_trains_archives_and_serves_from_its_four_places(tmp_path):
    project = copy_project(tmp_path / "project")
    add_model(project)
    changed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "models/mlp.py" not in changed  # it exists only in the copy

    assert run(project, "scripts.registry").split() == [*registry.names(), "mlp"]
    out = run(
        project,
        "scripts.train",
        "--model",
        "mlp",
        "--quick",
        "--threads",
        "1",
        "--no-progress",
        "--no-tensorboard",
    )
    assert "train mlp:" in out and "test accuracy" in out
    out = run(project, "scripts.archive", "build", "--model", "mlp")
    mar = project / "model-store" / "mlp.mar"
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    assert {"models/mlp.py", "handlers/mlp_digits.py", "mlp_digits.py", "mlp.yaml", "checkpoint.pt"} <= names
    assert manifest["model"]["modelName"] == "mlp"

    cfg = server_config(tmp_path / "run", project / "model-store", models=["mlp"])
    serve.start(cfg)
    try:
        x, y = load_dataset("cnn").take("test")
        buf = io.BytesIO()
        Image.fromarray(x[0]).save(buf, format="PNG")
        for transport in ("rest", "grpc"):
            with Client(transport, settings(cfg)) as c:
                answer = c.predict("mlp", buf.getvalue())
            # The new handler's own default: the top label only.
            assert len(answer) == 1 and list(answer)[0] in [str(i) for i in range(10)], answer
    finally:
        assert serve.stop(cfg)
