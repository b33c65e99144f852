"""GPU-shaped scheduling on the real cluster.

The node advertises ``nvidia.com/gpu: 2`` through its status, as the Kubernetes documentation's
"Advertise Extended Resources for a Node" does (a device plugin would do it on a GPU node), and
carries GPU feature discovery's label. The chart's GPU profile (k8s/chart/values-gpu.yaml) asks
one GPU per pod: an autoscaled group that wants 3 pods gets 2 Running and the third Pending with
``Insufficient nvidia.com/gpu``, and the deploy tool names that in one line instead of waiting out
its timeout.

No GPU exists here: the resource is only advertised, so the scheduler's accounting is real and the
pods run on the CPU (each handler says so once at load). Nothing GPU-only is claimed as tested.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from tests.e2e.harness.cluster import Cluster
from tests.e2e.harness.release import (
    CHART,
    CNN_ONLY,
    GPU_VALUES,
    POD_GONE_S,
    READY_BOUND_S,
    VALUES,
    Release,
    deploy_tool,
    image_values,
    unschedulable_reason,
)

NAMESPACE = "e2e-gpu"
RELEASE = Release("tsgpu")
NODE = "e2e-node"
GPUS = 2
SELECTOR = RELEASE.selector
# values-gpu.yaml sizes a pod for a GPU node (6 CPUs, 8 GiB); the e2e node has 2 cores in all.
SMALL = [
    *("--set", "resources.requests.cpu=100m", "--set", "resources.requests.memory=1Gi"),
    *("--set", "resources.limits.cpu=2", "--set", "resources.limits.memory=4Gi"),
]


def gpu_patch(op: str) -> str:
    paths = ["/status/capacity/nvidia.com~1gpu", "/status/allocatable/nvidia.com~1gpu"]
    return json.dumps([{"op": op, "path": p, **({"value": str(GPUS)} if op == "add" else {})} for p in paths])


def advertised(c: Cluster) -> str | None:
    return c.json("get", "node", NODE)["status"].get("allocatable", {}).get("nvidia.com/gpu")


@pytest.fixture(scope="module")
def gpu_node(cluster: Cluster):
    c = dataclasses.replace(cluster, namespace=NAMESPACE)
    c.kubectl("label", "node", NODE, "nvidia.com/gpu.present=true", "--overwrite", namespaced=False)

    def advertise():
        # The kubelet may drop a resource no device plugin reports when it re-registers: apply again until it holds.
        if advertised(c) != str(GPUS):
            c.kubectl(
                "patch", "node", NODE, "--subresource=status", "--type=json", "-p", gpu_patch("add"), namespaced=False
            )
        return advertised(c) == str(GPUS)

    c.wait(f"the node advertising nvidia.com/gpu: {GPUS}", advertise, 60)
    c.create_namespace(NAMESPACE)
    yield c
    c.kubectl("delete", "namespace", NAMESPACE, "--wait=false", namespaced=False, check=False)
    c.kubectl(
        "patch",
        "node",
        NODE,
        "--subresource=status",
        "--type=json",
        "-p",
        gpu_patch("remove"),
        namespaced=False,
        check=False,
    )
    c.kubectl("label", "node", NODE, "nvidia.com/gpu.present-", namespaced=False, check=False)


def test_an_autoscaled_gpu_group_gets_two_pods_and_one_pending_for_want_of_a_gpu(gpu_node):
    c = gpu_node
    # minReplicas 3: the HPA asks for 3 pods at once, whatever the load (the autoscaling test scales on load).
    scaled = ["--set", "autoscaling.minReplicas=3", "--set", "autoscaling.maxReplicas=3"]
    c.helm(
        "install",
        RELEASE.name,
        str(CHART),
        "-f",
        str(VALUES),
        "-f",
        str(GPU_VALUES),
        *image_values(c),
        *SMALL,
        *CNN_ONLY,
        *scaled,
    )
    try:

        def two_ready_one_pending():
            pods = c.pods(SELECTOR)
            ready = [p for p in pods if c.is_ready(p)]
            pending = [(p, unschedulable_reason(p)) for p in pods if p["status"].get("phase") == "Pending"]
            pending = [(p, why) for p, why in pending if why]
            return (ready, pending) if len(ready) == GPUS and len(pending) == 1 else None

        ready, [(pod, why)] = c.wait("2 pods Ready and the third unschedulable", two_ready_one_pending, READY_BOUND_S)
        print(f"Pending {pod['metadata']['name']}: {why}")
        assert "Insufficient nvidia.com/gpu" in why, why
        for p in ready:
            limits = p["spec"]["containers"][0]["resources"]["limits"]
            assert limits["nvidia.com/gpu"] == "1", limits
            assert p["spec"]["nodeSelector"]["nvidia.com/gpu.present"] == "true"
            # No GPU is visible inside: the handler says it runs on the CPU, once per worker at load,
            # in TorchServe's model log (LOG_LOCATION, an emptyDir the chart mounts).
            logs = c.kubectl(
                "exec", p["metadata"]["name"], "-c", "torchserve", "--", "cat", "/home/model-server/logs/model_log.log"
            )
            said = logs.count("no CUDA device visible to this worker: running on the CPU")
            assert said >= 1, logs[-2000:]
        hpa = c.json("get", "hpa", RELEASE.group("cnn"))
        assert hpa["status"]["desiredReplicas"] == 3
    finally:
        c.helm("uninstall", RELEASE.name, "--wait", "--timeout", "120s", timeout=150, check=False)
    c.wait("the release's pods gone", lambda: not c.pods(SELECTOR), POD_GONE_S)


def test_the_deploy_tool_names_the_missing_gpu_in_one_line_before_its_timeout(gpu_node):
    c = gpu_node
    ns = "e2e-gpu-deploy"
    timeout = 600
    three = ["--set", "autoscaling.enabled=false", "--set", "replicaCount=3"]
    cmd = deploy_tool(ns, "--values", str(GPU_VALUES), *image_values(c), *SMALL, *CNN_ONLY, *three)
    t0 = time.monotonic()
    try:
        proc = c.run([*cmd, "--timeout", str(timeout), "apply"], timeout=timeout + 60, check=False)
        took = time.monotonic() - t0
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"nvidia.com/gpu: {GPUS} allocatable on 1 schedulable nodes: {NODE} ({GPUS})" in proc.stdout, proc.stdout
        first = proc.stderr.strip().splitlines()[0]
        print(f"deploy tool, after {took:.0f}s of its {timeout}s: {first}")
        assert "1 of 3 pods of" in first and "unschedulable" in first, proc.stderr
        assert "Insufficient nvidia.com/gpu" in first, proc.stderr
        assert took < timeout / 2
    finally:
        c.run([*cmd, "delete"], timeout=180, check=False)
    c.wait_pods_gone(ns, "the deploy tool's pods gone", POD_GONE_S)
    c.kubectl("delete", "namespace", ns, "--wait=false", namespaced=False, check=False)
