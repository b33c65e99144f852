"""The models this project trains, archives, serves and measures: one entry each.

Everything else loops over ``REGISTRY``: training (task, data, defaults), the archiver (handler),
the in-process harness, the bench, the soak, the demo and the tests. Adding a model means a
network in ``models/``, a handler in ``handlers/`` (or an existing one, for a task it serves), a
TorchServe model config ``handlers/config/<name>.yaml`` and one entry below (README, "Adding your
own model").

  python -m scripts.registry          # the registered model names, one line
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from models.cnn import CNNClassifier
from models.lstm import LSTMClassifier
from models.transformer import Translator

from . import data
from .common import ROOT, CLIError
from .tasks import ImageTask, Task, TextTask, TranslationTask


@dataclass(frozen=True)
class ModelEntry:
    name: str  # what it is trained, archived and served as (checkpoints/<name>, <name>.mar, /predictions/<name>)
    network: type[nn.Module]  # a models/ class with a config_cls dataclass
    task: type[Task]  # data, config fields, batching, loss and metrics (scripts/tasks.py)
    handler: str  # "handlers.<module>:<Class>", serving the task
    dataset: str  # the bundled dataset it trains on by default (a key of scripts/data.py PINNED)
    train: dict = field(default_factory=dict)  # full-run defaults for train's flags (epochs, batch_size, lr)
    train_cuda: dict = field(default_factory=dict)  # what differs from ``train`` when training on a GPU
    quick: dict = field(default_factory=dict)  # the --quick preset: seconds-long runs for demos and archives
    demo: tuple[str, object] | None = None  # (description, payload) `make demo` sends; default a test input
    cost: float = 1.0  # worker time per request, relative; the soak sends this model 1/cost as many
    aoti: str | None = None  # why an AOTInductor variant can't serve it; None: it can

    @property
    def config_path(self) -> Path:
        """The TorchServe model config that travels inside the archive."""
        return ROOT / "handlers" / "config" / f"{self.name}.yaml"

    def model_config(self) -> dict:
        """Its TorchServe model config, as read from ``config_path`` (a fresh dict each call)."""
        import yaml

        return yaml.safe_load(self.config_path.read_text())

    @property
    def batch_size(self) -> int:
        """The TorchServe batch size its model config sets."""
        return int(self.model_config()["batchSize"])

    @property
    def handler_file(self) -> Path:
        return ROOT / (self.handler.partition(":")[0].replace(".", "/") + ".py")

    def handler_class(self) -> type:
        module, _, cls = self.handler.partition(":")
        return getattr(importlib.import_module(module), cls)


REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in [
        ModelEntry(
            name="cnn",
            network=CNNClassifier,
            task=ImageTask,
            handler="handlers.image_classifier:ImageClassifierHandler",
            dataset="mnist",
            train=dict(epochs=10, batch_size=64, lr=2e-3),
            quick=dict(epochs=2, limit=2000),
        ),
        ModelEntry(
            name="lstm",
            network=LSTMClassifier,
            task=TextTask,
            handler="handlers.text_classifier:TextClassifierHandler",
            dataset="rotten_tomatoes",
            train=dict(epochs=6, batch_size=64, lr=2e-3),
            quick=dict(epochs=2, limit=4000),
            demo=("'A gripping, beautifully acted film.'", {"text": "A gripping, beautifully acted film."}),
            aoti="does not export (packed sequences)",
        ),
        ModelEntry(
            name="transformer",
            network=Translator,
            task=TranslationTask,
            handler="handlers.translator:TranslatorHandler",
            dataset="en_es_bible",
            # Sized for 2 CPU cores: about 25 minutes. A GPU affords many more epochs of larger batches.
            train=dict(epochs=4, batch_size=256, batch_tokens=4000, lr=1e-3),
            train_cuda=dict(epochs=40, batch_tokens=6000),
            # --quick: a quarter-size network on the shorter pairs, about 2 minutes on 2 CPU cores. It
            # writes Spanish (Bible register, no <unk>) but does not yet translate; the full run does.
            quick=dict(
                epochs=6,
                limit=16000,
                max_tokens=32,
                vocab_size=2000,
                batch_tokens=2000,
                lr=3e-3,
                bleu_samples=100,
                eval_beam=1,
                set=["d_model=128"],
            ),
            demo=(
                "'In the beginning God created the heavens and the earth.'",
                {"text": "In the beginning God created the heavens and the earth."},
            ),
            cost=4.5,
            aoti="decodes step by step",
        ),
    ]
}


def get(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise CLIError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}") from None


def names() -> list[str]:
    return list(REGISTRY)


def load_checkpoint(path: str | Path, model: str | None = None) -> dict:
    """handlers.checkpoint.load, with its error (or a checkpoint of another model) as a one-line CLIError."""
    from handlers import checkpoint

    try:
        ckpt = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise CLIError(str(e)) from None
    if model is not None and ckpt["model_name"] != model:
        raise CLIError(f"{path}: holds model {ckpt['model_name']!r}, not {model!r}")
    return ckpt


# ----------------------------------------------------------------------------- a model's data


def load_dataset(model: str, path: str | None = None, *, seed: int = 0, limit: int | None = None) -> data.Dataset:
    """The dataset ``model`` trains on: its bundled one when ``path`` is None, else the user's file
    or folder, read as the model's task's kind of data."""
    entry = get(model)
    return data.load(entry.dataset, entry.task.data_kind, path, seed=seed, limit=limit)


def request_inputs(model: str, n: int) -> list:
    """Up to ``n`` inputs from the model's held-out test split, as a client sends them."""
    return get(model).task.request_inputs(load_dataset(model), n)


def sample_inputs(models: list[str] | None = None) -> dict:
    """model -> (what it is, payload): each entry's demo input, else its first test input."""
    out = {}
    for name in models if models is not None else names():
        entry = get(name)
        if entry.demo:
            out[name] = entry.demo
        else:
            payload = request_inputs(name, 1)[0]
            out[name] = (f"a test-split input of {name} ({type(payload).__name__})", payload)
    return out


if __name__ == "__main__":
    print(" ".join(names()))
    sys.exit(0)
