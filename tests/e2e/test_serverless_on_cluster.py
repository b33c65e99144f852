"""Serverless groups on Knative Serving: scale to zero, and back with no failed request.

e2e.sh starts the cluster DNS (CoreDNS) and Knative Serving v0.50.0's core (controller, webhook,
autoscaler, activator) from Knative's own YAML, with no networking layer (none is served here). A
release of three serverless groups, each its own Knative Service with the serving image from the
cluster's registry:

- ``cnn`` over REST (http1), ``cnn-grpc`` the same model over gRPC (h2c): Knative routes one port
  per revision, so the two protocols are two groups;
- ``lstm`` over REST with a concurrency target of 2 a pod, for the load that scales it past one;
- ``cnn-slow``: cnn from an archive on a volume (models.source.type pvc) whose handler takes
  90 s to load (tests/e2e/slow_handler.py), a stand-in for a model whose weights take minutes.

Clients call a revision's Service (``<revision>.<namespace>.svc.cluster.local``, which Knative points
at the activator while the revision has no ready pod) by its ClusterIP, with that name as HTTP Host
or gRPC :authority, as a client in the cluster does through the cluster DNS. Every test samples,
each second, each group's desired and actual scale (its PodAutoscaler) and pods; a restarted
container, or a pod deleted before it was ever Ready, fails it.

1. From zero: 20 concurrent REST requests to ``cnn`` at 0 pods, all answered; then the same over
   gRPC to ``cnn-grpc``, each under a trickle on ``lstm``. The cold start's stages are timed from
   the pod's conditions and the model-ready sidecar's log: pod created, scheduled, archives fetched
   and verified (init container), containers started, models loaded, first answer.
2. Three cycles of back to zero after the idle window and a burst from zero again, 0 failed.
3. Under load ``lstm`` scales past one pod, and back to zero after it, 0 failed.
4. From zero, 20 requests to ``cnn-slow`` are held while its pod loads the model for 90 s, past
   the 60 s at which held connections have been closed elsewhere, and all answered; the pod is
   neither restarted nor removed before it is Ready.

The figures go to bench/results/serverless.json and serverless.png (docs/serverless.md).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import pytest
import yaml

matplotlib.use("Agg")  # files only: the e2e has no display
import matplotlib.pyplot as plt

from scripts import archive
from scripts.client import Client, ClientError, Settings
from scripts.common import ROOT
from scripts.registry import sample_inputs
from scripts.serve import PORTS
from tests.e2e import slow_handler
from tests.e2e.harness.cluster import Cluster, StepFailed
from tests.e2e.harness.load import Load, outcome_of
from tests.e2e.harness.release import (
    CHART,
    READY_BOUND_S,
    REGISTRY_IMAGE,
    VALUES,
    Release,
    pull_secret,
    registry_image_flags,
)
from tests.e2e.harness.results import record, save_figure

NAMESPACE = "e2e-serverless"
RELEASE = Release("tssl")
SECRET = "registry-login"
WINDOW_S = 10  # serverless.window: the autoscaler's window, and the idle time before scaling to zero
# Back to zero: the window, Knative's scale-to-zero-grace-period (30 s, its default), the
# autoscaler's tick and the SKS's switch to the activator; measured 35-45 s here. Bounded at twice.
ZERO_BOUND_S = 2 * (WINDOW_S + 30 + 10)
BURST = 20
# A request from zero waits for a pod to start and load its models: measured 5-9 s here; the
# client's deadline is far above it, and below the revision's timeoutSeconds (the chart's 600).
COLD_TIMEOUT_S = 120
# The slow group's deadline: its load plus a fast group's deadline, below timeoutSeconds.
SLOW_TIMEOUT_S = slow_handler.LOAD_S + COLD_TIMEOUT_S
SLOW_CLAIM = "slow-models"
LSTM_TARGET = 2  # requests in flight per lstm pod: 8 closed-loop clients want 4 pods, capped at MAX_SCALE
MAX_SCALE = 3
GROUPS = {
    "cnn": ("cnn", "http1"),
    "cnn-grpc": ("cnn", "h2c"),
    "lstm": ("lstm", "http1"),
    "cnn-slow": ("cnn", "http1"),
}
VALUES_FLAGS = [
    *("--set", "models.names={cnn,lstm}", "--set", "groups.transformer=null", "--set", "helmTest.model=cnn"),
    *("--set", "groups.cnn.serverless.enabled=true"),
    *("--set", "groups.cnn-grpc.models={cnn}", "--set", "groups.cnn-grpc.serverless.enabled=true"),
    *("--set", "groups.cnn-grpc.serverless.protocol=h2c"),
    *("--set", "groups.lstm.serverless.enabled=true"),
    *("--set", f"groups.lstm.serverless.targetConcurrency={LSTM_TARGET}"),
    *("--set", "groups.cnn-slow.models={cnn}", "--set", "groups.cnn-slow.serverless.enabled=true"),
    *("--set", "groups.cnn-slow.modelSource.type=pvc"),
    *("--set", f"groups.cnn-slow.modelSource.pvc.claimName={SLOW_CLAIM}"),
    *("--set", f"serverless.window={WINDOW_S}s", "--set", f"serverless.maxScale={MAX_SCALE}"),
]
RESULTS: dict = {}  # what each test measured, written by the last two (save())

# stage knative: needs Knative Serving
pytestmark = [
    pytest.mark.stage("knative"),
    pytest.mark.skipif(not REGISTRY_IMAGE, reason="no E2E_REGISTRY_IMAGE: e2e.sh starts the registry"),
]


def wall(stamp: str) -> float:
    """A Kubernetes timestamp (RFC 3339, whole seconds or up to nanoseconds) as seconds since the epoch."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    seconds = dt.datetime.fromisoformat(whole).replace(tzinfo=dt.UTC).timestamp()
    return seconds + (float(f"0.{fraction}") if fraction else 0.0)


