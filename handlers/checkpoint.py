"""The checkpoint contract: its format, and how it is written, read and turned back into a model.

A checkpoint is a dict of tensors and plain types only, so it loads with ``weights_only=True``:
``format_version``, ``model_name`` (the name it is served under), ``network`` (its class, as
``models.<module>:<Class>``), ``task`` (what its handler must be able to serve), ``config`` (the
network's constructor config), ``state_dict``, plus what its task needs to serve (labels, vocabularies, preprocessing) and its provenance (data
fingerprint, versions, metrics). ``scripts/train.py`` writes it; the handlers (inside every
archive), the archiver, the variants tool and the tests read it, all through this module.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from models import build_model

FORMAT_VERSION = 2  # 2: the network is named by class path, no longer looked up by model name
REQUIRED = ("format_version", "model_name", "network", "task", "config", "state_dict")


class CheckpointError(ValueError):
    """A file that is not a loadable checkpoint of this format; the message is one line."""


def save(ckpt: dict, path: str | os.PathLike) -> None:
    """Write via a temporary file, prove the result loads with weights_only=True, then move it in place."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt, tmp)
    try:
        load(tmp)
    except Exception:
        tmp.unlink()
        raise
    os.replace(tmp, path)


def load(path: str | os.PathLike, task: str | None = None) -> dict:
    """Read a checkpoint safely (tensors and plain types only) and check its format (and task)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint written by scripts.train")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {ckpt['format_version']}, this code reads {FORMAT_VERSION} "
            "(train it again: python -m scripts.train)"
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint written by scripts.train (no {', '.join(missing)})")
    if task is not None and ckpt["task"] != task:
        raise CheckpointError(
            f"{path}: holds a {ckpt['task']} model ({ckpt['model_name']}), this handler serves {task}"
        )
    return ckpt


def rebuild(ckpt: dict, device: torch.device | str = "cpu") -> nn.Module:
    """The model the checkpoint describes, built from its own config, weights loaded, in eval mode."""
    try:
        model = build_model(ckpt["network"], ckpt["config"])
    except ValueError as e:
        raise CheckpointError(f"{ckpt['model_name']}: {e}") from None
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()
