"""Every entry point under one command: ``python -m scripts <verb> [flags]``.

Each verb is a module of this package with its own ``--help``; ``python -m scripts.<module>``
runs the same code.
"""

from __future__ import annotations

import importlib
import sys

from .common import run_cli

VERBS = {
    "data": "verify and summarise the bundled datasets",
    "train": "train one model and write its checkpoint",
    "archive": "build or verify .mar archives",
    "serve": "start, stop or describe a local TorchServe",
    "client": "predict, describe or list over REST or gRPC",
    "demo": "serve the archives and call every model",
    "bench": "measure serving against the in-process limit",
    "limits": "the translator's work bounds, in process and served",
    "soak": "good and hostile requests, with a worker killed midway",
    "variants": "parity and speed of the optimised variants",
    "deploy": "apply the chart to a cluster, wait and smoke-test",
    "k8s": "offline checks of the chart and manifests",
    "k8s_tools": "install the pinned helm, kubectl and checkers",
    "pod": "the in-pod tool (fetch, serve, ready, drain, smoke)",
    "registry": "list the registered models",
    "report": "what training produced: data, size, test metrics, time",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        width = max(map(len, VERBS))
        lines = [f"  {verb:{width}s}  {what}" for verb, what in VERBS.items()]
        print("usage: python -m scripts <verb> [flags]   (<verb> --help for its flags)\n\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nscripts: error: unknown verb {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    verb, rest = argv[0], argv[1:]
    module = importlib.import_module(f"{__package__}.{verb}")
    if verb == "registry":
        print(" ".join(module.names()))
        return 0
    return run_cli(verb, module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
