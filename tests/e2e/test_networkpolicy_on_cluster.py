"""The chart's NetworkPolicy, enforced on the wire by kube-router's firewall (cluster.sh policy).

A release of the cnn group in a Pod Security "restricted" namespace, and probe pods (the serving
image running ``sleep``, restricted like the chart's) that connect from where a caller might be:

- ``client``: a pod of the release's namespace labelled ``torchserve-client: "true"``
  (networkPolicy.inferenceFrom.podLabels);
- ``remote``: a pod of another namespace labelled that way (inferenceFrom.namespaceLabels);
- ``stranger``: an unlabelled pod of the release's namespace;
- ``scraper``: a pod of the monitoring namespace (networkPolicy.monitoringNamespace).

Each refusal is then shown to be the policy's doing: with the release's policy removed (helm
upgrade networkPolicy.enabled=false) the same probe gets through. The management ports need no
policy: they listen on the pod's loopback only (test_chart_on_cluster).

The model-source egress rule (networkPolicy.modelSourceCIDR, rendered for models.source.type=url)
is checked on a probe pod carrying the release's pod labels under the policy the chart renders for
a url source, in a namespace of its own: the init container would reach the model store through
exactly this rule, but the e2e has no https model store the image trusts, so no init container
downloads through it here.

kube-router applies a policy change at its next sync: every check polls, bounded by SYNC_BOUND_S.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time

import pytest
import requests
import yaml

from scripts.serve import PORTS
from tests.e2e.harness.cluster import Cluster
from tests.e2e.harness.release import CHART, CNN_ONLY, READY_BOUND_S, VALUES, Release, image_values

# stage metrics: needs Prometheus, whose scrapes the policy must let through
pytestmark = pytest.mark.stage("metrics")
NAMESPACE = "e2e-netpol"
REMOTE = "e2e-netpol-clients"  # a client namespace, labelled as inferenceFrom.namespaceLabels says
EGRESS = "e2e-netpol-egress"  # the url-source policy on a pod with the release's labels
RELEASE = Release("tsnp")
GROUP = "cnn"
CLIENT_LABEL = {"torchserve-client": "true"}  # the chart's default inferenceFrom labels
MONITORING = "monitoring"  # the chart's default monitoringNamespace (cluster.sh creates it)
SOURCE_PORT = 443  # the port the chart's model-source egress rule opens
OTHER_PORT = 8443  # a port the rule does not open, on the same address
SYNC_BOUND_S = 60  # a policy change on the wire: kube-router syncs on every watch event (seconds here)
CONNECT_TIMEOUT_S = 3
OPEN = "open"

# Run inside a probe pod: one TCP connection, or one HTTP GET, to argv[1]:argv[2]; prints what came of it.
PROBE = """
import socket, sys, urllib.request
host, port, path, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
try:
    if path == "-":
        socket.create_connection((host, port), timeout=timeout).close()
        print("open")
    else:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as r:
            print("open" if r.status == 200 else f"http {r.status}")
except ConnectionRefusedError:
    print("refused")
except (socket.timeout, TimeoutError):
    print("timeout")
except OSError as e:
    print(f"error {getattr(e, 'reason', e)}")
"""


def probe_pod(name: str, namespace: str, image: str, labels: dict[str, str]) -> dict:
    """A pod that only waits (bounded), to connect from; admitted by Pod Security's restricted profile."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"e2e/probe": "true", **labels}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 1,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "runAsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "probe",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sleep", "1800"],
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


@dataclasses.dataclass
class Probe:
    cluster: Cluster
    namespace: str
    name: str

    def __call__(self, host: str, port: int, path: str = "-") -> str:
        """What one connection from this pod to host:port (an HTTP GET of ``path`` unless "-") came to."""
        out = self.cluster.run(
            [
                self.cluster.kubectl_bin,
                "exec",
                "-n",
                self.namespace,
                self.name,
                "--",
                "python3",
                "-c",
                PROBE,
                host,
                str(port),
                path,
                str(CONNECT_TIMEOUT_S),
            ],
            timeout=60,
        )
        return out.stdout.strip()

    def until(self, host: str, port: int, want_open: bool, path: str = "-") -> str:
        """Probe until the connection is open (``want_open``) or anything but open; bounded."""
        seen: list[str] = []

        def check():
            seen.append(self(host, port, path))
            return (seen[-1] == OPEN) == want_open

        try:
            self.cluster.wait(
                f"{self.namespace}/{self.name} -> {host}:{port}{'' if path == '-' else path} "
                f"{'open' if want_open else 'refused'} (saw {seen[-3:]})",
                check,
                SYNC_BOUND_S,
                poll=1,
            )
        except AssertionError:
            raise AssertionError(f"{self.name} -> {host}:{port}: {seen[-5:]}") from None
        return seen[-1]


