"""What training produced, as one results file: each checkpoint's data, size, test metrics and time.

  python -m scripts.report --output bench/results/training-<date>.json
  python -m scripts.report --checkpoints /tmp/run --models transformer

Everything comes from what the checkpoints store (data split sizes, training arguments and wall
time, validation and test metrics) and, when the archives are built, from model-store/manifest.json
(archive and checkpoint sizes), so the figures docs/training.md quotes trace to a file. For the
translator it adds real output: the first test pairs of at most 14 words per side, beside their
references, decoded in process as a worker does (beam 5).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from handlers import checkpoint

from . import registry
from .common import ROOT, CLIError, run_cli


def summary(path: Path) -> dict:
    ck = checkpoint.load(path)
    network = checkpoint.rebuild(ck)
    args = ck.get("train_args", {})
    return {
        "checkpoint": str(path),
        "task": ck["task"],
        "data": ck["data"]["name"],
        "split_sizes": ck["data"]["sizes"],
        "parameters": sum(p.numel() for p in network.parameters()),  # a tied matrix once, buffers not
        "primary_metric": ck["metrics"].get("primary"),
        "val": ck["metrics"]["val"],
        "test": ck["metrics"]["test"],
        "best_epoch": ck.get("epoch"),
        "epochs": args.get("epochs"),
        "quick": args.get("quick"),
        "device": args.get("device"),
        "wall_seconds": args.get("wall_seconds"),
        "git_commit": ck.get("git_commit"),
        "created_at": dt.datetime.fromtimestamp(ck["created_at"], dt.UTC).isoformat(timespec="seconds"),
        "checkpoint_bytes": path.stat().st_size,
    }


SAMPLES, SAMPLE_WORDS, SAMPLE_BEAM = 8, 14, 5
OUTSIDE = ["The Lord is my shepherd.", "God is love.", "Jesus wept."]  # not in the data, greedy as served


def samples(model: str, path: Path) -> list[dict]:
    """The translator's answers to the first short test pairs (beam 5), beside their references, and
    to a few sentences from outside the data (greedy, the serving default)."""
    from .inprocess import load_handler, run_batch

    sources, targets = registry.load_dataset(model).take("test")
    pairs = [
        (s, t) for s, t in zip(sources, targets, strict=True) if max(len(s.split()), len(t.split())) <= SAMPLE_WORDS
    ]
    handler, ctx = load_handler(model, path)
    out = []
    for source, reference in [*pairs[:SAMPLES], *((s, None) for s in OUTSIDE)]:
        beam = SAMPLE_BEAM if reference else 1
        body = json.dumps({"text": source, "beam": beam}).encode()
        [answer], _, _ = run_batch(handler, ctx, [{"body": body}])
        out.append({"source": source, "reference": reference, "beam": beam, "model": answer["translation"]})
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=registry.names(), choices=registry.names())
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints", help="<dir>/<model>/checkpoint.pt")
    p.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH", help="one model's own path")
    p.add_argument("--manifest", type=Path, default=ROOT / "model-store" / "manifest.json")
    p.add_argument("--output", type=Path, help="write the JSON here (default: print it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    paths = {m: args.checkpoints / m / "checkpoint.pt" for m in args.models}
    for item in args.checkpoint:
        model, _, path = item.partition("=")
        if model not in paths or not path:
            raise CLIError(f"--checkpoint {item!r}: want MODEL=PATH for one of {', '.join(args.models)}")
        paths[model] = Path(path)
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise CLIError(f"no checkpoint at {', '.join(missing)}; train first (make train MODEL=...)")
    archives = json.loads(args.manifest.read_text())["archives"] if args.manifest.is_file() else {}
    out = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "models": {}}
    for model, path in paths.items():
        out["models"][model] = summary(path)
        if out["models"][model]["task"] == "translation":
            out["models"][model]["samples"] = samples(model, path)
        archive = archives.get(model)
        if archive and archive["checkpoint_size"] == out["models"][model]["checkpoint_bytes"]:
            out["models"][model]["archive_bytes"] = archive["size"]
    text = json.dumps(out, indent=1) + "\n"
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(f"report: {', '.join(paths)} -> {args.output}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("report", main))
