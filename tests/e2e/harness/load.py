"""Client load for the real-cluster e2e, built on the project's own client (scripts.client) and the
ports scripts.serve defines: a steady closed-loop load (``Load``) and an open-loop one at a set rate
(``PacedLoad``), both bounded in time and requests, both counting every outcome."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests

from scripts.client import Client, ClientError, Settings, encode_payload
from scripts.serve import PORTS


def service_settings(host: str, timeout: float = 60) -> Settings:
    """Client settings for a Service or pod address, without tokens (the chart's default)."""
    return Settings(host=host, ports=dict(PORTS), timeout=timeout, inference_token="", management_token="")


def predictions_url(host: str, model: str) -> str:
    return f"http://{host}:{PORTS['inference']}/predictions/{model}"


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
        settings = service_settings(self.host, self.timeout)
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
                        url = predictions_url(self.host, self.model)
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
