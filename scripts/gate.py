"""The model-quality gate: is a new model version as good as the one it replaces?

Error rate and latency cannot tell: a model trained on shuffled labels answers 200, fast, and wrong.
The gate sends each model's held-out test examples straight to the canary's pods and to the stable
pods, scores both with the model's own test metric (accuracy, or corpus BLEU for the translator) and
fails when the canary scores below the stable by more than a tolerance.

  python -m scripts.gate export                          # every model's held-out set, into k8s/heldout/
  python -m scripts.gate compare --models cnn --selector app.kubernetes.io/instance=ts \\
      --canary-hash 5d8f --stable-hash 7b9c               # inside the cluster (an Argo Rollouts Job)
  python -m scripts.gate compare --models cnn --canary http://10.0.0.7:8080 --stable http://10.0.0.8:8080

``export`` writes, per model, the test split its checkpoint was scored on (the checkpoint's own
data, seed and limit): ``<model>.json`` with the inputs as a client sends them and the expected
answers. The serving image carries them (k8s/Dockerfile). ``compare`` finds the pods of each
version through the Kubernetes API (the pod's service account, ``pods: list``) by Argo Rollouts'
``rollouts-pod-template-hash`` label, or takes addresses; it prints one line per model with both
scores and exits 1 when a canary falls short, 2 when it cannot measure.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .client import Client, ClientError, Settings
from .common import ROOT, CLIError, run_cli

HELDOUT = ROOT / "k8s" / "heldout"  # build-image.sh writes it; the image has it at the same place
SA = Path("/var/run/secrets/kubernetes.io/serviceaccount")
HASH_LABEL = "rollouts-pod-template-hash"


# ----------------------------------------------------------------------------- the held-out sets


def export(models: list[str], out: Path, n: int, checkpoints: Path = ROOT / "checkpoints") -> list[Path]:
    """Write each model's held-out examples (the test split of checkpoints/<model>/checkpoint.pt, the
    first ``n``) to out/<model>.json."""
    import numpy as np

    from . import registry

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in models:
        entry = registry.get(name)
        ckpt = registry.load_checkpoint(checkpoints / name / "checkpoint.pt", name)
        a = ckpt["train_args"]
        ds = registry.load_dataset(name, a.get("data"), seed=a.get("seed", 0), limit=a.get("limit"))
        inputs = entry.task.request_inputs(ds, len(ds.splits["test"]))
        x, y = ds.take("test")
        if isinstance(y, np.ndarray):  # classifiers: the label names, which the handlers answer with
            expected = [ds.labels[int(i)] for i in y]
        else:  # translation: request_inputs keeps the short sources; their references, in order
            ref = dict(zip(x, y, strict=True))
            expected = [ref[s] for s in inputs]
        pairs = list(zip(inputs, expected, strict=True))[:n]
        doc = {
            "model": name,
            "metric": entry.task.score,
            "data": {"name": ds.name, "fingerprint": ds.fingerprint, "split": "test"},
            "examples": [
                {"base64": base64.b64encode(i).decode(), "expected": e}
                if isinstance(i, bytes)
                else {"text": i, "expected": e}
                for i, e in pairs
            ],
        }
        path = out / f"{name}.json"
        path.write_text(json.dumps(doc))
        written.append(path)
    return written


def load_heldout(folder: Path, model: str) -> dict:
    path = folder / f"{model}.json"
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise CLIError(f"{path}: {e.strerror}; run `python -m scripts.gate export` (make image does)") from None


# ----------------------------------------------------------------------------- scoring


def score(metric: str, answers: list, expected: list[str]) -> float:
    """The model's test metric over its answers: accuracy of the top label, or corpus BLEU (sacrebleu,
    lower-cased, as training reports it). A failed request (None) counts as wrong, or as an empty
    translation."""
    if metric == "accuracy":
        hits = sum(
            1 for a, e in zip(answers, expected, strict=True) if isinstance(a, dict) and a and next(iter(a)) == e
        )
        return hits / max(len(expected), 1)
    if metric == "bleu":
        import sacrebleu

        hyps = [a.get("translation", "") if isinstance(a, dict) else "" for a in answers]
        return sacrebleu.corpus_bleu(hyps, [expected], lowercase=True).score
    raise CLIError(f"no scoring for metric {metric!r}")


@dataclass
class Side:
    """One version's pods: what they answered, and how many requests failed."""

    urls: list[str]
    answers: list | None = None
    failed: int = 0
    first_error: str = ""


