"""Parity and speed of each optimised variant against the eager model, on the test split.

  python -m scripts.variants                      # every model, variant int8 (make variants)
  python -m scripts.variants --models lstm
  python -m scripts.variants --variant aoti       # AOTInductor-compiled forward (cnn; make variants VARIANT=aoti)
  python -m scripts.variants --variant bfloat16   # autocast as the handlers' cuda_dtype does (CUDA hosts)

For each model: test metrics (accuracy, or loss/BLEU for the translator) of the eager model and of
the variant, the largest absolute difference of their outputs on a test batch, and the speed ratio
of one batched forward at the model's batchSize; and whether torch.export captures the forward (so
other servers can run it), with its parity and speed. Writes bench/results/variants-<timestamp>.json/.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import registry
from .common import ROOT, CLIError, run_cli

CUDA_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # handler option cuda_dtype


class Autocast(torch.nn.Module):
    """The model under autocast to ``dtype``, as the handlers run it with cuda_dtype on CUDA."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, device_type: str = "cuda"):
        super().__init__()
        self.model, self.dtype, self.device_type = model, dtype, device_type

    def forward(self, *args):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(*args).float()

    def greedy_decode(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model.greedy_decode(*args, **kwargs)


def timed(fn, repeats: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t) / repeats


def try_export(model, example: tuple, repeats: int) -> dict:
    """torch.export the model's forward: parity and speed of the exported program, or why not."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, example).module()
    except Exception as e:  # export raises many types (Unsupported, GuardOnDataDependentSymNode, TypeError...)
        return {"exportable": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    with torch.inference_mode():
        diff = (model(*example) - program(*example)).abs().max().item()
        t_eager, t_exported = timed(lambda: model(*example), repeats), timed(lambda: program(*example), repeats)
    return {"exportable": True, "max_abs_diff": diff, "speedup": t_eager / t_exported}


def compare(model_name: str, checkpoint: Path, variant: str, repeats: int) -> dict:
    from handlers.base import AOTI_PACKAGE, optimize
    from handlers.checkpoint import rebuild

    from .archive import check_aoti, compile_aoti
    from .registry import load_dataset
    from .tasks import TaskOptions

    if variant == "aoti":
        check_aoti(model_name)
    device = torch.device("cpu")
    if variant in CUDA_DTYPES:
        if not torch.cuda.is_available():
            raise CLIError(f"{variant}: the handlers autocast only on CUDA, and this host has no GPU")
        device = torch.device("cuda")
    ckpt = registry.load_checkpoint(checkpoint, model_name)
    trained = ckpt["train_args"]  # the same data, split and options as the run that wrote it
    ds = load_dataset(model_name, trained["data"], seed=trained["seed"], limit=trained["limit"])
    task = registry.get(model_name).task(ds, ckpt, TaskOptions.from_args(trained))
    eager = rebuild(ckpt, device)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        if variant == "aoti":  # what make archive VARIANT=aoti puts in the archive
            compile_aoti(model_name, ckpt, Path(tmp) / AOTI_PACKAGE)
        build_s = time.perf_counter() - t
        if variant in CUDA_DTYPES:
            fast = Autocast(eager, CUDA_DTYPES[variant])
        else:
            fast = optimize(copy.deepcopy(eager), variant, device, tmp).eval()

        with torch.inference_mode():
            # task.evaluate, not train.evaluate: that one autocasts on CUDA, and eager must stay float32
            m_eager, m_fast = task.evaluate(eager, "test", device), task.evaluate(fast, "test", device)
            bs = registry.get(model_name).batch_size
            # The tensors of one test batch (the translator's batches also carry their row indices).
            batch = [t.to(device) for t in next(task.batches("test", bs, None)) if isinstance(t, torch.Tensor)]
            exported = try_export(eager, task.forward_example(batch), repeats)
            diff = (task.parity_outputs(eager, batch) - task.parity_outputs(fast, batch)).abs().max().item()
            t_eager = timed(task.timed_call(eager, batch), repeats)
            t_fast = timed(task.timed_call(fast, batch), repeats)
    return {
        "variant": variant,
        "score": task.score,
        "batch_size": bs,
        "build_s": build_s,
        "test_eager": m_eager,
        "test_variant": m_fast,
        "max_abs_diff": diff,
        "eager_ms": 1000 * t_eager,
        "variant_ms": 1000 * t_fast,
        "speedup": t_eager / t_fast,
        "export": exported,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="variants", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=registry.names(), help="models (default: every registered one)")
    p.add_argument(
        "--variant",
        choices=["int8", "aoti", *CUDA_DTYPES],
        default="int8",
        help="optimisation to compare; bfloat16/float16 need CUDA (default: %(default)s)",
    )
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints", help="(default: checkpoints)")
    p.add_argument("--repeats", type=int, default=20, help="timed forwards per model (default: %(default)s)")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results", help="(default: bench/results)")
    args = p.parse_args(argv)
    results = {}
    for m in args.models:
        try:
            results[m] = compare(m, args.checkpoints / m / "checkpoint.pt", args.variant, args.repeats)
        except CLIError as e:  # a variant that does not apply here (aoti: the cnn only; autocast: CUDA only)
            results[m] = {"variant": args.variant, "not_applicable": str(e)}
    lines = [
        f"| model | variant | test metric eager → {args.variant} | max abs diff | forward ms eager → {args.variant} (batch) | speedup | torch.export of forward |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in results.items():
        if "not_applicable" in r:
            lines.append(f"| {m} | {r['variant']} | not applicable: {r['not_applicable']} | | | | |")
            continue
        key = r["score"]
        lines.append(
            f"| {m} | {r['variant']} | {key} {r['test_eager'][key]:.4f} → {r['test_variant'][key]:.4f} | "
            f"{r['max_abs_diff']:.2e} | {r['eager_ms']:.2f} → {r['variant_ms']:.2f} ({r['batch_size']}) | {r['speedup']:.2f}× | "
            + (
                f"yes, max diff {r['export']['max_abs_diff']:.1e}, {r['export']['speedup']:.2f}× eager |"
                if r["export"]["exportable"]
                else f"no: {r['export']['reason'][:90]} |"
            )
        )
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"variants-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    Path(f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("variants", main))
