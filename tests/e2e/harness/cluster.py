"""The cluster handle of the real-cluster e2e: kubectl and helm calls with bounded waits, pod
readiness, and the evidence a failing step prints."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scripts.common import ROOT
from scripts.k8s import namespace_doc


class StepFailed(AssertionError):
    pass


NODE_CONDITIONS = ("Ready", "MemoryPressure", "DiskPressure", "PIDPressure")


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

    @staticmethod
    def as_list(docs: list[dict]) -> str:
        """The objects as one kubectl input (a List)."""
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})

    def apply(self, docs: list[dict]) -> None:
        """kubectl apply of the objects, each in the namespace its metadata names."""
        self.run([self.kubectl_bin, "apply", "-f", "-"], input_=self.as_list(docs))

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """Create ``name`` as users are told to: Pod Security's restricted profile enforced, so
        every pod the chart makes there must be admitted by it."""
        self.run([self.kubectl_bin, "create", "-f", "-"], input_=json.dumps(namespace_doc(name, labels)))

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
        by its ClusterIP, since the tests run on the node, outside the cluster DNS."""
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
            self.create_namespace(namespace)
        self.apply(items)
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
        return lambda: self.run(
            [self.kubectl_bin, "delete", "-f", "-", "--wait=false"], input_=self.as_list(items), check=False
        )

    # ------------------------------------------------------------------------- evidence

    def evidence(self) -> str:
        parts = []
        for cmd in [
            ["get", "pods", "-A", "-o", "wide"],
            # A node under memory, disk or PID pressure evicts and refuses pods whatever the test does.
            [
                "get",
                "nodes",
                "-o",
                "custom-columns=NAME:.metadata.name,"
                + ",".join(f"{c}:.status.conditions[?(@.type=='{c}')].status" for c in NODE_CONDITIONS),
            ],
            ["get", "events", "-A", "--sort-by=.lastTimestamp"],
            ["get", "deploy,svc,endpoints,hpa,pdb,networkpolicy", "-A"],
            # What each autoscaler saw and decided: conditions, current metrics, events.
            ["describe", "hpa", "-A"],
            ["get", "scaledobjects.keda.sh", "-A", "-o", "wide"],
            # Knative's serverless groups: each revision, its PodAutoscaler's desired and actual
            # scale, and its ServerlessService's mode (Proxy: through the activator; Serve: direct).
            ["get", "ksvc,revisions,podautoscalers,serverlessservices", "-A", "-o", "wide"],
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
