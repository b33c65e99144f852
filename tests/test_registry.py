"""The registry is the one list of models: every entry is complete and consistent, and the other
lists (the Makefile's MODELS, the model configs) follow it."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import subprocess

import pytest
import yaml

from models import network_path, resolve_network
from scripts import data, registry, train
from scripts.common import ROOT, CLIError


@pytest.mark.parametrize("name", registry.names())
def test_every_entry_is_complete_and_consistent(name):
    entry = registry.get(name)
    assert entry.name == name
    # The network is one a checkpoint may name, with a config whose every field has a default.
    assert resolve_network(network_path(entry.network)) is entry.network
    assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(entry.network.config_cls))
    # The handler exists in the archive's packages and serves the entry's task.
    assert entry.handler_file.is_file() and entry.handler_file.parent == ROOT / "handlers"
    assert entry.handler_class().task == entry.task.name
    # TorchServe refuses a handler file that defines more than one class (imported ones are fine).
    module = importlib.import_module(entry.handler.partition(":")[0])
    own = [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__]
    assert own == [entry.handler_class()], own
    # A TorchServe model config, and a bundled dataset with a reader.
    assert isinstance(yaml.safe_load(entry.config_path.read_text())["batchSize"], int)
    assert entry.dataset in data.PINNED
    # Training defaults name real flags of scripts.train.
    flags = vars(train.get_args_parser().parse_args(["--model", name]))
    assert set(entry.train) | set(entry.quick) <= set(flags), set(entry.train) | set(entry.quick) - set(flags)


def test_model_configs_and_the_makefile_list_exactly_the_registered_models():
    configs = sorted(p.stem for p in (ROOT / "handlers" / "config").glob("*.yaml"))
    assert configs == sorted(registry.names())
    printed = subprocess.run(
        ["make", "--no-print-directory", "-s", "--eval", "print-models: ; @echo $(MODELS)", "print-models"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.stdout.split() == configs, printed.stderr


def test_an_unknown_model_is_named_with_the_known_ones():
    with pytest.raises(CLIError, match="unknown model 'resnet'; known models: cnn, lstm, transformer"):
        registry.get("resnet")


def test_one_command_runs_every_entry_point():
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "scripts", *args], cwd=ROOT, capture_output=True, text=True)

    assert run("registry").stdout.split() == registry.names()
    listed = run("--help")
    assert listed.returncode == 0 and all(f"  {verb}" in listed.stdout for verb in ("train", "archive", "deploy"))
    assert "usage: train" in run("train", "--help").stdout
    bad = run("nope")
    assert bad.returncode == 2 and "unknown verb 'nope'" in bad.stderr
