"""What the e2e installs: the chart's object names (``fullname`` mirrors the chart's
tsm.fullname), its labels, the values files, the bounds every wait uses, and the helm flags and
tools the tests pass."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import yaml

from scripts import deploy, k8s, registry

from .cluster import Cluster

CHART = k8s.CHART
CHART_NAME = yaml.safe_load((CHART / "Chart.yaml").read_text())["name"]
GROUP_LABEL = f"{CHART_NAME}/group"  # the chart's tsm.groupSelectorLabels
TRACK_LABEL = f"{CHART_NAME}/track"  # stable or canary
E2E = Path(__file__).resolve().parents[1]
VALUES = E2E / "values.yaml"  # the e2e's small pods, fast probes and short drains
FLEET_VALUES = E2E / "fleet-values.yaml"
GPU_VALUES = CHART / "values-gpu.yaml"
MODELS = registry.names()

READY_BOUND_S = 240  # models.startupSeconds in values.yaml; measured 11-24 s from helm install on 2 cores
ROUTED_BOUND_S = 60  # a new Service in kube-proxy's rules once its first pod is Ready (about a second here)
DRAIN = yaml.safe_load(VALUES.read_text())["drain"]
SETTLE_S = DRAIN["settleSeconds"] + 5 + 1  # + drain.grpcConnectionAgeSeconds (the chart's default) + jitter
GRACE_S = DRAIN["timeoutSeconds"] + SETTLE_S + 20  # the chart's terminationGracePeriodSeconds
# A deleted pod's object goes once the kubelet has reclaimed it on its periodic loops: status sync
# every 10 s, container garbage collection every minute (measured 10-65 s after the container exited on 1.20).
POD_GONE_S = GRACE_S + 120
# Helm flags for a release of the cnn group alone (the smallest model), for tests about something else.
CNN_ONLY = [
    *("--set", "models.names={cnn}", "--set", "groups.lstm=null", "--set", "groups.transformer=null"),
    *("--set", "helmTest.model=cnn"),
]


def fullname(release: str) -> str:
    """The chart's tsm.fullname: <release>-<chart>, or the release name when it already holds the
    chart's name; 63 characters at most."""
    name = release if CHART_NAME in release else f"{release}-{CHART_NAME}"
    return name[:63].rstrip("-")


@dataclass(frozen=True)
class Release:
    """One helm release of the chart, and the names and selectors of what it creates."""

    name: str

    @property
    def selector(self) -> str:
        """Every pod of the release (the chart's tsm.selectorLabels)."""
        return f"app.kubernetes.io/name={CHART_NAME},app.kubernetes.io/instance={self.name}"

    def group(self, group: str) -> str:
        """A group's Deployment, Service, HPA, PDB (and <group>-config, -grpc, -canary): tsm.groupName,
        the fullname cut to leave room for the group and a 7-character suffix."""
        return f"{fullname(self.name)[: 55 - len(group)].rstrip('-')}-{group}"

    def group_selector(self, group: str, track: str | None = None) -> str:
        return f"{self.selector},{GROUP_LABEL}={group}" + (f",{TRACK_LABEL}={track}" if track else "")


def image_values(cluster: Cluster) -> list[str]:
    """The helm flags that point the chart at the image imported into the cluster."""
    repo, _, tag = cluster.image.rpartition(":")
    return ["--set", f"image.repository={repo}", "--set", f"image.tag={tag}"]


def deploy_tool(namespace: str, *flags: str) -> list[str]:
    """`make deploy`'s tool, rendering the chart with the e2e values into ``namespace``."""
    return [sys.executable, "-m", "scripts.deploy", "--namespace", namespace, "--values", str(VALUES), *flags]


def unschedulable_reason(pod: dict) -> str | None:
    """The scheduler's word on why this pod (as kubectl prints it) fits no node: the deploy tool's
    own reading of its PodScheduled condition."""
    conditions = [
        SimpleNamespace(**{k: c.get(k) for k in ("type", "status", "reason", "message")})
        for c in pod["status"].get("conditions", [])
    ]
    return deploy.unschedulable_reason(SimpleNamespace(status=SimpleNamespace(conditions=conditions)))


# The e2e's registry (cluster.sh registry), with the serving image e2e.sh pushed to it.
REGISTRY_IMAGE = os.environ.get("E2E_REGISTRY_IMAGE", "")


def registry_login() -> tuple[str, str]:
    user, _, password = Path(os.environ["E2E_REGISTRY_CREDENTIALS"]).read_text().strip().partition(":")
    return user, password


def pull_secret(c: Cluster, name: str, password: str | None = None) -> None:
    """A docker-registry Secret ``name`` in the cluster handle's namespace with the registry's login
    (or with ``password`` instead of its own)."""
    user, right = registry_login()
    c.kubectl(
        "create",
        "secret",
        "docker-registry",
        name,
        f"--docker-server={REGISTRY_IMAGE.split('/')[0]}",
        f"--docker-username={user}",
        f"--docker-password={right if password is None else password}",
    )


def registry_image_flags(pull_secret: str, pull_policy: str = "IfNotPresent") -> list[str]:
    """The helm flags that point the chart at the registry's image, pulled with ``pull_secret``."""
    repository, _, tag = REGISTRY_IMAGE.rpartition(":")
    return [
        *("--set", f"image.repository={repository}", "--set", f"image.tag={tag}"),
        *("--set", f"image.pullPolicy={pull_policy}", "--set", f"imagePullSecrets={{{pull_secret}}}"),
    ]
