"""What runs inside a TorchServe pod besides the server: fetch+verify, readiness, drain.

  python pod.py serve -- --model-store /model-store --ts-config config.properties   # the container's main process
  python pod.py fetch --source https://bucket.example/models/v1 --dest /model-store [--models cnn lstm]
  python pod.py fetch --source /mnt/pvc/model-store --dest /model-store
  python pod.py ready                     # exit 0 only when every model has a READY worker
  python pod.py ready-server --port 8090  # the same answer over HTTP: GET /ready (Knative's readiness)
  python pod.py drain --timeout 60        # preStop: stop taking traffic, wait for in-flight work
  python pod.py smoke --url http://svc:8080 --model lstm --text "fine"   # helm test

Standard library only, so the same file runs in the init container, the probes and the preStop
hook of the serving image (k8s/Dockerfile copies it to /opt/torchserve-k8s/pod.py).

fetch: reads manifest.json from the source, copies or downloads each listed archive into a
temporary file, checks its size and sha256 against the manifest, and only then moves it into
place. A mismatch or a short download stops with exit 1 and one clear line, so the pod never
serves an archive it could not verify.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import http.client
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

MANIFEST = "manifest.json"
DRAIN_MARKER = Path(os.environ.get("TS_DRAIN_MARKER", "/tmp/torchserve-draining"))
MANAGEMENT = os.environ.get("TS_MANAGEMENT_URL", "http://127.0.0.1:8081")
# Each worker keeps <TS_BUSY_DIR>/torchserve-busy-<pid>, its first byte 1 while a batch runs (handlers/base.py).
BUSY_DIR = os.environ.get("TS_BUSY_DIR")


class PodError(Exception):
    pass


# ----------------------------------------------------------------------------- fetch

MANIFEST_MAX_BYTES = 1 << 20
ARCHIVE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # a plain file name: no folder, no ..


def _is_url(source: str) -> bool:
    return "://" in source


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only within the source's origin: the bearer token never leaves it, and
    https is never downgraded to http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _origin(newurl) != _origin(req.full_url):
            raise PodError(
                f"{req.full_url}: redirected to another origin ({_origin(newurl)[0]}://{_origin(newurl)[1]}); refused"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameOriginRedirects)


def _open(source: str, name: str, timeout: float):
    if _is_url(source):
        if not source.lower().startswith("https://"):
            raise PodError(f"{source}: only https:// sources are allowed (archives and tokens travel over it)")
        req = urllib.request.Request(f"{source.rstrip('/')}/{name}")
        token = os.environ.get("MODEL_SOURCE_BEARER_TOKEN")  # for private buckets behind a gateway
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            return _OPENER.open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise PodError(f"{source}/{name}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise PodError(f"{source}/{name}: cannot download ({getattr(e, 'reason', e)})") from None
    path = Path(source) / name
    try:
        return open(path, "rb")
    except OSError as e:
        raise PodError(f"{path}: {e.strerror}") from None


def _read_capped(src, limit: int, deadline: float, what: str, sink=None) -> tuple[int, bytes]:
    """Read ``src`` to the end, at most ``limit`` bytes, before ``deadline`` (monotonic).

    One read returns what has arrived (read1), so a server dripping bytes slowly cannot hold the
    download past its deadline for more than one connection timeout."""
    size, head = 0, b""
    read = getattr(src, "read1", src.read)
    while True:
        try:
            chunk = read(1 << 16)
        except (OSError, http.client.HTTPException) as e:
            raise PodError(f"{what}: download broke off after {size} bytes ({type(e).__name__}: {e})") from None
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise PodError(f"{what}: more than the {limit} bytes the manifest allows; refused")
        if time.monotonic() > deadline:
            raise PodError(f"{what}: download not finished within its deadline ({size} bytes so far)")
        if sink is None:
            head += chunk
        else:
            sink(chunk)
    return size, head


def manifest_entries(raw: bytes, where: str) -> dict[str, dict]:
    """The manifest's archives, each checked: a plain .mar file name, a size and a sha256. The one
    check of manifest.json: the init container's fetch and `make archive`'s verify both use it."""
    try:
        archives = json.loads(raw)["archives"]
        if not isinstance(archives, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise PodError(f"{where}: not a manifest written by `make archive`") from None
    for name, entry in archives.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str)
            and ARCHIVE_NAME.fullmatch(entry["file"])
            and entry["file"].endswith(".mar")
            and isinstance(entry.get("size"), int)
            and not isinstance(entry.get("size"), bool)
            and entry["size"] > 0
            and isinstance(entry.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
        )
        if not ok:
            raise PodError(
                f"{where}: entry {str(name)[:60]!r} needs a plain file name ending in .mar, "
                "a positive size and a sha256"
            )
    return archives


def fetch(
    source: str, dest: Path, models: list[str] | None = None, timeout: float = 60.0, deadline_s: float = 900.0
) -> list[str]:
    """Copy every listed archive from ``source`` to ``dest``, verified; returns the names.

    ``timeout`` bounds each connection and read; ``deadline_s`` each whole download."""
    where = f"{source}/{MANIFEST}"
    with _open(source, MANIFEST, timeout) as f:
        _, raw = _read_capped(f, MANIFEST_MAX_BYTES, time.monotonic() + deadline_s, where)
    archives = manifest_entries(raw, where)
    names = models or sorted(archives)
    missing = [m for m in names if m not in archives]
    if missing:
        raise PodError(f"{where}: no entry for {missing}")
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    for name in names:
        entry = archives[name]
        target = dest / entry["file"]
        if target.is_file() and target.stat().st_size == entry["size"] and sha256_file(target) == entry["sha256"]:
            done.append(name)  # baked into the image or fetched by an earlier attempt
            continue
        tmp = dest / f".{entry['file']}.part"
        digest = hashlib.sha256()
        try:
            with _open(source, entry["file"], timeout) as src, open(tmp, "wb") as out:

                def sink(chunk: bytes, digest=digest, out=out) -> None:
                    digest.update(chunk)
                    out.write(chunk)

                size, _ = _read_capped(src, entry["size"], time.monotonic() + deadline_s, entry["file"], sink)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if size != entry["size"]:
            tmp.unlink()
            raise PodError(f"{entry['file']}: got {size} bytes, manifest says {entry['size']} (truncated download?)")
        if digest.hexdigest() != entry["sha256"]:
            tmp.unlink()
            raise PodError(
                f"{entry['file']}: sha256 {digest.hexdigest()} does not match the manifest's {entry['sha256']}"
            )
        os.replace(tmp, target)
        done.append(name)
    (dest / MANIFEST).write_bytes(raw)
    return done


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256 (hex). The one implementation: scripts/common.py re-exports it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- readiness and drain


def management_get(base: str, path: str, timeout: float = 2.0, key_file: str | os.PathLike | None = None):
    """GET ``base + path`` on TorchServe's management API as JSON, with the current key.

    With token auth, keys expire (token_expiration_min) and nothing renews them: on a refused key
    this asks TorchServe for a new one once (``refresh_key``) and tries again."""
    key_file = key_file or os.environ.get("TS_KEY_FILE")
    for attempt in (0, 1):
        req = urllib.request.Request(f"{base}{path}")
        token = read_key("management", key_file)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if e.code != 400 or not token or attempt or not refresh_key(base, "management", key_file, timeout):
                raise


def read_key(api: str, key_file: str | os.PathLike | None = None) -> str | None:
    """The current key for "inference", "management" or "API" from TorchServe's key file."""
    if key_file and Path(key_file).is_file():
        try:
            return json.loads(Path(key_file).read_text())[api]["key"]
        except (ValueError, KeyError, TypeError):
            return None
    return None


