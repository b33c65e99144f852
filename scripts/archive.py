"""Build reproducible TorchServe archives (.mar) and verify them against model-store/manifest.json.

  python -m scripts.archive build --model cnn               # -> model-store/cnn.mar
  python -m scripts.archive build --model lstm --version 2.0
  python -m scripts.archive verify                          # exit 1 on any mismatch

`build` runs the real torch-model-archiver on the checkpoint, the handler, the `models` and
`handlers` packages and handlers/config/<model>.yaml, then normalises the zip so the same inputs
give byte-identical archives: entries sorted, fixed timestamps and permissions, and MANIFEST.json's
createdOn taken from SOURCE_DATE_EPOCH or else from the checkpoint's own creation time.

`--optimize aoti` (make archive VARIANT=aoti, cnn only) also compiles the forward with AOTInductor
into the archive's model.pt2: native code for the CPU it was built on (a C++ compiler is needed,
about 40 s), so build it on the kind of host that serves it. The same host and toolchain give the
same bytes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from . import pod, registry
from .common import ROOT, CLIError, git_commit, run_cli, sha256_file

PACKAGES = ("models", "handlers")  # code every archive carries, .py files only
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold
MANIFEST = "manifest.json"


def stage_packages(stage: Path) -> Path:
    """Copy the packages' .py files under ``stage``.

    The archiver copies the *contents* of a folder named in --extra-files to the archive root, so
    it is given ``stage`` (which holds models/ and handlers/) to keep the package folders intact.
    """
    for pkg in PACKAGES:
        dst = stage / pkg
        dst.mkdir(parents=True)
        for src in sorted((ROOT / pkg).glob("*.py")):
            shutil.copy2(src, dst / src.name)
    return stage


def created_on(ckpt: dict) -> str:
    """MANIFEST.json's createdOn, in the archiver's own format, from a fixed source."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        ts = int(os.environ["SOURCE_DATE_EPOCH"])
    elif "created_at" in ckpt:
        ts = int(ckpt["created_at"])
    else:
        raise CLIError("checkpoint has no created_at; set SOURCE_DATE_EPOCH or retrain")
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%d/%m/%Y %H:%M:%S")


def normalise_zip(src: Path, dst: Path, created: str) -> None:
    """Rewrite ``src`` as ``dst`` with sorted entries, fixed metadata and a fixed createdOn."""
    with zipfile.ZipFile(src) as zin:
        entries = sorted(zin.infolist(), key=lambda i: i.filename)
        with zipfile.ZipFile(dst, "w") as zout:
            for info in entries:
                data = zin.read(info.filename)
                if info.filename == "MAR-INF/MANIFEST.json":
                    manifest = json.loads(data)
                    manifest["createdOn"] = created
                    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
                out = zipfile.ZipInfo(info.filename, ZIP_EPOCH)
                out.create_system = 3  # unix, so the permission bits below are honoured
                is_dir = info.filename.endswith("/")
                out.external_attr = ((0o40755 if is_dir else 0o100644) << 16) | (0x10 if is_dir else 0)
                out.compress_type = zipfile.ZIP_STORED if is_dir else zipfile.ZIP_DEFLATED
                zout.writestr(out, data, compresslevel=6)


PROFILES = ROOT / "handlers" / "config" / "profiles"


def profile_settings(profile: str, model: str) -> dict:
    """What a serving profile (handlers/config/profiles/<profile>.yaml) changes in a model's config."""
    import yaml

    path = PROFILES / f"{profile}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise CLIError(f"--profile {profile}: no {path.relative_to(ROOT)} (profiles: {known})")
    models = yaml.safe_load(path.read_text()).get("models") or {}
    return models.get(model) or {}


