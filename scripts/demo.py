"""The main job end to end on the bundled data: verify data -> train (quick) -> report.

  python -m scripts.demo              # reuse checkpoints/<model>/checkpoint.pt when present
  python -m scripts.demo --retrain    # train every model again with --quick first
"""
from __future__ import annotations

import argparse
import sys

from .common import ROOT, run_cli
from . import data, train

MODELS = ("cnn", "lstm", "transformer")


def checkpoint_path(model: str):
    return ROOT / "checkpoints" / model / "checkpoint.pt"


def ensure_checkpoint(model: str, retrain: bool = False) -> None:
    """Train with --quick when the checkpoint is missing (or when asked to)."""
    if retrain or not checkpoint_path(model).is_file():
        train.main(["--model", model, "--quick", "--no-progress"])


def report(models=MODELS) -> str:
    rows = ["| model | data | test metrics | best epoch | parameters file |", "|---|---|---|---|---|"]
    for m in models:
        ckpt = train.load_checkpoint(checkpoint_path(m))
        test = ", ".join(f"{k} {v:.4f}" for k, v in ckpt["metrics"]["test"].items())
        rows.append(f"| {m} | {ckpt['data']['name']} | {test} | {ckpt['epoch']} | "
                    f"{checkpoint_path(m).relative_to(ROOT)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retrain", action="store_true", help="train again even when checkpoints exist (default: off)")
    args = parser.parse_args(argv)
    print("== data"); data.main([])
    for m in MODELS:
        print(f"== train {m}"); ensure_checkpoint(m, args.retrain)
    print("== report"); print(report())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("demo", main))