def refresh_key(base: str, api: str, key_file: str | os.PathLike | None, timeout: float = 2.0) -> bool:
    """Have TorchServe issue a new ``api`` key (it rewrites the key file), with the API key, which
    does not expire. True when it did."""
    api_key = read_key("API", key_file)
    if not api_key:
        return False
    req = urllib.request.Request(f"{base}/token?type={api}", headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def model_states(url: str = MANAGEMENT, timeout: float = 2.0) -> dict[str, list[dict]]:
    names = [m["modelName"] for m in management_get(url, "/models?limit=1000", timeout)["models"]]
    return {name: management_get(url, f"/models/{name}", timeout) for name in names}


def ready_worker_pids(versions: list[dict]) -> list[int]:
    """The PIDs of a model's READY workers, from its describe-model answer (every version)."""
    return sorted(w.get("pid", 0) for v in versions for w in v.get("workers", []) if w.get("status") == "READY")


def not_ready(states: dict[str, list[dict]], expected: list[str] | None = None) -> list[str]:
    """Models without a READY worker (and expected models that are not registered at all)."""
    problems = [f"{m}: not registered" for m in (expected or []) if m not in states]
    for name, versions in states.items():
        if not ready_worker_pids(versions):
            problems.append(f"{name}: no READY worker")
    if not states:
        problems.append("no models registered")
    return problems


def ready(url: str = MANAGEMENT, expected: list[str] | None = None, timeout: float = 2.0) -> list[str]:
    if DRAIN_MARKER.exists():
        return ["draining"]
    try:
        return not_ready(model_states(url, timeout), expected)
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        return [f"management API at {url} not answering ({getattr(e, 'reason', e)})"]


def busy_workers(busy_dir: str | None = BUSY_DIR) -> int:
    """Workers running a batch: busy files marked 1 whose worker process is still alive.

    A worker killed mid-batch leaves its file marked; such a file names a dead PID and is removed
    here, so it cannot hold every later drain for its whole timeout."""
    if not busy_dir:
        return 0
    busy = 0
    for path in Path(busy_dir).glob("torchserve-busy-*"):
        try:
            os.kill(int(path.name.rsplit("-", 1)[1]), 0)
        except ValueError:
            continue
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            continue
        except PermissionError:
            pass  # alive, owned by another user
        try:
            busy += path.read_bytes()[:1] == b"1"
        except FileNotFoundError:
            continue
    return busy


def in_flight(states: dict[str, list[dict]]) -> int:
    """Queued requests (describe-model) plus workers busy with a batch (their busy files)."""
    queued = sum(v.get("jobQueueStatus", {}).get("pendingRequests", 0) for vs in states.values() for v in vs)
    return queued + busy_workers()


def drain(url: str = MANAGEMENT, timeout: float = 60.0, settle: float = 5.0, poll: float = 0.5) -> tuple[bool, int]:
    """Fail readiness, let endpoints drop the pod, then wait until nothing is in flight."""
    DRAIN_MARKER.touch()
    deadline = time.monotonic() + timeout
    time.sleep(min(settle, timeout))  # kube-proxy and the Service take a moment to stop routing here
    quiet, pending = 0, -1
    while time.monotonic() < deadline:
        try:
            pending = in_flight(model_states(url))
        except urllib.error.HTTPError as e:
            # The server answers but refuses us (an expired or rejected key): requests may be
            # running, so this proves nothing; keep waiting on the busy files alone.
            pending = max(busy_workers(), 1) if e.code >= 400 else 0
        except (urllib.error.URLError, OSError, ValueError):
            return True, 0  # the server is already gone: nothing left in flight
        quiet = quiet + 1 if pending == 0 else 0
        if quiet >= 2:  # two quiet polls in a row: no request between them either
            return True, 0
        time.sleep(poll)
    return False, pending


class _ReadyHandler(http.server.BaseHTTPRequestHandler):
    """GET /ready: 200 "ready" when ready() finds nothing missing, else 503 with the reasons."""

    server: _ReadyServer
    timeout = 5  # seconds a client may take to send its request line and headers

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        if self.path != "/ready":
            self._answer(404, "not found: GET /ready")
            return
        problems = ready(self.server.management, self.server.expected)
        self.server.note(problems)
        self._answer(503 if problems else 200, "not ready: " + "; ".join(problems) if problems else "ready")

    def _answer(self, code: int, text: str) -> None:
        body = (text + "\n").encode("ascii", "replace")
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name)
        pass  # one line per change of state instead (note), not one per probe


