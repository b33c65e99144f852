"""The translator's work bounds, measured: what one batch can cost, and what the largest legal
requests and the splitter's hostile texts do to their neighbours on a real TorchServe.

  python -m scripts.limits                  # make limits
  python -m scripts.limits --no-served      # only the in-process phases

Phases:
  splitter  every hostile text of scripts/hostile.py at max_chars: seconds to split and check it
  worst     max_batch_rows decoder rows of full-length pieces, decoded to the last position, greedy
            and with beam max_beam: what a batch can cost at most. The checkpoint's network with
            fresh random weights, which (unlike trained ones) end no row early; the same work.
  served    model-store/transformer.mar on a real TorchServe, REST and gRPC: each largest legal
            request (max_rows pieces of one-word sentences; max_rows / max_beam with beam max_beam;
            max_rows full-length windows; an explanation of max_explain_pieces full-length windows)
            and each hostile text, sent at once with 6 good neighbours: statuses, seconds, response
            bytes, and the workers' PIDs before and after.
Writes bench/results/limits-<time>.json. Exits 1 when a neighbour did not get 200, a worker was
replaced, a hostile text was not answered 2xx or 4xx within 10 s, a largest request was refused or
took over half of responseTimeout, or a worst batch did.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import torch

from handlers import checkpoint
from handlers.base import InvalidInput
from models import build_model

from . import hostile, pod, registry, serve
from .client import Client, ClientError, Settings
from .common import ROOT, run_cli
from .inprocess import load_handler

MODEL = "transformer"
NEIGHBOURS = 6
OPTIONS = ("max_chars", "max_texts", "max_beam", "max_rows", "max_batch_rows", "max_explain_pieces")
HOSTILE_BOUND_S = 10.0
DENSE_UNITS = (
    "q7",
    "%x",
    "7 ",
    "\u00e9",
)  # candidates for text of about one token a character  # a hostile text's answer, 2xx or 4xx, comes within this (issue 27)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="limits", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=ROOT / "checkpoints" / MODEL / "checkpoint.pt",
        help="the translator checkpoint the archive was built from (default: checkpoints/transformer/checkpoint.pt)",
    )
    p.add_argument("--model-store", type=Path, default=ROOT / "model-store", help="archives (default: model-store/)")
    p.add_argument("--no-served", action="store_true", help="skip the served phase (default: run it)")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results", help="(default: bench/results)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    handler, _ = load_handler(MODEL, args.checkpoint)
    config = registry.get(MODEL).model_config()
    half = config["responseTimeout"] / 2
    result = {
        "checkpoint": str(args.checkpoint),
        "options": {k: handler.options[k] for k in OPTIONS},
        "response_timeout_s": config["responseTimeout"],
        "threads": torch.get_num_threads(),
    }
    result["splitter"] = splitter(handler)
    result["worst_batch"] = worst_batch(handler, args.checkpoint)
    problems = [
        f"worst batch {k}: {v['seconds']} s > {half} s" for k, v in result["worst_batch"].items() if v["seconds"] > half
    ]
    if not args.no_served:
        result["served"] = served(args, handler, config)
        problems += served_problems(result["served"], half)
    result["problems"] = problems
    write(result, args.output)
    for p in problems:
        print(f"limits: {p}")
    return 1 if problems else 0


def splitter(handler) -> dict:
    """Seconds to split and to check() each hostile text at max_chars, and its pieces."""
    out = {}
    for name, text in hostile.texts(handler.options["max_chars"]).items():
        t0 = time.perf_counter()
        sentences = handler.sentences(text)
        split = time.perf_counter() - t0
        try:
            pieces = len(handler.check(text))
        except InvalidInput:  # a text of nothing to translate
            pieces = 0
        out[name] = {
            "chars": len(text),
            "split_ms": round(1000 * split, 3),
            "sentences": len(sentences),
            "pieces": pieces,
        }
    return out


def worst_batch(handler, path: Path) -> dict:
    """max_batch_rows rows of full-length pieces, decoded to the model's last position."""
    ckpt = checkpoint.load(path, handler.task)
    torch.manual_seed(0)
    model = build_model(ckpt["network"], ckpt["config"]).eval()
    max_len, vocab = ckpt["config"]["max_len"], ckpt["config"]["tgt_vocab_size"]
    rows = handler.options["max_batch_rows"]
    out = {}
    with torch.inference_mode(), swapped_model(handler, model):
        for beam in (1, handler.options["max_beam"]):
            pieces = rows // beam
            src = torch.randint(4, vocab, (pieces, max_len))
            t0 = time.perf_counter()
            ids = handler.inference(src, [([row.tolist() for row in src], max_len - 1, beam)])
            out[f"beam{beam}"] = {
                "pieces": pieces,
                "rows": pieces * beam,
                "source_tokens": max_len,
                "steps": max(len(r) for r in ids),
                "seconds": round(time.perf_counter() - t0, 2),
            }
            print(f"limits: worst batch, beam {beam}: {out[f'beam{beam}']}", flush=True)
    return out


@contextlib.contextmanager
def swapped_model(handler, model):
    """The handler decoding with another model for a while (the same network, other weights)."""
    saved, handler.model = handler.model, model
    try:
        yield
    finally:
        handler.model = saved


