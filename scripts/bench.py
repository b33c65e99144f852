"""Benchmark the served models against their in-process limit, on this machine, in one run.

  python -m scripts.bench                  # full sweep (make bench)
  python -m scripts.bench --quick          # about a minute (make bench BENCH=quick)
  python -m scripts.bench --slo-ms 100     # capacity at p99 <= 100 ms -> the HPA target it implies

Measures, for each model, with the archives in model-store/ and inputs from the test split:
  served   throughput and p50/p95/p99 latency over REST and gRPC across a concurrency sweep,
           after a warm-up, with every non-2xx counted (a real TorchServe on free loopback ports)
  limit    in-process batched forward of the same model on the same inputs, and the in-process
           handler (parse + preprocess + inference + postprocess), at batch 1 and the model's batchSize
  start    archive build time, TorchServe start to every model READY, frontend and worker RSS
Writes bench/results/<timestamp>.json, .md and .png (throughput and p99 vs concurrency).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch

from handlers.base import StageClock

from . import archive, registry, serve
from .client import Client, ClientError, Settings, encode_payload, error_for_status
from .common import ROOT, CLIError, run_cli
from .inprocess import load_handler, run_batch
from .registry import request_inputs

RESULTS = ROOT / "bench" / "results"


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


class RawRest:
    """A lean REST load generator: one keep-alive connection per thread, no JSON decoding.

    The load generator shares the machine's cores with the server, so its own cost per request
    is kept low (and reported: see cpu_ms_per_request)."""

    def __init__(self, settings):
        self.s, self.local = settings, threading.local()

    def predict(self, model: str, data):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(
                self.s.host, self.s.ports["inference"], timeout=self.s.timeout
            )
        body, ctype = encode_payload(data)
        headers = {"Content-Type": ctype}
        token = self.s.token("inference")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request("POST", f"/predictions/{model}", body=body, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        if resp.status >= 400:
            raise error_for_status(resp.status, payload.decode(errors="replace")[:200])
        return payload


def _drive(
    client, model: str, inputs: list, concurrency: int, requests: int, min_seconds: float, max_seconds: float
) -> dict:
    """Send from ``concurrency`` threads until ``requests`` are sent and ``min_seconds`` have passed
    (never past ``max_seconds``); the raw latencies (ms), errors and wall time."""
    latencies, errors, examples = [], {}, {}
    lock, sent = threading.Lock(), [0]
    t0 = time.perf_counter()

    def next_index() -> int | None:
        with lock:
            elapsed = time.perf_counter() - t0
            if elapsed > max_seconds or (sent[0] >= requests and elapsed >= min_seconds):
                return None
            sent[0] += 1
            return sent[0] - 1

    def worker() -> None:
        while (i := next_index()) is not None:
            t = time.perf_counter()
            try:
                client.predict(model, inputs[i % len(inputs)])
                latencies.append(1000 * (time.perf_counter() - t))
            except (ClientError, OSError) as e:
                with lock:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    examples.setdefault(type(e).__name__, str(e)[:200])

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return {"ms": latencies, "errors": errors, "examples": examples, "sent": sent[0], "wall": time.perf_counter() - t0}


def _summary(concurrency: int, parts: list[dict]) -> dict:
    ms = [v for p in parts for v in p["ms"]]
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for p in parts:
        for k, n in p["errors"].items():
            errors[k] = errors.get(k, 0) + n
        for k, text in p.get("examples", {}).items():
            examples.setdefault(k, text)
    wall = max(p["wall"] for p in parts)
    return {
        "concurrency": concurrency,
        "requests": sum(p["sent"] for p in parts),
        "seconds": wall,
        "ok": len(ms),
        "errors": errors,
        "error_examples": examples,
        "throughput_rps": len(ms) / wall,
        "p50_ms": percentile(ms, 50) if ms else None,
        "p95_ms": percentile(ms, 95) if ms else None,
        "p99_ms": percentile(ms, 99) if ms else None,
    }


def load_generator(transport: str, client, settings):
    """What sends a level's requests: the lean RawRest for REST, the client itself for gRPC."""
    return RawRest(settings) if transport == "rest" else client