@dataclasses.dataclass
class Revision:
    """A group's ready revision: its name, and its Service's address and the name clients use."""

    group: str
    name: str
    ip: str
    protocol: str

    @property
    def authority(self) -> str:
        return f"{self.name}.{NAMESPACE}.svc.cluster.local"

    def settings(self, timeout: float) -> Settings:
        # The revision's Service: port 80 for http1, 81 for h2c.
        return Settings(
            host=self.ip,
            ports={**PORTS, "inference": 80},
            timeout=timeout,
            inference_token="",
            management_token="",
            grpc_target=f"{self.ip}:81",
            authority=self.authority,
        )

    @property
    def transport(self) -> str:
        return "grpc" if self.protocol == "h2c" else "rest"


class Timeline:
    """Each second: per group, the PodAutoscaler's desired and actual scale and the pods (ready,
    existing, restarts). It keeps every pod it saw: when it was first Ready, and whether it was
    being deleted before that (a pod scaled away before Ready)."""

    def __init__(self, c: Cluster):
        self.c, self.t0, self.rows = c, time.time(), []
        self.first_ready: dict[str, float] = {}
        self.seen_alive: set[str] = set()  # pods seen before any deletion (not those already going)
        self.killed_unready: set[str] = set()
        self.restarts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.sample()
            except (StepFailed, ValueError, KeyError):
                continue  # a slow API answer: the next second samples again

    def sample(self) -> dict:
        now = time.time()
        pas = {
            pa["metadata"]["labels"].get("serving.knative.dev/configuration", ""): pa
            for pa in self.c.json("get", "podautoscalers.autoscaling.internal.knative.dev")["items"]
        }
        row: dict = {"t": round(now - self.t0, 1)}
        pods = self.c.pods(RELEASE.selector)
        for group in GROUPS:
            pa = pas.get(RELEASE.group(group), {}).get("status", {})
            mine = [p for p in pods if p["metadata"]["labels"].get("torchserve-models/group") == group]
            for p in mine:
                name = p["metadata"]["name"]
                deleting = bool(p["metadata"].get("deletionTimestamp"))
                if not deleting:
                    self.seen_alive.add(name)
                if Cluster.is_ready(p):
                    self.first_ready.setdefault(name, now)
                elif deleting and name in self.seen_alive and name not in self.first_ready:
                    self.killed_unready.add(name)
                self.restarts[name] = sum(s.get("restartCount", 0) for s in p["status"].get("containerStatuses", []))
            row[group] = {
                "desired": pa.get("desiredScale"),
                "actual": pa.get("actualScale"),
                "ready": sum(Cluster.is_ready(p) for p in mine),
                "pods": len(mine),
            }
        self.rows.append(row)
        return row

    def __enter__(self) -> Timeline:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def summary(self, last_s: float = 90) -> str:
        rows = [r for r in self.rows if r["t"] >= (self.rows[-1]["t"] - last_s if self.rows else 0)]
        return "\n".join(
            f"{r['t']:6.1f}s "
            + "  ".join(
                f"{g}: {r[g]['desired']}/{r[g]['actual']} ready {r[g]['ready']} pods {r[g]['pods']}" for g in GROUPS
            )
            for r in rows
        )

    def check_pods(self) -> None:
        """No container restarted, no pod deleted before it was ever Ready."""
        restarted = {n: r for n, r in self.restarts.items() if r}
        assert not restarted, f"containers restarted: {restarted}\n{self.summary()}"
        assert not self.killed_unready, f"pods deleted before they were Ready: {self.killed_unready}\n{self.summary()}"