def largest_requests(handler) -> dict[str, dict]:
    """name -> the body of each largest legal request."""
    o = handler.options
    return {
        "one_word_sentences": hostile.one_word_sentences(o["max_rows"], o["max_texts"]),
        "one_word_sentences_beam": hostile.one_word_sentences(
            o["max_rows"] // o["max_beam"], o["max_texts"], o["max_beam"]
        ),
        "full_windows": {"text": window_texts(handler, o["max_rows"])},
        "explanation": {"text": window_texts(handler, o["max_explain_pieces"]), "explain": True},
    }


def window_texts(handler, pieces: int) -> list[str]:
    """Texts that the tokenizer cuts into one token a character or so, each therefore cut into
    full-length windows: ``pieces`` windows in all, or as many as max_texts texts hold."""
    o = handler.options
    unit = max(DENSE_UNITS, key=lambda u: len(handler.tokenizer.encode(u * 64)))
    text = (unit * o["max_chars"])[: o["max_chars"]]
    out, left = [], pieces
    while left > 0 and len(out) < o["max_texts"]:
        lo, hi = 1, len(text)  # the longest prefix of at most ``left`` pieces
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(handler.check(text[:mid])) <= left else (lo, mid - 1)
        out.append(text[:lo])
        left -= len(handler.check(text[:lo]))
    return out


def served(args, handler, config) -> dict:
    ports = dict(zip(serve.PORTS, serve.free_ports(len(serve.PORTS)), strict=True))
    cfg = serve.ServerConfig(
        run_dir=ROOT / "run" / "limits", model_store=args.model_store.resolve(), ports=ports, models=[MODEL]
    )
    settings = Settings(
        host=cfg.host, ports=dict(cfg.ports), timeout=config["responseTimeout"] + 30, key_file=cfg.key_file
    )
    good = registry.request_inputs(MODEL, NEIGHBOURS)
    cases = {f"largest:{k}": v for k, v in largest_requests(handler).items()}
    cases |= {f"hostile:{k}": v for k, v in hostile.texts(handler.options["max_chars"]).items()}
    serve.start(cfg)
    try:
        before = pod.ready_worker_pids(serve.describe(cfg, MODEL))
        out = {"cases": {}}
        for transport in ("rest", "grpc"):
            for name, body in cases.items():
                out["cases"][f"{name} {transport}"] = with_neighbours(settings, transport, body, good)
                print(f"limits: {name} {transport}: {summary(out['cases'][f'{name} {transport}'])}", flush=True)
        out["workers_before"], out["workers_after"] = before, pod.ready_worker_pids(serve.describe(cfg, MODEL))
    finally:
        serve.stop(cfg)
    return out


def with_neighbours(settings, transport: str, body, good: list) -> dict:
    """``body`` and the good neighbours sent at once, each on its own connection."""

    def send(payload, explain: bool = False) -> dict:
        with Client(transport, settings) as c:
            t0 = time.perf_counter()
            try:
                if explain:
                    answer = c.explain(MODEL, {k: v for k, v in payload.items() if k != "explain"})
                else:
                    answer = c.predict(MODEL, payload)
                status, size = 200, len(json.dumps(answer, ensure_ascii=False).encode())
            except ClientError as e:
                status, size = e.status or 0, 0
            return {"status": status, "seconds": round(time.perf_counter() - t0, 3), "bytes": size}

    explain = isinstance(body, dict) and body.get("explain") is True
    with ThreadPoolExecutor(1 + len(good)) as pool:
        main_call = pool.submit(send, body, explain)
        time.sleep(0.005)  # the request first, its neighbours into the same batch
        neighbours = [pool.submit(send, g) for g in good]
        return {"request": main_call.result(), "neighbours": [n.result() for n in neighbours]}


def summary(case: dict) -> str:
    r, ns = case["request"], case["neighbours"]
    return (
        f"{r['status']} in {r['seconds']} s, {r['bytes']} bytes; neighbours "
        f"{sorted({n['status'] for n in ns})} in at most {max(n['seconds'] for n in ns)} s"
    )


def served_problems(out: dict, half: float) -> list[str]:
    problems = []
    for name, case in out["cases"].items():
        r = case["request"]
        if any(n["status"] != 200 for n in case["neighbours"]):
            problems.append(f"{name}: a neighbour got {[n['status'] for n in case['neighbours']]}")
        if name.startswith("largest:") and (r["status"] != 200 or r["seconds"] > half):
            problems.append(f"{name}: {r['status']} in {r['seconds']} s (half of responseTimeout: {half} s)")
        if name.startswith("hostile:") and not (200 <= r["status"] < 500 and r["seconds"] <= HOSTILE_BOUND_S):
            problems.append(f"{name}: {r['status']} in {r['seconds']} s")
    if out["workers_before"] != out["workers_after"]:
        problems.append(f"workers replaced: {out['workers_before']} -> {out['workers_after']}")
    return problems


def write(result: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"limits-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"limits: -> {path}")


if __name__ == "__main__":
    sys.exit(run_cli("limits", main))
