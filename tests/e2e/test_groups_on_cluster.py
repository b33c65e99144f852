"""Model groups on the real cluster: gRPC spread over a group's replicas, a new archive version
rolled out under load, a canary beside the stable version, its promotion, and a one-command rollback.

A second release, in its own namespace: groups cnn (1 replica) and lstm (2 replicas), autoscaling
off so that the replica counts are the test's. Version 2.0 of both archives (`make archive
VERSION=2.0`) is served from a hostPath volume (models.source.type=pvc).
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from scripts.client import Client, Settings
from scripts.common import ROOT
from scripts.registry import sample_inputs
from scripts.serve import PORTS
from tests.e2e.harness.cluster import Cluster
from tests.e2e.harness.load import Load, service_settings
from tests.e2e.harness.release import CHART, POD_GONE_S, READY_BOUND_S, TRACK_LABEL, VALUES, Release, image_values

RELEASE = Release("tsg")
NAMESPACE = "e2e-groups"
SELECTOR = RELEASE.selector
REPLICAS = {"cnn": 1, "lstm": 2}
BASE = [
    *("--set", "models.names={cnn,lstm}", "--set", "groups.transformer=null", "--set", "autoscaling.enabled=false"),
    *(a for g, n in REPLICAS.items() for a in ("--set", f"groups.{g}.replicaCount={n}")),
]
V2 = ["--set", "modelSource.type=pvc", "--set", "modelSource.pvc.claimName=models-v2"]  # under groups.<g>.[canary.]


def source_v2(prefix: str) -> list[str]:
    return [a if a == "--set" else f"{prefix}.{a}" for a in V2]


@pytest.fixture(scope="module")
def groups(cluster: Cluster):
    c = dataclasses.replace(cluster, namespace=NAMESPACE)
    state = Path(os.environ.get("STATE", "/var/lib/torchserve-e2e"))
    store = state / "model-store-v2"
    made = subprocess.run(
        ["make", "--no-print-directory", "archive", "VERSION=2.0", f"STORE={store}", "MODELS=cnn lstm"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    remove_volume = c.host_volume(NAMESPACE, "models-v2", store)
    c.helm("install", RELEASE.name, str(CHART), "-f", str(VALUES), *image_values(c), *BASE)
    c.wait("every group's replicas Ready", lambda: all(ready(c, g) == n for g, n in REPLICAS.items()), READY_BOUND_S)
    yield c
    c.helm("uninstall", RELEASE.name, "--wait", "--timeout", "120s", timeout=150, check=False)
    remove_volume()
    c.kubectl("delete", "namespace", NAMESPACE, "--wait=false", namespaced=False, check=False)


def ready(c: Cluster, group: str, track: str | None = None) -> int:
    sel = RELEASE.group_selector(group, track)
    return len(c.ready_pods(sel))


def upgrade(c: Cluster, *values: str) -> None:
    """helm upgrade with the module's base values plus ``values``; waits for every rollout."""
    c.helm("upgrade", RELEASE.name, str(CHART), "-f", str(VALUES), *image_values(c), *BASE, *values)
    for dep in c.kubectl("get", "deployments", "-o", "name").split():
        c.kubectl("rollout", "status", dep, "--timeout=300s", timeout=320)


def only_current_pods(c: Cluster) -> None:
    """Wait until no pod of the release is terminating (a rollout leaves its old pods draining)."""
    c.wait(
        "the replaced pods gone",
        lambda: not [p for p in c.pods(SELECTOR) if p["metadata"].get("deletionTimestamp")],
        POD_GONE_S,
    )