def ask(side: Side, model: str, examples: list[dict], timeout: float, threads: int = 4) -> None:
    """Send every example to the side's pods, spread over them in turn."""

    def one(i: int):
        url = urllib.parse.urlsplit(side.urls[i % len(side.urls)])
        settings = Settings(host=url.hostname, timeout=timeout)
        settings.ports["inference"] = url.port
        x = examples[i]
        payload = base64.b64decode(x["base64"]) if "base64" in x else x["text"]
        try:
            with Client(settings=settings) as c:
                return c.predict(model, payload), ""
        except ClientError as e:
            return None, str(e)

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, range(len(examples))))
    side.answers = [a for a, _ in results]
    side.failed = sum(1 for a, _ in results if a is None)
    side.first_error = next((e for _, e in results if e), "")


def verdict(metric: str, canary: float, stable: float, tolerance: float) -> bool:
    """True when the canary is at most ``tolerance`` below the stable (accuracy in [0, 1], BLEU points)."""
    return canary >= stable - tolerance


# ----------------------------------------------------------------------------- finding the pods


def pod_urls(namespace: str, selector: str, pod_hash: str, port: int) -> list[str]:
    """The inference addresses of the Ready pods matching ``selector`` with that pod-template hash,
    from the Kubernetes API with this pod's service-account token."""
    query = urllib.parse.urlencode({"labelSelector": f"{selector},{HASH_LABEL}={pod_hash}"})
    api = os.environ.get("KUBERNETES_SERVICE_HOST")
    if not api:
        raise CLIError("not in a pod (no KUBERNETES_SERVICE_HOST): give --canary and --stable addresses")
    req = urllib.request.Request(
        f"https://{api}:{os.environ.get('KUBERNETES_SERVICE_PORT', '443')}/api/v1/namespaces/{namespace}/pods?{query}",
        headers={"Authorization": f"Bearer {(SA / 'token').read_text().strip()}"},
    )
    ctx = ssl.create_default_context(cafile=str(SA / "ca.crt"))
    with urllib.request.urlopen(req, context=ctx, timeout=20) as r:
        return ready_urls(json.load(r)["items"], port)


def ready_urls(pods: list[dict], port: int) -> list[str]:
    """http://<pod IP>:<port> of each pod (as the API lists them) that is Ready and not going away."""
    urls = []
    for p in pods:
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        if ready and p["status"].get("podIP") and not p["metadata"].get("deletionTimestamp"):
            urls.append(f"http://{p['status']['podIP']}:{port}")
    return sorted(urls)


def unreachable(urls: list[str], within: float = 60.0, timeout: float = 5.0) -> list[str]:
    """The URLs whose TorchServe has not answered /ping within ``within`` seconds, tried every 2 s.

    A NetworkPolicy enforcer admits a new pod's packets a moment after it starts (kube-router
    refuses them until its next sync of the pod), so a first refusal is not the answer; past the
    bound the gate says so rather than waiting out every request's deadline."""
    deadline = time.monotonic() + within
    pending, why = list(urls), {}
    while pending:
        for url in list(pending):
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=timeout):
                    pending.remove(url)
            except urllib.error.HTTPError:
                pending.remove(url)  # it answered (401 where tokens are on)
            except (OSError, urllib.error.URLError) as e:
                why[url] = str(getattr(e, "reason", e))
        if pending and time.monotonic() > deadline:
            break
        if pending:
            time.sleep(2)
    return [f"{url} ({why[url]})" for url in pending]


