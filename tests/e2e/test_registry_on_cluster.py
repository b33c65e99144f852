"""The serving image pulled from a real registry, with the chart's imagePullSecrets.

e2e.sh starts the cluster's registry (distribution v3.1.2: TLS from the cluster's CA, which
containerd trusts for that host, and an htpasswd login) and pushes the serving image to it with
buildah. A release of the cnn group names that image, ``image.pullPolicy=Always`` and a
docker-registry Secret with the login: the kubelet pulls it from the registry (its events and the
container's imageID say so) and the pod serves. With a Secret holding a wrong password the pull is
refused (401), the pod goes to ImagePullBackOff, and the deploy tool names that in one line.
"""

from __future__ import annotations

import dataclasses

import pytest

from scripts.registry import sample_inputs
from tests.e2e.harness.cluster import Cluster
from tests.e2e.harness.load import serves
from tests.e2e.harness.release import (
    CHART,
    CNN_ONLY,
    POD_GONE_S,
    READY_BOUND_S,
    REGISTRY_IMAGE,
    VALUES,
    Release,
    deploy_tool,
    pull_secret,
    registry_image_flags,
)

NAMESPACE = "e2e-registry"
RELEASE = Release("tsreg")
SECRET = "registry-login"
WRONG = "registry-wrong-login"
IMAGE = REGISTRY_IMAGE
# The layers are in containerd already (the tar import): a pull fetches the manifest and config.
PULL_BOUND_S = 180

pytestmark = pytest.mark.skipif(not IMAGE, reason="no E2E_REGISTRY_IMAGE: e2e.sh starts the registry and sets it")


def image_flags(secret: str) -> list[str]:
    return registry_image_flags(secret, pull_policy="Always")


@pytest.fixture(scope="module")
def registry_ns(cluster: Cluster):
    c = dataclasses.replace(cluster, namespace=NAMESPACE)
    c.create_namespace(NAMESPACE)
    yield c
    c.kubectl("delete", "namespace", NAMESPACE, "--wait=false", namespaced=False, check=False)


def test_pods_pull_the_serving_image_from_the_registry_with_the_pull_secret(registry_ns):
    c = registry_ns
    pull_secret(c, SECRET)
    flags = [*CNN_ONLY, *("--set", "autoscaling.enabled=false", "--set", "replicaCount=1")]
    c.helm("install", RELEASE.name, str(CHART), "-f", str(VALUES), *flags, *image_flags(SECRET))
    try:
        [pod] = c.wait(
            "the cnn pod Ready, pulled from the registry",
            lambda: c.ready_pods(RELEASE.selector),
            READY_BOUND_S + PULL_BOUND_S,
        )
        statuses = pod["status"]["initContainerStatuses"] + pod["status"]["containerStatuses"]
        repository = IMAGE.rpartition(":")[0]
        assert all(s["image"] == IMAGE for s in statuses), statuses
        assert all(s["imageID"].startswith(f"{repository}@sha256:") for s in statuses), statuses
        selector = f"involvedObject.name={pod['metadata']['name']},reason=Pulled"
        events = [e["message"] for e in c.json("get", "events", "--field-selector", selector)["items"]]
        print(f"kubelet: {events}")
        assert any(m.startswith(f'Successfully pulled image "{IMAGE}"') for m in events), events
        ip = c.json("get", "service", RELEASE.group("cnn"))["spec"]["clusterIP"]
        [(_, payload)] = sample_inputs(["cnn"]).values()
        assert c.wait("the pod serving cnn through its Service", lambda: serves(ip, "cnn", payload), 60, poll=1)
    finally:
        c.helm("uninstall", RELEASE.name, "--wait", "--timeout", "120s", check=False)
        c.wait("the release's pods gone", lambda: not c.pods(RELEASE.selector), POD_GONE_S)


def test_a_wrong_pull_secret_is_named_by_the_deploy_tool_in_one_line(registry_ns):
    c = registry_ns
    ns = "e2e-registry-wrong"
    cmd = deploy_tool(ns, *CNN_ONLY, "--set", "allInOnePod=true", *image_flags(WRONG), "--timeout", "180")
    try:
        # The deploy tool renders its own namespace: the Secret goes in once that exists.
        c.create_namespace(ns)
        pull_secret(dataclasses.replace(c, namespace=ns), WRONG, password="not-the-password")
        proc = c.run([*cmd, "apply"], timeout=300, check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        first = proc.stderr.strip().splitlines()[0]
        print(f"deploy tool: {first}")
        assert f"cannot pull image {IMAGE} (" in first, proc.stderr
        assert "401" in first or "authoriz" in first.lower(), proc.stderr
    finally:
        c.run([*cmd, "delete"], timeout=180, check=False)
        c.kubectl("delete", "namespace", ns, "--wait=false", namespaced=False, check=False)
