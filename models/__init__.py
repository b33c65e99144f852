"""Networks: each a pure ``nn.Module`` built from its own config dataclass, named by ``config_cls``.

A checkpoint names its network by import path (``models.cnn:CNNClassifier``) and stores the config
as plain types; :func:`build_model` rebuilds it from those two. A new network is a module in this
package and nothing else here. Everything in this package is pure: no file or network I/O, no
device choice, no argparse.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from torch import nn


def network_path(cls: type[nn.Module]) -> str:
    """The name a checkpoint stores for a network class: ``models.<module>:<Class>``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_network(path: str) -> type[nn.Module]:
    """The network class a checkpoint names. Only classes of this package are accepted: a
    checkpoint is data, and must not choose which code runs."""
    module, _, name = path.partition(":")
    if not (module.startswith(f"{__name__}.") and module.count(".") == 1 and name.isidentifier()):
        raise ValueError(f"network {path!r}: not a class of the {__name__} package (models.<module>:<Class>)")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ValueError(f"network {path!r}: no such class") from None
    if not (
        isinstance(cls, type)
        and issubclass(cls, nn.Module)
        and dataclasses.is_dataclass(getattr(cls, "config_cls", None))
    ):
        raise ValueError(f"network {path!r}: not an nn.Module with a config_cls dataclass")
    return cls


def config_from_dict(config_cls: type, values: dict[str, Any]):
    """Rebuild a config dataclass, restoring tuples that were stored as lists, rejecting unknown keys."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(values) - fields
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no fields {sorted(unknown)}")
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def config_to_dict(config) -> dict[str, Any]:
    """Plain types only (tuples become lists) so the checkpoint loads with weights_only=True."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def build_model(network: str | type[nn.Module], config: dict[str, Any]) -> nn.Module:
    """The network (a class, or its path as a checkpoint stores it) built from a plain config."""
    cls = resolve_network(network) if isinstance(network, str) else network
    return cls(config_from_dict(cls.config_cls, config))
