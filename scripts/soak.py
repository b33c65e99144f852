"""Soak a real TorchServe with mixed good and hostile requests, and kill one worker mid-run.

  python -m scripts.soak                        # 10,000 requests, 24 clients, REST and gRPC, all three models
  python -m scripts.soak --requests 600 --clients 8 --max-seconds 120

Starts its own server (token auth on) from model-store/, sends a bounded number of requests for a
bounded time from ``--clients`` threads (half REST, half gRPC), each request drawn from a fixed,
seeded mix: good test-split inputs for every model and the hostile classes that once killed a
worker or failed a whole batch (non-ASCII messages, deeply nested JSON, huge keys, garbage and
damaged images, texts that break regex sentence splitters, the translator's largest legal
requests). Once a third of the requests are sent it SIGKILLs one worker.

Every outcome is written by class to bench/results/soak-<time>.json. It passes (exit 0) when:
good requests got 2xx except those that were in flight on the killed worker (500/507 "Worker died." /
gRPC INTERNAL, within the kill window), hostile ones a 4xx (the same exception), splitter texts a 2xx
or a 4xx, the largest legal requests a 2xx (either may get the translator's 503 BatchFull when
its batch is full), none hung (client timeout), and every worker PID but the killed one is unchanged.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from . import hostile, pod, registry, serve
from .client import Client, ClientError, Settings, Timeout
from .common import ROOT, CLIError, run_cli
from .registry import request_inputs

MODELS = registry.names()
KILL_WINDOW_S = 15.0  # requests failing this soon after the kill count as in flight on the killed worker
BATCH_FULL = "503 BatchFull"  # a legal translator request that did not fit beside smaller ones in its batch


def hostile_classes(digit_png: bytes) -> dict[str, tuple[str, object]]:
    """class -> (model, payload): the requests a hostile tester found harmful. "hostile:" ones must
    get a 4xx; "text:" ones, texts that break regex sentence splitters, a 2xx or a 4xx; "large:"
    ones, the translator's largest legal requests, a 2xx. A text or a large request may also get the
    translator's 503 BatchFull, when its batch already holds smaller requests that fill it."""

    def deep(key: str, leaf: str) -> bytes:
        return (f'{{"{key}":' * 100_000 + leaf + "}" * 100_000).encode()

    damaged = bytearray(digit_png)
    damaged[len(damaged) // 2] ^= 0xFF
    options = registry.get("transformer").model_config()["handler"]
    rows, texts, beam = options["max_rows"], options["max_texts"], options["max_beam"]
    classes = {
        "non_ascii_key": ("lstm", {"text": "x", "\u00e9": 1}),
        "non_ascii_topk": ("cnn", {"data": "aGk=", "topk": "\u00fc"}),
        "non_ascii_max_length": ("transformer", {"text": "hi", "max_length": "\u00e9"}),
        "deep_json": ("lstm", deep("text", '"x"')),
        "huge_key": ("lstm", {"text": "x", "k" * 200_000: 1}),
        "garbage_bytes": ("cnn", b"\x00\x01\x02garbage"),
        "damaged_png": ("cnn", bytes(damaged)),
        "truncated_png": ("cnn", digit_png[: len(digit_png) // 3]),
        "bad_utf8": ("transformer", b"\xc3\x28 bad"),
    }
    out = {f"hostile:{name}": value for name, value in classes.items()}
    out |= {f"text:{name}": ("transformer", text) for name, text in hostile.texts(options["max_chars"]).items()}
    out["large:one_word_sentences"] = ("transformer", hostile.one_word_sentences(rows, texts))
    out["large:one_word_sentences_beam"] = ("transformer", hostile.one_word_sentences(rows // beam, texts, beam))
    return out


def build_plan(n: int, hostile_share: float, seed: int) -> tuple[list[tuple[str, str, object]], dict]:
    """``n`` requests as (class, model, payload), seeded; good ones weighted by model cost."""
    goods = {m: request_inputs(m, 16) for m in MODELS}
    hostile = hostile_classes(goods["cnn"][0])
    rng = random.Random(seed)
    # Good requests weighted by 1/cost, so that each model gets a similar share of worker time.
    weights = {m: 1 / registry.get(m).cost for m in MODELS}
    plan = []
    # Each kind of hostile request as often as its share, whatever the number of its classes; the
    # largest legal requests are rarer, as each is a second of worker time or more.
    shares = {"hostile": 0.45, "text": 0.45, "large": 0.1}
    kinds = {k: sorted(c for c in hostile if c.startswith(f"{k}:")) for k in shares}
    for _ in range(n):
        if rng.random() < hostile_share:
            cls = rng.choice(kinds[rng.choices(list(shares), list(shares.values()))[0]])
            model, payload = hostile[cls]
            plan.append((cls, model, payload))
        else:
            model = rng.choices(list(weights), list(weights.values()))[0]
            plan.append((f"good:{model}", model, rng.choice(goods[model])))
    return plan, hostile


def worker_pids(cfg: serve.ServerConfig) -> dict[str, set[int]]:
    """Each model's READY workers' PIDs."""
    return {m: set(pod.ready_worker_pids(serve.describe(cfg, m))) for m in MODELS}


def outcome_of(exc: BaseException | None) -> str:
    if exc is None:
        return "2xx"
    if isinstance(exc, Timeout):
        return "hang"
    if isinstance(exc, ClientError) and exc.status:
        # The translator's "batch full, retry" is its own outcome, not the queue's 503.
        return BATCH_FULL if exc.status == 503 and "BatchFull" in str(exc) else str(exc.status)
    return type(exc).__name__


def soak(cfg: serve.ServerConfig, plan: list, clients: int, max_seconds: float, kill_model: str) -> dict:
    settings = Settings(host=cfg.host, ports=dict(cfg.ports), timeout=30, key_file=cfg.key_file)
    # (class, transport, outcome, sent at, finished at, error)
    records: list[tuple[str, str, str, float, float, str]] = []
    lock, cursor = threading.Lock(), iter(range(len(plan)))
    start = time.monotonic()
    kill = {"at": None, "pid": None}
    before = worker_pids(cfg)

    def client_loop(i: int) -> None:
        transport = "rest" if i % 2 == 0 else "grpc"
        with Client(transport, settings) as c:
            while time.monotonic() - start < max_seconds:
                with lock:
                    j = next(cursor, None)
                if j is None:
                    return
                cls, model, payload = plan[j]
                sent = time.monotonic()
                try:
                    c.predict(model, payload)
                    exc = None
                except (ClientError, OSError) as e:
                    exc = e
                outcome = outcome_of(exc)
                with lock:
                    error = "" if exc is None else str(exc)[:200]
                    records.append((cls, transport, outcome, sent, time.monotonic(), error))
                    if kill["at"] is None and len(records) >= len(plan) // 3:
                        kill["pid"] = min(before[kill_model])
                        kill["at"] = time.monotonic()
                        os.kill(kill["pid"], signal.SIGKILL)

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_seconds + 60)
    elapsed = time.monotonic() - start
    # The killed worker's replacement needs a few seconds to be READY before the PIDs are compared.
    deadline = time.monotonic() + 60
    while True:
        after = worker_pids(cfg)
        replaced = kill["pid"] not in after[kill_model] and len(after[kill_model]) >= len(before[kill_model])
        if replaced or time.monotonic() > deadline:
            break
        time.sleep(1)
    hostile_models = {cls: model for cls, model, _ in plan if not cls.startswith("good:")}
    return judge(
        records,
        before,
        after,
        kill,
        kill_model,
        elapsed,
        hostile_models,
        hung_threads=sum(t.is_alive() for t in threads),
    )


def model_of(cls: str, hostile_models: dict[str, str]) -> str:
    kind, name = cls.split(":", 1)
    return name if kind == "good" else hostile_models[cls]


def expected(cls: str, outcome: str) -> bool:
    """Whether ``outcome`` is what a request of class ``cls`` must get (hostile_classes)."""
    kind = cls.split(":", 1)[0]
    client_error = outcome.isdigit() and 400 <= int(outcome) < 500
    if kind == "good":
        return outcome == "2xx"
    if kind == "text":
        return outcome in ("2xx", BATCH_FULL) or client_error
    if kind == "large":
        return outcome in ("2xx", BATCH_FULL)
    return client_error


def lost_with_worker(outcome: str, sent: float, finished: float, kill_at: float | None) -> bool:
    """Whether a failed request of the killed worker's model was in flight on it when it died.

    TorchServe answers such a request 500 or 507 "Worker died." (gRPC INTERNAL) soon after the kill;
    over gRPC it may instead never answer, and the client's deadline ends the wait: a request sent
    before the kill and timed out after it was lost with the worker too. A deadline on a request
    sent after the kill is a hang."""
    if kill_at is None:
        return False
    if outcome in ("500", "507"):
        return kill_at <= finished <= kill_at + KILL_WINDOW_S
    return outcome == "hang" and sent <= kill_at <= finished


def judge(records, before, after, kill, kill_model, elapsed, hostile_models, hung_threads=0) -> dict:
    by_class: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures = collections.Counter()
    in_flight_on_killed = collections.Counter()
    messages: dict[str, str] = {}
    hangs = hung_threads
    for cls, transport, outcome, sent, at, error in records:
        by_class[f"{cls} {transport}"][outcome] += 1
        if expected(cls, outcome):
            continue
        if model_of(cls, hostile_models) == kill_model and lost_with_worker(outcome, sent, at, kill["at"]):
            in_flight_on_killed[f"{cls} {transport} {outcome}"] += 1
            continue
        if outcome == "hang":
            hangs += 1
        failures[f"{cls} {transport} {outcome}"] += 1
        messages.setdefault(f"{cls} {transport} {outcome}", error)
    changed = {m: sorted(before[m] - after[m]) for m in before if before[m] - after[m]}
    unexpected_restarts = {
        m: pids for m, pids in changed.items() if set(pids) != ({kill["pid"]} if m == kill_model else set())
    }
    return {
        "requests": len(records),
        "seconds": round(elapsed, 1),
        "requests_per_s": round(len(records) / max(elapsed, 1e-9), 1),
        "outcomes_by_class": {k: dict(v) for k, v in sorted(by_class.items())},
        "killed_worker": {
            "model": kill_model,
            "pid": kill["pid"],
            "at_request": None if kill["at"] is None else sum(1 for r in records if r[4] <= kill["at"]),
            "in_flight_outcomes": dict(in_flight_on_killed),
        },
        "failures": dict(failures),
        "failure_messages": messages,
        "hangs": hangs,
        "worker_restarts": {m: pids for m, pids in changed.items()},
        "unexpected_restarts": unexpected_restarts,
        "replaced": kill["pid"] is not None
        and kill["pid"] not in after[kill_model]
        and len(after[kill_model]) >= len(before[kill_model]),
        "passed": (
            not failures
            and not hangs
            and not unexpected_restarts
            and kill["pid"] is not None
            and kill["pid"] not in after[kill_model]
            and len(after[kill_model]) >= len(before[kill_model])
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000, help="requests in all (default: %(default)s)")
    p.add_argument(
        "--clients", type=int, default=24, help="client threads, half REST, half gRPC (default: %(default)s)"
    )
    p.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long (default: %(default)s)")
    p.add_argument("--hostile-share", type=float, default=0.05, help="share of hostile requests (default: %(default)s)")
    p.add_argument("--kill-model", choices=MODELS, default="lstm", help="whose worker is killed (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the request mix's seed (default: %(default)s)")
    p.add_argument("--model-store", type=Path, default=ROOT / "model-store", help="archives (default: model-store/)")
    p.add_argument(
        "--output", type=Path, default=ROOT / "bench" / "results", help="where the JSON goes (default: bench/results)"
    )
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 256 or args.requests < 30:
        raise CLIError("--clients must be 1..256 and --requests at least 30")
    plan, _ = build_plan(args.requests, args.hostile_share, args.seed)
    ports = dict(zip(serve.PORTS, serve.free_ports(len(serve.PORTS)), strict=True))
    cfg = serve.ServerConfig(
        run_dir=ROOT / "run" / "soak", model_store=args.model_store.resolve(), ports=ports, models=list(MODELS)
    )
    serve.start(cfg)
    try:
        result = soak(cfg, plan, args.clients, args.max_seconds, args.kill_model)
    finally:
        serve.stop(cfg)
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"soak-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"soak: {result['requests']} requests in {result['seconds']}s ({result['requests_per_s']}/s) -> {path}")
    for cls, outcomes in result["outcomes_by_class"].items():
        print(f"  {cls:34s} {outcomes}")
    print(f"  killed {result['killed_worker']}")
    print(
        f"  failures {result['failures'] or 'none'}, hangs {result['hangs']}, "
        f"worker restarts {result['worker_restarts']}, unexpected {result['unexpected_restarts'] or 'none'}"
    )
    print("soak: PASSED" if result["passed"] else "soak: FAILED")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(run_cli("soak", main))