def slow_store(store: Path) -> Path:
    """``store`` with one archive, cnn, built by the real archiver with slow_handler.py as its
    handler and a model config whose startupTimeout gives a worker the load and a minute more."""
    checkpoint = ROOT / "checkpoints" / "cnn" / "checkpoint.pt"
    assert checkpoint.is_file(), f"{checkpoint}: missing (make archive trains it)"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    config = yaml.safe_load((ROOT / "handlers" / "config" / "cnn.yaml").read_text())
    config["startupTimeout"] = slow_handler.LOAD_S + 60
    with tempfile.TemporaryDirectory(prefix="slow-config-") as tmp:
        path = Path(tmp) / "cnn.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        archive.build("cnn", checkpoint, "1.0", store, path, handler_file=Path(slow_handler.__file__))
    return store


@pytest.fixture(scope="module")
def serverless(cluster: Cluster):
    c = dataclasses.replace(cluster, namespace=NAMESPACE)
    c.create_namespace(NAMESPACE)
    pull_secret(c, SECRET)
    state = Path(os.environ.get("STATE", "/var/lib/torchserve-e2e"))
    remove_volume = c.host_volume(NAMESPACE, SLOW_CLAIM, slow_store(state / "slow-model-store"))
    c.helm("install", RELEASE.name, str(CHART), "-f", str(VALUES), *registry_image_flags(SECRET), *VALUES_FLAGS)
    revisions = {}
    try:
        for group, (_, protocol) in GROUPS.items():
            name = c.wait(
                f"{group}'s first revision Ready (its first pod loads every model)",
                lambda g=group: (
                    c.json("get", "ksvc", RELEASE.group(g)).get("status", {}).get("latestReadyRevisionName")
                ),
                READY_BOUND_S,
            )
            ip = c.json("get", "service", name)["spec"]["clusterIP"]
            revisions[group] = Revision(group, name, ip, protocol)
        inputs = {m: payload for m, (_, payload) in sample_inputs(["cnn", "lstm"]).items()}
        yield c, revisions, inputs
    finally:
        c.helm("uninstall", RELEASE.name, "--wait", "--timeout", "120s", check=False)
        remove_volume()
        c.kubectl("delete", "namespace", NAMESPACE, "--wait=false", namespaced=False, check=False)


