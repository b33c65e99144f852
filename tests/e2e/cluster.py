"""Helpers for the real-cluster e2e: kubectl and helm calls with bounded waits, the evidence a
failing step prints, and a steady bounded client load that counts every outcome."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from scripts.client import Client, ClientError, Settings, encode_payload

ROOT = Path(__file__).resolve().parents[2]


class StepFailed(AssertionError):
    pass


@dataclass
class Cluster:
    kubectl_bin: str
    helm_bin: str
    kubeconfig: str
    image: str
    namespace: str = "e2e"

    @classmethod
    def from_env(cls) -> Cluster:
        return cls(
            kubectl_bin=os.environ.get("KUBECTL", "kubectl"),
            helm_bin=os.environ.get("HELM", "helm"),
            kubeconfig=os.environ.get("KUBECONFIG", ""),
            image=os.environ.get("E2E_IMAGE", ""),
        )

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": self.kubeconfig}

    def run(
        self, cmd: list[str], timeout: float = 120, check: bool = True, input_: str | None = None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT, input=input_
        )
        if check and proc.returncode != 0:
            raise StepFailed(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def kubectl(self, *args: str, timeout: float = 60, check: bool = True, namespaced: bool = True) -> str:
        ns = ["-n", self.namespace] if namespaced else []
        return self.run([self.kubectl_bin, *ns, "--request-timeout=30s", *args], timeout=timeout, check=check).stdout

    def json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def helm(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return self.run([self.helm_bin, "-n", self.namespace, *args], timeout=timeout, check=check)

    # ------------------------------------------------------------------------- pods

    def pods(self, selector: str) -> list[dict]:
        return self.json("get", "pods", "-l", selector)["items"]

    @staticmethod
    def is_ready(pod: dict) -> bool:
        return (
            pod["status"].get("phase") == "Running"
            and not pod["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))
        )

    def ready_pods(self, selector: str) -> list[dict]:
        return [p for p in self.pods(selector) if self.is_ready(p)]

    def wait(self, what: str, check: Callable[[], object], timeout: float, poll: float = 2.0):
        """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise StepFailed(f"{what}: not within {timeout:.0f}s")
            time.sleep(poll)

    def prometheus_url(self) -> str:
        """The e2e's Prometheus, through the Service the chart's defaults name (monitoring/prometheus-operated):
        by its ClusterIP, since the cluster runs no DNS server."""
        ip = self.json("get", "service", "prometheus-operated", "-n", "monitoring")["spec"]["clusterIP"]
        return f"http://{ip}:9090"

    def wait_pods_gone(self, namespace: str, what: str, timeout: float) -> None:
        """Wait, bounded, until ``namespace`` has no pod left (terminating ones included)."""
        self.wait(
            what,
            lambda: not self.run([self.kubectl_bin, "-n", namespace, "get", "pods", "-o", "name"]).stdout.strip(),
            timeout,
        )

    def container_pid(self, pod: dict, pattern: str) -> int:
        """The host PID of the process in ``pod`` whose command line contains ``pattern``.

        The e2e shares the host's PID namespace (it only entered the cluster's network
        namespace), so the pod's processes are visible in /proc; the pod UID in their cgroup
        path tells them apart from other pods'."""
        uid = pod["metadata"]["uid"]
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                cgroup = (proc / "cgroup").read_text()
            except OSError:
                continue
            if pattern in cmdline and uid in cgroup.replace("_", "-"):
                return int(proc.name)
        raise StepFailed(f"no process matching {pattern!r} in pod {pod['metadata']['name']}")

    def host_volume(self, namespace: str, claim: str, path: Path) -> Callable[[], None]:
        """A claim ``claim`` in ``namespace`` bound to a hostPath volume of ``path`` on the node (this
        machine), statically: the cluster has no provisioner. Creates the namespace; returns the
        volume's removal."""
        for p in (path, *path.rglob("*")):
            p.chmod(0o755 if p.is_dir() else 0o644)  # the pods run as a non-root user
        volume = f"{namespace}-{claim}"
        items = [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": volume},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadOnlyMany"],
                    "storageClassName": "manual",
                    "hostPath": {"path": str(path), "type": "Directory"},
                },
            },
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": namespace},
                "spec": {
                    "accessModes": ["ReadOnlyMany"],
                    "storageClassName": "manual",
                    "volumeName": volume,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        ]
        if self.run([self.kubectl_bin, "get", "namespace", namespace], check=False).returncode != 0:
            self.kubectl("create", "namespace", namespace, namespaced=False)
        manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        self.run([self.kubectl_bin, "apply", "-f", "-"], input_=manifest)
        self.wait(
            f"the claim {claim} bound to its volume",
            lambda: (
                self.run(
                    [self.kubectl_bin, "-n", namespace, "get", "pvc", claim, "-o", "jsonpath={.status.phase}"]
                ).stdout
                == "Bound"
            ),
            60,
        )
        return lambda: self.run([self.kubectl_bin, "delete", "-f", "-", "--wait=false"], input_=manifest, check=False)

    # ------------------------------------------------------------------------- evidence

    def evidence(self) -> str:
        parts = []
        for cmd in [
            ["get", "pods", "-A", "-o", "wide"],
            ["get", "events", "-A", "--sort-by=.lastTimestamp"],
            ["get", "deploy,svc,endpoints,hpa,pdb", "-A"],
            # What each autoscaler saw and decided: conditions, current metrics, events.
            ["describe", "hpa", "-A"],
            ["get", "scaledobjects.keda.sh", "-A", "-o", "wide"],
            ["top", "pods", "-A"],
        ]:
            proc = self.run([self.kubectl_bin, "--request-timeout=20s", *cmd], timeout=40, check=False)
            parts.append(f"--- kubectl {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        pods = self.run(
            [self.kubectl_bin, "--request-timeout=20s", "get", "pods", "-A", "-o", "json"], timeout=40, check=False
        )
        try:
            items = json.loads(pods.stdout)["items"]
        except ValueError:
            items = []
        for pod in items:
            ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
            containers = [c["name"] for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]]
            for c in containers:
                for previous in ([], ["--previous"]):
                    proc = self.run(
                        [
                            self.kubectl_bin,
                            "--request-timeout=20s",
                            "logs",
                            "-n",
                            ns,
                            name,
                            "-c",
                            c,
                            "--tail=40",
                            *previous,
                        ],
                        timeout=40,
                        check=False,
                    )
                    if proc.stdout.strip():
                        parts.append(
                            f"--- logs {ns}/{name} [{c}]{' (previous container)' if previous else ''}\n{proc.stdout}"
                        )
        return "\n".join(parts)


