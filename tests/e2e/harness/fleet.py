"""The simulated fleet's parts: its kwok nodes, and a watch that counts a namespace's pods per group.

kwok (k8s/cluster/cluster.sh fleet) manages every Node annotated ``kwok.x-k8s.io/node: fake``: it
keeps them Ready and plays their pods' lifecycle (Running and Ready once bound, gone once deleted).
Its pods run no container.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time

from .cluster import Cluster
from .release import GROUP_LABEL

ZONE = "topology.kubernetes.io/zone"
POOL = "e2e.torchserve-models/pool"  # which pool a fleet node belongs to (the test's own label)
GPU = "nvidia.com/gpu"
GROUP = GROUP_LABEL
HASH = "pod-template-hash"


@dataclasses.dataclass(frozen=True)
class Pool:
    name: str
    nodes: int
    allocatable: dict[str, str]
    labels: dict[str, str]
    gpu_taint: bool


# The fleet of the issue it proves: 100 H100 nodes of 8 GPUs, 10 A100 nodes cut into 56 MIG slices
# of 1g.10gb each (7 per GPU), 10 CPU-only nodes; labels as GPU feature discovery sets them.
POOLS = [
    Pool(
        "gpu",
        100,
        {"cpu": "192", "memory": "2Ti", "pods": "110", GPU: "8"},
        {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            "nvidia.com/gpu.count": "8",
        },
        True,
    ),
    Pool(
        "mig",
        10,
        {"cpu": "128", "memory": "1Ti", "pods": "110", "nvidia.com/mig-1g.10gb": "56"},
        {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
            "nvidia.com/mig.strategy": "mixed",
            "nvidia.com/mig-1g.10gb.count": "56",
        },
        True,
    ),
    Pool("cpu", 10, {"cpu": "64", "memory": "256Gi", "pods": "110"}, {}, False),
]
ZONES = ["zone-a", "zone-b", "zone-c"]


def node_objects() -> list[dict]:
    """Every fleet node, each pool spread round-robin over the zones (34/33/33 of 100)."""
    out = []
    for pool in POOLS:
        for i in range(pool.nodes):
            name = f"kwok-{pool.name}-{i:03d}"
            out.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                        "labels": {
                            "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                            "type": "kwok",
                            ZONE: ZONES[i % len(ZONES)],
                            POOL: pool.name,
                            **pool.labels,
                        },
                    },
                    "spec": {
                        "taints": [{"key": GPU, "value": "present", "effect": "NoSchedule"}] if pool.gpu_taint else []
                    },
                    "status": {"allocatable": pool.allocatable, "capacity": pool.allocatable},
                }
            )
    return out


@dataclasses.dataclass
class PodState:
    group: str
    revision: str
    node: str | None
    ready: bool
    deleting: bool


def pod_state(pod: dict) -> PodState:
    meta = pod["metadata"]
    return PodState(
        group=meta.get("labels", {}).get(GROUP, ""),
        revision=meta.get("labels", {}).get(HASH, ""),
        node=pod.get("spec", {}).get("nodeName"),
        ready=Cluster.is_ready(pod),
        deleting=bool(meta.get("deletionTimestamp")),
    )


class PodWatch:
    """A namespace's pods and ReplicaSets, event by event from the API server's watches.

    Per group it keeps the live pods (not being deleted) and the ready ones among them, and the
    extremes of both since ``reset()``: a count polled every second could miss a dip that lasted
    less. It also notes when each pod was first seen and first bound to a node.

    Per group it also keeps the pods its ReplicaSets are told to hold (the sum of their
    ``spec.replicas``) and its highest since ``reset()``. That sum is what a Deployment's maxSurge
    bounds. The live pods can stand a few above it for a moment: the Deployment controller lowers
    the old ReplicaSet and raises the new one, and the new one's pods can be created before the
    ReplicaSet controller has marked the old one's extra pods for deletion.
    """

    def __init__(self, namespace: str):
        from kubernetes import client, config

        config.load_kube_config()
        self.core = client.CoreV1Api()
        self.namespace = namespace
        self.lock = threading.Lock()
        self.pods: dict[str, PodState] = {}
        self.seen: dict[str, float] = {}
        self.bound: dict[str, float] = {}
        self.live: collections.Counter[str] = collections.Counter()
        self.ready: collections.Counter[str] = collections.Counter()
        self.min_ready: dict[str, int] = {}
        self.max_live: dict[str, int] = {}
        self.replica_sets: dict[str, tuple[str, int]] = {}  # name -> (group, spec.replicas)
        self.planned: collections.Counter[str] = collections.Counter()
        self.max_planned: dict[str, int] = {}
        self.events = 0
        self.error: str | None = None
        self.reconnects: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ----------------------------------------------------------------- bookkeeping

    def _count(self, state: PodState | None, sign: int) -> None:
        if state and not state.deleting:
            self.live[state.group] += sign
            self.ready[state.group] += sign * state.ready

    def _apply(self, kind: str, pod: dict, now: float) -> None:
        name = pod["metadata"]["name"]
        with self.lock:
            self.events += 1
            self._count(self.pods.pop(name, None), -1)
            if kind != "DELETED":
                state = pod_state(pod)
                self.pods[name] = state
                self._count(state, +1)
                self.seen.setdefault(name, now)
                if state.node:
                    self.bound.setdefault(name, now)
            for g in set(self.live) | set(self.ready):
                self.min_ready[g] = min(self.min_ready.get(g, self.ready[g]), self.ready[g])
                self.max_live[g] = max(self.max_live.get(g, self.live[g]), self.live[g])

    def _apply_replica_set(self, kind: str, rs: dict, now: float) -> None:
        name = rs["metadata"]["name"]
        with self.lock:
            group, replicas = self.replica_sets.pop(name, ("", 0))
            self.planned[group] -= replicas
            if kind != "DELETED":
                group = rs["metadata"].get("labels", {}).get(GROUP, "")
                replicas = int(rs["spec"].get("replicas", 0))
                self.replica_sets[name] = (group, replicas)
                self.planned[group] += replicas
            for g in self.planned:
                self.max_planned[g] = max(self.max_planned.get(g, self.planned[g]), self.planned[g])

    def reset(self) -> None:
        """Start new extremes from the counts as they are now."""
        with self.lock:
            self.min_ready = dict(self.ready)
            self.max_live = dict(self.live)
            self.max_planned = dict(self.planned)

    def snapshot(self) -> dict[str, PodState]:
        with self.lock:
            return dict(self.pods)

    def counts(self, group: str) -> tuple[int, int]:
        """(live, ready) pods of the group now."""
        with self.lock:
            return self.live[group], self.ready[group]

    # ----------------------------------------------------------------- the watch

    def start(self) -> PodWatch:
        from kubernetes import client

        apps = client.AppsV1Api()
        for list_fn, apply in (
            (self.core.list_namespaced_pod, self._apply),
            (apps.list_namespaced_replica_set, self._apply_replica_set),
        ):
            listed = json.loads(list_fn(self.namespace, _preload_content=False).data)
            now = time.monotonic()
            for item in listed["items"]:
                apply("ADDED", item, now)
            rv = listed["metadata"]["resourceVersion"]
            thread = threading.Thread(target=self._run, args=(list_fn, apply, rv), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, list_fn, apply, rv: str) -> None:
        while not self._stop.is_set():
            try:
                resp = list_fn(
                    self.namespace,
                    watch=True,
                    resource_version=rv,
                    allow_watch_bookmarks=True,
                    timeout_seconds=30,
                    _preload_content=False,
                )
                buf = b""
                for chunk in resp.stream(amt=None, decode_content=False):
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            # 410 Gone (the resource version compacted away) would leave a gap: say so.
                            self.error = f"watch error: {obj.get('message', obj)}"
                            return
                        rv = obj["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            apply(event["type"], obj, time.monotonic())
                    if self._stop.is_set():
                        return
            except Exception as e:  # a dropped connection: resume from the last resource version
                if self._stop.is_set():
                    return
                self.reconnects.append(f"{type(e).__name__}: {e}")
                time.sleep(0.5)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=35)