def running(c: Cluster, namespace: str, names: list[str]) -> bool:
    pods = c.json("get", "pods", "-n", namespace, "-l", "e2e/probe=true")["items"]
    ready = {p["metadata"]["name"] for p in pods if c.is_ready(p)}
    return set(names) <= ready


@pytest.fixture(scope="module")
def world(cluster: Cluster):
    c = dataclasses.replace(cluster, namespace=NAMESPACE)
    c.create_namespace(NAMESPACE)
    c.create_namespace(REMOTE, CLIENT_LABEL)
    probes = {
        "client": (NAMESPACE, CLIENT_LABEL),
        "stranger": (NAMESPACE, {}),
        "remote": (REMOTE, {}),
        "scraper": (MONITORING, {}),
    }
    try:
        c.helm("install", RELEASE.name, *release_flags(c, policy=True))
        c.apply([probe_pod(f"np-{name}", ns, c.image, labels) for name, (ns, labels) in probes.items()])
        c.wait("the cnn pod Ready", lambda: c.ready_pods(RELEASE.selector), READY_BOUND_S)
        for ns in (NAMESPACE, REMOTE, MONITORING):
            names = [f"np-{n}" for n, (pns, _) in probes.items() if pns == ns]
            c.wait(f"probe pods {names} in {ns} running", lambda ns=ns, names=names: running(c, ns, names), 120)
        service = c.json("get", "service", RELEASE.group(GROUP))["spec"]["clusterIP"]
        pod_ip = c.ready_pods(RELEASE.selector)[0]["status"]["podIP"]
        yield c, service, pod_ip, {name: Probe(c, ns, f"np-{name}") for name, (ns, _) in probes.items()}
    finally:
        c.helm("uninstall", RELEASE.name, "--wait", "--timeout", "120s", check=False)
        c.kubectl("delete", "pod", "-n", MONITORING, "np-scraper", "--wait=false", namespaced=False, check=False)
        for ns in (NAMESPACE, REMOTE):
            c.kubectl("delete", "namespace", ns, "--wait=false", namespaced=False, check=False)


def release_flags(c: Cluster, policy: bool) -> list[str]:
    """The chart and its values for this release: the cnn group alone, one pod, the policy on or off."""
    return [
        str(CHART),
        *("-f", str(VALUES)),
        *image_values(c),
        *CNN_ONLY,
        *("--set", "autoscaling.enabled=false", "--set", "replicaCount=1"),
        *("--set", f"networkPolicy.enabled={str(policy).lower()}"),
    ]


def policy_on(c: Cluster, on: bool) -> None:
    c.helm("upgrade", RELEASE.name, *release_flags(c, policy=on))
    assert bool(c.kubectl("get", "networkpolicy", "-o", "name").strip()) == on


