"""Train one model and write a self-describing checkpoint.

  python -m scripts.train --model cnn                  # full default run on the bundled data
  python -m scripts.train --model lstm --quick         # seconds-long run for demos and archives
  python -m scripts.train --model transformer --data my-pairs.tsv --epochs 20
  python -m scripts.train --model cnn --resume checkpoints/cnn/last.pt --epochs 15

Writes <output-dir>/checkpoint.pt (best epoch by validation metric), <output-dir>/last.pt (for
--resume, with optimizer state) and TensorBoard scalars under <output-dir>/tb. Both checkpoints
hold only tensors and plain types and load with torch.load(path, weights_only=True).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from handlers import checkpoint
from models import build_model, config_to_dict, network_path

from . import registry
from .common import ROOT, CLIError, git_commit, run_cli
from .registry import load_dataset
from .tasks import TaskOptions

# ----------------------------------------------------------------------------- training loop


def autocast(device: torch.device):
    """bf16 autocast on CUDA where supported (fp16 otherwise); a no-op context on CPU."""
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def to_device(batch, device):
    return tuple(t.to(device, non_blocking=True) if torch.is_tensor(t) else t for t in batch)


def train_one_epoch(model, task, optimizer, scheduler, scaler, device, epoch, args, writer, step):
    model.train()
    n_batches = task.n_batches("train", args.batch_size, np.random.default_rng(args.init_seed + epoch))
    running, seen = 0.0, 0
    bar = tqdm(
        task.batches("train", args.batch_size, np.random.default_rng(args.init_seed + epoch)),
        total=n_batches,
        desc=f"epoch {epoch}/{args.epochs}",
        leave=False,
        dynamic_ncols=True,
        disable=args.no_progress,
    )
    for batch in bar:
        batch = to_device(batch, device)
        with autocast(device):
            loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        running += loss.item()
        seen += 1
        step += 1
        bar.set_postfix(loss=f"{running / seen:.4f}")
        if writer is not None and step % 10 == 0:
            writer.add_scalar("train/loss_step", loss.item(), step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
    return running / max(seen, 1), step


def evaluate(model, task, split, device):
    model.eval()
    with autocast(device):
        return task.evaluate(model, split, device)


def make_scheduler(optimizer, total_steps: int):
    """Linear warm-up over the first 5% of steps, then cosine decay to 5% of the peak rate."""
    warmup = max(1, int(0.05 * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def snapshot(model: torch.nn.Module) -> dict:
    """A CPU copy of the state dict in which tied weights stay one tensor, so they are saved once."""
    copies: dict = {}
    out = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.stride(), t.device)
        if key not in copies:
            copies[key] = t.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out


def network_config(config_cls: type, task, overrides: list[str] | None) -> dict:
    """The network config: its defaults, then the fields the data decides, then ``--set``."""
    config = config_to_dict(task.config(config_cls))
    decided = task.config_fields()
    for item in overrides or []:
        name, sep, raw = item.partition("=")
        if not sep or name not in config:
            known = ", ".join(k for k in config if k not in decided)
            raise CLIError(f"--set {item}: expected FIELD=VALUE with FIELD one of {known}")
        if name in decided:
            raise CLIError(f"--set {item}: {name} comes from the data ({decided[name]})")
        kind = type(config[name])
        try:
            config[name] = {"true": True, "false": False}[raw.lower()] if kind is bool else kind(raw)
        except (KeyError, ValueError):
            raise CLIError(f"--set {item}: {name} must be {kind.__name__}") from None
    return config


def plain_args(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name}: {e}") from None


def per_model(flag: str, quick: bool = False) -> str:
    """A flag's per-model defaults, for --help."""
    values = {e.name: (e.quick if quick else e.train).get(flag) for e in registry.REGISTRY.values()}
    return ", ".join(f"{m} {v}" for m, v in values.items() if v is not None)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=registry.names(), help="which model to train (required)")
    p.add_argument(
        "--data",
        default=None,
        help="your own data file or folder (default: the bundled dataset; formats: python -m scripts.data --help)",
    )
    p.add_argument("--epochs", type=int, default=None, help=f"total epochs (default: {per_model('epochs')})")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: 64)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak learning rate of AdamW (default: {per_model('lr')})",
    )
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help=f"use a seeded random subset of N samples (default: all; --quick: {per_model('limit', quick=True)})",
    )
    p.add_argument("--quick", action="store_true", help="a seconds-long run: few epochs on a subset (default: off)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed for splits, initialisation and shuffling (default: %(default)s)"
    )
    p.add_argument(
        "--init-seed",
        type=int,
        default=None,
        help="seed for initialisation and batch order only, the splits staying --seed's: the same model "
        "trained again, scored on the same held-out test split (default: --seed)",
    )
    p.add_argument(
        "--shuffle-labels",
        action="store_true",
        help="a control run for classifiers: train on the training split's labels shuffled, a model that "
        "answers confidently and learns nothing (what a quality gate must stop) (default: off)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda or cuda:N; auto picks cuda when available, with AMP (default: %(default)s)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default (default: %(default)s)"
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where to write checkpoints and logs (default: checkpoints/<model>)",
    )
    p.add_argument("--resume", type=Path, default=None, help="continue from this last.pt (default: start fresh)")
    # The translator's options (TaskOptions); --batch-tokens defaults per model, from the registry.
    for name, help_ in {
        "max_tokens": "train on pairs of at most N subword tokens per side",
        "vocab_size": "pieces in the joint subword vocabulary",
        "batch_tokens": "tokens per training batch, padding included; --batch-size caps its pairs",
        "eval_beam": "the test split is also decoded with this beam; 1 = greedy only",
        "bleu_samples": "validation sentences decoded for BLEU per epoch; the test split is decoded whole",
    }.items():
        default = None if name == "batch_tokens" else getattr(TaskOptions, name)
        shown = per_model(name) if default is None else default
        p.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=default, help=f"transformer: {help_} (default: {shown})"
        )
    p.add_argument(
        "--set",
        nargs="+",
        default=None,
        metavar="FIELD=VALUE",
        help="network config fields to change, e.g. --set d_model=128 dim_feedforward=256 (default: the "
        "config's own; fields the data decides, such as vocabulary sizes, can't be set)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the per-epoch progress bar (default: shown)")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs (default: written)")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left unset: the --quick preset first, then the model's full-run defaults
    (on a GPU, its GPU defaults over them).

    A flag given on the command line always wins, --quick or not."""
    parser = get_args_parser()
    entry = registry.get(args.model)
    if args.quick:
        for key, value in entry.quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    defaults = {"epochs": 10, "batch_size": 64, "lr": 1e-3, **entry.train}
    if pick_device(args.device).type == "cuda":
        defaults.update(entry.train_cuda)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.output_dir is None:
        args.output_dir = ROOT / "checkpoints" / args.model
    if args.init_seed is None:
        args.init_seed = args.seed
    for name in ("epochs", "batch_size", "lr", "limit", "max_tokens", "bleu_samples", "batch_tokens", "eval_beam"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = resolve_defaults(get_args_parser().parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(args.init_seed)

    resumed = registry.load_checkpoint(args.resume) if args.resume else None
    if resumed is not None and resumed["model_name"] != args.model:
        raise CLIError(f"--resume {args.resume}: checkpoint is for model {resumed['model_name']!r}, not {args.model!r}")
    if resumed is not None and "optimizer" not in resumed:
        raise CLIError(f"--resume {args.resume}: resume from last.pt, which holds the optimizer state")

    t0 = time.perf_counter()
    ds = load_dataset(args.model, args.data, seed=args.seed, limit=args.limit)
    if args.shuffle_labels:
        if not isinstance(ds.y, np.ndarray):
            raise CLIError(f"--shuffle-labels: {args.model} is not a classifier (its targets are not labels)")
        train_idx = ds.splits["train"]
        ds.y = ds.y.copy()
        ds.y[train_idx] = np.random.default_rng(args.init_seed).permutation(ds.y[train_idx])
    if resumed is not None and resumed["data"]["fingerprint"] != ds.fingerprint:
        raise CLIError(f"--resume {args.resume}: data differs from the run it continues (fingerprint mismatch)")
    entry = registry.get(args.model)
    task = entry.task(ds, resumed, TaskOptions.from_args(args))
    config_dict = resumed["config"] if resumed else network_config(entry.network.config_cls, task, args.set)
    model = build_model(entry.network, config_dict).to(device)
    n_params = sum(p.numel() for p in model.parameters())

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = sum(
        task.n_batches("train", args.batch_size, np.random.default_rng(args.init_seed + e))
        for e in range(1, args.epochs + 1)
    )
    scheduler = make_scheduler(optimizer, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    start_epoch, step, best, best_state, best_val, best_epoch = 1, 0, None, None, None, None
    if resumed is not None:
        model.load_state_dict(resumed["state_dict"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        start_epoch, step = resumed["epoch"] + 1, resumed["step"]
        best, best_val = resumed["best"]["value"], resumed["metrics"]["val"]
        best_state, best_epoch = resumed["best"]["state_dict"], resumed["best"]["epoch"]
        if start_epoch > args.epochs:
            raise CLIError(
                f"--resume {args.resume}: already trained {resumed['epoch']} epochs; pass --epochs > {resumed['epoch']}"
            )

    args.output_dir.mkdir(parents=True, exist_ok=True)
    writer = None
    if not args.no_tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(args.output_dir / "tb"))
    splits = ", ".join(f"{k} {len(v)}" for k, v in ds.splits.items())
    print(
        f"train {args.model}: {n_params / 1e6:.2f}M parameters on {device}, data {ds.name} ({splits}), "
        f"{args.epochs} epochs of batch {args.batch_size}",
        flush=True,
    )

    base = {
        "format_version": checkpoint.FORMAT_VERSION,
        "model_name": args.model,
        "network": network_path(entry.network),
        "task": task.name,
        "config": config_dict,
        **task.extras(),
        "data": {
            "name": ds.name,
            "fingerprint": ds.fingerprint,
            "source_sha256": ds.source_sha256,
            "sizes": {k: len(v) for k, v in ds.splits.items()},
        },
        # str(): torch.__version__ is a TorchVersion, which weights_only=True refuses to unpickle.
        "versions": {"torch": str(torch.__version__), "python": platform.python_version()},
        "git_commit": git_commit(),
        # Unix time of this run; archives take their MANIFEST createdOn from it (reproducible builds).
        "created_at": int(time.time()),
        "train_args": plain_args(args),
    }
    for epoch in range(start_epoch, args.epochs + 1):
        t_epoch = time.perf_counter()
        train_loss, step = train_one_epoch(model, task, optimizer, scheduler, scaler, device, epoch, args, writer, step)
        val = evaluate(model, task, "val", device)
        value = val[task.primary]
        improved = best is None or (value > best if task.higher_is_better else value < best)
        if improved:
            best, best_val, best_epoch = value, val, epoch
            best_state = snapshot(model)
        if writer is not None:
            writer.add_scalar("train/loss", train_loss, epoch)
            for k, v in val.items():
                writer.add_scalar(f"val/{k}", v, epoch)
        print(
            f"epoch {epoch}/{args.epochs}  train loss {train_loss:.4f}  val {task.summary(val)}  "
            f"({time.perf_counter() - t_epoch:.1f}s){'  *best' if improved else ''}",
            flush=True,
        )
        checkpoint.save(
            {
                **base,
                "epoch": epoch,
                "step": step,
                "state_dict": snapshot(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "best": {"value": best, "epoch": best_epoch, "state_dict": best_state},
                "metrics": {"val": best_val},
            },
            args.output_dir / "last.pt",
        )

    model.load_state_dict(best_state)
    test = evaluate(model, task, "test", device)
    metrics = {"val": best_val, "test": test, "primary": task.primary}
    base["train_args"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    checkpoint.save(
        {**base, "state_dict": best_state, "metrics": metrics, "epoch": best_epoch}, args.output_dir / "checkpoint.pt"
    )
    if writer is not None:
        for k, v in test.items():
            writer.add_scalar(f"test/{k}", v, args.epochs)
        writer.close()
    print(
        f"test {task.summary(test)}  -> {args.output_dir / 'checkpoint.pt'} ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("train", main))
