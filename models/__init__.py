"""Model registry: a checkpoint names its model, and the registry rebuilds it from the stored config.

Everything in this package is pure: no file or network I/O, no device choice, no argparse.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from torch import nn

from .cnn import CNNClassifier, CNNConfig
from .lstm import LSTMClassifier, LSTMConfig
from .transformer import TransformerConfig, Translator


class ModelSpec(NamedTuple):
    cls: type[nn.Module]
    config_cls: type
    task: str  # "image-classification" | "text-classification" | "translation"


REGISTRY: dict[str, ModelSpec] = {
    "cnn": ModelSpec(CNNClassifier, CNNConfig, "image-classification"),
    "lstm": ModelSpec(LSTMClassifier, LSTMConfig, "text-classification"),
    "transformer": ModelSpec(Translator, TransformerConfig, "translation"),
}


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}") from None


def config_from_dict(name: str, values: dict[str, Any]):
    """Rebuild a config dataclass, restoring tuples that were stored as lists, rejecting unknown keys."""
    config_cls = get_spec(name).config_cls
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{name} config has unknown keys: {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return config_cls(**kwargs)


def config_to_dict(config) -> dict[str, Any]:
    """Plain types only (tuples become lists) so the checkpoint loads with weights_only=True."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def build_model(name: str, config: dict[str, Any]) -> nn.Module:
    return get_spec(name).cls(config_from_dict(name, config))