def test_only_allowed_clients_reach_inference_and_only_monitoring_reaches_metrics(world):
    c, service, pod_ip, probe = world
    rest, grpc, metrics = PORTS["inference"], PORTS["grpc_inference"], PORTS["metrics"]
    # Allowed: labelled pods, pods of labelled namespaces (REST answers /ping, gRPC accepts).
    for who in ("client", "remote"):
        assert probe[who].until(service, rest, True, "/ping") == OPEN
        assert probe[who].until(service, grpc, True) == OPEN
    assert probe["scraper"].until(pod_ip, metrics, True, "/metrics") == OPEN
    # Refused: an unlabelled pod, on both inference ports, by Service and by pod address; the
    # metrics port from anyone outside the monitoring namespace.
    refused = {
        ("stranger", service, rest): probe["stranger"].until(service, rest, False),
        ("stranger", pod_ip, grpc): probe["stranger"].until(pod_ip, grpc, False),
        ("client", pod_ip, metrics): probe["client"].until(pod_ip, metrics, False),
        ("remote", pod_ip, metrics): probe["remote"].until(pod_ip, metrics, False),
    }
    print(f"with the policy: refused {refused}")
    # Prometheus (on the node, as the kubelet's probes are) still scrapes the pod.
    prometheus = c.prometheus_url()

    def scraped():
        body = requests.get(
            f"{prometheus}/api/v1/query", params={"query": f'up{{namespace="{NAMESPACE}"}}'}, timeout=10
        ).json()
        return [r for r in body["data"]["result"] if r["value"][1] == "1"]

    c.wait("Prometheus scraping the release's pod (up == 1)", scraped, 60)

    # The control: the policy removed, the same connections get through, so the refusals above
    # were the policy's, not a port that was down.
    policy_on(c, False)
    try:
        t0 = time.monotonic()
        assert probe["stranger"].until(service, rest, True, "/ping") == OPEN
        assert probe["stranger"].until(pod_ip, grpc, True) == OPEN
        assert probe["client"].until(pod_ip, metrics, True, "/metrics") == OPEN
        print(f"without the policy: every refused connection opens ({time.monotonic() - t0:.1f}s after the upgrade)")
    finally:
        policy_on(c, True)
    t0 = time.monotonic()
    probe["stranger"].until(service, rest, False)
    probe["client"].until(pod_ip, metrics, False)
    print(f"policy back: refused again {time.monotonic() - t0:.1f}s after the upgrade (bound {SYNC_BOUND_S}s)")


class Listener:
    """A TCP server on the node's address (this process runs in the node's network namespace):
    accepts and closes, for a probe pod to connect to."""

    def __init__(self, host: str, port: int):
        self.sock = socket.create_server((host, port))
        self.sock.settimeout(0.5)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
                conn.close()
            except OSError:
                continue

    def close(self):
        self.stopped.set()
        self.thread.join(timeout=5)
        self.sock.close()


def node_ip(c: Cluster) -> str:
    nodes = c.json("get", "nodes")["items"]
    real = [n for n in nodes if "kwok.x-k8s.io/node" not in n["metadata"].get("annotations", {})]
    return next(a["address"] for a in real[0]["status"]["addresses"] if a["type"] == "InternalIP")


def url_source_policy(c: Cluster, source_ip: str, cidr: str) -> dict:
    """The NetworkPolicy the chart renders for a url model source at https://source_ip/ and
    networkPolicy.modelSourceCIDR=cidr."""
    proc = c.helm(
        "template",
        RELEASE.name,
        str(CHART),
        *("--show-only", "templates/networkpolicy.yaml"),
        *("--set", "models.source.type=url", "--set", f"models.source.url=https://{source_ip}/models"),
        *("--set", f"networkPolicy.modelSourceCIDR={cidr}"),
    )
    return yaml.safe_load(proc.stdout)


def test_model_source_egress_is_limited_to_model_source_cidr(cluster: Cluster):
    c = dataclasses.replace(cluster, namespace=EGRESS)
    c.create_namespace(EGRESS)
    ip = node_ip(c)
    listener = Listener(ip, SOURCE_PORT)
    try:
        inside = url_source_policy(c, ip, f"{ip}/32")
        outside = url_source_policy(c, ip, "192.0.2.0/24")  # TEST-NET-1: holds no address here
        labels = inside["spec"]["podSelector"]["matchLabels"]
        c.apply([probe_pod("np-source", EGRESS, c.image, labels), inside])
        c.wait("the probe pod running", lambda: running(c, EGRESS, ["np-source"]), 120)
        source = Probe(c, EGRESS, "np-source")
        other = OTHER_PORT
        other_listener = Listener(ip, other)
        try:
            assert source.until(ip, SOURCE_PORT, True) == OPEN
            refused_other = source.until(ip, other, False)
            c.apply([outside])
            refused_source = source.until(ip, SOURCE_PORT, False)
            print(
                f"modelSourceCIDR {ip}/32: {ip}:{SOURCE_PORT} open, {ip}:{other} {refused_other}; "
                f"192.0.2.0/24: {ip}:{SOURCE_PORT} {refused_source}"
            )
            # The control: without the policy both connections open.
            c.kubectl("delete", "networkpolicy", outside["metadata"]["name"])
            assert source.until(ip, SOURCE_PORT, True) == OPEN
            assert source.until(ip, other, True) == OPEN
        finally:
            other_listener.close()
    finally:
        listener.close()
        c.kubectl("delete", "namespace", EGRESS, "--wait=false", namespaced=False, check=False)
