"""The chart on a real single-node Kubernetes: install, serve, roll, drain, restart, test, deploy, uninstall.

The release runs the chart's default groups, one Deployment per model; the tests that roll, drain or
restart a pod do it to the lstm group while the others keep serving.

Run by `make e2e-k8s` (k8s/cluster/e2e.sh), which starts the cluster and imports the image; the
tests run in file order and share one release. Every wait is bounded; a failure prints the step's
events, pod logs and component logs (tests/e2e/conftest.py).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from scripts import k8s
from scripts.client import Client, ModelNotFound
from scripts.common import ROOT
from scripts.inprocess import load_handler, run_batch
from scripts.registry import sample_inputs
from scripts.serve import PORTS
from tests.e2e.harness.cluster import Cluster
from tests.e2e.harness.load import Load
from tests.e2e.harness.load import service_settings as settings_for
from tests.e2e.harness.release import (
    CHART,
    DRAIN,
    GRACE_S,
    GROUP_LABEL,
    MODELS,
    POD_GONE_S,
    READY_BOUND_S,
    SETTLE_S,
    VALUES,
    Release,
    deploy_tool,
    image_values,
)

RELEASE = Release("ts")
DEPLOY_TOOL_RELEASE = Release(k8s.RELEASE)  # the release `make deploy` renders
GROUPS = {m: [m] for m in MODELS}  # the chart's default: one group per model
GROUP = "lstm"  # the group the roll, drain and restart tests act on
SELECTOR = RELEASE.group_selector(GROUP)
DEPLOYMENT = RELEASE.group(GROUP)


def group_of(model: str) -> str:
    return next(g for g, models in GROUPS.items() if model in models)


@pytest.fixture(scope="module")
def release(cluster: Cluster):
    cluster.create_namespace(cluster.namespace)
    t0 = time.monotonic()
    cluster.helm("install", RELEASE.name, str(CHART), "-f", str(VALUES), *image_values(cluster))

    def every_group_ready():
        ready = {p["metadata"]["labels"][GROUP_LABEL]: p for p in cluster.ready_pods(RELEASE.selector)}
        return ready if set(ready) == set(GROUPS) else None

    pods = cluster.wait("a Ready pod in every group (each model with a READY worker)", every_group_ready, READY_BOUND_S)
    print(
        f"helm install -> a pod Ready in each of {len(pods)} groups in {time.monotonic() - t0:.0f}s (bound {READY_BOUND_S}s)"
    )
    yield pods
    # Uninstall is asserted by test_uninstall_leaves_nothing; this is the cleanup if a test failed before it.
    cluster.helm("uninstall", RELEASE.name, "--wait", "--timeout", "120s", check=False)


def service_settings(cluster: Cluster, name: str = DEPLOYMENT):
    """Client settings for a group's Service (its ClusterIP), no tokens (the chart's default)."""
    return settings_for(cluster.json("get", "service", name)["spec"]["clusterIP"])


def test_every_model_ready_and_objects_accepted(cluster, release):
    manifest = [d for d in yaml.safe_load_all(cluster.helm("get", "manifest", RELEASE.name).stdout) if d]
    versions = {d["kind"]: d["apiVersion"] for d in manifest}
    served = set(cluster.kubectl("api-versions", namespaced=False).split())
    # The HPAs and PDBs were accepted in the only API versions the chart renders.
    assert {versions["HorizontalPodAutoscaler"], versions["PodDisruptionBudget"]} == {"autoscaling/v2", "policy/v1"}
    assert {versions["HorizontalPodAutoscaler"], versions["PodDisruptionBudget"]} <= served
    hpa_kind = "horizontalpodautoscalers." + ".".join(versions["HorizontalPodAutoscaler"].split("/")[::-1])
    pdb_kind = "poddisruptionbudgets." + ".".join(versions["PodDisruptionBudget"].split("/")[::-1])
    for group, models in GROUPS.items():
        # Readiness is the probe's verdict; ask the same tool inside the group's pod for its models by name.
        pod = release[group]["metadata"]["name"]
        out = cluster.kubectl(
            "exec", pod, "-c", "torchserve", "--", "python3", "/opt/torchserve-k8s/pod.py", "ready", "--models", *models
        )
        assert out.strip() == "ready"
        # Each group scales on its own models' request rates only, and has its own PDB and settings.
        hpa = cluster.json("get", hpa_kind, RELEASE.group(group))
        assert hpa["spec"]["scaleTargetRef"]["name"] == RELEASE.group(group) and hpa["spec"]["minReplicas"] == 1
        assert [m["pods"]["metric"]["selector"]["matchLabels"]["model_name"] for m in hpa["spec"]["metrics"]] == models
        assert cluster.json("get", pdb_kind, RELEASE.group(group))["spec"]["maxUnavailable"] == 1
        config = cluster.json("get", "configmap", f"{RELEASE.group(group)}-config")["data"]["config.properties"]
        assert f"load_models={','.join(f'{m}={m}.mar' for m in models)}\n" in config


@pytest.fixture(scope="module")
def inputs():
    return sample_inputs()


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_predictions_through_the_service_equal_the_in_process_handler(cluster, release, inputs, transport):
    for model in MODELS:
        _, payload = inputs[model]
        handler, ctx = load_handler(model, ROOT / "checkpoints" / model / "checkpoint.pt")
        answers, statuses, _ = run_batch(handler, ctx, [{"body": payload}])
        assert statuses[0][0] == 200
        with Client(transport, service_settings(cluster, RELEASE.group(group_of(model)))) as client:
            assert client.predict(model, payload) == answers[0], f"{transport} {model}"


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_each_group_answers_only_its_own_models_and_404_for_the_others(cluster, release, inputs, transport):
    for group in GROUPS:
        with Client(transport, service_settings(cluster, RELEASE.group(group))) as client:
            for model in MODELS:
                if model in GROUPS[group]:
                    continue
                with pytest.raises(ModelNotFound) as e:
                    client.predict(model, inputs[model][1])
                assert e.value.status == 404 and model in str(e.value), str(e.value)


def test_management_api_is_not_reachable_from_outside_the_pod(cluster, release):
    pod = cluster.ready_pods(SELECTOR)[0]
    ip = pod["status"]["podIP"]
    for port in (8081, 7071):  # REST and gRPC management
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((ip, port), timeout=5).close()
    # ... while inference on the same address answers, and management answers inside the pod.
    socket.create_connection((ip, PORTS["inference"]), timeout=5).close()
    service_ports = {p["port"] for p in cluster.json("get", "service", DEPLOYMENT)["spec"]["ports"]}
    assert service_ports == {PORTS["inference"], PORTS["grpc_inference"]}


def test_rollout_restart_under_load_fails_no_request(cluster, release, inputs):
    before = {p["metadata"]["name"] for p in cluster.ready_pods(SELECTOR)}
    with Load(service_settings(cluster).host, [(m, inputs[m][1]) for m in GROUPS[GROUP]], max_seconds=400) as load:
        time.sleep(5)
        assert load.count > 0, "no request went through before the restart"
        cluster.kubectl("rollout", "restart", f"deployment/{DEPLOYMENT}")
        cluster.kubectl("rollout", "status", f"deployment/{DEPLOYMENT}", "--timeout=300s", timeout=320)
        # The old pod drains after the new one is Ready: keep the load on until it is gone.
        cluster.wait(
            "the old pods gone",
            lambda: not before & {p["metadata"]["name"] for p in cluster.pods(SELECTOR)},
            POD_GONE_S,
        )
        time.sleep(3)
    print(f"rollout restart under load: {load.outcomes()}")
    assert load.count >= 50, f"too few requests to tell ({load.count})"
    assert not load.non_ok(), f"{len(load.non_ok())} of {load.count} requests failed: {load.failures}"
    after = {p["metadata"]["name"] for p in cluster.ready_pods(SELECTOR)}
    assert after and not after & before


def follow_logs(cluster: Cluster, pod: str) -> tuple[subprocess.Popen, list[str]]:
    """Stream the serving container's log, each line prefixed with the runtime's RFC 3339 time."""
    lines: list[str] = []
    proc = subprocess.Popen(
        [cluster.kubectl_bin, "-n", cluster.namespace, "logs", "-f", "--timestamps", pod, "-c", "torchserve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cluster.env,
    )
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def log_time(lines: list[str], pattern: str) -> tuple[float, re.Match] | None:
    """The wall-clock time (epoch seconds) of the first timestamped log line matching ``pattern``."""
    for line in lines:
        stamp, _, text = line.partition(" ")
        if m := re.search(pattern, text):
            return datetime.datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp(), m
    return None


def watch_termination(cluster: Cluster, name: str, limit: float) -> dict[str, float | int | str]:
    """Poll the pod until its object is gone; when its container terminated, how, and when it went.

    Times are seconds since the call. Bounded by ``limit``; what was seen is returned either way."""
    t0 = time.monotonic()
    seen: dict[str, float | int | str] = {}
    while time.monotonic() - t0 < limit:
        proc = cluster.run(
            [cluster.kubectl_bin, "-n", cluster.namespace, "get", "pod", name, "-o", "json"], timeout=30, check=False
        )
        now = time.monotonic() - t0
        if proc.returncode != 0 and "NotFound" in proc.stderr:
            seen["gone_s"] = now
            break
        try:
            status = json.loads(proc.stdout)["status"]
        except ValueError:
            continue
        for c in status.get("containerStatuses", []):
            if c["name"] == "torchserve" and "terminated" in c.get("state", {}) and "exited_s" not in seen:
                term = c["state"]["terminated"]
                seen.update(exited_s=now, exit_code=term.get("exitCode"), reason=term.get("reason", ""))
        time.sleep(0.5)
    return seen


def test_deleting_a_pod_drains_and_shuts_the_jvm_down_cleanly(cluster, release):
    pod = cluster.ready_pods(SELECTOR)[0]["metadata"]["name"]
    logs, lines = follow_logs(cluster, pod)
    time.sleep(2)
    wall0 = time.time()
    cluster.kubectl("delete", "pod", pod, "--wait=false")
    seen = watch_termination(cluster, pod, limit=POD_GONE_S)
    logs.wait(30)
    drain_s = SETTLE_S + DRAIN["timeoutSeconds"]
    signal = log_time(lines, r"serve: SIGTERM: asking TorchServe to shut down")
    clean = log_time(lines, r"serve: TorchServe shut down cleanly ([\d.]+)s after the signal")
    phases = {
        "SIGTERM after": signal and round(signal[0] - wall0, 1),
        "clean exit after": clean and round(clean[0] - wall0, 1),
        **{k: round(v, 1) if isinstance(v, float) else v for k, v in seen.items()},
    }
    print(f"kubectl delete pod (drain at most {drain_s}s, grace period {GRACE_S}s): {phases}")
    tail = "".join(lines[-30:])
    assert signal, f"no SIGTERM reached pod.py serve: {phases}\n{tail}"
    assert clean, f"TorchServe did not shut down cleanly: {phases}\n{tail}"
    # The container stops within the drain plus a few seconds for the JVM, well short of the grace
    # period that a PID 1 ignoring SIGTERM used to take in full, and by itself (exit 0, not SIGKILL).
    assert clean[0] - wall0 < drain_s + 10 < GRACE_S, phases
    assert seen.get("exit_code") in (0, None), phases
    # Then the kubelet reclaims the pod (volumes, sandbox, containers, cgroups) and deletes the object.
    assert "gone_s" in seen, f"the pod object was not deleted: {phases}"
    cluster.wait("a replacement pod Ready", lambda: cluster.ready_pods(SELECTOR), READY_BOUND_S)


def test_a_container_killed_by_its_liveness_probe_comes_back_ready(cluster, release):
    pod = cluster.ready_pods(SELECTOR)[0]
    name = pod["metadata"]["name"]
    restarts = pod["status"]["containerStatuses"][0]["restartCount"]
    jvm = cluster.container_pid(pod, "org.pytorch.serve.ModelServer")
    subprocess.run(["kill", "-STOP", str(jvm)], check=True)  # the frontend stops answering: liveness fails

    def restarted_and_ready():
        p = cluster.json("get", "pod", name)
        return p["status"]["containerStatuses"][0]["restartCount"] > restarts and cluster.is_ready(p)

    # 3 failed checks 5 s apart, the grace period (the frozen JVM only dies by SIGKILL), then a cold start.
    cluster.wait(
        f"pod {name} restarted by its liveness probe and Ready again",
        restarted_and_ready,
        15 + GRACE_S + READY_BOUND_S,
        poll=3,
    )
    log = cluster.kubectl("logs", name, "-c", "torchserve")
    assert "removed /tmp/torchserve-draining left by the previous container" in log


def test_helm_test_passes_and_its_pod_is_never_served(cluster, release):
    # (No --logs: the hook pod is deleted once it succeeds; a failing one stays, and its logs show
    # in the evidence.)
    proc = cluster.helm("test", RELEASE.name, "--timeout", "180s", timeout=200)
    assert re.search(r"Phase:\s+Succeeded", proc.stdout), proc.stdout
    endpoints = cluster.json("get", "endpoints", DEPLOYMENT)
    ips = {
        a["ip"] for s in endpoints.get("subsets", []) for a in s.get("addresses", []) + s.get("notReadyAddresses", [])
    }
    assert ips == {p["status"]["podIP"] for p in cluster.pods(SELECTOR)}
    pdb = cluster.json("get", "pdb", DEPLOYMENT)
    assert pdb["status"]["expectedPods"] == len(cluster.pods(SELECTOR))


def test_uninstall_leaves_nothing(cluster, release):
    cluster.helm("uninstall", RELEASE.name, "--wait", "--timeout", "120s", timeout=150)
    kinds = "all,configmap,secret,serviceaccount,pdb,hpa,networkpolicy,endpoints"

    def nothing_left():
        left = cluster.kubectl("get", kinds, "-l", f"app.kubernetes.io/instance={RELEASE.name}", "-o", "name").split()
        helm_state = cluster.kubectl("get", "secret", "-l", f"owner=helm,name={RELEASE.name}", "-o", "name").split()
        return not left and not helm_state

    cluster.wait("nothing of the release left", nothing_left, POD_GONE_S)


def test_deploy_tool_applies_waits_and_smoke_tests_every_group(cluster):
    ns = "e2e-deploy"
    groups = ["--set", "models.names={cnn,lstm}", "--set", "groups.transformer=null"]  # two groups
    cmd = deploy_tool(ns, *image_values(cluster), *groups, "--timeout", str(READY_BOUND_S))
    try:
        proc = cluster.run([*cmd, "apply"], timeout=READY_BOUND_S + 120)
        for group in ("cnn", "lstm"):
            assert re.search(
                rf"rollout of {DEPLOY_TOOL_RELEASE.group(group)} done in \d+s: 1 pods Ready", proc.stdout
            ), proc.stdout
        # Each group's own models, each with its own kind of input.
        assert re.search(r'smoke: lstm on \S+-lstm-\S+ -> \{"label": "(fresh|rotten)"', proc.stdout), proc.stdout
        assert re.search(r'smoke: cnn on \S+-cnn-\S+ -> \{"\d": ', proc.stdout), proc.stdout
    finally:
        cluster.run([*cmd, "delete"], timeout=180, check=False)
    cluster.wait_pods_gone(ns, "the deploy tool's pods gone", POD_GONE_S)


def test_deploy_tool_names_a_missing_image_in_one_line(cluster):
    ns = "e2e-missing"
    image = ["--set", "image.repository=localhost/no-such-image", "--set", "image.tag=0.0.0"]
    cmd = deploy_tool(ns, *image, "--set", "allInOnePod=true", "--timeout", "120")
    try:
        proc = cluster.run([*cmd, "apply"], timeout=200, check=False)
        assert proc.returncode == 1
        first = proc.stderr.strip().splitlines()[0]
        assert "cannot pull image localhost/no-such-image:0.0.0" in first, proc.stderr
    finally:
        cluster.run([*cmd, "delete"], timeout=180, check=False)


def test_an_archive_failing_its_checksum_stops_the_pod_with_one_line_naming_it(cluster):
    """The archives come from a volume (models.source.type=pvc) where lstm.mar has one byte flipped."""
    ns = "e2e-badsum"
    # A hostPath volume on the node (this machine), bound statically: the cluster has no provisioner.
    store = Path(os.environ.get("STATE", "/var/lib/torchserve-e2e")) / "bad-model-store"
    store.mkdir(parents=True, exist_ok=True)
    good = ROOT / "model-store"
    (store / "manifest.json").write_bytes((good / "manifest.json").read_bytes())
    data = bytearray((good / "lstm.mar").read_bytes())
    data[len(data) // 2] ^= 0x40
    (store / "lstm.mar").write_bytes(bytes(data))
    remove_volume = cluster.host_volume(ns, "bad-models", store)
    source = ["--set", "models.source.type=pvc", "--set", "models.source.pvc.claimName=bad-models"]
    one = ["--set", "models.names={lstm}", "--set", "allInOnePod=true"]
    cmd = deploy_tool(ns, *image_values(cluster), *source, *one, "--timeout", "120")
    try:
        proc = cluster.run([*cmd, "apply"], timeout=200, check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        first = proc.stderr.strip().splitlines()[0]
        assert "model fetch failed" in first or "fetch-models" in first, first
        assert re.search(r"lstm\.mar: sha256 [0-9a-f]{64} does not match the manifest's", first), first
    finally:
        cluster.run([*cmd, "delete"], timeout=180, check=False)
        remove_volume()
