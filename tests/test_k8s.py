"""The chart and manifests with real helm, kubectl, kubernetes-validate and checkov (offline), the
in-pod scripts for real, and the deploy tool's logic. No API server runs here: the deploy tool's
real run is skipped unless KUBECONFIG names a reachable cluster."""

import collections
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from kubernetes import client as k8s

from scripts import bench, deploy
from scripts import k8s as k8s_tool
from scripts.client import Client
from scripts.common import ROOT, CLIError
from tests.helpers import settings

POD = [sys.executable, str(ROOT / "scripts" / "pod.py")]


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


# ----------------------------------------------------------------------------- chart and manifests


def test_every_offline_check_passes():
    assert k8s_tool.check() == [
        "helm lint --strict (defaults and variants)",
        f"kubernetes-validate --strict for {', '.join(k8s_tool.KUBE_VERSIONS)} (defaults and variants)",
        "checkov on the chart and the manifests",
        "k8s/manifests in sync with the chart",
    ]


@pytest.mark.parametrize(
    "values,message",
    [
        (["image.tag=latest"], "image.tag"),
        (["gpu.count=-1"], "gpu.count"),
        (["autoscaling.maxReplica=3"], "maxReplica"),
        (["models.source.type=s3"], "models.source.type"),
        (["autoscaling.targetRequestsPerSecond.cnn=0"], "targetRequestsPerSecond"),
        (["topologySpread.zone.whenUnsatisfiable=Always"], "whenUnsatisfiable"),
        (["rollingUpdate.maxSurge=ten"], "maxSurge"),
        (["podDisruptionBudget.maxUnavailable=0"], "maxUnavailable"),
    ],
)
def test_schema_refuses_bad_values(values, message):
    cmd = [k8s_tool.tool("helm"), "lint", "--strict", str(k8s_tool.CHART), *[a for v in values for a in ("--set", v)]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr


GROUPS = {"cnn": ["cnn"], "lstm": ["lstm"], "transformer": ["transformer"]}  # the default: one group per model


def by_group(docs, kind) -> dict:
    """Each group's object of a kind, by its group label."""
    return {d["metadata"]["labels"]["torchserve-models/group"]: d for d in by_kind(docs, kind)}


def render_error(*values: str) -> str:
    proc = subprocess.run(
        [k8s_tool.tool("helm"), "template", "x", str(k8s_tool.CHART), *[a for v in values for a in ("--set", v)]],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0, "rendered"
    return proc.stderr


def test_rendered_defaults_are_safe_and_honest():
    docs = k8s_tool.template()
    deps = by_group(docs, "Deployment")
    assert {g: d["metadata"]["name"] for g, d in deps.items()} == {g: f"torchserve-models-{g}" for g in GROUPS}
    dep = deps["lstm"]
    spec = dep["spec"]["template"]["spec"]
    [ts] = spec["containers"]
    assert ts["resources"]["limits"]["nvidia.com/gpu"] == ts["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"] and spec["tolerations"] and spec["automountServiceAccountToken"] is False
    sc = ts["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["allowPrivilegeEscalation"] and sc["runAsUser"] >= 10000
    assert ts["readinessProbe"]["exec"]["command"][-1] == "ready"  # describe-model, not /ping
    assert ts["startupProbe"]["failureThreshold"] * ts["startupProbe"]["periodSeconds"] >= 300
    assert ts["livenessProbe"]["httpGet"]["port"] == "metrics"
    assert "drain" in ts["lifecycle"]["preStop"]["exec"]["command"]
    assert spec["terminationGracePeriodSeconds"] > 60 + 5  # drain timeout + settle
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    for group, models in GROUPS.items():
        # Each group fetches, loads and scales on its own models only.
        [init] = deps[group]["spec"]["template"]["spec"]["initContainers"]
        assert init["command"][2] == "fetch" and init["command"][init["command"].index("--models") + 1 :] == models
        assert deps[group]["metadata"]["annotations"]["torchserve-models/models"] == ",".join(models)
    cms = by_group(docs, "ConfigMap")
    conf = cms["lstm"]["data"]["config.properties"]
    assert "management_address=http://127.0.0.1:8081" in conf and "inference_address=http://0.0.0.0:8080" in conf
    assert "grpc_management_address=127.0.0.1" in conf and "metrics_mode=prometheus" in conf
    hpas = by_group(docs, "HorizontalPodAutoscaler")
    for group, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["name"] == deps[group]["metadata"]["name"]
        metrics = {
            m["pods"]["metric"]["selector"]["matchLabels"]["model_name"]: m["pods"] for m in hpa["spec"]["metrics"]
        }
        assert list(metrics) == GROUPS[group]  # only its own models: a hot translator scales its own pods
        assert all(
            m["metric"]["name"] == "torchserve_requests_per_second" and m["target"]["type"] == "AverageValue"
            for m in metrics.values()
        )
        assert hpa["spec"]["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    pdbs = by_group(docs, "PodDisruptionBudget")
    assert set(pdbs) == set(GROUPS) and all(p["apiVersion"] == "policy/v1" for p in pdbs.values())
    [np] = by_kind(docs, "NetworkPolicy")
    ingress = np["spec"]["ingress"]
    assert {p["port"] for p in ingress[0]["ports"]} == {"http", "grpc"}
    assert ingress[1]["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    assert all(s["spec"]["type"] == "ClusterIP" for s in services.values())
    for group in GROUPS:
        # A ClusterIP Service and a headless one for per-request gRPC balancing, both on the group's pods.
        svc, headless = services[f"torchserve-models-{group}"], services[f"torchserve-models-{group}-grpc"]
        assert svc["spec"]["selector"]["torchserve-models/group"] == group
        assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == svc["spec"]["selector"]
        assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
        pod_labels = deps[group]["spec"]["template"]["metadata"]["labels"]
        assert all(pod_labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert not by_kind(docs, "Ingress")


def test_cpu_only_and_keda_variants():
    cpu = k8s_tool.template(k8s_tool.KUBE_VERSIONS[0], "--set", "gpu.count=0", "--set", "autoscaling.metric=cpu")
    for dep in by_kind(cpu, "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in json.dumps(spec["containers"]) and "nodeSelector" not in spec
    assert by_kind(cpu, "HorizontalPodAutoscaler")[0]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    keda = k8s_tool.template(k8s_tool.KUBE_VERSIONS[0], "--set", "autoscaling.keda.enabled=true")
    sos = by_group(keda, "ScaledObject")
    assert not by_kind(keda, "HorizontalPodAutoscaler") and set(sos) == set(GROUPS)
    [trigger] = sos["transformer"]["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    assert 'model_name="transformer"' in query and 'pod=~"torchserve-models-transformer-[a-z0-9]+-[a-z0-9]+"' in query
    queue = k8s_tool.template(k8s_tool.KUBE_VERSIONS[0], "--set", "autoscaling.metric=queueLatency")
    hpa = by_kind(queue, "HorizontalPodAutoscaler")[0]
    assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == ["torchserve_queue_latency_ms"]
    assert "replicas" not in by_kind(keda, "Deployment")[0]["spec"]


def config_lines(conf: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in conf.splitlines() if "=" in line and not line.lstrip().startswith("#"))


def test_load_models_names_each_archive_file():
    """TorchServe reads a bare load_models entry as a file name: nothing loaded in the pod."""
    cms = by_group(k8s_tool.template(), "ConfigMap")
    assert {g: config_lines(cm["data"]["config.properties"])["load_models"] for g, cm in cms.items()} == {
        g: f"{g}={g}.mar" for g in GROUPS
    }
    [one] = by_kind(k8s_tool.template(k8s_tool.KUBE_VERSIONS[-1], "--set", "allInOnePod=true"), "ConfigMap")
    loads = config_lines(one["data"]["config.properties"])["load_models"].split(",")
    assert loads == ["cnn=cnn.mar", "lstm=lstm.mar", "transformer=transformer.mar"]


def test_the_pods_and_make_serve_start_from_one_settings_file(tmp_path):
    """Everything but the per-place overrides is the same in the ConfigMap and in `make serve`'s config."""
    from scripts import serve

    base = config_lines(serve.BASE_CONFIG.read_text())
    cm = by_group(k8s_tool.template(), "ConfigMap")["cnn"]
    pod = config_lines(cm["data"]["config.properties"])
    cfg = serve.ServerConfig(run_dir=tmp_path, model_store=tmp_path)
    local = config_lines(serve.write_config(cfg, {"cnn": tmp_path / "cnn.mar"}).read_text())
    pod_set = {
        "inference_address",
        "management_address",
        "metrics_address",
        "grpc_inference_address",
        "grpc_inference_port",
        "grpc_management_address",
        "grpc_management_port",
        "model_store",
        "load_models",
        "disable_token_authorization",
        "job_queue_size",
        "vmargs",
    }
    for key, value in base.items():
        if key not in pod_set:
            assert pod[key] == value == local[key], key
    for key in ("number_of_netty_threads", "default_response_timeout", "max_request_size"):
        assert key in base  # the settings the chart used to miss
    # The JVM flags are the file's, with the chart's heap.
    assert pod["vmargs"] == base["vmargs"].replace("-Xmx512m", "-Xmx1g") and "-Xmx512m" in local["vmargs"]


def test_the_container_runs_under_an_init_that_forwards_sigterm():
    for dep in by_kind(k8s_tool.template(), "Deployment"):
        [ts] = dep["spec"]["template"]["spec"]["containers"]
        assert ts["command"][:6] == ["dumb-init", "--", "python3", "/opt/torchserve-k8s/pod.py", "serve", "--"]
        assert "--foreground" not in ts["command"]
    dockerfile = (ROOT / "k8s" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["dumb-init", "--"]' in dockerfile and "ARG BASE_IMAGE=" in dockerfile


def test_the_helm_test_pod_is_no_endpoint_no_pdb_member_and_has_its_own_policy():
    docs = k8s_tool.template(tests=True)
    [test_pod] = by_kind(docs, "Pod")
    labels = test_pod["metadata"]["labels"]
    for obj in [*by_kind(docs, "Service"), *by_kind(docs, "PodDisruptionBudget")]:
        sel = obj["spec"]["selector"]
        sel = sel.get("matchLabels", sel)
        assert not all(labels.get(k) == v for k, v in sel.items()), obj["metadata"]["name"]
    policies = {p["metadata"]["name"]: p["spec"]["podSelector"]["matchLabels"] for p in by_kind(docs, "NetworkPolicy")}
    matching = [n for n, sel in policies.items() if all(labels.get(k) == v for k, v in sel.items())]
    assert matching == [test_pod["metadata"]["name"]]
    # It calls helmTest.model (lstm) on its group's Service, through the variables Kubernetes
    # injects: no cluster DNS needed.
    assert "$(TORCHSERVE_MODELS_LSTM_SERVICE_HOST)" in " ".join(test_pod["spec"]["containers"][0]["command"])
    assert "served by no group" in render_error("helmTest.model=resnet")


def test_notes_send_the_digit_with_a_content_type():
    notes = (k8s_tool.CHART / "templates" / "NOTES.txt").read_text()
    [cnn] = [line for line in notes.splitlines() if line.strip().startswith('"cnn"')]
    assert "Content-Type: image/png" in cnn or " -T " in cnn


def test_the_hpa_targets_are_the_ones_make_bench_printed():
    """values.yaml carries the per-pod targets of the bench run docs/performance.md shows, as `make bench` prints them."""
    run = re.search(
        r"Results of the run below: `bench/results/(\w+)\.json`",
        (ROOT / "docs" / "performance.md").read_text(),
    )
    result = json.loads((ROOT / "bench" / "results" / f"{run.group(1)}.json").read_text())
    printed = bench.hpa_targets(result)
    targets = yaml.safe_load((k8s_tool.CHART / "values.yaml").read_text())["autoscaling"]["targetRequestsPerSecond"]
    assert printed and {m: targets[m] for m in printed} == printed
    # The translator met no p99 objective on 2 cores, so the bench printed no target: the chart's own says why.
    assert set(targets) - set(printed) == {"transformer"}
    assert "no level met p99" in (k8s_tool.CHART / "values.yaml").read_text()


def test_the_chart_refuses_clusters_older_than_the_lowest_proven_version():
    # 1.28 is the oldest version the strict schemas check; the real-cluster e2e runs 1.34.
    assert k8s_tool.KUBE_VERSIONS[0] == "1.28.0"
    docs = k8s_tool.template("1.28.0")
    assert {d["apiVersion"] for d in by_kind(docs, "HorizontalPodAutoscaler")} == {"autoscaling/v2"}
    assert {d["apiVersion"] for d in by_kind(docs, "PodDisruptionBudget")} == {"policy/v1"}
    with pytest.raises(CLIError, match="incompatible with Kubernetes v1.27"):
        k8s_tool.template("1.27.0")


def test_autoscaling_follows_the_served_models_and_the_uid_can_be_left_to_the_platform():
    one = k8s_tool.template(k8s_tool.KUBE_VERSIONS[-1], "--set", "models.names={cnn,lstm}", "--set", "allInOnePod=true")
    [hpa] = by_kind(one, "HorizontalPodAutoscaler")
    assert [m["pods"]["metric"]["selector"]["matchLabels"]["model_name"] for m in hpa["spec"]["metrics"]] == [
        "cnn",
        "lstm",
    ]
    assert [d["metadata"]["name"] for d in by_kind(one, "Deployment")] == ["torchserve-models-all"]
    error = render_error("models.names={cnn,resnet}", "allInOnePod=true", "helmTest.model=cnn")
    assert "targetRequestsPerSecond has no entry for model resnet" in error
    openshift = json.dumps(k8s_tool.template(k8s_tool.KUBE_VERSIONS[-1], "--set", "podSecurity.runAsUser=null"))
    assert "runAsUser" not in openshift and "fsGroup" not in openshift and '"runAsNonRoot": true' in openshift
    dep = by_kind(k8s_tool.template(), "Deployment")[0]
    assert dep["metadata"]["labels"]["app.kubernetes.io/version"] == "0.1.0"  # the image's version


@pytest.mark.parametrize(
    "values,message",
    [
        (["groups.empty.models={}"], "groups.empty: lists no models"),
        (["groups.vision.models={resnet}"], "groups.vision: model resnet is not in models.names"),
        (["groups.both.models={cnn,lstm}"], "groups.cnn: model cnn is already served by group both"),
        (["groups.Big.models={cnn}"], "groups.Big: a group name is a DNS label"),
        (["groups=null"], "groups: no group"),
    ],
)
def test_a_bad_group_is_refused_at_render_time_in_one_line_naming_it(values, message):
    first = render_error(*values).splitlines()[0]  # helm adds a hint about --debug below it
    assert message in first, first


def test_a_serverless_group_is_a_knative_service_with_the_same_pod():
    docs = k8s_tool.template(
        k8s_tool.KUBE_VERSIONS[-1],
        *("--set", "groups.cnn.serverless.enabled=true", "--set", "groups.lstm.serverless.enabled=true"),
        *("--set", "groups.lstm.serverless.protocol=h2c", "--set", "groups.lstm.serverless.targetConcurrency=7"),
        tests=True,
    )
    ksvcs = {
        d["metadata"]["labels"]["torchserve-models/group"]: d
        for d in docs
        if d["apiVersion"] == "serving.knative.dev/v1" and d["kind"] == "Service"
    }
    assert set(ksvcs) == {"cnn", "lstm"}
    # Knative owns their pods, scaling and rollout: none of a Deployment group's objects for them.
    for kind in ("Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert set(by_group(docs, kind)) == {"transformer"}, kind
    core = {d["metadata"]["name"] for d in docs if d["apiVersion"] == "v1" and d["kind"] == "Service"}
    assert not {n for n in core if "cnn" in n or "lstm" in n}
    # The helm test's model (lstm) is served by a serverless group: no test pod to call it.
    assert not [d for d in docs if d["kind"] == "Pod" and "predict" in d["metadata"]["name"]]
    stable = by_group(docs, "Deployment")["transformer"]["spec"]["template"]["spec"]
    for group, protocol, port, target in (("cnn", "http1", 8080, "45"), ("lstm", "h2c", 7070, "7")):
        template = ksvcs[group]["spec"]["template"]
        spec, annotations = template["spec"], template["metadata"]["annotations"]
        assert annotations["autoscaling.knative.dev/min-scale"] == "0"
        assert annotations["autoscaling.knative.dev/target"] == target
        assert annotations["autoscaling.knative.dev/metric"] == "concurrency"
        ts, ready = spec["containers"]
        # The same pod as a Deployment group's, but for what Knative changes.
        assert spec["securityContext"] == stable["securityContext"]
        assert [v["name"] for v in spec["volumes"]] == [v["name"] for v in stable["volumes"]]
        [init] = spec["initContainers"]
        assert init["command"][: init["command"].index("--models")] == stable["initContainers"][0]["command"][:-2]
        assert init["command"][-1] == group
        [stable_ts] = stable["containers"]
        for key in ("command", "env", "securityContext", "volumeMounts", "resources", "image"):
            assert ts[key] == stable_ts[key], key
        assert ts["ports"] == [{"name": protocol, "containerPort": port}]
        assert "lifecycle" not in ts and "readinessProbe" not in ts and "startupProbe" not in ts
        # Readiness: every model READY, over HTTP from the sidecar that the queue-proxy probes.
        assert ready["command"][2:] == ["ready-server", "--port", "8090", "--models", group]
        assert ready["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8090}
        assert spec["timeoutSeconds"] == spec["responseStartTimeoutSeconds"] == 600
        assert spec["containerConcurrency"] == 0
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy" and "test" not in d["metadata"]["name"]]
    knative = [
        r
        for r in policy["spec"]["ingress"]
        if {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "knative-serving"}}} in r["from"]
    ]
    assert [sorted(p["port"] for p in r["ports"]) for r in knative] == [[8012, 8013], [9090]]


def test_a_serverless_group_reads_its_own_model_source_from_a_read_only_claim():
    # Knative admits a PersistentVolumeClaim only read-only (kubernetes.podspec-persistent-volume-claim).
    docs = k8s_tool.template(
        k8s_tool.KUBE_VERSIONS[-1],
        *("--set", "groups.cnn.serverless.enabled=true", "--set", "groups.cnn.modelSource.type=pvc"),
        *("--set", "groups.cnn.modelSource.pvc.claimName=slow-models"),
    )
    [ksvc] = [d for d in docs if d["apiVersion"] == "serving.knative.dev/v1"]
    spec = ksvc["spec"]["template"]["spec"]
    claims = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert [v["persistentVolumeClaim"] for v in claims] == [{"claimName": "slow-models", "readOnly": True}]
    [init] = spec["initContainers"]
    [mount] = [m for m in init["volumeMounts"] if m["name"] == claims[0]["name"]]
    assert mount["readOnly"] is True and mount["mountPath"] == "/mnt/model-source"
    # The other groups keep the release's source: the image.
    assert not [
        v
        for d in by_group(docs, "Deployment").values()
        for v in d["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]


def test_serverless_refuses_a_canary_and_a_model_without_a_target():
    on = "groups.cnn.serverless.enabled=true"
    assert "serverless and canary together" in render_error(on, "groups.cnn.canary.enabled=true")
    assert "model cnn has no serverless.targetConcurrency" in render_error(on, "serverless.targetConcurrency.cnn=null")
    assert "serverless.protocol" in render_error(on, "serverless.protocol=grpc")


def test_a_rollout_group_runs_its_deployments_pods_through_a_rollout_with_analysis_at_each_step():
    docs = k8s_tool.template(
        k8s_tool.KUBE_VERSIONS[-1],
        *("--set", "groups.cnn.rollout.enabled=true", "--set", "groups.cnn.rollout.canaryWeights={20,60}"),
        *("--set", "rollout.qualityGate.tolerance.accuracy=0.03"),
    )
    [ro] = by_kind(docs, "Rollout")
    dep = by_group(docs, "Deployment")["cnn"]
    # The pod template stays the Deployment's, which keeps no pod of its own on a new install.
    assert ro["spec"]["workloadRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
        "scaleDown": "progressively",
    }
    assert dep["spec"]["replicas"] == 0 and "replicas" not in by_group(docs, "Deployment")["lstm"]["spec"]
    assert ro["spec"]["selector"] == dep["spec"]["selector"] and "template" not in ro["spec"]
    # The HPA scales the Rollout; the other groups keep theirs on their Deployments.
    hpas = by_group(docs, "HorizontalPodAutoscaler")
    assert hpas["cnn"]["spec"]["scaleTargetRef"] == {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "name": ro["metadata"]["name"],
    }
    assert hpas["lstm"]["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    canary = ro["spec"]["strategy"]["canary"]
    assert (canary["maxSurge"], canary["maxUnavailable"]) == (1, 0)
    steps = [next(iter(s)) + ":" + str(s.get("setWeight", "")) for s in canary["steps"]]
    assert steps == ["setWeight:20", "analysis:", "analysis:", "setWeight:60", "analysis:"]
    health, quality = (canary["steps"][i]["analysis"]["templates"][0]["templateName"] for i in (1, 2))
    templates = {t["metadata"]["name"]: t for t in by_kind(docs, "AnalysisTemplate")}
    assert set(templates) == {health, quality}
    # Health: the canary pods' error rate and latency, each measurement must pass.
    metrics = {m["name"]: m for m in templates[health]["spec"]["metrics"]}
    assert set(metrics) == {"error-rate", "latency"}
    assert metrics["error-rate"]["successCondition"] == "result[0] <= 0.01"
    assert all(m["failureLimit"] == 0 for m in metrics.values())
    query = metrics["error-rate"]["provider"]["prometheus"]["query"]
    assert 'rollouts_pod_template_hash="{{args.canary-hash}}"' in query and "Requests5XX" in query
    # Quality: the gate from the serving image, told both versions' pod-template hashes.
    args = {a["name"]: a["valueFrom"]["podTemplateHashValue"] for a in canary["steps"][2]["analysis"]["args"]}
    assert args == {"canary-hash": "Latest", "stable-hash": "Stable"}
    job = templates[quality]["spec"]["metrics"][0]["provider"]["job"]["spec"]
    pod = job["template"]["spec"]
    [gate] = pod["containers"]
    assert gate["image"] == dep["spec"]["template"]["spec"]["containers"][0]["image"]
    assert gate["command"][:4] == ["python3", "-m", "scripts.gate", "compare"]
    assert "accuracy=0.03" in gate["command"] and "{{args.stable-hash}}" in gate["command"]
    assert job["backoffLimit"] == 0 and gate["securityContext"]["readOnlyRootFilesystem"]
    assert job["template"]["metadata"]["labels"]["torchserve-client"] == "true"  # the policy's inference clients
    [role] = by_kind(docs, "Role")
    assert pod["serviceAccountName"] == role["metadata"]["name"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]


def test_a_rollout_refuses_a_canary_and_serverless():
    on = "groups.cnn.rollout.enabled=true"
    assert "rollout and canary together" in render_error(on, "groups.cnn.canary.enabled=true")
    assert "serverless and rollout together" in render_error(on, "groups.cnn.serverless.enabled=true")
    assert "canaryWeights" in render_error(on, "rollout.canaryWeights={100}")
    assert "needs torchserve.tokenAuth=false" in render_error(on, "torchserve.tokenAuth=true")


def test_a_group_sets_its_own_gpus_bounds_and_version_and_a_canary_shares_its_services():
    docs = k8s_tool.template(
        k8s_tool.KUBE_VERSIONS[-1],
        *("--set", "groups.cnn.gpu.count=0"),
        *("--set", "groups.transformer.gpu.resourceName=nvidia.com/mig-1g.10gb"),
        *("--set", "groups.transformer.autoscaling.maxReplicas=16"),
        *("--set", "groups.lstm.canary.enabled=true", "--set", "groups.lstm.canary.replicas=2"),
        *("--set", "groups.lstm.canary.modelSource.type=url"),
        *("--set", "groups.lstm.canary.modelSource.url=https://models.example.com/v2"),
    )
    deps = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    limits = {n: d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] for n, d in deps.items()}
    assert "nvidia.com/gpu" not in limits["torchserve-models-cnn"]
    assert limits["torchserve-models-transformer"]["nvidia.com/mig-1g.10gb"] == "1"
    assert "nvidia.com/gpu" not in limits["torchserve-models-transformer"]
    assert limits["torchserve-models-lstm"]["nvidia.com/gpu"] == "1"
    assert by_group(docs, "HorizontalPodAutoscaler")["transformer"]["spec"]["maxReplicas"] == 16
    stable, canary = deps["torchserve-models-lstm"], deps["torchserve-models-lstm-canary"]
    assert canary["spec"]["replicas"] == 2 and "replicas" not in stable["spec"]  # the HPA owns the stable count
    assert stable["spec"]["selector"]["matchLabels"]["torchserve-models/track"] == "stable"
    assert canary["spec"]["selector"]["matchLabels"]["torchserve-models/track"] == "canary"

    def source(dep):
        return {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["initContainers"][0]["env"]}

    assert source(stable)["MODEL_SOURCE"] == "/opt/model-store"
    assert source(canary)["MODEL_SOURCE"] == "https://models.example.com/v2"
    # The group's Services select both tracks: the canary's share is its share of the pods.
    for svc in by_kind(docs, "Service"):
        if svc["metadata"]["labels"].get("torchserve-models/group") == "lstm":
            for dep in (stable, canary):
                labels = dep["spec"]["template"]["metadata"]["labels"]
                assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
    # The HPA scales the stable Deployment; the PDB guards both.
    assert (
        by_group(docs, "HorizontalPodAutoscaler")["lstm"]["spec"]["scaleTargetRef"]["name"]
        == stable["metadata"]["name"]
    )
    pdb = by_group(docs, "PodDisruptionBudget")["lstm"]["spec"]["selector"]["matchLabels"]
    assert "torchserve-models/track" not in pdb


def test_the_ingress_routes_each_model_to_its_group_and_grpc_per_group_host():
    docs = k8s_tool.template(
        k8s_tool.KUBE_VERSIONS[-1], "--set", "ingress.enabled=true", "--set", "ingress.grpc.enabled=true"
    )
    ingresses = {i["metadata"]["name"]: i for i in by_kind(docs, "Ingress")}
    paths = {
        p["path"]: p["backend"]["service"]["name"]
        for r in ingresses["torchserve-models"]["spec"]["rules"]
        for p in r["http"]["paths"]
    }
    assert paths["/predictions/cnn"] == paths["/explanations/cnn"] == "torchserve-models-cnn"
    assert paths["/predictions/transformer"] == "torchserve-models-transformer"
    grpc = ingresses["torchserve-models-lstm-grpc"]
    assert grpc["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    [rule] = grpc["spec"]["rules"]
    assert rule["host"] == "lstm.grpc.models.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"]["port"]["name"] == "grpc"


def test_plain_manifests_build_with_kustomize_and_a_drifted_copy_is_caught(tmp_path, monkeypatch):
    out = subprocess.run(
        [k8s_tool.tool("kubectl"), "kustomize", str(k8s_tool.MANIFESTS)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    kinds = [line.split(": ")[1] for line in out.stdout.splitlines() if line.startswith("kind: ")]
    assert kinds.count("Namespace") == 1 and kinds.count("Deployment") == 3 and "HorizontalPodAutoscaler" in kinds
    copy = tmp_path / "manifests"
    shutil.copytree(k8s_tool.MANIFESTS, copy)
    dep = copy / "deployment-torchserve-models-lstm.yaml"
    dep.write_text(dep.read_text().replace("maxUnavailable: 0", "maxUnavailable: 1"))
    monkeypatch.setattr(k8s_tool, "MANIFESTS", copy)
    assert k8s_tool.out_of_sync() == ["k8s/manifests/deployment-torchserve-models-lstm.yaml: differs from the chart"]


# ----------------------------------------------------------------------------- pod.py fetch


@pytest.fixture
def source(archive_store, tmp_path):
    """A copy of the archive store: the model source an init container reads."""
    _, store = archive_store
    src = tmp_path / "source"
    shutil.copytree(store, src, ignore=shutil.ignore_patterns(".version"))
    return src


def fetch(src, dest, *extra, env=None):
    return subprocess.run(
        [*POD, "fetch", "--source", str(src), "--dest", str(dest), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_fetch_accepts_good_archives_from_a_folder(source, tmp_path):
    proc = fetch(source, tmp_path / "store")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "cnn.mar",
        "lstm.mar",
        "manifest.json",
        "transformer.mar",
    ]
    assert "verified cnn, lstm, transformer" in proc.stdout


def test_fetch_refuses_a_flipped_byte_and_a_truncated_archive(source, tmp_path):
    data = bytearray((source / "lstm.mar").read_bytes())
    data[1000] ^= 0x40
    (source / "lstm.mar").write_bytes(bytes(data))
    proc = fetch(source, tmp_path / "a", "--models", "lstm")
    assert proc.returncode == 1 and "lstm.mar: sha256" in proc.stderr and "does not match the manifest" in proc.stderr
    assert not list((tmp_path / "a").glob("*.mar")) and not list((tmp_path / "a").glob(".*part"))
    (source / "cnn.mar").write_bytes((source / "cnn.mar").read_bytes()[:-4096])
    proc = fetch(source, tmp_path / "b", "--models", "cnn")
    assert proc.returncode == 1 and "truncated download" in proc.stderr
    assert fetch(source, tmp_path / "c", "--models", "resnet").returncode == 1


@pytest.mark.parametrize(
    "entry",
    [
        {"file": "./../evil.mar"},
        {"file": "../evil.mar"},
        {"file": "/tmp/evil.mar"},
        {"file": "sub/dir.mar"},
        {"file": "lstm.zip"},
        {"size": "big"},
        {"size": None},
        {"sha256": "abc"},
        "not an object",
    ],
)
def test_fetch_refuses_a_malformed_manifest_entry_in_one_line(source, tmp_path, entry):
    manifest = json.loads((source / "manifest.json").read_text())
    good = manifest["archives"]["lstm"]
    manifest["archives"]["lstm"] = {**good, **entry} if isinstance(entry, dict) else entry
    (source / "manifest.json").write_text(json.dumps(manifest))
    proc = fetch(source, tmp_path / "dest", "--models", "lstm")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "entry 'lstm' needs a plain file name ending in .mar" in proc.stderr
    assert not (tmp_path / "evil.mar").exists() and not list(tmp_path.rglob("evil.mar"))


class Source(http.server.SimpleHTTPRequestHandler):
    """An archive source with misbehaving paths: /ok, /redirect (to another origin), /drip, /big."""

    other_origin = ""
    seen_auth: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        Source.seen_auth.append((self.server.server_port, self.headers.get("Authorization")))
        kind, _, name = self.path.lstrip("/").partition("/")
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", f"{Source.other_origin}/ok/{name}")
            self.end_headers()
            return
        if kind in ("drip", "big") and name.endswith(".mar"):
            self.send_response(200)
            self.end_headers()
            try:
                if kind == "drip":  # one byte at a time, each well within the read timeout
                    for _ in range(40):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.25)
                else:  # far more than the manifest's size
                    for _ in range(64):
                        self.wfile.write(b"\0" * (1 << 20))
            except OSError:  # the fetch hung up, as it should
                pass
            return
        self.path = "/" + name
        super().do_GET()


@pytest.fixture
def https_source(source, tmp_path):
    """The source folder over https on loopback (a self-signed certificate the fetch is told to trust),
    plus a plain-http server that plays another origin."""
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    handler = lambda *a, **kw: Source(*a, directory=str(source), **kw)
    tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    Source.other_origin = f"http://127.0.0.1:{plain.server_port}"
    Source.seen_auth = []
    for srv in (tls, plain):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    env = {**os.environ, "SSL_CERT_FILE": str(cert), "MODEL_SOURCE_BEARER_TOKEN": "s3cret"}
    try:
        yield f"https://127.0.0.1:{tls.server_port}", plain.server_port, env
    finally:
        for srv in (tls, plain):
            srv.shutdown()
            srv.server_close()


def test_fetch_over_https_and_a_failed_download(https_source, source, tmp_path):
    url, _, env = https_source
    proc = fetch(f"{url}/ok", tmp_path / "ok", env=env)
    assert proc.returncode == 0, proc.stderr
    (source / "transformer.mar").unlink()
    proc = fetch(f"{url}/ok", tmp_path / "bad", "--models", "transformer", env=env)
    assert proc.returncode == 1 and "HTTP 404" in proc.stderr


def test_fetch_refuses_plain_http_and_redirects_to_another_origin(https_source, tmp_path):
    url, plain_port, env = https_source
    proc = fetch(f"http://127.0.0.1:{plain_port}/ok", tmp_path / "a", env=env)
    assert proc.returncode == 1 and "only https:// sources are allowed" in proc.stderr
    proc = fetch(f"{url}/redirect", tmp_path / "b", env=env)
    assert proc.returncode == 1 and "redirected to another origin (http://127.0.0.1); refused" in proc.stderr
    assert not [auth for port, auth in Source.seen_auth if port == plain_port], "the token left the source's origin"


def test_fetch_caps_the_size_and_bounds_each_download(https_source, source, tmp_path):
    url, _, env = https_source
    for kind in ("big", "drip"):
        (source / kind).mkdir()
        shutil.copy(source / "manifest.json", source / kind / "manifest.json")
    t0 = time.monotonic()
    proc = fetch(f"{url}/big", tmp_path / "a", "--models", "cnn", env=env)
    assert proc.returncode == 1 and "more than the" in proc.stderr and "bytes the manifest allows" in proc.stderr
    assert not list((tmp_path / "a").iterdir())
    proc = fetch(f"{url}/drip", tmp_path / "b", "--models", "cnn", "--timeout", "2", "--deadline", "3", env=env)
    took = time.monotonic() - t0
    assert proc.returncode == 1 and "not finished within its deadline" in proc.stderr, proc.stderr
    assert took < 15 and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- pod.py ready and drain


def test_ready_and_drain_against_a_real_torchserve(server, tmp_path):
    env = {
        **os.environ,
        "TS_KEY_FILE": str(server.key_file),
        "TS_DRAIN_MARKER": str(tmp_path / "draining"),
        "TS_BUSY_DIR": server.env()["TS_BUSY_DIR"],
    }
    url = server.url("management")
    ready = lambda *a: subprocess.run(
        [*POD, "ready", "--url", url, *a], env=env, capture_output=True, text=True, timeout=30
    )
    ok = ready("--models", "cnn", "lstm", "transformer")
    assert ok.returncode == 0 and ok.stdout.strip() == "ready", ok.stderr
    missing = ready("--models", "resnet")
    assert missing.returncode == 1 and "resnet: not registered" in missing.stderr
    no_server = subprocess.run([*POD, "ready", "--url", "http://127.0.0.1:9"], env=env, capture_output=True, text=True)
    assert no_server.returncode == 1 and "not answering" in no_server.stderr
    # Drain while requests are in flight: readiness turns false at once, drain returns when done.
    with Client("rest", settings(server)) as c, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(c.predict, "transformer", {"text": f"God is love {i}."}) for i in range(24)]
        t0 = time.monotonic()
        drain = subprocess.Popen(
            [*POD, "drain", "--url", url, "--timeout", "60", "--settle", "0"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
        assert ready().returncode == 1 and "draining" in ready().stderr
        out, err = drain.communicate(timeout=90)
        assert drain.returncode == 0 and "no request in flight" in out, err
        assert all(f.done() for f in futures), "drain returned with requests still in flight"
        assert all("translation" in f.result() for f in futures)
        assert time.monotonic() - t0 < 60
    (tmp_path / "draining").unlink()
    assert ready().returncode == 0


def test_ready_server_answers_over_http_what_ready_exits_with(server, tmp_path):
    """Knative's queue-proxy can only probe over HTTP: the sidecar must say what `ready` says."""
    from tests.helpers import free_ports

    env = {**os.environ, "TS_KEY_FILE": str(server.key_file), "TS_DRAIN_MARKER": str(tmp_path / "draining")}
    procs = []

    def start(*args):
        port = free_ports(1)[0]
        proc = subprocess.Popen(
            [*POD, "ready-server", "--port", str(port), *args], env=env, stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert "ready-server: GET" in proc.stdout.readline()
        return f"http://127.0.0.1:{port}"

    def get(base, path="/ready"):
        try:
            with urllib.request.urlopen(base + path, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    url = server.url("management")
    try:
        every = start("--url", url, "--models", "cnn", "lstm", "transformer")
        missing = start("--url", url, "--models", "resnet")
        gone = start("--url", "http://127.0.0.1:9")
        # A client that opens a connection and sends nothing holds one thread, not the server.
        with socket.create_connection(("127.0.0.1", int(every.rsplit(":", 1)[1]))):
            assert get(every) == (200, "ready\n")
        code, text = get(missing)
        assert code == 503 and "resnet: not registered" in text
        code, text = get(gone)
        assert code == 503 and "not answering" in text
        assert get(every, "/ping")[0] == 404
        (tmp_path / "draining").touch()
        assert get(every) == (503, "not ready: draining\n")
    finally:
        for proc in procs:
            proc.terminate()
            assert proc.wait(timeout=10) == 0


def test_only_a_live_worker_marked_busy_is_in_flight(tmp_path):
    from scripts import pod

    dead = subprocess.Popen(["true"])
    dead.wait()
    mine = tmp_path / f"torchserve-busy-{os.getpid()}"
    mine.write_bytes(b"1")  # a live worker in a batch
    (tmp_path / f"torchserve-busy-{dead.pid}").write_bytes(b"1")  # killed mid-batch: left marked
    assert pod.busy_workers(str(tmp_path)) == 1
    assert not (tmp_path / f"torchserve-busy-{dead.pid}").exists()
    mine.write_bytes(b"0")  # the same worker between batches
    assert pod.busy_workers(str(tmp_path)) == 0


class Refusing(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(400, "InvalidKeyException")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_drain_does_not_read_a_refused_key_as_nothing_in_flight(tmp_path, monkeypatch):
    from scripts import pod

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(pod, "DRAIN_MARKER", tmp_path / "draining")
    monkeypatch.setattr(pod, "BUSY_DIR", None)
    try:
        ok, pending = pod.drain(f"http://127.0.0.1:{httpd.server_port}", timeout=1.5, settle=0, poll=0.2)
    finally:
        httpd.shutdown()
    assert not ok and pending >= 1


def test_serve_clears_the_last_containers_state_and_stops_cleanly_on_sigterm(archive_store, tmp_path):
    """`pod.py serve` as the container runs it: a clean JVM shutdown on SIGTERM, then exit 0."""
    import psutil

    from scripts import serve
    from tests.helpers import server_config

    _, store = archive_store
    cfg = server_config(tmp_path / "run", store, auth=False, models=["lstm"])
    (cfg.run_dir / "tmp").mkdir(parents=True)
    config = serve.write_config(cfg, serve.model_archives(cfg))
    marker, busy = tmp_path / "draining", cfg.run_dir / "tmp" / "torchserve-busy-999999"
    marker.touch()  # what preStop left when a probe killed the previous container
    busy.write_text("1")
    env = {**cfg.env(), "TS_DRAIN_MARKER": str(marker), "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [
            *POD,
            "serve",
            "--",
            "--ncs",
            "--model-store",
            str(store),
            "--ts-config",
            str(config),
            "--log-config",
            str(serve.LOG_CONFIG),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = cfg.url("management")
        deadline = time.monotonic() + 120
        while subprocess.run([*POD, "ready", "--url", url], env=env, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and proc.poll() is None, "TorchServe never became ready"
            time.sleep(1)
        jvm = int((cfg.run_dir / "tmp" / ".model_server.pid").read_text())
        t0 = time.monotonic()
        proc.send_signal(15)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"removed {marker} left by the previous container" in out and not marker.exists() and not busy.exists()
    assert "TorchServe shut down cleanly" in out, out
    assert time.monotonic() - t0 < 30
    assert not psutil.pid_exists(jvm) or psutil.Process(jvm).status() == psutil.STATUS_ZOMBIE


def test_smoke_subcommand_against_a_real_torchserve_without_auth(archive_store, tmp_path):
    from scripts import serve
    from tests.helpers import server_config

    _, store = archive_store
    cfg = server_config(tmp_path / "run", store, auth=False, models=["lstm"])
    serve.start(cfg)
    try:
        proc = subprocess.run(
            [*POD, "smoke", "--url", cfg.url("inference"), "--model", "lstm", "--text", "lovely"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0 and json.loads(proc.stdout)["label"] in ("rotten", "fresh")
        bad = subprocess.run(
            [*POD, "smoke", "--url", cfg.url("inference"), "--model", "resnet", "--text", "x"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 1 and "HTTP 404" in bad.stderr
    finally:
        serve.stop(cfg)


def test_smoke_waits_out_a_refused_connection_within_its_grace_and_no_longer(tmp_path):
    """A client pod's first connections may be refused until the NetworkPolicy enforcer has synced
    its address: smoke tries again for connect_grace seconds, then names the refusal."""
    import http.server
    import socket
    import threading
    import time

    from scripts import pod

    with socket.socket() as s:  # a free port, closed: connections to it are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"label": "fresh"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    t0 = time.monotonic()
    with pytest.raises(pod.PodError, match="Connection refused"):
        pod.smoke(f"http://127.0.0.1:{port}", "lstm", "x", timeout=5, connect_grace=1.5)
    assert 1.5 <= time.monotonic() - t0 < 10
    servers = []

    def listen_later():
        time.sleep(1.5)
        server = http.server.HTTPServer(("127.0.0.1", port), Answer)
        servers.append(server)
        server.serve_forever()

    threading.Thread(target=listen_later, daemon=True).start()
    try:
        assert pod.smoke(f"http://127.0.0.1:{port}", "lstm", "x", timeout=5, connect_grace=20) == {"label": "fresh"}
    finally:
        for server in servers:
            server.shutdown()


# ----------------------------------------------------------------------------- deploy tool


def test_deploy_loads_manifests_into_another_namespace():
    docs = deploy.load_manifests(namespace="team-a")
    assert docs[0]["kind"] == "Namespace" and docs[0]["metadata"]["name"] == "team-a"
    assert all(d["metadata"].get("namespace", "team-a") == "team-a" for d in docs)
    deps = deploy.deployments_of(docs)
    assert [deploy.served_models(d) for d in deps] == [["cnn"], ["lstm"], ["transformer"]]
    assert [deploy.gpu_requests(d) for d in deps] == [{"nvidia.com/gpu": 1}] * 3
    mig = deploy.render_chart([], ["groups.cnn.gpu.resourceName=nvidia.com/mig-1g.10gb"], "1.33.0", [])
    assert deploy.gpu_requests(deploy.deployments_of(mig)[0]) == {"nvidia.com/mig-1g.10gb": 1}
    assert deploy.load_manifests()[1]["metadata"]["namespace"] == "ml-serving"


def node(name, gpus=None, unschedulable=False):
    alloc = {"cpu": "8"} | ({"nvidia.com/gpu": str(gpus)} if gpus is not None else {})
    return k8s.V1Node(
        metadata=k8s.V1ObjectMeta(name=name),
        spec=k8s.V1NodeSpec(unschedulable=unschedulable),
        status=k8s.V1NodeStatus(allocatable=alloc),
    )


def test_gpu_capacity_counts_only_schedulable_gpu_nodes():
    nodes = [node("cpu-1"), node("gpu-1", 4), node("gpu-2", 8, unschedulable=True), node("gpu-3", 0)]
    assert deploy.gpu_capacity(nodes) == {"gpu-1": 4}
    assert deploy.gpu_capacity([node("cpu-1")]) == {}


def pod_with(waiting=None, terminated=None, name="torchserve", unschedulable=None):
    state = k8s.V1ContainerState(
        waiting=k8s.V1ContainerStateWaiting(reason=waiting, message="back-off") if waiting else None,
        terminated=k8s.V1ContainerStateTerminated(exit_code=terminated) if terminated is not None else None,
    )
    cs = k8s.V1ContainerStatus(
        name=name,
        image="registry.example.com/ml/torchserve-models:0.1.0",
        image_id="",
        ready=False,
        restart_count=0,
        state=state,
    )
    conds = (
        [k8s.V1PodCondition(type="PodScheduled", status="False", reason="Unschedulable", message=unschedulable)]
        if unschedulable
        else []
    )
    status = k8s.V1PodStatus(
        container_statuses=[cs] if name == "torchserve" else [],
        init_container_statuses=[cs] if name != "torchserve" else [],
        conditions=conds,
    )
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="tsm-abc"), status=status)


def test_pod_problems_are_named():
    assert "cannot pull image" in deploy.pod_problem(pod_with("ImagePullBackOff"))
    assert "CrashLoopBackOff" in deploy.pod_problem(pod_with("CrashLoopBackOff"))
    assert "model fetch failed" in deploy.pod_problem(pod_with(terminated=1, name="fetch-models"))
    assert deploy.pod_problem(pod_with("ContainerCreating")) is None
    assert deploy.pod_problem(pod_with(terminated=0, name="fetch-models")) is None
    full = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    assert deploy.unschedulable_reason(pod_with(unschedulable=full)) == full
    assert deploy.unschedulable_reason(pod_with("ContainerCreating")) is None
    # A claim still binding is not a verdict: the scheduler retries.
    binding = "0/1 nodes are available: 1 pod has unbound immediate PersistentVolumeClaims."
    assert deploy.unschedulable_reason(pod_with(unschedulable=binding)) is None


def test_unschedulable_pods_are_counted_in_one_line_once_the_scheduler_tried_them_all():
    full = "0/121 nodes are available: 90 Insufficient nvidia.com/gpu, 31 node(s) didn't match Pod's node affinity."

    def pod(i, node=None, unschedulable=None, deleting=False):
        p = pod_with(unschedulable=unschedulable)
        p.metadata = k8s.V1ObjectMeta(
            name=f"tsm-cnn-{i}", deletion_timestamp="2026-01-01T00:00:00Z" if deleting else None
        )
        p.spec = k8s.V1PodSpec(containers=[], node_name=node)
        return p

    placed = [pod(i, node=f"gpu-{i}") for i in range(3)]
    waiting = [pod(3, unschedulable=full), pod(4, unschedulable=full)]
    line = deploy.unschedulable_summary("fleet/tsm-cnn", 5, placed + waiting)
    assert line == f"2 of 5 pods of fleet/tsm-cnn unschedulable: {full}"
    assert "\n" not in line
    # Not yet: a pod the scheduler has not tried, a pod not yet created, or none unschedulable.
    assert deploy.unschedulable_summary("fleet/tsm-cnn", 6, [*placed, *waiting, pod(5)]) is None
    assert deploy.unschedulable_summary("fleet/tsm-cnn", 6, placed + waiting) is None
    assert deploy.unschedulable_summary("fleet/tsm-cnn", 3, placed) is None
    # A pod being deleted is not counted; a second reason is mentioned, the most common one quoted.
    other = "0/121 nodes are available: 121 node(s) didn't match pod topology spread constraints."
    mixed = [*placed, *waiting, pod(5, unschedulable=other), pod(6, unschedulable=full, deleting=True)]
    line = deploy.unschedulable_summary("fleet/tsm-cnn", 6, mixed)
    assert line == f"3 of 6 pods of fleet/tsm-cnn unschedulable: {full} (and 1 other reason)"


def test_rollout_done_needs_every_replica_updated_and_ready():
    def dep(**status):
        return k8s.V1Deployment(
            metadata=k8s.V1ObjectMeta(generation=3),
            spec=k8s.V1DeploymentSpec(replicas=2, selector=k8s.V1LabelSelector(), template=k8s.V1PodTemplateSpec()),
            status=k8s.V1DeploymentStatus(**status),
        )

    full = dict(observed_generation=3, updated_replicas=2, ready_replicas=2, available_replicas=2)
    assert deploy.rollout_done(dep(**full))
    assert not deploy.rollout_done(dep(**{**full, "observed_generation": 2}))
    assert not deploy.rollout_done(dep(**{**full, "ready_replicas": 1}))
    assert not deploy.rollout_done(dep(**full, unavailable_replicas=1))


def test_http_over_a_socket_pair_like_the_port_forward():
    """The port-forward stream never reports the far end closing: the answer must end at its length."""
    a, b = socket.socketpair()
    got = []

    def answer():
        request = b""
        while not request.endswith(b"fine"):
            request += b.recv(65536)
        got.append(request)
        b.sendall(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n2\r\n1}\r\n0\r\n\r\n')
        # b stays open, like the port-forward.

    threading.Thread(target=answer, daemon=True).start()
    t0 = time.monotonic()
    assert deploy.http_over_socket(a, "POST", "/predictions/lstm", b"fine", "text/plain", 5) == (200, b'{"a":1}')
    assert time.monotonic() - t0 < 4, "read until the timeout instead of the answer's end"
    assert got[0].startswith(b"POST /predictions/lstm HTTP/1.1")
    b.close()


STEPS = [
    {"setWeight": 25},
    {"analysis": {"templates": [{"templateName": "ts-cnn-health"}]}},
    {"analysis": {"templates": [{"templateName": "ts-cnn-quality"}]}},
    {"setWeight": 50},
    {"analysis": {"templates": [{"templateName": "ts-cnn-health"}]}},
]


def a_rollout(generation: str = "3", **status) -> dict:
    return {
        "metadata": {"generation": 1},
        "spec": {"strategy": {"canary": {"steps": STEPS}}, "workloadRef": {"name": "ts-cnn"}},
        "status": {"workloadObservedGeneration": generation, **status},
    }


def test_deploy_follows_a_rollout_step_by_step_in_one_line_each():
    ro = a_rollout(
        currentStepIndex=2,
        stableRS="aaa",
        currentPodHash="bbb",
        phase="Progressing",
        canary={"currentStepAnalysisRunStatus": {"name": "ts-cnn-bbb-2-2", "status": "Running"}},
    )
    key, line = deploy.rollout_state(ro, collections.Counter({"aaa": 3, "bbb": 1}))
    assert line == (
        "step 3/5 analysis ts-cnn-quality: canary bbb 1 Ready, stable aaa 3 Ready, "
        "analysis ts-cnn-bbb-2-2 Running (Progressing)"
    )
    # A new line only when something changed: the step, the pods, the analysis.
    assert deploy.rollout_state(ro, collections.Counter({"aaa": 3, "bbb": 1}))[0] == key
    assert deploy.rollout_state(ro, collections.Counter({"aaa": 4}))[0] != key
    assert deploy.describe_step(STEPS, 5) == "step 5/5 done"
    run = {
        "status": {
            "metricResults": [
                {"name": "error-rate", "phase": "Successful", "measurements": [{"value": "[0.0021]"}]},
                {"name": "model-quality", "phase": "Failed", "measurements": [{"metadata": {"job-name": "j"}}]},
            ]
        }
    }
    assert deploy.measurement_summary(run) == "error-rate 0.0021 Successful, model-quality Failed"


def test_a_rollouts_verdict_waits_for_the_controller_to_see_the_newest_template():
    aborted = {"abort": True, "phase": "Degraded", "stableRS": "aaa", "currentPodHash": "bbb"}
    promoted = {"phase": "Healthy", "stableRS": "bbb", "currentPodHash": "bbb"}
    assert deploy.verdict(a_rollout("3", **aborted), 3) is False
    assert deploy.verdict(a_rollout("3", **promoted), 3) is True
    # The Deployment changed again (a new version): the last abort or promotion is not this one's.
    assert deploy.verdict(a_rollout("3", **aborted), 4) is None
    assert deploy.verdict(a_rollout("3", **promoted), 4) is None
    assert deploy.verdict(a_rollout("4", phase="Progressing", stableRS="bbb", currentPodHash="ccc"), 4) is None


def test_deploy_without_a_cluster_is_one_clear_line(tmp_path):
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "missing"), "HOME": str(tmp_path)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.deploy", "apply"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert (
        proc.returncode == 1 and proc.stderr.startswith("deploy: error: no cluster") and "Traceback" not in proc.stderr
    )


def test_the_pod_tool_runs_alone_as_in_the_image(tmp_path):
    """k8s/Dockerfile copies scripts/pod.py alone: it must run with no other project file and no
    third-party package on its path (-I: isolated from the environment; -S: no site-packages)."""
    alone = tmp_path / "pod.py"
    shutil.copy(ROOT / "scripts" / "pod.py", alone)
    cmd = [sys.executable, "-I", "-S", str(alone)]
    assert "drain" in subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=True).stdout
    # A command that does its work (asks a management API that is not there) and says why it failed.
    proc = subprocess.run([*cmd, "ready", "--url", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "not ready: management API at http://127.0.0.1:9 not answering" in out, out


def test_the_pod_tools_import_contract_names_every_other_module_of_scripts():
    """pyproject.toml's contract forbids scripts.pod every other module: a new module is added to it."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    [leaf] = [c for c in contracts if c.get("source_modules") == ["scripts.pod"]]
    others = {f"scripts.{p.stem}" for p in (ROOT / "scripts").glob("*.py")} - {"scripts.pod", "scripts.__init__"}
    assert set(leaf["forbidden_modules"]) == {"models", "handlers", *others}


def test_grpc_connections_age_out_within_the_drain():
    """HPA scale-downs delete pods directly: the preStop drain is all that protects their requests.
    gRPC clients hold their connection, so TorchServe closes (GOAWAY) every connection older than
    drain.grpcConnectionAgeSeconds, and the drain waits for that before it looks at the queue."""
    docs = k8s_tool.template(k8s_tool.KUBE_VERSIONS[-1], "--set", "drain.grpcConnectionAgeSeconds=7")
    [cm] = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-lstm-config")]
    props = cm["data"]["config.properties"]
    assert "grpc_inference_max_connection_age_ms=7000\n" in props
    assert "grpc_inference_max_connection_age_grace_ms=60000\n" in props  # in-flight calls: the drain's bound
    [dep] = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-lstm")]
    spec = dep["spec"]["template"]["spec"]
    command = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[command.index("--settle") + 1] == "13"  # settleSeconds 5 + age 7 + 1 s of jitter
    assert spec["terminationGracePeriodSeconds"] == 60 + 13 + 20


def test_zone_spread_is_off_by_default_soft_or_hard_on_request_and_counts_one_revision():
    """A zone constraint needs the zone label on every node: the scheduler leaves a node without it
    out of all spreading (seen on the e2e's two nodes: both replicas on one), and a hard one strands
    every pod. No zone constraint is the default; the node spread is always there."""

    def constraints(*sets: str) -> list[dict]:
        docs = k8s_tool.template(k8s_tool.KUBE_VERSIONS[-1], *[a for v in sets for a in ("--set", v)])
        return by_group(docs, "Deployment")["cnn"]["spec"]["template"]["spec"]["topologySpreadConstraints"]

    [node] = constraints()
    assert node["topologyKey"] == "kubernetes.io/hostname"
    assert node["whenUnsatisfiable"] == "ScheduleAnyway"
    for when in ("ScheduleAnyway", "DoNotSchedule"):
        by_key = {c["topologyKey"]: c for c in constraints(f"topologySpread.zone.whenUnsatisfiable={when}")}
        assert by_key["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == when
        for c in by_key.values():
            assert c["matchLabelKeys"] == ["pod-template-hash"]  # a rollout's new pods spread among themselves
            assert c["labelSelector"]["matchLabels"]["torchserve-models/group"] == "cnn"


def test_pods_leave_a_failed_node_after_the_chart_s_toleration_not_kubernetes_s_300_s():
    def tolerations(*sets: str) -> dict[str, list[dict]]:
        docs = k8s_tool.template(k8s_tool.KUBE_VERSIONS[-1], *[a for v in sets for a in ("--set", v)])
        return {
            g: d["spec"]["template"]["spec"].get("tolerations", []) for g, d in by_group(docs, "Deployment").items()
        }

    failure = {"node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready"}
    for group, items in tolerations().items():  # a GPU group: the GPU taint tolerated too
        by_key = {t["key"]: t for t in items}
        assert set(by_key) == failure | {"nvidia.com/gpu"}, group
        for key in failure:
            assert by_key[key] == {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}
    for items in tolerations("gpu.count=0", "nodeFailureTolerationSeconds=120").values():
        assert {t["key"]: t["tolerationSeconds"] for t in items} == dict.fromkeys(failure, 120)
    # null: Kubernetes's DefaultTolerationSeconds admission adds its own 300 s.
    assert all(items == [] for items in tolerations("gpu.count=0", "nodeFailureTolerationSeconds=null").values())


def test_the_rollout_surge_and_the_pdb_take_counts_or_percentages():
    docs = k8s_tool.template(
        k8s_tool.KUBE_VERSIONS[-1],
        *("--set", "rollingUpdate.maxSurge=10%", "--set", "podDisruptionBudget.maxUnavailable=10%"),
        *("--set", "groups.lstm.podDisruptionBudget.maxUnavailable=2"),
    )
    deps, pdbs = by_group(docs, "Deployment"), by_group(docs, "PodDisruptionBudget")
    assert deps["cnn"]["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": "10%", "maxUnavailable": 0}
    assert pdbs["cnn"]["spec"]["maxUnavailable"] == "10%" and pdbs["lstm"]["spec"]["maxUnavailable"] == 2
    defaults = by_group(k8s_tool.template(k8s_tool.KUBE_VERSIONS[-1]), "Deployment")
    assert defaults["cnn"]["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert "both 0" in render_error("rollingUpdate.maxSurge=0")


@pytest.mark.parametrize(
    "release", ["ts", "torchserve-models", "team-a-torchserve-models-v2", "x" * 53]
)  # 53: helm's longest
def test_the_e2e_harness_names_objects_as_the_chart_does(release):
    """tests/e2e/harness/release.py mirrors the chart's fullname: the names and selectors the e2e
    looks objects up by are the ones helm renders, for any release name."""
    from tests.e2e.harness.release import Release

    out = k8s_tool.run(
        [k8s_tool.tool("helm"), "template", release, str(k8s_tool.CHART), "--skip-tests"], f"helm template {release}"
    )
    docs = [d for d in yaml.safe_load_all(out) if d]
    names = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    r = Release(release)
    assert len(names) == 3 and set(names) == {r.group(g) for g in ("cnn", "lstm", "transformer")}
    assert all(len(d["metadata"]["name"]) <= 63 for d in docs if d["kind"] != "Secret")
    for group in ("cnn", "lstm", "transformer"):
        labels = names[r.group(group)]["spec"]["template"]["metadata"]["labels"]
        assert dict(kv.split("=") for kv in r.group_selector(group).split(",")).items() <= labels.items()