# ----------------------------------------------------------------------------- steady client load


def post_new_connection(url: str, body: bytes, ctype: str, timeout: float) -> requests.Response:
    """One request on a connection of its own, so kube-proxy picks a pod for each request."""
    return requests.post(url, data=body, timeout=timeout, headers={"Content-Type": ctype, "Connection": "close"})


@dataclass
class Load:
    """``clients`` threads sending good requests in a loop until stopped, each on a new connection.

    Bounded: it stops after ``max_seconds`` or ``max_requests`` whatever happens. Every outcome is
    counted: HTTP statuses by code, and connection errors or timeouts by exception type."""

    url: str
    requests_: list[tuple[str, bytes, str]]  # (model, body, content type)
    clients: int = 2
    max_seconds: float = 600
    max_requests: int = 100_000
    timeout: float = 30
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(self.clients)]

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    def _record(self, outcome: str, detail: str | None = None) -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            if detail and len(self.failures) < 20:
                self.failures.append(detail)

    def _loop(self, i: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        n = i
        while not self._stop.is_set() and time.monotonic() < deadline and self.sent < self.max_requests:
            model, body, ctype = self.requests_[n % len(self.requests_)]
            n += 1
            try:
                resp = post_new_connection(f"{self.url}/predictions/{model}", body, ctype, self.timeout)
                ok = 200 <= resp.status_code < 300
                self._record(str(resp.status_code), None if ok else f"{model}: {resp.status_code} {resp.text[:160]}")
            except requests.RequestException as e:
                self._record(type(e).__name__, f"{model}: {type(e).__name__}: {str(e)[:160]}")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)

    def non_2xx(self) -> int:
        return sum(n for k, n in self.outcomes.items() if not (k.isdigit() and 200 <= int(k) < 300))