def versions_answering(c: Cluster, group: str, model: str, payload: bytes, n: int) -> collections.Counter:
    """The X-Model-Version of ``n`` answers through the group's Service, each on a new connection
    (kube-proxy picks a pod per connection)."""
    ip = c.json("get", "service", RELEASE.group(group))["spec"]["clusterIP"]
    seen: collections.Counter = collections.Counter()
    for _ in range(n):
        conn = http.client.HTTPConnection(ip, PORTS["inference"], timeout=30)
        try:
            conn.request("POST", f"/predictions/{model}", body=payload, headers={"Content-Type": "image/png"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
            seen[resp.getheader("X-Model-Version")] += 1
        finally:
            conn.close()
    return seen


def wait_routed(c: Cluster, group: str, payload: bytes, versions: set[str], timeout: float = 60) -> None:
    """Until a handful of answers through the group's Service come from exactly ``versions``: a pod
    that turned Ready reaches the Service's EndpointSlice, then kube-proxy's rules, a moment later
    (and one that left, likewise), so a sample taken at once can miss it."""
    c.wait(
        f"the {group} Service routing to versions {sorted(versions)}",
        lambda: set(versions_answering(c, group, group, payload, 10)) == versions,
        timeout,
        poll=1.0,
    )


def requests_served(ip: str, model: str) -> float:
    """The pod's own count of inference requests for ``model`` (TorchServe's Prometheus counter)."""
    conn = http.client.HTTPConnection(ip, 8082, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    pattern = rf'^ts_inference_requests_total\{{[^}}]*model_name="{model}"[^}}]*\}} ([0-9.eE+]+)$'
    return sum(float(v) for v in re.findall(pattern, text, flags=re.M))


@pytest.fixture(scope="module")
def inputs():
    return {m: payload for m, (_, payload) in sample_inputs(["cnn", "lstm"]).items()}


def test_grpc_round_robin_over_the_headless_service_reaches_every_replica(groups, inputs):
    c = groups
    # The headless Service's DNS name lists its ready pods; this cluster runs no DNS server, so the
    # test gives the client the same list, from the Service's Endpoints, in gRPC's ipv4: syntax.
    endpoints = c.json("get", "endpoints", f"{RELEASE.group('lstm')}-grpc")
    ips = sorted(a["ip"] for s in endpoints.get("subsets", []) for a in s.get("addresses", []))
    assert len(ips) == REPLICAS["lstm"], endpoints
    service_ip = c.json("get", "service", RELEASE.group("lstm"))["spec"]["clusterIP"]

    def shares(settings: Settings, n: int = 100) -> dict[str, float]:
        before = {ip: requests_served(ip, "lstm") for ip in ips}
        with Client("grpc", settings) as client:
            for _ in range(n):
                client.predict("lstm", inputs["lstm"])
        return {ip: (requests_served(ip, "lstm") - before[ip]) / n for ip in ips}

    grpc = PORTS["grpc_inference"]
    spread = shares(
        dataclasses.replace(
            service_settings(service_ip),
            grpc_target="ipv4:" + ",".join(f"{ip}:{grpc}" for ip in ips),
            grpc_lb="round_robin",
        )
    )
    # One channel through the ClusterIP Service is one connection: kube-proxy sends it all to one pod.
    pinned = shares(service_settings(service_ip))
    print(f"gRPC, 100 requests of one client: round_robin {spread}, one channel via the ClusterIP {pinned}")
    assert sum(spread.values()) == pytest.approx(1.0) and min(spread.values()) >= 0.3, spread
    assert max(pinned.values()) >= 0.95, pinned


def test_a_new_archive_version_rolls_out_under_load_with_no_failed_request(groups, inputs):
    c = groups
    ip = c.json("get", "service", RELEASE.group("lstm"))["spec"]["clusterIP"]
    body = json.dumps(inputs["lstm"]).encode()
    with Load(ip, [("lstm", inputs["lstm"])], max_seconds=500) as load:
        time.sleep(5)
        assert load.count > 0, "no request went through before the upgrade"
        upgrade(c, *source_v2("groups.lstm"))
        only_current_pods(c)
        time.sleep(3)
    print(f"lstm 1.0 -> 2.0 under load: {load.outcomes()}")
    assert load.count >= 50, f"too few requests to tell ({load.count})"
    assert not load.non_ok(), f"{len(load.non_ok())} of {load.count} requests failed: {load.failures}"
    conn = http.client.HTTPConnection(ip, PORTS["inference"], timeout=30)
    conn.request("POST", "/predictions/lstm", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200 and resp.getheader("X-Model-Version") == "2.0"
    assert ready(c, "lstm") == REPLICAS["lstm"]


def test_a_canary_answers_beside_the_stable_version_then_is_promoted_and_rolled_back(groups, inputs):
    c = groups
    lstm_v2 = source_v2("groups.lstm")  # the previous test's rollout stays
    before = int(json.loads(c.helm("history", RELEASE.name, "-o", "json").stdout)[-1]["revision"])
    # A canary of the cnn group with archive 2.0: 1 of its 2 pods, so about half of the traffic.
    upgrade(c, *lstm_v2, "--set", "groups.cnn.canary.enabled=true", *source_v2("groups.cnn.canary"))
    assert ready(c, "cnn", "canary") == 1 and ready(c, "cnn", "stable") == 1
    wait_routed(c, "cnn", inputs["cnn"], {"1.0", "2.0"})
    mixed = versions_answering(c, "cnn", "cnn", inputs["cnn"], 60)
    print(f"cnn with a 1-of-2 canary: {dict(mixed)}")
    assert set(mixed) == {"1.0", "2.0"}, mixed
    # Promotion: the stable Deployment takes the canary's version, and the canary goes.
    upgrade(c, *lstm_v2, *source_v2("groups.cnn"))
    only_current_pods(c)
    wait_routed(c, "cnn", inputs["cnn"], {"2.0"})
    promoted = versions_answering(c, "cnn", "cnn", inputs["cnn"], 20)
    assert promoted == {"2.0": 20}, promoted
    assert not c.pods(f"{SELECTOR},{TRACK_LABEL}=canary")
    # Rolling back is one command: the revision before the canary, cnn at 1.0 again.
    c.helm("rollback", RELEASE.name, str(before), "--wait", "--timeout", "300s", timeout=320)
    only_current_pods(c)
    wait_routed(c, "cnn", inputs["cnn"], {"1.0"})
    rolled_back = versions_answering(c, "cnn", "cnn", inputs["cnn"], 20)
    assert rolled_back == {"1.0": 20}, rolled_back
