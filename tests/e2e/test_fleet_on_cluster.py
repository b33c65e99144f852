"""The chart on a simulated GPU fleet: 120 nodes, up to 940 pods, drains and a rollout at scale.

kwok (sigs.k8s.io/kwok, built from the Go module proxy like the rest of the cluster, started beside
the control plane by ``k8s/cluster/cluster.sh fleet``) plays 100 GPU nodes of 8 GPUs in 3 zones,
tainted and labelled as GPU feature discovery does, 10 nodes of MIG slices and 10 CPU-only nodes.
What acts on them is real: the API server and etcd, the scheduler, the controller manager
(Deployment, ReplicaSet, disruption budgets), ``kubectl drain``, helm and the deploy tool, on the
chart rendered with k8s/chart/values-gpu.yaml and tests/e2e/fleet-values.yaml.

kwok only reports what kubelets would: its pods run no container, so nothing here claims inference
on them. What is proven is where the chart's pods land and how its spread, rollout and disruption
settings hold at this scale. The figures go to bench/results/fleet-*.json.

The tests run in order, each on the state the one before left: install, placement, zones, drain,
rollout, beyond capacity.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import sys
import time

import pytest
import yaml
from kubernetes.utils import parse_quantity

from scripts import k8s
from tests.e2e.harness.cluster import Cluster
from tests.e2e.harness.fleet import GPU, POOL, POOLS, ZONE, PodWatch, node_objects
from tests.e2e.harness.release import (
    CHART,
    FLEET_VALUES,
    GPU_VALUES,
    GROUP_LABEL,
    Release,
    image_values,
    unschedulable_reason,
)
from tests.e2e.harness.results import record

# stage fleet: needs kwok
pytestmark = [pytest.mark.fleet, pytest.mark.stage("fleet")]

NAMESPACE = "fleet"
# The deploy tool renders the chart under this release name (scripts/k8s.py): helm's objects and
# the deploy tool's are the same objects.
RELEASE = Release(k8s.RELEASE)
MIG = "nvidia.com/mig-1g.10gb"
VALUES = [GPU_VALUES, FLEET_VALUES]
SETTINGS = yaml.safe_load(FLEET_VALUES.read_text())
REPLICAS = {g: v["replicaCount"] for g, v in SETTINGS["groups"].items()}
RESOURCE = {g: v.get("gpu", {}).get("resourceName", GPU) for g, v in SETTINGS["groups"].items()}
POOL_OF = {GPU: "gpu", MIG: "mig"}
MAX_SKEW = SETTINGS["topologySpread"]["zone"]["maxSkew"]
ROLLED = "cnn"  # the 300-pod group the rollout and the capacity test act on
BEYOND = 20  # pods asked beyond what the pool can hold
DRAINED = [f"kwok-gpu-{i:03d}" for i in range(10)]  # 4, 3 and 3 nodes of the three zones
NODES_READY_S = 120
READY_S = 300  # 600 pods created, scheduled and made Ready: 15 s from helm install on 2 cores


def scaled(value: int | str, total: int, round_up: bool) -> int:
    """An integer or a percentage of ``total``, as Kubernetes scales maxSurge (up) and maxUnavailable."""
    if isinstance(value, int):
        return value
    exact = int(value.rstrip("%")) * total / 100
    return math.ceil(exact) if round_up else math.floor(exact)


@dataclasses.dataclass
class Fleet:
    c: Cluster
    watch: PodWatch
    sets: list[str]  # the release's --set flags as it is now
    image_tag: str

    @property
    def helm_args(self) -> list[str]:
        return [*(x for v in VALUES for x in ("-f", str(v))), *self.sets]

    def wait_full(self, what: str, replicas: dict[str, int], timeout: float) -> None:
        """Until every group has exactly its replicas live, all Ready."""

        def full():
            if self.watch.error:
                raise AssertionError(self.watch.error)
            return all(self.watch.counts(g) == (n, n) for g, n in replicas.items())

        self.c.wait(f"{what} ({replicas})", full, timeout, poll=1.0)

    def pods(self) -> list[dict]:
        return self.c.json("get", "pods")["items"]

    def nodes(self) -> dict[str, dict]:
        return {n["metadata"]["name"]: n for n in self.c.json("get", "nodes")["items"]}


def requests_of(pod: dict) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    for container in pod["spec"]["containers"]:
        for resource, value in container.get("resources", {}).get("requests", {}).items():
            out[resource] += float(parse_quantity(value))
    return out


@pytest.fixture(scope="module")
def fleet(cluster: Cluster):
    c = dataclasses.replace(cluster, namespace=NAMESPACE)
    nodes = node_objects()
    t0 = time.monotonic()
    c.run(
        [c.kubectl_bin, "create", "-f", "-"],
        input_=json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes}),
        timeout=180,
    )

    def nodes_ready():
        listed = c.json("get", "nodes", "-l", "type=kwok")["items"]
        ready = [
            n
            for n in listed
            if any(x["type"] == "Ready" and x["status"] == "True" for x in n["status"].get("conditions", []))
        ]
        return len(ready) == len(nodes)

    c.wait(f"all {len(nodes)} kwok nodes Ready", nodes_ready, NODES_READY_S)
    nodes_s = time.monotonic() - t0
    c.create_namespace(NAMESPACE)
    watch = PodWatch(NAMESPACE).start()
    f = Fleet(c, watch, image_values(c), c.image.rpartition(":")[2])
    try:
        t1 = time.monotonic()
        c.helm("install", RELEASE.name, str(CHART), *f.helm_args)
        f.wait_full("every pod of the release Ready", REPLICAS, READY_S)
        ready_s = time.monotonic() - t1
        seen, bound = dict(watch.seen), dict(watch.bound)
        first_seen, last_bound = min(seen.values()), max(bound.values())
        first_bound = min(bound.values())
        n = len(bound)
        record(
            "fleet-install",
            {
                "nodes": {p.name: p.nodes for p in POOLS},
                "nodes_ready_s": round(nodes_s, 1),
                "replicas": REPLICAS,
                "pods": n,
                "install_to_all_ready_s": round(ready_s, 1),
                "first_pod_created_to_last_bound_s": round(last_bound - first_seen, 1),
                "pods_bound_per_s": round(n / max(last_bound - first_seen, 1e-3), 1),
                "pods_bound_per_s_while_binding": round(n / max(last_bound - first_bound, 1e-3), 1),
                "pods_created_per_s": round(len(seen) / max(max(seen.values()) - first_seen, 1e-3), 1),
                "watch_events": watch.events,
            },
        )
        yield f
    finally:
        watch.stop()
        c.helm("uninstall", RELEASE.name, "--wait=false", timeout=120, check=False)
        c.kubectl("delete", "namespace", NAMESPACE, "--wait=false", namespaced=False, check=False)
        # kwok deletes a deleted pod at once; pods left on a deleted node go with it (pod GC).
        c.wait_pods_gone(NAMESPACE, "the fleet's pods gone", 180)
        c.kubectl("delete", "nodes", "-l", "type=kwok", "--wait=true", timeout=180, namespaced=False, check=False)


def test_every_pod_lands_on_a_node_of_its_pool_and_no_node_is_over_capacity(fleet: Fleet):
    nodes, pods = fleet.nodes(), fleet.pods()
    assert len(pods) == sum(REPLICAS.values())
    used: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    pools: collections.Counter[tuple[str, str]] = collections.Counter()
    for pod in pods:
        group = pod["metadata"]["labels"][GROUP_LABEL]
        node = nodes[pod["spec"]["nodeName"]]
        pool = node["metadata"]["labels"].get(POOL, "the real node")
        pools[(group, pool)] += 1
        assert pool == POOL_OF[RESOURCE[group]], (
            f"{pod['metadata']['name']} ({group}) on {node['metadata']['name']} ({pool})"
        )
        used[node["metadata"]["name"]] += requests_of(pod)
    for name, requested in used.items():
        allocatable = nodes[name]["status"]["allocatable"]
        for resource, amount in requested.items():
            assert amount <= float(parse_quantity(allocatable.get(resource, "0"))), (
                name,
                resource,
                amount,
                allocatable,
            )
    gpus = sum(u[GPU] for u in used.values())
    slices = sum(u[MIG] for u in used.values())
    full = sum(1 for u in used.values() if u[GPU] == 8)
    print(
        f"pods per (group, pool): {dict(pools)}; {gpus:.0f} GPUs and {slices:.0f} MIG slices in use; {full} GPU nodes full"
    )
    record(
        "fleet-placement",
        {
            "pods_per_group_and_pool": {f"{g}/{p}": n for (g, p), n in sorted(pools.items())},
            "gpus_in_use": gpus,
            "mig_slices_in_use": slices,
            "nodes_over_capacity": 0,
            "pods_on_cpu_nodes": sum(n for (_, p), n in pools.items() if p == "cpu"),
        },
    )


def test_zones_balanced_within_the_hard_constraint_and_groups_spread_over_nodes(fleet: Fleet):
    nodes, pods = fleet.nodes(), fleet.pods()
    zones: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    per_node: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for pod in pods:
        group, node = pod["metadata"]["labels"][GROUP_LABEL], pod["spec"]["nodeName"]
        zones[group][nodes[node]["metadata"]["labels"][ZONE]] += 1
        per_node[group][node] += 1
    figures = {}
    for group, counts in zones.items():
        assert len(counts) == 3, (group, dict(counts))
        skew = max(counts.values()) - min(counts.values())
        assert skew <= MAX_SKEW, f"{group}: zones {dict(counts)}, skew {skew} > maxSkew {MAX_SKEW}"
        eligible = sum(1 for n in nodes.values() if n["metadata"]["labels"].get(POOL) == POOL_OF[RESOURCE[group]])
        spread = per_node[group]
        figures[group] = {
            "zones": dict(sorted(counts.items())),
            "zone_skew": skew,
            "nodes_used": len(spread),
            "eligible_nodes": eligible,
            "most_on_one_node": max(spread.values()),
            "even_share": math.ceil(REPLICAS[group] / eligible),
        }
        print(f"{group}: {figures[group]}")
        # The hostname constraint is soft (ScheduleAnyway): no node may hold more than twice a
        # group's even share, and the group must use every eligible node it could.
        assert len(spread) >= min(REPLICAS[group], eligible), figures[group]
        assert max(spread.values()) <= 2 * math.ceil(REPLICAS[group] / eligible), figures[group]
    record("fleet-zones", figures)


def test_draining_ten_gpu_nodes_never_takes_a_group_below_its_disruption_budget(fleet: Fleet):
    c, watch = fleet.c, fleet.watch
    on_drained = collections.Counter(s.group for s in watch.snapshot().values() if s.node in DRAINED)
    assert sum(on_drained.values()) > 0
    budget = SETTINGS["podDisruptionBudget"]["maxUnavailable"]
    floor = {g: n - scaled(budget, n, round_up=True) for g, n in REPLICAS.items()}
    watch.reset()
    t0 = time.monotonic()
    proc = c.run(
        [c.kubectl_bin, "drain", *DRAINED, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=240s"],
        timeout=300,
        check=False,
    )
    drain_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fleet.wait_full("every group back to its replicas after the drain", REPLICAS, 120)
    back_s = time.monotonic() - t0
    lowest = dict(watch.min_ready)
    left = [n for n, s in watch.snapshot().items() if s.node in DRAINED]
    assert not left, f"pods still on drained nodes: {left[:5]}"
    print(
        f"drained {len(DRAINED)} nodes in {drain_s:.1f}s, {dict(on_drained)} pods evicted; lowest ready {lowest}, floor {floor}"
    )
    for group, n in floor.items():
        assert lowest[group] >= n, f"{group}: {lowest[group]} ready at the lowest, below its budget's floor {n}"
    record(
        "fleet-drain",
        {
            "nodes": DRAINED,
            "evicted": dict(on_drained),
            "drain_s": round(drain_s, 1),
            "all_ready_again_s": round(back_s, 1),
            "lowest_ready": lowest,
            "pdb_floor": floor,
            "pdb_max_unavailable": budget,
        },
    )


def test_a_rolling_update_of_the_300_pod_group_stays_within_surge_and_unavailable(fleet: Fleet):
    c, watch = fleet.c, fleet.watch
    n = REPLICAS[ROLLED]
    surge = scaled(SETTINGS["rollingUpdate"]["maxSurge"], n, round_up=True)
    unavailable = scaled(SETTINGS["rollingUpdate"]["maxUnavailable"], n, round_up=False)
    before = {s.revision for s in watch.snapshot().values() if s.group == ROLLED}
    # A new archive version: with the chart's default model source (archives baked into the image)
    # that is a new image tag. kwok pulls nothing; the Deployment rolls all the same.
    new_tag = ["--set", f"groups.{ROLLED}.image.tag={fleet.image_tag}-archives-1.1"]
    watch.reset()
    t0 = time.monotonic()
    c.helm("upgrade", RELEASE.name, str(CHART), *fleet.helm_args, *new_tag)
    c.kubectl("rollout", "status", f"deployment/{RELEASE.group(ROLLED)}", "--timeout=300s", timeout=330)
    fleet.wait_full("the rolled group back to its replicas", REPLICAS, 60)
    took = time.monotonic() - t0
    fleet.sets += new_tag

    def revisions() -> set[str]:  # terminating pods too: kwok deletes them a moment after the rollout ends
        return {s.revision for s in watch.snapshot().values() if s.group == ROLLED}

    c.wait("the old revision's pods gone", lambda: not before & revisions(), 120, poll=1.0)
    after = revisions()
    lowest, highest, planned = dict(watch.min_ready), dict(watch.max_live), dict(watch.max_planned)
    print(
        f"rollout of {n} pods in {took:.1f}s: ready never below {lowest[ROLLED]}, "
        f"ReplicaSets never above {planned[ROLLED]} pods, live pods never above {highest[ROLLED]}"
    )
    assert len(after) == 1 and not after & before, (before, after)
    assert lowest[ROLLED] >= n - unavailable, f"{n - lowest[ROLLED]} unavailable > maxUnavailable {unavailable}"
    # maxSurge bounds the pods the ReplicaSets are told to hold. The live pods are not asserted: they
    # can pass it for a moment while the old ReplicaSet's extra pods wait to be marked for deletion
    # (PodWatch says why); the record keeps how far.
    assert planned[ROLLED] <= n + surge, f"ReplicaSets held {planned[ROLLED] - n} extra pods > maxSurge {surge}"
    assert planned[ROLLED] > n, f"the rollout never surged: ReplicaSets held at most {planned[ROLLED]} pods"
    for group, replicas in REPLICAS.items():
        if group != ROLLED:
            assert lowest[group] == replicas == highest[group], (group, lowest[group], highest[group])
            assert planned[group] == replicas, (group, planned[group])
    record(
        "fleet-rollout",
        {
            "group": ROLLED,
            "replicas": n,
            "max_surge": surge,
            "max_unavailable": unavailable,
            "most_extra_pods_planned": planned[ROLLED] - n,
            "most_extra_pods_live": highest[ROLLED] - n,
            "most_unavailable": n - lowest[ROLLED],
            "rollout_s": round(took, 1),
        },
    )


def placeable(nodes: dict[str, dict], pods: list[dict], group: str) -> tuple[int, dict[str, int]]:
    """How many pods of ``group`` the fleet can hold: its pods now plus the free GPUs of schedulable
    GPU nodes, per zone, capped by the hard zone constraint (no zone more than maxSkew above the
    fullest-possible smallest zone)."""
    free: collections.Counter[str] = collections.Counter()
    for node in nodes.values():
        labels = node["metadata"]["labels"]
        if labels.get(POOL) == "gpu" and not node["spec"].get("unschedulable"):
            free[labels[ZONE]] += int(node["status"]["allocatable"][GPU])
    for pod in pods:
        node = nodes[pod["spec"]["nodeName"]]
        if node["metadata"]["labels"].get(POOL) == "gpu" and not node["spec"].get("unschedulable"):
            free[node["metadata"]["labels"][ZONE]] -= int(requests_of(pod)[GPU])
    mine = collections.Counter(
        nodes[p["spec"]["nodeName"]]["metadata"]["labels"][ZONE]
        for p in pods
        if p["metadata"]["labels"][GROUP_LABEL] == group
    )
    cap = {z: mine[z] + free[z] for z in free}
    lowest = min(cap.values())
    return sum(min(v, lowest + MAX_SKEW) for v in cap.values()), dict(free)


def test_beyond_capacity_pods_wait_for_a_gpu_and_the_deploy_tool_says_how_many_in_one_line(fleet: Fleet):
    c = fleet.c
    fits, free = placeable(fleet.nodes(), fleet.pods(), ROLLED)
    want = fits + BEYOND
    # The release as it stands (the same values files and settings), with more pods of one group.
    values = [x for v in VALUES for x in ("--values", str(v))]
    more = ["--set", f"groups.{ROLLED}.replicaCount={want}"]
    cmd = [sys.executable, "-m", "scripts.deploy", "--namespace", NAMESPACE, *values, *fleet.sets, *more]
    cmd += ["--timeout", "300", "apply"]
    t0 = time.monotonic()
    proc = c.run(cmd, timeout=360, check=False)
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = proc.stderr.strip().splitlines()[0]
    print(f"free GPUs per zone {free}; asked {want}, {fits} fit; deploy tool after {took:.0f}s: {first}")
    expected = f"deploy: error: {BEYOND} of {want} pods of {NAMESPACE}/{RELEASE.group(ROLLED)} unschedulable: "
    assert first.startswith(expected), first
    assert "Insufficient nvidia.com/gpu" in first, first
    pending = [
        p
        for p in fleet.pods()
        if not p["spec"].get("nodeName") and "Insufficient nvidia.com/gpu" in (unschedulable_reason(p) or "")
    ]
    assert len(pending) == BEYOND, len(pending)
    record(
        "fleet-capacity",
        {
            "group": ROLLED,
            "asked": want,
            "fit": fits,
            "pending": len(pending),
            "free_gpus_per_zone_before": free,
            "deploy_tool_s": round(took, 1),
            "deploy_tool_says": first,
        },
    )