def variant_config(
    config: Path, tmp: Path, model: str, optimize: str | None = None, profile: str | None = None
) -> Path:
    """A copy of the model config with a profile's settings and handler.optimize applied."""
    import yaml

    values = yaml.safe_load(config.read_text())
    for key, value in (profile_settings(profile, model) if profile else {}).items():
        if key == "handler":
            values.setdefault("handler", {}).update(value)
        else:
            values[key] = value
    if optimize:
        values.setdefault("handler", {})["optimize"] = optimize
    out = tmp / config.name
    out.write_text(yaml.safe_dump(values, sort_keys=False))
    return out


def check_aoti(model_name: str) -> None:
    """Refuse the aoti variant where it can't be built, before any work is done."""
    why = registry.get(model_name).aoti
    if why:
        raise CLIError(f"optimize aoti: {model_name} {why}")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        raise CLIError("optimize aoti: AOTInductor needs a C++ compiler (apt-get install g++)")


def compile_aoti(model_name: str, ckpt: dict, dest: Path) -> Path:
    """AOTInductor-compile the model's forward, batch size dynamic, into ``dest`` (a .pt2 package)."""
    import warnings

    import torch

    from handlers import checkpoint

    check_aoti(model_name)
    model = checkpoint.rebuild(ckpt)
    size = ckpt["preprocess"]["image_size"]
    example = (torch.zeros(4, 1, size, size),)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
        return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(dest)))


