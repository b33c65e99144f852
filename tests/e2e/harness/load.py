"""Client load for the real-cluster e2e: one generator, ``Load``, built on the project's own client
(scripts.client, both transports) with the ports scripts.serve defines.

It runs closed-loop (``rate=None``: each worker sends its next request when the last is answered, a
steady load that follows the server's speed) or open-loop (``rate=r``: request i is due at i / r
seconds whatever the answers take, so the offered load does not fall when the server slows and an
HPA sees the rate it is asked to carry). Bounded in time and requests; every request is recorded
with its outcome, and failures keep their detail."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from scripts.client import Client, ClientError, Settings
from scripts.serve import PORTS


def service_settings(host: str, timeout: float = 60) -> Settings:
    """Client settings for a Service or pod address, without tokens (the chart's default)."""
    return Settings(host=host, ports=dict(PORTS), timeout=timeout, inference_token="", management_token="")


def as_settings(target: str | Settings, timeout: float = 60) -> Settings:
    """Client settings as given, or a Service's or pod's address as ``service_settings`` makes them."""
    return target if isinstance(target, Settings) else service_settings(target, timeout)


def predictions_url(host: str, model: str) -> str:
    return f"http://{host}:{PORTS['inference']}/predictions/{model}"


def serves(target: str | Settings, model: str, payload: Any) -> bool:
    """Whether ``target`` answers one request over each transport now. A pod that turned Ready
    reaches its Service's EndpointSlice, then kube-proxy's rules, a moment later: until then a new
    Service refuses connections, so a load waits for this, not for the pods alone."""
    settings = as_settings(target)
    for transport in ("rest", "grpc"):
        try:
            with Client(transport, settings) as client:
                client.predict(model, payload)
        except ClientError:
            return False
    return True


OK = "ok"


@dataclass
class Sent:
    """One request: when it was due and sent (s since the load's start), how long it took (ms), its
    model and transport, and its outcome: ``ok``, or the client's error class and status."""

    due: float
    start: float
    ms: float
    model: str
    transport: str
    outcome: str

    @property
    def ok(self) -> bool:
        return self.outcome == OK


def outcome_of(e: ClientError) -> str:
    return f"{type(e).__name__} {e.status}" if e.status else type(e).__name__


@dataclass
class Load:
    """``workers`` threads sending ``requests_`` ((model, payload) pairs, in turn) to ``target`` (a
    Service's or pod's address, or client settings), REST and gRPC in turn, closed-loop or at ``rate``
    requests/s in all.

    Every REST request opens a new connection and every gRPC client reopens its channel every
    ``reconnect_every`` requests and after a failure, so kube-proxy spreads both over the replicas a Service has now
    (new pods of a rollout or a scale-up get their share; draining ones stop getting new ones).
    It stops after ``max_seconds`` or ``max_requests`` whatever happens."""

    target: str | Settings
    requests_: list[tuple[str, Any]]
    rate: float | None = None
    transports: tuple[str, ...] = ("rest", "grpc")
    workers: int = 2
    max_seconds: float = 900
    max_requests: int = 100_000
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
        """The next request's number, or None once the load is stopped or past its bounds."""
        with self._lock:
            if self._stop.is_set() or self._next >= self.max_requests:
                return None
            if self.rate is not None and self._next / self.rate > self.max_seconds:
                return None
            if self.rate is None and time.monotonic() - self.t0 > self.max_seconds:
                return None
            self._next += 1
            return self._next - 1

    def _loop(self) -> None:
        settings = as_settings(self.target, self.timeout)
        clients: dict[str, Client] = {}
        uses: collections.Counter = collections.Counter()
        try:
            while (i := self._ticket()) is not None:
                due = i / self.rate if self.rate else 0.0
                if (wait := self.t0 + due - time.monotonic()) > 0 and self._stop.wait(wait):
                    break
                model, payload = self.requests_[i % len(self.requests_)]
                transport = self.transports[i % len(self.transports)]
                every = 1 if transport == "rest" else self.reconnect_every
                if transport not in clients or uses[transport] >= every:
                    if transport in clients:
                        clients[transport].close()
                    clients[transport], uses[transport] = Client(transport, settings), 0
                uses[transport] += 1
                start = time.monotonic()
                try:
                    clients[transport].predict(model, payload)
                    outcome, detail = OK, ""
                except ClientError as e:
                    outcome, detail = outcome_of(e), str(e)[:160]
                    # As a client with a deadline does: a fresh connection after a failure, not
                    # another call on one that may lead to a pod that is gone.
                    clients.pop(transport).close()
                record = Sent(due, start - self.t0, 1000 * (time.monotonic() - start), model, transport, outcome)
                with self._lock:
                    self.sent.append(record)
                    if not record.ok and len(self.failures) < 100:
                        self.failures.append(f"{model} {transport} at {record.start:.1f}s: {outcome} {detail}")
        finally:
            for client in clients.values():
                client.close()

    def start(self) -> Load:
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

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.sent)

    def outcomes(self) -> dict[str, int]:
        """Requests by (transport, outcome), e.g. {"rest ok": 812, "grpc ok": 810}."""
        with self._lock:
            return dict(collections.Counter(f"{s.transport} {s.outcome}" for s in self.sent))

    def non_ok(self) -> list[Sent]:
        with self._lock:
            return [s for s in self.sent if not s.ok]

    def window(self, since: float, until: float) -> list[Sent]:
        """The requests sent between ``since`` and ``until`` (monotonic clock)."""
        a, b = since - self.t0, until - self.t0
        with self._lock:
            return [s for s in self.sent if a <= s.start < b]