# ----------------------------------------------------------------------------- the CLI


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.gate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write each model's held-out test examples")
    e.add_argument("--models", nargs="+", default=None, help="models (default: every registered model)")
    e.add_argument("--examples", type=int, default=400, help="examples per model (default: %(default)s)")
    e.add_argument("--out", type=Path, default=HELDOUT, help="folder (default: k8s/heldout/)")
    e.add_argument(
        "--checkpoints",
        type=Path,
        default=ROOT / "checkpoints",
        help="<model>/checkpoint.pt under it (default: checkpoints/)",
    )
    c = sub.add_parser("compare", help="score the canary's pods against the stable pods on the held-out set")
    c.add_argument("--models", nargs="+", required=True, help="the models the pods serve")
    c.add_argument("--heldout", type=Path, default=HELDOUT, help="the folder export wrote (default: k8s/heldout/)")
    c.add_argument("--examples", type=int, default=0, help="use the first N of each set (default: all)")
    where = c.add_argument_group("where the pods are: addresses, or the Kubernetes API")
    where.add_argument("--canary", nargs="+", default=None, help="the canary's inference URLs")
    where.add_argument("--stable", nargs="+", default=None, help="the stable version's inference URLs")
    where.add_argument("--namespace", default=None, help="the pods' namespace (default: this pod's)")
    where.add_argument("--selector", default="", help="label selector of the group's pods")
    where.add_argument("--canary-hash", default="", help="the canary's rollouts-pod-template-hash")
    where.add_argument("--stable-hash", default="", help="the stable version's rollouts-pod-template-hash")
    where.add_argument("--port", type=int, default=8080, help="the pods' inference port (default: %(default)s)")
    c.add_argument(
        "--tolerance",
        action="append",
        default=[],
        metavar="METRIC=DELTA",
        help="how far below the stable the canary may score: accuracy=0.02 (a fraction), bleu=2 (points); repeatable",
    )
    c.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: %(default)s)")
    c.add_argument(
        "--reach-within",
        type=float,
        default=60.0,
        help="seconds every pod has to answer /ping before the gate gives up, exit 2 (default: %(default)s)",
    )
    return p


def compare(args) -> int:
    tolerances = {"accuracy": 0.02, "bleu": 2.0}
    for t in args.tolerance:
        metric, _, value = t.partition("=")
        try:
            tolerances[metric] = float(value)
        except ValueError:
            raise CLIError(f"--tolerance {t!r}: expected METRIC=NUMBER") from None
    if args.canary and args.stable:
        canary_urls, stable_urls = args.canary, args.stable
    elif args.canary_hash and args.stable_hash:
        ns = args.namespace or (SA / "namespace").read_text().strip()
        canary_urls = pod_urls(ns, args.selector, args.canary_hash, args.port)
        stable_urls = pod_urls(ns, args.selector, args.stable_hash, args.port)
    else:
        raise CLIError("give --canary and --stable URLs, or --canary-hash and --stable-hash")
    if args.canary_hash and args.canary_hash == args.stable_hash:
        print("gate: the canary is the stable version (one pod-template hash): nothing to compare")
        return 0
    if not canary_urls or not stable_urls:
        print(f"gate: no Ready pods to compare (canary {len(canary_urls)}, stable {len(stable_urls)})")
        return 2
    if dead := unreachable(canary_urls + stable_urls, args.reach_within):
        print(f"gate: no answer to /ping from {', '.join(dead)}: cannot compare", flush=True)
        return 2
    worst = 0
    for model in args.models:
        held = load_heldout(args.heldout, model)
        examples = held["examples"][: args.examples or None]
        if not examples:
            raise CLIError(f"{args.heldout / (model + '.json')}: no examples")
        expected = [x["expected"] for x in examples]
        sides = {"canary": Side(canary_urls), "stable": Side(stable_urls)}
        for side in sides.values():
            ask(side, model, examples, args.timeout)
        if sides["stable"].failed:
            print(
                f"gate: {model}: the stable pods failed {sides['stable'].failed} of {len(examples)} requests "
                f"({sides['stable'].first_error}): no baseline to compare against"
            )
            worst = max(worst, 2)
            continue
        metric, tol = held["metric"], tolerances.get(held["metric"], 0.0)
        c, s = (score(metric, sides[k].answers, expected) for k in ("canary", "stable"))
        ok = verdict(metric, c, s, tol)
        failed = f", {sides['canary'].failed} canary requests failed" if sides["canary"].failed else ""
        print(
            f"gate: {model} {metric} on {len(examples)} held-out examples: canary {c:.4f} "
            f"({len(canary_urls)} pods), stable {s:.4f} ({len(stable_urls)} pods), tolerance {tol:g}{failed}: "
            f"{'PASS' if ok else 'FAIL'}",
            flush=True,
        )
        worst = max(worst, 0 if ok else 1)
    return worst


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.command == "export":
        from . import registry

        for path in export(args.models or registry.names(), args.out, args.examples, args.checkpoints):
            doc = json.loads(path.read_text())
            print(f"gate: {path}: {len(doc['examples'])} {doc['model']} examples ({doc['data']['name']} test split)")
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(run_cli("gate", main))