def build(
    model: str,
    checkpoint: Path,
    version: str,
    export: Path,
    config: Path,
    optimize: str | None = None,
    profile: str | None = None,
    handler_file: Path | None = None,
) -> dict:
    """Archive ``checkpoint`` as ``model`` into ``export`` and record it in the manifest.

    ``handler_file`` replaces the registry's handler with another module of the ``handlers``
    package's kind (the e2e's slow-loading cnn); it is archived beside that package."""
    handler_file = handler_file or registry.get(model).handler_file
    handler = handler_file.name
    ckpt = registry.load_checkpoint(checkpoint, model)
    if not config.is_file():
        raise CLIError(f"{config}: model config not found")
    archiver = shutil.which("torch-model-archiver", path=str(Path(sys.executable).parent)) or shutil.which(
        "torch-model-archiver"
    )
    if archiver is None:
        raise CLIError("torch-model-archiver not found; run `make install`")
    export.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="archive-") as tmp:
        stage, out = Path(tmp) / "stage", Path(tmp) / "out"
        out.mkdir()
        extra = stage_packages(stage)
        shutil.copy2(handler_file, stage / "handlers" / handler)  # another handler joins the package
        if optimize or profile:
            config = variant_config(config, Path(tmp), model, optimize, profile)
        variant = _config_optimize(config)
        if variant == "aoti":
            from handlers.base import AOTI_PACKAGE

            compile_aoti(model, ckpt, stage / AOTI_PACKAGE)
        cmd = [
            archiver,
            "--model-name",
            model,
            "--version",
            version,
            "--serialized-file",
            str(checkpoint),
            "--handler",
            str(stage / "handlers" / handler),
            "--extra-files",
            str(extra),
            "--config-file",
            str(config),
            "--export-path",
            str(out),
            "--force",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CLIError(f"torch-model-archiver failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        tmp_mar = export / f".{model}.mar.tmp"
        normalise_zip(out / f"{model}.mar", tmp_mar, created_on(ckpt))
        os.replace(tmp_mar, export / f"{model}.mar")
    mar = export / f"{model}.mar"
    entry = {
        "file": mar.name,
        "version": version,
        "sha256": sha256_file(mar),
        "size": mar.stat().st_size,
        "checkpoint_sha256": sha256_file(checkpoint),
        "checkpoint_size": checkpoint.stat().st_size,
        "handler": handler,
        "optimize": variant,
        "profile": profile or "default",
        "metrics": ckpt["metrics"]["test"],
        "data_fingerprint": ckpt["data"]["fingerprint"],
        "versions": {
            "torch": ckpt["versions"]["torch"],
            "torchserve": importlib.metadata.version("torchserve"),
            "torch-model-archiver": importlib.metadata.version("torch-model-archiver"),
        },
        "git_commit": ckpt.get("git_commit", "unknown"),
        "archived_from_commit": git_commit(),
    }
    update_manifest(export, model, entry)
    return entry


def _config_optimize(config: Path) -> str:
    import yaml

    return (yaml.safe_load(config.read_text()).get("handler") or {}).get("optimize", "none")


def update_manifest(export: Path, model: str, entry: dict) -> None:
    path = export / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {"archives": {}}
    manifest["archives"][model] = entry
    manifest["archives"] = dict(sorted(manifest["archives"].items()))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def verify(store: Path, models: list[str] | None = None) -> list[str]:
    """Recompute every listed archive's sha256 and size; return the problems found."""
    path = store / MANIFEST
    if not path.is_file():
        return [f"{path}: not found"]
    try:
        archives = pod.manifest_entries(path.read_bytes(), str(path))
    except pod.PodError as e:
        return [str(e)]
    problems = []
    for name in models or sorted(archives):
        if name not in archives:
            problems.append(f"{name}: not listed in {path}")
            continue
        entry, mar = archives[name], store / archives[name]["file"]
        if not mar.is_file():
            problems.append(f"{mar}: missing")
            continue
        size, digest = mar.stat().st_size, sha256_file(mar)
        if size != entry["size"]:
            problems.append(f"{mar}: size {size} != {entry['size']} in the manifest (truncated or replaced)")
        if digest != entry["sha256"]:
            problems.append(f"{mar}: sha256 {digest} != {entry['sha256']} in the manifest")
            continue
        with zipfile.ZipFile(mar) as z:
            bad = z.testzip()
            if bad:
                problems.append(f"{mar}: corrupt entry {bad}")
            ckpt_digest = _sha256_bytes(z.read("checkpoint.pt"))
            if ckpt_digest != entry["checkpoint_sha256"]:
                problems.append(f"{mar}: embedded checkpoint sha256 differs from the manifest")
    return problems


def _sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="archive", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build model-store/<model>.mar from a checkpoint")
    b.add_argument("--model", required=True, choices=registry.names(), help="which model (required)")
    b.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint to archive (default: checkpoints/<model>/checkpoint.pt)",
    )
    b.add_argument("--version", default="1.0", help="model version in the archive (default: %(default)s)")
    b.add_argument(
        "--export-path", type=Path, default=ROOT / "model-store", help="output folder (default: model-store)"
    )
    b.add_argument(
        "--config", type=Path, default=None, help="model-config.yaml (default: handlers/config/<model>.yaml)"
    )
    b.add_argument(
        "--optimize",
        choices=["none", "int8", "aoti"],
        default=None,
        help="optimisation variant written into the archive's config (default: the config's own, none)",
    )
    b.add_argument(
        "--profile",
        default=None,
        help="serving profile: handlers/config/profiles/<name>.yaml changes workers, batching and handler "
        "options for that kind of node, e.g. gpu (default: none, the configs as they are: 2 CPU cores)",
    )
    v = sub.add_parser("verify", help="recompute sha256 and sizes against manifest.json")
    v.add_argument(
        "--model-store", type=Path, default=ROOT / "model-store", help="folder with the archives (default: model-store)"
    )
    v.add_argument(
        "--model", action="append", default=None, help="only this model; repeatable (default: every listed archive)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.command == "build":
        ckpt = args.checkpoint or ROOT / "checkpoints" / args.model / "checkpoint.pt"
        config = args.config or registry.get(args.model).config_path
        e = build(args.model, ckpt, args.version, args.export_path, config, args.optimize, args.profile)
        print(
            f"{args.export_path / e['file']}: version {e['version']}, {e['size'] / 1e6:.2f} MB "
            f"(checkpoint {e['checkpoint_size'] / 1e6:.2f} MB), sha256 {e['sha256'][:16]}…"
        )
        return 0
    problems = verify(args.model_store, args.model)
    for p in problems:
        print(f"verify: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"verify: every archive in {args.model_store / MANIFEST} matches")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("archive", main))
