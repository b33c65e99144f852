"""Run a real TorchServe on loopback with the archives in the model store.

  python -m scripts.serve start            # returns once every model has a READY worker
  python -m scripts.serve status           # models, versions and worker states
  python -m scripts.serve stop             # returns once no TorchServe process is left

Logs, the token key file and the server's pid file live under the run directory (default run/),
never in the repo root. Token authorization is on unless --no-auth is given; clients find the
key file in the run directory themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import pod
from .common import ROOT, CLIError, run_cli

# TorchServe's settings, shared with the chart (its ConfigMap renders the same file), so what
# `make serve` and `make bench` run is what the pods run. This tool overrides addresses, the model
# store, the models and auth only.
BASE_CONFIG = ROOT / "k8s" / "chart" / "files" / "config.properties"
LOG_CONFIG = ROOT / "handlers" / "config" / "log4j2.xml"
PORTS = {  # name -> default port (each has a --<name>-port flag)
    "inference": 8080,
    "management": 8081,
    "metrics": 8082,
    "grpc_inference": 7070,
    "grpc_management": 7071,
}
READY = "READY"


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass
class ServerConfig:
    run_dir: Path = ROOT / "run"
    model_store: Path = ROOT / "model-store"
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(
        default_factory=lambda: {k: env_int(f"TS_{k.upper()}_PORT", v) for k, v in PORTS.items()}
    )
    auth: bool = True
    models: list[str] | None = None  # default: every .mar in the model store

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "tmp" / ".model_server.pid"

    @property
    def key_file(self) -> Path:
        return self.run_dir / "key_file.json"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def url(self, api: str) -> str:
        return f"http://{self.host}:{self.ports[api]}"

    def env(self) -> dict[str, str]:
        tmp = str(self.run_dir / "tmp")
        return {
            **os.environ,
            "LOG_LOCATION": str(self.log_dir),
            "METRICS_LOCATION": str(self.log_dir),
            "TEMP": tmp,
            "TMPDIR": tmp,
            "TMP": tmp,
            "TS_BUSY_DIR": tmp,
            # Idle OpenMP threads sleep instead of spinning on cores the frontend needs: on
            # 2 cores this cut worker CPU per request 4x and p99 at 16 clients 2.5x (make bench).
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        }


def model_archives(cfg: ServerConfig) -> dict[str, Path]:
    mars = {p.stem: p for p in sorted(cfg.model_store.glob("*.mar"))}
    if cfg.models:
        missing = [m for m in cfg.models if m not in mars]
        if missing:
            raise CLIError(f"no archive for {missing} in {cfg.model_store}; run `make archive`")
        mars = {m: mars[m] for m in cfg.models}
    if not mars:
        raise CLIError(f"no .mar files in {cfg.model_store}; run `make archive` first")
    return mars


def startup_timeout(mar: Path) -> int:
    """The model's own startupTimeout from the model-config.yaml inside its archive.

    The whole archive is checked first (every entry's CRC): a truncated or corrupted archive is
    refused here in one line, before a frontend starts and waits its start-up timeout on it."""
    try:
        with zipfile.ZipFile(mar) as z:
            bad = z.testzip()
            if bad:
                raise CLIError(f"{mar}: corrupted archive (CRC mismatch in {bad}); rebuild it with `make archive`")
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
            conf = manifest["model"].get("configFile")
            values = yaml.safe_load(z.read(conf)) if conf else {}
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        zlib.error,  # a damaged deflate stream, found while checking the CRCs
        EOFError,
        NotImplementedError,  # an unsupported compression method
        RuntimeError,  # an encrypted entry
        KeyError,
        ValueError,
        TypeError,
        OSError,
        yaml.YAMLError,
    ) as e:
        raise CLIError(
            f"{mar}: not a readable model archive ({type(e).__name__}: {e}); rebuild it with `make archive`"
        ) from None
    return int((values or {}).get("startupTimeout", 120))


def write_config(cfg: ServerConfig, mars: dict[str, Path]) -> Path:
    lines = []
    overrides = {
        "inference_address": cfg.url("inference"),
        "management_address": cfg.url("management"),
        "metrics_address": cfg.url("metrics"),
        "grpc_inference_address": cfg.host,
        "grpc_inference_port": str(cfg.ports["grpc_inference"]),
        "grpc_management_address": cfg.host,
        "grpc_management_port": str(cfg.ports["grpc_management"]),
        "model_store": str(cfg.model_store.resolve()),
        "load_models": ",".join(f"{m}={p.name}" for m, p in mars.items()),
        "disable_token_authorization": "false" if cfg.auth else "true",
    }
    for line in BASE_CONFIG.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key in overrides and not line.lstrip().startswith("#"):
            continue
        lines.append(line)
    lines += ["", "# Set by scripts/serve.py"] + [f"{k}={v}" for k, v in overrides.items()]
    path = cfg.run_dir / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


def running_pid(cfg: ServerConfig) -> int | None:
    try:
        pid = int(cfg.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that are free on ``host`` right now (for test and bench servers)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def check_ports_free(cfg: ServerConfig) -> None:
    for name, port in cfg.ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((cfg.host, port))
            except OSError:
                flag = f"--{name.replace('_', '-')}-port"
                raise CLIError(
                    f"port {port} ({name}) on {cfg.host} is in use; stop what holds it or pass {flag}"
                ) from None


def read_token(cfg: ServerConfig, api: str) -> str | None:
    """The current key for `inference`, `management` or `API` from the run's key file."""
    return pod.read_key(api, cfg.key_file) if cfg.auth else None


def describe(cfg: ServerConfig, model: str, timeout: float = 5.0) -> list[dict]:
    """describe-model; an expired management key is renewed (pod.management_get)."""
    return pod.management_get(cfg.url("management"), f"/models/{model}", timeout, cfg.key_file if cfg.auth else None)


def ready_workers(info: list[dict]) -> int:
    return len(pod.ready_worker_pids(info))


def log_excerpt(cfg: ServerConfig, model: str, lines: int = 25) -> str:
    path = cfg.log_dir / "model_log.log"
    if not path.is_file():
        return f"(no {path})"
    text = path.read_text(errors="replace").splitlines()
    pattern = re.compile(rf"W-\d+-{re.escape(model)}_")
    picked = [line for line in text if pattern.search(line)] or text
    return "\n".join(picked[-lines:])


def load_failure(cfg: ServerConfig, model: str, lines: int = 25) -> str:
    """Why a model did not load: the frontend's errors about it (an archive it could not unpack,
    say) and its workers' log lines; either may be where the cause is."""
    out = []
    ts_log = cfg.log_dir / "ts_log.log"
    if ts_log.is_file():
        errors = [
            line
            for line in ts_log.read_text(errors="replace").splitlines()
            if ("ERROR" in line or "Exception" in line or "WARN" in line) and model in line
        ]
        if errors:
            out.append(f"frontend ({ts_log}):\n" + "\n".join(errors[-10:]))
    out.append(f"workers ({cfg.log_dir / 'model_log.log'}):\n{log_excerpt(cfg, model, lines)}")
    return "\n".join(out)


def server_processes(pid: int) -> list:
    """The frontend and every process of its session: workers too, even orphaned ones (`start`
    gives the server a session of its own)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        family = {parent, *parent.children(recursive=True), *session_processes(os.getsid(pid))}
    except (psutil.NoSuchProcess, ProcessLookupError):
        return []
    return sorted(family, key=lambda p: p.pid)


def session_processes(sid: int) -> list:
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and os.getsid(p.pid) == sid:
                found.append(p)
        except (ProcessLookupError, PermissionError):
            continue
    return found


def start(cfg: ServerConfig, wait: float | None = None) -> dict[str, list[dict]]:
    """Start TorchServe and wait until every model has a READY worker; stop it again on failure."""
    pid = running_pid(cfg)
    if pid:
        raise CLIError(f"TorchServe is already running from {cfg.run_dir} (pid {pid}); run `make stop` first")
    if shutil.which("java") is None:
        raise CLIError("java not found: TorchServe's frontend needs Java 17 or newer")
    mars = model_archives(cfg)
    timeouts = {m: startup_timeout(p) for m, p in mars.items()}  # also refuses broken archives
    check_ports_free(cfg)
    for sub in ("logs", "tmp"):
        (cfg.run_dir / sub).mkdir(parents=True, exist_ok=True)
    cfg.key_file.unlink(missing_ok=True)
    config = write_config(cfg, mars)
    cmd = [
        str(Path(sys.executable).parent / "torchserve"),
        "--start",
        "--ncs",
        "--foreground",
        "--model-store",
        str(cfg.model_store.resolve()),
        "--ts-config",
        str(config),
        "--log-config",
        str(LOG_CONFIG),
    ]
    if not cfg.auth:
        cmd.append("--disable-token-auth")
    out = open(cfg.log_dir / "torchserve.out", "ab")
    # --foreground keeps the frontend our child; start_new_session detaches it from our terminal
    # so Ctrl-C here does not kill it, and `stop` ends it by pid.
    proc = subprocess.Popen(
        cmd, cwd=cfg.run_dir, env=cfg.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadlines = {m: time.monotonic() + (wait or timeouts[m] + 30) for m in mars}
    state: dict[str, list[dict]] = {}
    pending = set(mars)
    try:
        while pending:
            if proc.poll() is not None:
                tail = (cfg.log_dir / "torchserve.out").read_text(errors="replace").splitlines()[-15:]
                raise CLIError("TorchServe exited during start-up:\n" + "\n".join(tail))
            for m in sorted(pending):
                try:
                    info = describe(cfg, m, timeout=2)
                except (urllib.error.URLError, OSError, ValueError):
                    info = []
                if ready_workers(info):
                    state[m] = info
                    pending.discard(m)
                elif time.monotonic() > deadlines[m]:
                    raise CLIError(f"model {m} has no READY worker after its start-up timeout:\n{load_failure(cfg, m)}")
            time.sleep(0.25)
    except BaseException:
        stop(cfg)
        raise
    return state


def stop(cfg: ServerConfig, timeout: float = 30.0) -> bool:
    """Stop the server from this run directory and wait until its processes are gone."""
    pid = running_pid(cfg)
    if pid is None:
        return False
    procs = server_processes(pid)
    try:
        sid = os.getsid(pid)
    except ProcessLookupError:
        sid = None
    subprocess.run(
        [str(Path(sys.executable).parent / "torchserve"), "--stop"],
        cwd=cfg.run_dir,
        env=cfg.env(),
        capture_output=True,
        timeout=timeout,
    )
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout)
    # Workers started after the first look (a scale-up under way) are in the session too.
    if sid is not None and sid != os.getsid(0):
        alive = list({*alive, *session_processes(sid)})
    for p in alive:  # a frontend that ignored --stop: TERM, then KILL
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    cfg.pid_file.unlink(missing_ok=True)
    return True


def status_rows(cfg: ServerConfig) -> list[tuple[str, str, str]]:
    rows = []
    for m in model_archives(cfg):
        try:
            info = describe(cfg, m)
        except urllib.error.HTTPError as e:
            rows.append((m, "-", f"HTTP {e.code}"))
            continue
        for version in info:
            workers = ", ".join(f"{w['id']}:{w['status']}" for w in version.get("workers", [])) or "no workers"
            rows.append((m, version.get("modelVersion", "?"), workers))
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["start", "stop", "status"], help="what to do")
    p.add_argument("--run-dir", type=Path, default=ROOT / "run", help="logs, keys and pid file (default: run/)")
    p.add_argument(
        "--model-store", type=Path, default=ROOT / "model-store", help="folder of .mar files (default: model-store/)"
    )
    p.add_argument("--models", nargs="+", default=None, help="models to load (default: every .mar in the store)")
    p.add_argument("--host", default="127.0.0.1", help="address every API binds to (default: %(default)s)")
    for name, default in PORTS.items():
        env = f"TS_{name.upper()}_PORT"
        p.add_argument(
            f"--{name.replace('_', '-')}-port",
            type=int,
            default=env_int(env, default),
            help=f"{name.replace('_', ' ')} port (default: ${env} or {default})",
        )
    p.add_argument("--no-auth", action="store_true", help="turn token authorization off (default: on)")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for each model to be READY (default: its startupTimeout + 30)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    ports = {name: getattr(args, f"{name}_port") for name in PORTS}
    if len(set(ports.values())) != len(ports):
        raise CLIError(f"ports must differ, got {ports}")
    return ServerConfig(
        run_dir=args.run_dir.resolve(),
        model_store=args.model_store.resolve(),
        host=args.host,
        ports=ports,
        auth=not args.no_auth,
        models=args.models,
    )


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.command == "stop":
        print("stopped" if stop(cfg) else f"no TorchServe running from {cfg.run_dir}")
        return 0
    if args.command == "status":
        if running_pid(cfg) is None:
            raise CLIError(f"no TorchServe running from {cfg.run_dir}; run `make serve`")
        rows = status_rows(cfg)
        for m, version, workers in rows:
            print(f"{m:12s} {version:8s} {workers}")
        # A model the server cannot describe, or with no READY worker, is not serving.
        return 0 if all("READY" in workers for _, _, workers in rows) else 1
    t0 = time.monotonic()
    state = start(cfg, args.timeout)
    loaded = ", ".join(f"{m} v{info[0].get('modelVersion')}" for m, info in state.items())
    print(f"TorchServe ready in {time.monotonic() - t0:.1f}s (pid {running_pid(cfg)}), {len(state)} models: {loaded}")
    print(f"  REST inference  {cfg.url('inference')}/predictions/<model>")
    print(f"  gRPC inference  {cfg.host}:{cfg.ports['grpc_inference']}")
    print(f"  management      {cfg.url('management')}    metrics {cfg.url('metrics')}/metrics")
    print(f"  auth            {'token (keys in ' + str(cfg.key_file) + ')' if cfg.auth else 'off'}")
    print(f"  logs            {cfg.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("serve", main))
