"""The main job end to end on the bundled data, after `make archive` (see `make demo`):

report the checkpoints -> start TorchServe -> one REST and one gRPC prediction per model -> stop

python -m scripts.demo                 # default ports (TS_*_PORT to change), run dir run/demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import registry, serve
from .client import Client, Settings
from .common import ROOT, run_cli
from .registry import sample_inputs


def report(store=ROOT / "model-store") -> str:
    """The archived models' test metrics and sizes, from model-store/manifest.json."""
    archives = json.loads((store / "manifest.json").read_text())["archives"]
    rows = ["| model | test metrics | archive | checkpoint |", "|---|---|---|---|"]
    for m, e in archives.items():
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in e["metrics"].items())
        rows.append(f"| {m} | {metrics} | {e['size'] / 1e6:.2f} MB | {e['checkpoint_size'] / 1e6:.2f} MB |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run-dir", default=str(ROOT / "run" / "demo"), help="server run directory (default: run/demo)"
    )
    args = parser.parse_args(argv)
    print("== archived models\n" + report())
    cfg = serve.ServerConfig(run_dir=ROOT / args.run_dir, models=registry.names())
    t0 = time.monotonic()
    print("== serve")
    serve.start(cfg)
    try:
        print(
            f"TorchServe ready in {time.monotonic() - t0:.1f}s: REST {cfg.url('inference')}, "
            f"gRPC {cfg.host}:{cfg.ports['grpc_inference']}, token auth on"
        )
        settings = Settings(host=cfg.host, ports=dict(cfg.ports), key_file=cfg.key_file)
        inputs = sample_inputs()
        for transport in ("rest", "grpc"):
            with Client(transport, settings) as c:
                for model, (what, payload) in inputs.items():
                    answer = c.predict(model, payload)
                    print(f"== {transport:4s} {model:12s} {what}\n   -> {json.dumps(answer, ensure_ascii=False)}")
    finally:
        serve.stop(cfg)
        print("== stopped")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("demo", main))