def run_level(
    client,
    model: str,
    inputs: list,
    concurrency: int,
    requests: int,
    min_seconds: float = 0.0,
    max_seconds: float = 600.0,
) -> dict:
    """``concurrency`` clients in this process sending until at least ``requests`` are sent and
    ``min_seconds`` have passed (a level of a few hundred requests lasts a fraction of a second on a
    fast host, too short to trust), and never past ``max_seconds``."""
    return _summary(concurrency, [_drive(client, model, inputs, concurrency, requests, min_seconds, max_seconds)])


def _drive_in_child(
    settings, transport: str, model: str, inputs: list, concurrency: int, requests: int, min_seconds: float
):
    """One load-generator process: its own connections, its part of the level, its own CPU time."""
    cpu0 = time.process_time()
    with Client(transport, settings) as c:
        load = load_generator(transport, c, settings)
        part = _drive(load, model, inputs, concurrency, requests, min_seconds, 600.0)
    part["cpu_s"] = time.process_time() - cpu0
    return part


def run_level_processes(
    pool, settings, transport: str, model: str, inputs: list, concurrency: int, requests: int, min_seconds: float
) -> tuple[dict, float]:
    """The level split over the load-generator processes of ``pool`` (clients and requests shared
    out evenly): the summary, and the CPU seconds those processes spent."""
    n = min(pool._processes, concurrency)  # noqa: SLF001 - a pool's size, as it was made
    shares = [concurrency // n + (i < concurrency % n) for i in range(n)]
    futures = [
        pool.apply_async(
            _drive_in_child, (settings, transport, model, inputs, c, -(-requests * c // concurrency), min_seconds)
        )
        for c in shares
    ]
    parts = [f.get(timeout=900) for f in futures]
    return _summary(concurrency, parts), sum(p["cpu_s"] for p in parts)


def saturated(cpu_seconds_used: dict[str, float], wall: float, cores: int, client_processes: int = 1) -> str:
    """Which side ran out of CPU first in a level: "client" (the load generator: each of its Python
    processes is held to about one core by the GIL), "server" (frontend and workers together, on
    every core), or "neither" (something else bounds it: batching delays, the GPU, the network)."""
    client = cpu_seconds_used["client"] / wall
    server = (cpu_seconds_used["frontend"] + cpu_seconds_used["workers"]) / wall
    if client >= 0.85 * min(client_processes, cores):
        return "client"
    if server + client >= 0.85 * cores:
        return "server"
    return "neither"


def queue_counters(metrics_text: str) -> tuple[float, float]:
    """Summed ts_queue_latency_microseconds and ts_inference_requests_total."""
    q = r = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("ts_queue_latency_microseconds{"):
            q += float(line.rsplit(" ", 1)[1])
        elif line.startswith("ts_inference_requests_total{"):
            r += float(line.rsplit(" ", 1)[1])
    return q, r


def served_config(model: str, model_store: Path) -> dict:
    """The model config the served archive runs: the model's own, with the serving profile that
    model-store/manifest.json records for its archive (`make archive PROFILE=gpu`) applied."""
    config = registry.get(model).model_config()
    manifest = model_store / "manifest.json"
    entry = json.loads(manifest.read_text())["archives"].get(model, {}) if manifest.is_file() else {}
    if entry.get("profile") not in (None, "default"):
        for key, value in archive.profile_settings(entry["profile"], model).items():
            config[key] = {**config.get(key, {}), **value} if key == "handler" else value
    return config


def in_process_limit(
    model: str,
    checkpoint: Path,
    inputs: list,
    batch_sizes: list[int],
    repeats: int,
    handler_options: dict | None = None,
) -> dict:
    """Items/s and ms per batch of the raw batched forward and of the whole handler path."""
    # The limit gets every core, however the served workers split them (handler option threads),
    # and the device the served workers use: TorchServe gives each worker a GPU when there is one.
    threads = torch.get_num_threads()
    gpu = 0 if torch.cuda.is_available() else None
    options = {**(handler_options or {}), "threads": os.cpu_count() or 1}
    handler, ctx = load_handler(model, checkpoint, options, gpu=gpu)
    try:
        return _limit(handler, ctx, inputs, batch_sizes, repeats)
    finally:
        torch.set_num_threads(threads)


def _limit(handler, ctx, inputs: list, batch_sizes: list[int], repeats: int) -> dict:
    # GPU work is asynchronous: a timer must wait for it, or it times the launches only.
    sync = torch.cuda.synchronize if handler.device.type == "cuda" else (lambda: None)
    out = {"device": str(handler.device)}
    for bs in batch_sizes:
        reqs = [{"body": inputs[i % len(inputs)]} for i in range(bs)]
        parsed = [item for r in reqs for item in handler.parse(r["body"])[0]]
        with torch.inference_mode():
            batch = handler.preprocess(parsed)
            handler.inference(batch, parsed)  # warm-up
            sync()
            t = time.perf_counter()
            for _ in range(repeats):
                handler.inference(batch, parsed)
            sync()
            forward = (time.perf_counter() - t) / repeats
        run_batch(handler, ctx, reqs)
        t = time.perf_counter()
        for _ in range(repeats):
            run_batch(handler, ctx, reqs)
        full = (time.perf_counter() - t) / repeats
        out[str(bs)] = {
            "forward_ms": 1000 * forward,
            "forward_items_per_s": bs / forward,
            "handler_ms": 1000 * full,
            "handler_items_per_s": bs / full,
            **stage_profile(handler, ctx, reqs, repeats),
        }
    return out


STAGES = ("parse", "preprocess", "inference", "postprocess", "serialise")


def stage_profile(handler, ctx, reqs: list[dict], repeats: int) -> dict:
    """CPU and wall ms per request in each stage of the handler's batch path (handlers.base.StageClock),
    with the torch threads of one served worker (its model config's ``threads``), so that CPU time is
    what a worker spends, not idle threads spinning."""
    handler_options = registry.get(ctx.model_name).model_config().get("handler") or {}
    threads = handler_options.get("threads") or os.cpu_count() or 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    run_batch(handler, ctx, reqs)  # warm-up at this thread count
    handler.stages = clock = StageClock(handler.device)
    t = time.perf_counter()
    try:
        for _ in range(repeats):
            run_batch(handler, ctx, reqs)
    finally:
        handler.stages = None
        torch.set_num_threads(before)
    n = repeats * len(reqs)
    return {
        "stage_threads": threads,
        "stage_cpu_ms": {k: 1000 * clock.cpu[k] / n for k in STAGES},
        "stage_wall_ms": {k: 1000 * clock.wall[k] / n for k in STAGES},
        # The same batches timed whole: the stages are inside it, whatever else the machine runs.
        "stage_handler_ms": 1000 * (time.perf_counter() - t) / n,
    }


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time so far of the frontend, its workers together, and this process (the client)."""

    def total(p):
        t = p.cpu_times()
        return t.user + t.system

    front = psutil.Process(pid)
    return {
        "frontend": total(front),
        "workers": sum(total(c) for c in front.children(recursive=True)),
        "client": total(psutil.Process(os.getpid())),
    }


def rss_mib(pid: int) -> dict:
    proc = psutil.Process(pid)
    workers = [p.memory_info().rss / 2**20 for p in proc.children(recursive=True)]
    return {"frontend_mib": proc.memory_info().rss / 2**20, "workers_mib": workers}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about a minute: fewer levels and requests (default: off)")
    p.add_argument("--models", nargs="+", default=registry.names(), help="models (default: every registered one)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="levels (default: 1 4 16 64; quick: 1 8)")
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per level (default: 300 and at least 20 per client, so ramp-up and ramp-down "
        "are a small part of each level; quick: 40 and at least 10 per client)",
    )
    p.add_argument(
        "--min-seconds",
        type=float,
        default=None,
        help="each level also lasts at least this long (default: 2; quick: 0.5)",
    )
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="load-generator processes sharing each level's clients: one Python process is held to about "
        "one core (its GIL), which a fast server outruns (default: %(default)s)",
    )
    p.add_argument("--transports", nargs="+", default=["rest", "grpc"], help="(default: rest grpc)")
    p.add_argument(
        "--slo-ms", type=float, default=100.0, help="p99 latency objective for capacity (default: %(default)s)"
    )
    p.add_argument("--model-store", type=Path, default=ROOT / "model-store", help="archives (default: model-store)")
    p.add_argument(
        "--checkpoints",
        type=Path,
        default=ROOT / "checkpoints",
        help="checkpoints for the archive timing and the in-process limit (default: checkpoints)",
    )
    p.add_argument("--output", type=Path, default=RESULTS, help="results folder (default: bench/results)")
    p.add_argument(
        "--stages",
        action="store_true",
        help="only the in-process limit and the handler path's cost by stage, no server: seconds (default: off)",
    )
    return p


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run sends: the concurrency levels, requests and minimum seconds per level, repeats of
    the in-process timings, and the warm-up before each transport's levels."""

    levels: list[int]
    requests: dict[int, int]
    min_seconds: float
    repeats: int
    warmup: int

    @classmethod
    def of(cls, args) -> Plan:
        levels = args.concurrency or ([1, 8] if args.quick else [1, 4, 16, 64])
        floor, per_client = (40, 10) if args.quick else (300, 20)
        return cls(
            levels=levels,
            requests={n: args.requests or max(floor, per_client * n) for n in levels},
            min_seconds=args.min_seconds if args.min_seconds is not None else (0.5 if args.quick else 2.0),
            repeats=5 if args.quick else 20,
            warmup=20 if args.quick else 100,
        )


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    plan = Plan.of(args)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "cuda": torch.cuda.is_available(),
        },
        "levels": plan.levels,
        "requests_per_level": plan.requests,
        "client_processes": args.client_processes,
        "slo_ms": args.slo_ms,
        "models": {m: {} for m in args.models},
    }
    inputs = {m: request_inputs(m, 64) for m in args.models}
    if args.stages:
        return write_stages(result, args, inputs, plan.repeats)
    time_archives(args, result)
    serve_and_measure(args, plan, result, inputs)
    for m in args.models:
        result["models"][m].update(limit_and_capacity(args, plan, m, result["models"][m], inputs[m]))
    write(result, args.output)
    failed = errors_of(result)
    if failed:
        raise CLIError(f"{len(failed)} bench rows had errors; the first: {failed[0]}")
    return 0


def time_archives(args, result: dict) -> None:
    """Archive build time and size per model, into a scratch store (the real one is what is served)."""
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.models:
            t = time.perf_counter()
            e = archive.build(
                m, args.checkpoints / m / "checkpoint.pt", "bench", Path(tmp), registry.get(m).config_path
            )
            result["models"][m].update(
                archive_s=time.perf_counter() - t,
                mar_mib=e["size"] / 2**20,
                checkpoint_mib=e["checkpoint_size"] / 2**20,
            )


def serve_and_measure(args, plan: Plan, result: dict, inputs: dict) -> None:
    """A real TorchServe on free loopback ports: cold start, RSS, then every model's levels over each
    transport, each row with its CPU split (frontend, workers, client) and queue time."""
    with tempfile.TemporaryDirectory() as tmp:
        ports = dict(zip(serve.PORTS, serve.free_ports(len(serve.PORTS)), strict=True))
        cfg = serve.ServerConfig(run_dir=Path(tmp), model_store=args.model_store, ports=ports, models=args.models)
        t = time.perf_counter()
        serve.start(cfg)
        result["cold_start_s"] = time.perf_counter() - t
        # spawn, not fork: a forked copy of this process would share its gRPC channels' threads.
        pool = multiprocessing.get_context("spawn").Pool(args.client_processes) if args.client_processes > 1 else None
        try:
            result["rss_idle"] = rss_mib(serve.running_pid(cfg))
            settings = Settings(host=cfg.host, ports=dict(cfg.ports), key_file=cfg.key_file, timeout=60)
            for m in args.models:
                result["models"][m]["served"] = {
                    transport: measure_levels(args, plan, cfg, settings, pool, transport, m, inputs[m])
                    for transport in args.transports
                }
            result["rss_loaded"] = rss_mib(serve.running_pid(cfg))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            serve.stop(cfg)


def measure_levels(args, plan: Plan, cfg, settings, pool, transport: str, m: str, inputs: list) -> list[dict]:
    """One model over one transport: a warm-up, then a row per concurrency level."""
    rows = []
    with Client(transport, settings) as c:
        load = load_generator(transport, c, settings)
        run_level(load, m, inputs, 4, plan.warmup)  # warm-up: JIT, caches, allocator
        for level in plan.levels:
            q0, r0 = queue_counters(c.metrics())
            cpu0 = cpu_seconds(serve.running_pid(cfg))
            if pool is None:
                row = run_level(load, m, inputs, level, plan.requests[level], plan.min_seconds)
                children_cpu = 0.0
            else:
                row, children_cpu = run_level_processes(
                    pool, settings, transport, m, inputs, level, plan.requests[level], plan.min_seconds
                )
            cpu1 = cpu_seconds(serve.running_pid(cfg))
            cpu1["client"] += children_cpu
            used = {k: cpu1[k] - cpu0[k] for k in cpu0}
            row["saturated"] = saturated(used, row["seconds"], os.cpu_count() or 1, args.client_processes)
            q1, r1 = queue_counters(c.metrics())
            row["queue_ms_per_request"] = (q1 - q0) / max(r1 - r0, 1) / 1000
            row["cpu_ms_per_request"] = {k: 1000 * used[k] / max(row["ok"], 1) for k in cpu0}
            rows.append(row)
            print(
                f"{m:12s} {transport:4s} c={level:<3d} {row['throughput_rps']:7.1f} req/s  "
                f"p50 {row['p50_ms']:.1f} p99 {row['p99_ms']:.1f} ms  errors {row['errors'] or 0}  "
                f"({row['seconds']:.1f} s, CPU-bound: {row['saturated']})",
                flush=True,
            )
    return rows


def limit_and_capacity(args, plan: Plan, m: str, r: dict, inputs: list) -> dict:
    """The in-process limit beside the served figures: served/limit, the overhead at one client, and
    the capacity (best throughput with p99 within the objective) the HPA target is taken from."""
    config = served_config(m, args.model_store)  # the served batch size, with a GPU profile's too
    bs = int(config["batchSize"])
    limit = in_process_limit(
        m, args.checkpoints / m / "checkpoint.pt", inputs, [1, bs], plan.repeats, config.get("handler")
    )
    best = max(row["throughput_rps"] for rows in r["served"].values() for row in rows)
    rest1 = r["served"].get("rest", next(iter(r["served"].values())))[0]
    fits = [
        row
        for rows in r["served"].values()
        for row in rows
        if row["p99_ms"] is not None and row["p99_ms"] <= args.slo_ms
    ]
    cap = max(fits, key=lambda row: row["throughput_rps"]) if fits else None
    return {
        "batch_size": bs,
        "limit": limit,
        "served_over_limit": best / limit[str(bs)]["handler_items_per_s"],
        "overhead_c1_p50_ms": rest1["p50_ms"] - limit["1"]["handler_ms"],
        "capacity": cap
        and {
            "rps_per_pod": cap["throughput_rps"],
            "concurrency": cap["concurrency"],
            "queue_ms_per_request": cap["queue_ms_per_request"],
        },
    }


def errors_of(result: dict) -> list[str]:
    """One line per served row that had errors: the project's own inputs must all succeed."""
    out = []
    for m, r in result["models"].items():
        for transport, rows in r.get("served", {}).items():
            for row in rows:
                for kind, n in sorted(row["errors"].items()):
                    example = row.get("error_examples", {}).get(kind, "")
                    out.append(f"{m} {transport} c={row['concurrency']}: {n} x {kind} (e.g. {example!r})")
    return out


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / result["started"].replace(":", "").replace("-", "")
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Benchmark {result['started']} ({'quick' if result['quick'] else 'full'}), "
        f"{result['machine']['cpus']} CPUs, torch {result['machine']['torch']}, CUDA {result['machine']['cuda']}",
        "",
        f"Cold start to every model READY: {result['cold_start_s']:.1f} s; frontend RSS "
        f"{result['rss_loaded']['frontend_mib']:.0f} MiB; workers {', '.join(f'{w:.0f}' for w in result['rss_loaded']['workers_mib'])} MiB",
        "",
        "| model | transport | concurrency | req/s | p50 ms | p95 ms | p99 ms | queue ms/req | CPU ms/req: frontend / workers / client | CPU-bound | s | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in result["models"].items():
        for transport, rows in r["served"].items():
            for row in rows:
                cpu = row["cpu_ms_per_request"]
                lines.append(
                    f"| {m} | {transport} | {row['concurrency']} | {row['throughput_rps']:.1f} | {row['p50_ms']:.1f} | "
                    f"{row['p95_ms']:.1f} | {row['p99_ms']:.1f} | {row['queue_ms_per_request']:.1f} | "
                    f"{cpu['frontend']:.2f} / {cpu['workers']:.2f} / {cpu['client']:.2f} | {row['saturated']} | "
                    f"{row['seconds']:.1f} | {sum(row['errors'].values())} |"
                )
    lines += [
        "",
        "| model | batch | forward items/s | handler items/s | served/limit | overhead @c=1 (p50) | archive | .mar | capacity @p99≤SLO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in result["models"].items():
        bs = str(r["batch_size"])
        cap = r["capacity"]
        cap_s = f"{cap['rps_per_pod']:.0f} req/s, queue {cap['queue_ms_per_request']:.1f} ms" if cap else "none"
        lines.append(
            f"| {m} | {bs} | {r['limit'][bs]['forward_items_per_s']:.0f} | {r['limit'][bs]['handler_items_per_s']:.0f} | "
            f"{r['served_over_limit']:.2f} | {r['overhead_c1_p50_ms']:.1f} ms | {r['archive_s']:.1f} s | {r['mar_mib']:.1f} MiB | {cap_s} |"
        )
    lines += ["", *stage_table(result)]
    targets = hpa_targets(result)
    if targets:
        sets = " ".join(f"--set autoscaling.targetRequestsPerSecond.{m}={t}" for m, t in targets.items())
        lines += [
            "",
            f"HPA: 70% of each model's per-pod capacity at p99 ≤ {result['slo_ms']:.0f} ms. "
            f"Carry it into the chart with `helm upgrade ... {sets}` (or edit k8s/chart/values.yaml, then "
            "`make manifests`).",
        ]
    missing = [m for m, r in result["models"].items() if not r["capacity"]]
    if missing:
        lines += [
            "",
            f"No concurrency level kept p99 ≤ {result['slo_ms']:.0f} ms for {', '.join(missing)} on this machine: "
            "its target has to come from a faster node (or a looser --slo-ms).",
        ]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(result, Path(f"{stem}.png"))
    print("\n".join(lines))
    print(f"\nwrote {stem}.json, .md, .png")


def stage_table(result: dict) -> list[str]:
    lines = [
        "Handler path by stage at the config's batch size, with one served worker's torch threads: CPU ms "
        "per request (wall ms in brackets; CPU counts every thread of the process):",
        "",
        f"| model | device | batch | {' | '.join(STAGES)} | handler items/s | forward share |",
        "|---|---|---|" + "---|" * len(STAGES) + "---|---|",
    ]
    for m, r in result["models"].items():
        row = r["limit"][str(r["batch_size"])]
        cells = " | ".join(f"{row['stage_cpu_ms'][k]:.3f} ({row['stage_wall_ms'][k]:.3f})" for k in STAGES)
        lines.append(
            f"| {m} | {r['limit']['device']} | {r['batch_size']} | {cells} | {row['handler_items_per_s']:.0f} | "
            f"{row['forward_ms'] / row['handler_ms']:.0%} |"
        )
    return lines


def write_stages(result: dict, args, inputs: dict, repeats: int) -> int:
    """``--stages``: the in-process limit and the stage profile of each model, no server."""
    for m in args.models:
        config = served_config(m, args.model_store)
        bs = int(config["batchSize"])
        limit = in_process_limit(
            m, args.checkpoints / m / "checkpoint.pt", inputs[m], [bs], repeats, config.get("handler")
        )
        result["models"][m] = {"batch_size": bs, "limit": limit}
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / (result["started"].replace(":", "").replace("-", "") + "-stages")
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Handler stages {result['started']}, {result['machine']['cpus']} CPUs, torch {result['machine']['torch']}, "
        f"CUDA {result['machine']['cuda']}",
        "",
        *stage_table(result),
    ]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {stem}.json, .md")
    return 0


def hpa_targets(result: dict, headroom: float = 0.7) -> dict[str, int]:
    """Per model, the requests/s one pod should carry: headroom x capacity at the p99 objective."""
    return {
        m: max(1, int(headroom * r["capacity"]["rps_per_pod"])) for m, r in result["models"].items() if r["capacity"]
    }


def plot(result: dict, path: Path) -> None:
    # Imported here, not at the top: the file backend must be chosen before pyplot is imported, and
    # doing that at import time would change the backend of any program that imports this module.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m, r in result["models"].items():
        for transport, rows in r["served"].items():
            xs = [row["concurrency"] for row in rows]
            style = "-o" if transport == "rest" else "--s"
            a.plot(xs, [row["throughput_rps"] for row in rows], style, label=f"{m} {transport}")
            b.plot(xs, [row["p99_ms"] for row in rows], style, label=f"{m} {transport}")
    for ax, title in ((a, "throughput (req/s)"), (b, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    b.set_yscale("log")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(run_cli("bench", main))