class _ReadyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], management: str, expected: list[str] | None):
        super().__init__(address, _ReadyHandler)
        self.management, self.expected = management, expected
        self._last: list[str] | None = None

    def note(self, problems: list[str]) -> None:
        if problems != self._last:
            self._last = problems
            print("ready-server: " + ("not ready: " + "; ".join(problems) if problems else "ready"), flush=True)


def ready_server(port: int, url: str = MANAGEMENT, expected: list[str] | None = None, host: str = "127.0.0.1"):
    """An HTTP server answering GET /ready with what `pod.py ready` would exit with.

    Knative's queue-proxy runs a revision's readiness probes itself, and only over HTTP, TCP or
    gRPC: an exec probe becomes a TCP check of the server's port, which TorchServe opens (and
    whose /ping says Healthy) before any model is loaded, so the activator would send requests to
    a pod that can only answer 404 or 503. The chart runs this in a sidecar whose HTTP readiness
    probe the queue-proxy runs beside the server's (multi-container probing)."""
    return _ReadyServer((host, port), url, expected)


# ----------------------------------------------------------------------------- the server process

PR_SET_CHILD_SUBREAPER = 36


def clear_stale_state(busy_dir: str | None = BUSY_DIR) -> list[str]:
    """Remove what a previous container of this pod left in the pod-lifetime volumes.

    preStop also runs when a probe kills the container, so its drain marker would keep the next
    container unready for good; a worker killed mid-batch leaves its busy file."""
    removed = []
    for path in [DRAIN_MARKER, *(Path(busy_dir).glob("torchserve-busy-*") if busy_dir else [])]:
        if path.exists():
            path.unlink()
            removed.append(str(path))
    return removed


