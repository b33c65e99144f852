"""The chart's Grafana dashboard against the e2e's real Prometheus: after a load on every model, each
panel query returns data, for each model where the panel is per model.

A release with the chart's default groups (one per model) takes good requests on every model over
REST and gRPC, bad ones (4xx), and a burst beyond a small queue (503), so that every TorchServe
counter the dashboard reads exists. Then each query of k8s/chart/dashboards/torchserve.json, with
$namespace and $release filled in, goes to Prometheus's HTTP API. A query that returns nothing
fails and names its panel.

The ready pods and desired replicas panel reads kube-state-metrics, which the cluster runs beside
Prometheus: each group's Deployment shows its one available pod and its HPA one desired replica.
Two panels read exporters this cluster cannot run, and are named as such rather than passed: the
ingress latency (no ingress controller) and the GPU panels (no GPU).
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from scripts.client import encode_payload
from scripts.registry import sample_inputs
from tests.e2e.harness.cluster import Cluster
from tests.e2e.harness.load import Load, predictions_url, serves
from tests.e2e.harness.release import (
    CHART,
    GROUP_LABEL,
    MODELS,
    POD_GONE_S,
    READY_BOUND_S,
    ROUTED_BOUND_S,
    VALUES,
    Release,
    image_values,
)

# stage metrics: needs Prometheus and kube-state-metrics
pytestmark = pytest.mark.stage("metrics")
NAMESPACE = "e2e-dashboard"
RELEASE = Release("tsd")
SELECTOR = RELEASE.selector
DASHBOARD = CHART / "dashboards" / "torchserve.json"
QUEUE = 4  # torchserve.jobQueueSize for this release: a burst of 40 translations overflows it (503)
# Panels whose data comes from an exporter this cluster has not got: the reason, by a metric they read.
UNANSWERABLE = {
    "nginx_ingress_controller_": "needs an ingress-nginx controller, which this cluster does not run",
    "GPUUtilization": "needs a GPU",
    "GPUMemoryUtilization": "needs a GPU",
    "DCGM_FI_DEV_GPU_UTIL": "needs a GPU and NVIDIA's DCGM exporter",
}


def panels() -> list[tuple[str, str]]:
    """(panel title, query) for every target of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", []) if t.get("expr")]


def query(url: str, expr: str) -> list[dict]:
    resp = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30)
    resp.raise_for_status()
    body = resp.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture(scope="module")
def loaded(cluster: Cluster):
    c = dataclasses.replace(cluster, namespace=NAMESPACE)
    c.create_namespace(NAMESPACE)
    # One pod per group, held there by an HPA of 1 to 1, so that the HPA panel has HPAs to show.
    values = [
        *("--set", "autoscaling.minReplicas=1", "--set", "autoscaling.maxReplicas=1"),
        "--set",
        f"torchserve.jobQueueSize={QUEUE}",
    ]
    c.helm("install", RELEASE.name, str(CHART), "-f", str(VALUES), *image_values(c), *values)
    try:
        c.wait(
            "a Ready pod per model",
            lambda: len({p["metadata"]["labels"][GROUP_LABEL] for p in c.ready_pods(SELECTOR)}) == len(MODELS),
            READY_BOUND_S,
        )
        inputs = {m: payload for m, (_, payload) in sample_inputs(MODELS).items()}
        ips = {m: c.json("get", "service", RELEASE.group(m))["spec"]["clusterIP"] for m in MODELS}
        c.wait(
            "each group's Service routing to its pod",
            lambda: all(serves(ips[m], m, inputs[m]) for m in MODELS),
            ROUTED_BOUND_S,
            poll=1.0,
        )
        bad = {}
        for m in MODELS:
            resp = requests.post(predictions_url(ips[m], m), data=b"\xff\xfe not an input", timeout=30)
            bad[m] = resp.status_code
        # A burst of translations beyond the queue: TorchServe answers the overflow 503.
        body, ctype = encode_payload(inputs["transformer"])

        def translate(_: int) -> int:
            url = predictions_url(ips["transformer"], "transformer")
            return requests.post(url, data=body, headers={"Content-Type": ctype}, timeout=120).status_code

        with ThreadPoolExecutor(40) as pool:
            burst = list(pool.map(translate, range(40)))
        # Then good requests on every model, over both transports, for a little longer than Prometheus's
        # rate windows need; after the burst, whose 503s are its own, not theirs.
        loads = [Load(ips[m], [(m, inputs[m])], rate=4, max_seconds=40).start() for m in MODELS]
        for load in loads:
            load.finish()
        failed = [f for load in loads for f in load.failures]
        print(f"bad inputs answered {bad}; burst of 40 translations: {sorted(burst)}")
        assert not failed, failed
        assert all(400 <= s < 500 for s in bad.values()), bad
        assert 503 in burst, burst
        time.sleep(15)  # two more scrapes (5 s) after the last request
        yield c, c.prometheus_url()
    finally:
        c.helm("uninstall", RELEASE.name, "--wait", "--timeout", "120s", timeout=150, check=False)
        c.wait("the release's pods gone", lambda: not c.pods(SELECTOR), POD_GONE_S)
        c.kubectl("delete", "namespace", NAMESPACE, "--wait=false", namespaced=False, check=False)


def test_every_dashboard_query_answers_for_every_model(loaded):
    c, url = loaded
    answered, unanswerable, empty = [], {}, []
    for title, expr in panels():
        reason = next((why for metric, why in UNANSWERABLE.items() if metric in expr), None)
        if reason:
            unanswerable[title] = reason
            continue
        result = query(url, expr.replace("$namespace", NAMESPACE).replace("$release", RELEASE.name))
        if not result:
            empty.append(f"{title}: {expr}")
            continue
        by_model = {r["metric"].get("model_name") for r in result} - {None}
        if "model_name" in expr and by_model != set(MODELS):
            empty.append(f"{title}: data for {sorted(by_model)} only, not {MODELS}")
            continue
        answered.append((title, len(result)))
    print(f"answered: {answered}")
    print(f"not answerable on this cluster: {unanswerable}")
    assert not empty, "panels with no data:\n" + "\n".join(empty)
    # Everything not named above was answered: the requests, latency, queue and error panels.
    assert {t for t, _ in answered} >= {
        "Ready pods and HPA desired replicas",
        "Requests per second per pod and model — the HPA signal",
        "Mean inference latency (ms)",
        "Queue latency per REST request (ms)",
        "Non-2xx responses per second",
    }


def test_kube_state_metrics_shows_each_group_with_one_available_pod_and_one_desired_replica(loaded):
    """kube-state-metrics v2.15.0 against Kubernetes 1.34: the figures, not only their presence."""
    _, url = loaded
    groups = {RELEASE.group(m): m for m in MODELS}
    available = query(url, f'kube_deployment_status_replicas_available{{namespace="{NAMESPACE}"}}')
    desired = query(url, f'kube_horizontalpodautoscaler_status_desired_replicas{{namespace="{NAMESPACE}"}}')
    by_deployment = {r["metric"]["deployment"]: float(r["value"][1]) for r in available}
    by_hpa = {r["metric"]["horizontalpodautoscaler"]: float(r["value"][1]) for r in desired}
    print(f"kube-state-metrics: available {by_deployment}; desired {by_hpa}")
    assert by_deployment == {g: 1.0 for g in groups}, by_deployment
    assert by_hpa == {g: 1.0 for g in groups}, by_hpa