# ----------------------------------------------------------------------------- paced load


@dataclass
class Sent:
    """One request of a paced load: when it was due and sent (s since the load's start), how long it
    took (ms), its transport, and its outcome: an HTTP status, a gRPC status, or an exception's name."""

    due: float
    start: float
    ms: float
    transport: str
    outcome: str

    @property
    def ok(self) -> bool:
        return self.outcome in ("200", "OK")


@dataclass
class PacedLoad:
    """An open-loop load at ``rate`` requests/s in all, REST and gRPC in turn, to a Service's ClusterIP.

    Request i is due at i / rate seconds: the offered load does not fall when the server slows, as
    it would with clients that wait for each answer, so the HPA sees the rate it is asked to carry.
    Every REST request opens a new connection and every gRPC client reopens its channel every
    ``reconnect_every`` requests, so kube-proxy spreads both over the replicas the HPA adds. Bounded by
    ``max_seconds``; every request is recorded (``sent``), failures with their detail."""

    host: str
    model: str
    payload: Any
    rate: float
    transports: tuple[str, ...] = ("rest", "grpc")
    workers: int = 12
    max_seconds: float = 900
    timeout: float = 30
    reconnect_every: int = 10
    sent: list[Sent] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(self.workers)]
        self.t0 = 0.0

    def _ticket(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self._next / self.rate > self.max_seconds:
                return None
            self._next += 1
            return self._next - 1

    def _loop(self) -> None:
        settings = Settings(
            host=self.host,
            ports={"inference": 8080, "grpc_inference": 7070, "management": 8081, "grpc_management": 7071},
            timeout=self.timeout,
            inference_token="",
            management_token="",
        )
        body, ctype = encode_payload(self.payload)
        grpc_client, grpc_uses = None, 0
        try:
            while (i := self._ticket()) is not None:
                due = i / self.rate
                if (wait := self.t0 + due - time.monotonic()) > 0 and self._stop.wait(wait):
                    break
                transport = self.transports[i % len(self.transports)]
                start = time.monotonic()
                if transport == "rest":
                    try:
                        url = f"http://{self.host}:8080/predictions/{self.model}"
                        resp = post_new_connection(url, body, ctype, self.timeout)
                        outcome, detail = str(resp.status_code), resp.text[:160]
                    except requests.RequestException as e:
                        outcome, detail = type(e).__name__, str(e)[:160]
                else:
                    if grpc_client is None or grpc_uses >= self.reconnect_every:
                        if grpc_client is not None:
                            grpc_client.close()
                        grpc_client, grpc_uses = Client("grpc", settings), 0
                    grpc_uses += 1
                    try:
                        grpc_client.predict(self.model, self.payload)
                        outcome, detail = "OK", ""
                    except ClientError as e:
                        outcome, detail = type(e).__name__, str(e)[:160]
                ms = 1000 * (time.monotonic() - start)
                record = Sent(due, start - self.t0, ms, transport, outcome)
                with self._lock:
                    self.sent.append(record)
                    if not record.ok and len(self.failures) < 20:
                        self.failures.append(f"{transport} at {record.start:.1f}s: {outcome} {detail}")
        finally:
            if grpc_client is not None:
                grpc_client.close()

    def start(self) -> PacedLoad:
        self.t0 = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 10)

    def finish(self) -> None:
        """Let the load run to its ``max_seconds``, then stop it."""
        for t in self._threads:
            t.join(max(0.0, self.t0 + self.max_seconds - time.monotonic()) + self.timeout + 10)
        self.stop()

    def __enter__(self) -> PacedLoad:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def non_ok(self) -> list[Sent]:
        with self._lock:
            return [s for s in self.sent if not s.ok]

    def window(self, since: float, until: float) -> list[Sent]:
        """The requests sent between ``since`` and ``until`` (monotonic clock)."""
        a, b = since - self.t0, until - self.t0
        with self._lock:
            return [s for s in self.sent if a <= s.start < b]