def at_zero(timeline: Timeline, group: str) -> bool:
    row = timeline.sample()[group]
    return row["desired"] == 0 and row["actual"] == 0 and row["ready"] == 0


def wait_zero(c: Cluster, timeline: Timeline, group: str) -> float:
    t0 = time.monotonic()
    try:
        c.wait(f"{group} scaled to zero", lambda: at_zero(timeline, group), ZERO_BOUND_S, poll=1)
    except StepFailed as e:
        raise StepFailed(f"{e}\n{timeline.summary()}") from None
    return time.monotonic() - t0


def burst(
    rev: Revision, payload, n: int = BURST, timeout: float = COLD_TIMEOUT_S
) -> tuple[float, list[tuple[float, float, str]]]:
    """``n`` concurrent requests at once, each with the deadline ``timeout``; (the wall-clock start,
    each request's (start, end, outcome))."""

    def one(_):
        start = time.time()
        try:
            with Client(rev.transport, rev.settings(timeout)) as client:
                client.predict(GROUPS[rev.group][0], payload)
            outcome = "ok"
        except ClientError as e:
            outcome = f"{outcome_of(e)}: {str(e)[:160]}"
        return start, time.time(), outcome

    t0 = time.time()
    with ThreadPoolExecutor(n) as pool:
        return t0, list(pool.map(one, range(n)))


def cold_start(c: Cluster, group: str, t0: float, answers: list[tuple[float, float, str]]) -> dict:
    """The stages of the cold start the burst at ``t0`` caused, in seconds after it: the first pod
    created after t0, its conditions, its containers' start, the model-ready sidecar's first
    "ready" line, and the first answer."""
    pods = [p for p in c.pods(RELEASE.group_selector(group)) if wall(p["metadata"]["creationTimestamp"]) >= t0 - 1]
    assert pods, f"no {group} pod created after the burst"
    name = min(pods, key=lambda p: p["metadata"]["creationTimestamp"])["metadata"]["name"]
    # The activator probes a new pod itself and sends it requests as soon as it answers; the
    # kubelet's Ready (its probe of the queue-proxy) can come a moment later.
    pod = c.wait(
        f"{name} Ready",
        lambda: next(
            (p for p in c.pods(RELEASE.group_selector(group)) if p["metadata"]["name"] == name and Cluster.is_ready(p)),
            None,
        ),
        60,
        poll=1,
    )
    conditions = {x["type"]: wall(x["lastTransitionTime"]) for x in pod["status"].get("conditions", [])}
    started = [
        wall(s["state"]["running"]["startedAt"])
        for s in pod["status"].get("containerStatuses", [])
        if s["name"] == "torchserve" and "running" in s.get("state", {})
    ]
    log = c.kubectl("logs", pod["metadata"]["name"], "-c", "model-ready", "--timestamps")
    loaded = [wall(line.split()[0]) for line in log.splitlines() if line.endswith("ready-server: ready")]
    first = min(end for _, end, outcome in answers if outcome == "ok")
    stages = {
        "pod created": wall(pod["metadata"]["creationTimestamp"]),
        "scheduled": conditions.get("PodScheduled"),
        "archives fetched (init container done)": conditions.get("Initialized"),
        "torchserve started": started[0] if started else None,
        "models loaded (model-ready)": loaded[0] if loaded else None,
        "pod Ready (kubelet)": conditions.get("Ready"),
        "first answer": first,
    }
    return {"pod": pod["metadata"]["name"], **{k: (round(v - t0, 2) if v else None) for k, v in stages.items()}}