def serve(torchserve_args: list[str], pid_file: Path | None = None) -> int:
    """Start TorchServe and stay its parent until the JVM exits; returns the exit code.

    `torchserve --foreground` only waits on the JVM and dies at the first SIGTERM, which lets a
    container end (and its JVM be killed) before the JVM's shutdown has run. Here the launcher
    starts the JVM in the background; this process becomes the JVM's subreaper, passes SIGTERM and
    SIGINT on to it, and exits only once the JVM has shut down."""
    for path in clear_stale_state():
        print(f"serve: removed {path} left by the previous container", flush=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise PodError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    pid_file = pid_file or Path(os.environ.get("TEMP", "/tmp")) / ".model_server.pid"
    pid_file.unlink(missing_ok=True)
    launcher = subprocess.run(["torchserve", "--start", *torchserve_args])
    try:
        jvm = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        raise PodError(f"torchserve did not start (launcher exit {launcher.returncode}, no {pid_file})") from None
    print(f"serve: TorchServe frontend running as pid {jvm}", flush=True)
    stopping: list[float] = []

    def forward(signum, _frame):
        if not stopping:
            stopping.append(time.monotonic())
            print(f"serve: {signal.Signals(signum).name}: asking TorchServe to shut down", flush=True)
        try:
            os.kill(jvm, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            pid, status = os.wait()  # the JVM and any orphaned worker are our children now
        except ChildProcessError:
            raise PodError(f"lost track of the TorchServe frontend (pid {jvm})") from None
        if pid != jvm:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            took = time.monotonic() - stopping[0]
            # The JVM answers SIGTERM by running its shutdown hooks and exiting 143.
            clean = code in (0, 143)
            print(
                f"serve: TorchServe {'shut down cleanly' if clean else f'exited with {code}'} "
                f"{took:.1f}s after the signal",
                flush=True,
            )
            return 0 if clean else 1
        print(f"serve: TorchServe exited on its own with {code}", file=sys.stderr, flush=True)
        return code or 1


# A new pod's address reaches a NetworkPolicy enforcer's rules (kube-router, Calico, Cilium) at its
# next sync, a moment after the pod starts: until then its connections may be refused.
SMOKE_CONNECT_GRACE_S = 30.0


def smoke(url: str, model: str, text: str, timeout: float = 30.0, connect_grace: float = SMOKE_CONNECT_GRACE_S) -> dict:
    """One text prediction through a Service: HTTP 200 with a JSON object, else PodError. A refused
    or reset connection is tried again, once a second, for up to ``connect_grace`` seconds."""
    req = urllib.request.Request(
        f"{url.rstrip('/')}/predictions/{model}",
        data=text.encode(),
        headers={"Content-Type": "text/plain; charset=utf-8"},
        method="POST",
    )
    deadline = time.monotonic() + connect_grace
    while True:
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = json.loads(resp.read())
            break
        except urllib.error.HTTPError as e:
            raise PodError(f"{req.full_url}: HTTP {e.code} {e.read()[:200]!r}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (ConnectionRefusedError, ConnectionResetError)) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise PodError(f"{req.full_url}: {reason}") from None
    if not isinstance(body, dict) or not body:
        raise PodError(f"{req.full_url}: unexpected answer {body!r}")
    return body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pod", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("serve", help="run TorchServe as the container's main process, with a clean SIGTERM shutdown")
    v.add_argument("torchserve_args", nargs=argparse.REMAINDER, help="arguments for `torchserve --start`, after --")
    f = sub.add_parser("fetch", help="copy/download the archives listed in a manifest, verified")
    f.add_argument(
        "--source",
        default=os.environ.get("MODEL_SOURCE"),
        help="URL or folder with manifest.json (default: $MODEL_SOURCE)",
    )
    f.add_argument(
        "--dest",
        type=Path,
        default=Path(os.environ.get("MODEL_STORE", "/home/model-server/model-store")),
        help="model store to fill (default: $MODEL_STORE or /home/model-server/model-store)",
    )
    f.add_argument("--models", nargs="*", default=None, help="only these models (default: every listed archive)")
    f.add_argument("--timeout", type=float, default=60.0, help="seconds per connection and read (default: %(default)s)")
    f.add_argument(
        "--deadline", type=float, default=900.0, help="seconds for each whole download (default: %(default)s)"
    )
    r = sub.add_parser("ready", help="exit 0 when every model has a READY worker")
    r.add_argument("--url", default=MANAGEMENT, help="management API (default: $TS_MANAGEMENT_URL or %(default)s)")
    r.add_argument("--models", nargs="*", default=None, help="models that must be registered (default: whatever is)")
    rs = sub.add_parser("ready-server", help="answer GET /ready over HTTP as `ready` would exit (Knative)")
    rs.add_argument("--port", type=int, default=8090, help="port on loopback (default: %(default)s)")
    rs.add_argument("--url", default=MANAGEMENT, help="management API (default: $TS_MANAGEMENT_URL or %(default)s)")
    rs.add_argument("--models", nargs="*", default=None, help="models that must be registered (default: whatever is)")
    d = sub.add_parser("drain", help="preStop: fail readiness, wait for in-flight requests")
    d.add_argument("--url", default=MANAGEMENT, help="management API (default: %(default)s)")
    d.add_argument("--timeout", type=float, default=60.0, help="upper bound in seconds (default: %(default)s)")
    d.add_argument(
        "--settle", type=float, default=5.0, help="seconds for endpoints to drop the pod (default: %(default)s)"
    )
    s = sub.add_parser("smoke", help="one text prediction through a URL (helm test, deploy)")
    s.add_argument("--url", required=True, help="inference base URL, e.g. http://svc:8080")
    s.add_argument("--model", required=True, help="model name")
    s.add_argument("--text", required=True, help="text to send")
    args = p.parse_args(argv)
    try:
        if args.command == "serve":
            rest = args.torchserve_args
            return serve(rest[1:] if rest[:1] == ["--"] else rest)
        if args.command == "fetch":
            if not args.source:
                raise PodError("no --source and no MODEL_SOURCE: nothing to fetch from")
            names = fetch(args.source, args.dest, args.models, args.timeout, args.deadline)
            print(f"fetch: verified {', '.join(names)} into {args.dest}")
        elif args.command == "ready":
            problems = ready(args.url, args.models)
            if problems:
                print("not ready: " + "; ".join(problems), file=sys.stderr)
                return 1
            print("ready")
        elif args.command == "ready-server":
            server = ready_server(args.port, args.url, args.models)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            print(f"ready-server: GET http://127.0.0.1:{args.port}/ready", flush=True)
            server.serve_forever()
        elif args.command == "smoke":
            print(json.dumps(smoke(args.url, args.model, args.text)))
        else:
            ok, pending = drain(args.url, args.timeout, args.settle)
            print(
                "drain: no request in flight"
                if ok
                else f"drain: gave up after {args.timeout}s with {pending} in flight"
            )
    except PodError as e:
        print(f"pod {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