def from_zero(serverless, group: str, trickle_group: str, timeout: float = COLD_TIMEOUT_S) -> dict:
    c, revisions, inputs = serverless
    rev, other = revisions[group], revisions[trickle_group]
    with Timeline(c) as timeline:
        zero_s = wait_zero(c, timeline, group)
        trickle = Load(
            other.settings(COLD_TIMEOUT_S),
            [(GROUPS[trickle_group][0], inputs[GROUPS[trickle_group][0]])],
            rate=1.0,
            transports=(other.transport,),
            workers=1,
            max_seconds=300,
            timeout=COLD_TIMEOUT_S,
        )
        with trickle:
            time.sleep(2)
            t0, answers = burst(rev, inputs[GROUPS[group][0]], timeout=timeout)
        failed = [a for a in answers if a[2] != "ok"]
        assert not failed, f"{len(failed)} of {BURST} failed from zero: {failed[:3]}\n{timeline.summary()}"
        assert not trickle.non_ok(), f"the trickle on {trickle_group} failed: {trickle.failures[:3]}"
        stages = cold_start(c, group, t0, answers)
        timeline.check_pods()
    result = {
        "group": group,
        "protocol": rev.protocol,
        "requests": BURST,
        "failed": 0,
        "zero_after_s": round(zero_s, 1),
        "answered_s": sorted(round(end - t0, 2) for _, end, _ in answers),
        "cold_start_s": stages,
        f"trickle_{trickle_group}": trickle.outcomes(),
    }
    print(result)
    return result


def test_rest_from_zero_answers_every_request(serverless):
    RESULTS["rest_from_zero"] = from_zero(serverless, "cnn", "lstm")


def test_grpc_from_zero_answers_every_request(serverless):
    RESULTS["grpc_from_zero"] = from_zero(serverless, "cnn-grpc", "lstm")


def test_back_to_zero_and_from_zero_three_times(serverless):
    c, revisions, inputs = serverless
    rev = revisions["cnn"]
    cycles = []
    with Timeline(c) as timeline:
        for i in range(3):
            zero_s = wait_zero(c, timeline, "cnn")
            t0, answers = burst(rev, inputs["cnn"])
            failed = [a for a in answers if a[2] != "ok"]
            assert not failed, f"cycle {i + 1}: {len(failed)} of {BURST} failed: {failed[:3]}\n{timeline.summary()}"
            cycles.append(
                {
                    "to_zero_s": round(zero_s, 1),
                    "first_answer_s": round(min(end for _, end, _ in answers) - t0, 2),
                    "last_answer_s": round(max(end for _, end, _ in answers) - t0, 2),
                    "t": round(t0 - timeline.t0, 1),
                    # Each request's start and answer, in seconds on the timeline's clock.
                    "requests": [[round(a - timeline.t0, 2), round(b - timeline.t0, 2)] for a, b, _ in answers],
                }
            )
        timeline.sample()  # the pod that answered the last burst, Ready
        RESULTS["cycles_timeline"] = timeline.rows
        timeline.check_pods()
    RESULTS["cycles"] = cycles
    print(cycles)


def test_scales_past_one_pod_under_load_and_back_to_zero(serverless):
    c, revisions, inputs = serverless
    rev = revisions["lstm"]
    with Timeline(c) as timeline:
        load = Load(
            rev.settings(COLD_TIMEOUT_S),
            [("lstm", inputs["lstm"])],
            transports=("rest",),
            workers=4 * LSTM_TARGET,
            max_seconds=240,
            timeout=COLD_TIMEOUT_S,
        )
        with load:
            t0 = time.monotonic()
            try:
                c.wait(
                    f"lstm past one ready pod under {4 * LSTM_TARGET} clients",
                    lambda: timeline.rows and timeline.rows[-1]["lstm"]["ready"] > 1,
                    180,
                    poll=1,
                )
            except StepFailed as e:
                raise StepFailed(f"{e}\n{timeline.summary()}") from None
            up_s = time.monotonic() - t0
            peak_wait = time.monotonic() + 20
            while time.monotonic() < peak_wait:  # let it settle at its peak for a while
                time.sleep(1)
        assert load.count > 100 and not load.non_ok(), (load.outcomes(), load.failures[:3])
        down_s = wait_zero(c, timeline, "lstm")
        timeline.check_pods()
    peak = max(r["lstm"]["ready"] for r in timeline.rows)
    RESULTS["load"] = {
        "clients": 4 * LSTM_TARGET,
        "target_concurrency": LSTM_TARGET,
        "max_scale": MAX_SCALE,
        "past_one_s": round(up_s, 1),
        "peak_ready": peak,
        "to_zero_after_load_s": round(down_s, 1),
        "requests": load.count,
        "failed": 0,
        "outcomes": load.outcomes(),
    }
    print(RESULTS["load"])
    save()


def test_a_slow_loading_model_is_not_killed_and_its_held_requests_are_answered(serverless):
    result = from_zero(serverless, "cnn-slow", "lstm", timeout=SLOW_TIMEOUT_S)
    first = result["cold_start_s"]["first answer"]
    # Answered only after the load: the requests were held through it, not served some other way.
    assert first >= slow_handler.LOAD_S, f"first answer {first}s after the burst, under the {slow_handler.LOAD_S}s load"
    RESULTS["slow_from_zero"] = {**result, "load_s": slow_handler.LOAD_S, "client_deadline_s": SLOW_TIMEOUT_S}
    save()


def save() -> None:
    plot(RESULTS, record("serverless", RESULTS).with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    rows = result.get("cycles_timeline", [])
    if not rows or "rest_from_zero" not in result:
        return  # a test before failed: its figures are in the JSON as far as they go
    t = [r["t"] for r in rows]
    slow = result.get("slow_from_zero")
    fig, axes = plt.subplots(3 if slow else 2, 1, figsize=(9, 9.5 if slow else 6.5))
    ax1, ax2 = axes[0], axes[1]
    ax1.step(t, [r["cnn"]["actual"] or 0 for r in rows], where="post", label="cnn pods (actual scale)")
    ax1.step(t, [r["cnn"]["ready"] for r in rows], where="post", label="cnn pods Ready (kubelet)", linestyle="--")
    ax1.set_ylabel("pods")
    ax1.set_ylim(0, 1.6)
    ax1.set_xlabel("seconds: three cycles of back to zero, then 20 requests at once")
    spans = [span for cycle in result["cycles"] for span in cycle["requests"]]
    grid = [i / 10 for i in range(int(10 * max(t)) + 1)]
    held = ax1.twinx()
    held.plot(grid, [sum(a <= x < b for a, b in spans) for x in grid], color="red", label="requests held")
    held.plot(grid, [sum(b <= x for _, b in spans) for x in grid], color="green", label="requests answered")
    held.set_ylabel("requests")
    lines = ax1.get_legend_handles_labels()
    more = held.get_legend_handles_labels()
    ax1.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    stages = result["rest_from_zero"]["cold_start_s"]
    bars(ax2, stages, "seconds after 20 REST requests reached cnn at zero pods")
    if slow:
        bars(
            axes[2], slow["cold_start_s"], f"seconds after 20 REST requests reached cnn-slow ({slow['load_s']} s load)"
        )
    slow_title = f"; cnn-slow: first answer {slow['cold_start_s']['first answer']} s, 0 failed" if slow else ""
    save_figure(
        fig,
        f"cnn from zero: first answer {stages['first answer']} s, {result['rest_from_zero']['requests']} requests, "
        f"0 failed; three cycles, 0 failed{slow_title}",
        path,
    )


def bars(ax, stages: dict, label: str) -> None:
    """A cold start's stages as bars, in seconds after the burst."""
    names = [k for k, v in stages.items() if k != "pod" and v is not None]
    ax.barh(names, [stages[k] for k in names])
    ax.invert_yaxis()
    ax.set_xlabel(label)
