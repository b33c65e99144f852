"""Deploy the rendered manifests to the cluster KUBECONFIG names, and prove they serve.

  python -m scripts.deploy apply              # server-side apply, wait, smoke-predict, report
  python -m scripts.deploy apply --namespace team-a --timeout 1200
  python -m scripts.deploy apply --values my-values.yaml --set gpu.count=0   # render the chart for this cluster
  python -m scripts.deploy delete             # remove what `apply` created (keeps the namespace)
  python -m scripts.deploy rollout --rollout ts-torchserve-models-cnn   # follow an Argo Rollout to its verdict

`apply` checks the cluster answers and (when the pods ask for GPUs, MIG slices included) that some
node advertises them, applies every object of k8s/manifests server-side, waits for every group's
rollout and for its pods to be Ready (every model READY, per the chart's readiness probe), then
sends each group's own models one prediction through a port-forward to one of its pods and prints
it. Image pull failures, failed model fetches, crash loops and pods that never turn Ready stop it
with their events and log tail.

A group with rollout.enabled runs its pods through an Argo Rollouts Rollout: `apply` (and `rollout`)
follow it step by step, one line per change (the step, Ready pods per version, each analysis with
its figures and the quality gate's scores), and exit 1 when the new version is aborted.
"""

from __future__ import annotations

import argparse
import collections
import copy
import http.client
import json
import sys
import time
from pathlib import Path

import yaml

from .common import ROOT, CLIError, run_cli

MANIFESTS = ROOT / "k8s" / "manifests"
FIELD_MANAGER = "torchserve-models-deploy"
PULL_FAILURES = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
CRASH = {"CrashLoopBackOff", "CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


# ----------------------------------------------------------------------------- pure logic


def load_manifests(folder: Path = MANIFESTS, namespace: str | None = None) -> list[dict]:
    """The objects of every listed file in the kustomization, moved to ``namespace`` if given."""
    kust = folder / "kustomization.yaml"
    if not kust.is_file():
        raise CLIError(f"{kust} not found; run `make manifests`")
    docs = []
    for name in yaml.safe_load(kust.read_text())["resources"]:
        docs += [d for d in yaml.safe_load_all((folder / name).read_text()) if d]
    return in_namespace(docs, namespace)


def in_namespace(docs: list[dict], namespace: str | None) -> list[dict]:
    """The objects, moved to ``namespace`` if given, the Namespace first."""
    if namespace:
        docs = [copy.deepcopy(d) for d in docs]
        for d in docs:
            if d["kind"] == "Namespace":
                d["metadata"]["name"] = namespace
            elif "namespace" in d["metadata"]:
                d["metadata"]["namespace"] = namespace
    # Namespace first, then the rest in file order (ServiceAccount/ConfigMap before the Deployment).
    return sorted(docs, key=lambda d: d["kind"] != "Namespace")


MODELS_ANNOTATION = "torchserve-models/models"  # the chart's list of the models a Deployment serves


def deployments_of(docs: list[dict]) -> list[dict]:
    """The serving Deployments, one per group (and canary); each names its models."""
    found = [d for d in docs if d["kind"] == "Deployment"]
    if not found:
        raise CLIError("no Deployment in the manifests")
    for d in found:
        if not d["metadata"].get("annotations", {}).get(MODELS_ANNOTATION):
            raise CLIError(
                f"Deployment {d['metadata']['name']} has no {MODELS_ANNOTATION} annotation (render the chart)"
            )
    return found


def served_models(deployment: dict) -> list[str]:
    return deployment["metadata"]["annotations"][MODELS_ANNOTATION].split(",")


def gpu_requests(deployment: dict) -> dict[str, int]:
    """The GPU resources (nvidia.com/gpu, or MIG slices such as nvidia.com/mig-1g.10gb) each pod asks for."""
    out: dict[str, int] = {}
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        for resource, count in c.get("resources", {}).get("limits", {}).items():
            if resource.startswith("nvidia.com/"):
                out[resource] = out.get(resource, 0) + int(count)
    return out


def gpu_capacity(nodes, resource: str = "nvidia.com/gpu") -> dict[str, int]:
    """Schedulable nodes advertising the GPU resource -> their allocatable count."""
    out = {}
    for n in nodes:
        alloc = (n.status.allocatable or {}).get(resource)
        if alloc and int(alloc) > 0 and not n.spec.unschedulable:
            out[n.metadata.name] = int(alloc)
    return out


def pod_problem(pod) -> str | None:
    """A reason this pod will not become Ready by waiting longer, or None."""
    statuses = [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]
    for cs in statuses:
        waiting = cs.state.waiting if cs.state else None
        if waiting and waiting.reason in PULL_FAILURES:
            return f"pod {pod.metadata.name}: cannot pull image {cs.image} ({waiting.reason}: {waiting.message or ''})".strip()
        if waiting and waiting.reason in CRASH:
            return f"pod {pod.metadata.name}: container {cs.name} is in {waiting.reason}"
        terminated = cs.state.terminated if cs.state else None
        if terminated and terminated.exit_code and cs.name == "fetch-models":
            return f"pod {pod.metadata.name}: model fetch failed (exit {terminated.exit_code}): the archives did not verify"
    return None


def unschedulable_reason(pod) -> str | None:
    """The scheduler's word on why this pod fits no node, or None (scheduled, not yet tried, or a claim binding)."""
    for cond in pod.status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
            if "unbound" in (cond.message or "") and "PersistentVolumeClaim" in (cond.message or ""):
                return None  # a claim still binding: the scheduler retries once it is bound
            return cond.message or "no reason given"
    return None


def unschedulable_summary(name: str, want: int, pods) -> str | None:
    """One line saying how many of a Deployment's pods fit no node, and the scheduler's most common reason.

    None while none is unschedulable, and while some pod has not been tried yet (or not created): on a
    large group the scheduler reaches the last pods seconds after the first, and the count should be
    the final one. A pod being deleted does not count."""
    live = [p for p in pods if not p.metadata.deletion_timestamp]
    why = {p.metadata.name: r for p in live if (r := unschedulable_reason(p))}
    if not why or len(live) < want or any(not p.spec.node_name and p.metadata.name not in why for p in live):
        return None
    reasons = collections.Counter(why.values()).most_common()
    n = len(reasons) - 1
    others = f" (and {n} other reason{'s' if n > 1 else ''})" if n else ""
    return f"{len(why)} of {want} pods of {name} unschedulable: {reasons[0][0]}{others}"


def rollout_done(dep) -> bool:
    s, want = dep.status, dep.spec.replicas or 0
    return (
        (s.observed_generation or 0) >= dep.metadata.generation
        and (s.updated_replicas or 0) == want
        and (s.ready_replicas or 0) == want
        and (s.available_replicas or 0) == want
        and not s.unavailable_replicas
    )


def http_over_socket(sock, method: str, path: str, body: bytes, content_type: str, timeout: float) -> tuple[int, bytes]:
    """One HTTP/1.1 exchange on a connected socket (the port-forward stream).

    http.client reads exactly the answer's length (Content-Length or chunks): the port-forward
    stream does not report the far end closing, so reading until EOF would wait for the timeout."""
    sock.settimeout(timeout)
    conn = http.client.HTTPConnection("localhost", timeout=timeout)
    conn.sock = sock
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise CLIError(f"port-forward: no HTTP answer to {method} {path} ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- cluster calls


def render_chart(values: list[Path], sets: list[str], version: str, api_versions: list[str]) -> list[dict]:
    """The chart rendered with the user's values for this cluster (its version and APIs)."""
    from . import k8s

    extra = [a for v in values for a in ("-f", str(v))] + [a for kv in sets for a in ("--set", kv)]
    return k8s.with_namespace(k8s.template(version, *extra, api_versions=api_versions))


def api_versions(api) -> tuple[str, list[str]]:
    """The cluster's full version (for helm's --kube-version) and every group/version it serves."""
    from kubernetes import client

    version = client.VersionApi(api).get_code(_request_timeout=10).git_version.lstrip("v").split("+")[0].split("-")[0]
    groups = ["v1"] + [
        v.group_version for g in client.ApisApi(api).get_api_versions(_request_timeout=10).groups for v in g.versions
    ]
    return version, groups


def connect():
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_kube_config()
    except (ConfigException, FileNotFoundError, TypeError):
        try:
            config.load_incluster_config()
        except ConfigException:
            raise CLIError("no cluster: no usable KUBECONFIG (or ~/.kube/config) and not running in a pod") from None
    api = client.ApiClient()
    try:
        version = client.VersionApi(api).get_code(_request_timeout=10)
    except Exception as e:  # urllib3 MaxRetryError, ApiException, ...
        raise CLIError(
            f"no cluster: the API server at {api.configuration.host} does not answer ({type(e).__name__})"
        ) from None
    return api, f"{version.major}.{version.minor}"


def apply(api, docs: list[dict]) -> None:
    from kubernetes.dynamic import DynamicClient
    from kubernetes.dynamic.exceptions import DynamicApiError

    dyn = DynamicClient(api)
    for doc in docs:
        res = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        try:
            res.server_side_apply(
                body=doc,
                name=doc["metadata"]["name"],
                namespace=doc["metadata"].get("namespace"),
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            )
        except DynamicApiError as e:
            raise CLIError(f"apply {doc['kind']}/{doc['metadata']['name']}: {e.summary()}") from None
        print(f"applied {doc['kind']}/{doc['metadata']['name']}")


def pod_log_tail(core, pod, lines: int = 30) -> str:
    out = []
    for c in [*(pod.spec.init_containers or []), *pod.spec.containers]:
        try:
            out.append(
                f"--- {c.name}\n"
                + core.read_namespaced_pod_log(
                    pod.metadata.name, pod.metadata.namespace, container=c.name, tail_lines=lines
                )
            )
        except Exception:  # a container that never started has no log
            continue
    return "\n".join(out)


def fetch_error(core, pod) -> str | None:
    """The init container's own one-line reason when it failed (which archive, and why)."""
    for cs in pod.status.init_container_statuses or []:
        if cs.name != "fetch-models":
            continue
        failed_now = cs.state and cs.state.terminated and cs.state.terminated.exit_code
        failed_before = cs.last_state and cs.last_state.terminated and cs.last_state.terminated.exit_code
        if not (failed_now or failed_before):
            return None
        try:
            log = core.read_namespaced_pod_log(
                pod.metadata.name, pod.metadata.namespace, container=cs.name, tail_lines=5, previous=not failed_now
            )
        except Exception:  # the log may already be gone
            return None
        errors = [line for line in log.splitlines() if "error:" in line]
        return errors[-1].strip() if errors else None
    return None


def pod_events(core, pod) -> str:
    events = core.list_namespaced_event(
        pod.metadata.namespace, field_selector=f"involvedObject.name={pod.metadata.name}"
    ).items
    return "\n".join(f"{e.type} {e.reason}: {e.message}" for e in events[-10:])


def wait_for_rollout(api, dep_doc: dict, timeout: float):
    from kubernetes import client

    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    name, ns = dep_doc["metadata"]["name"], dep_doc["metadata"]["namespace"]
    selector = ",".join(f"{k}={v}" for k, v in dep_doc["spec"]["selector"]["matchLabels"].items())
    deadline = time.monotonic() + timeout
    while True:
        dep = apps.read_namespaced_deployment(name, ns)
        pods = core.list_namespaced_pod(ns, label_selector=selector).items
        if rollout_done(dep):
            return [p for p in pods if p.status.phase == "Running"]
        unschedulable = unschedulable_summary(f"{ns}/{name}", dep.spec.replicas or 0, pods)
        if unschedulable:
            raise CLIError(unschedulable)
        for pod in pods:
            problem = pod_problem(pod)
            if problem:
                why = fetch_error(core, pod)
                first = f"{problem}: {why}" if why else problem
                raise CLIError(f"{first}\nevents:\n{pod_events(core, pod)}\nlogs:\n{pod_log_tail(core, pod)}")
        if time.monotonic() > deadline:
            late = [p for p in pods if p.status.phase != "Running"][:5] or pods[:5]  # a few, on a group of hundreds
            details = "\n".join(f"{p.metadata.name}: {pod_events(core, p)}\n{pod_log_tail(core, p)}" for p in late)
            raise CLIError(
                f"deployment {ns}/{name} not Ready after {timeout:.0f}s "
                f"({dep.status.ready_replicas or 0}/{dep.spec.replicas} ready):\n{details}"
            )
        time.sleep(5)


# ----------------------------------------------------------------------------- Argo Rollouts

ROLLOUTS = ("argoproj.io", "v1alpha1")
HASH_LABEL = "rollouts-pod-template-hash"


def rollout_of(docs: list[dict], deployment: dict) -> dict | None:
    """The Rollout that runs this Deployment's pods (its workloadRef), if the manifests have one."""
    name = deployment["metadata"]["name"]
    for d in docs:
        if d["kind"] == "Rollout" and d["spec"].get("workloadRef", {}).get("name") == name:
            return d
    return None


def describe_step(steps: list[dict], index: int | None) -> str:
    """``step 2/5 analysis x-health``: the step a Rollout is at (index past the end: all steps done)."""
    if index is None or index >= len(steps):
        return f"step {len(steps)}/{len(steps)} done"
    step = steps[index]
    if "setWeight" in step:
        what = f"setWeight {step['setWeight']}"
    elif "analysis" in step:
        what = "analysis " + ",".join(t["templateName"] for t in step["analysis"].get("templates", []))
    elif "pause" in step:
        what = "pause"
    else:
        what = next(iter(step), "?")
    return f"step {index + 1}/{len(steps)} {what}"


def measurement_summary(run: dict) -> str:
    """An AnalysisRun's metrics in one line: ``error-rate 0 Successful, latency 9.8 Successful``."""
    parts = []
    for m in run.get("status", {}).get("metricResults", []):
        last = (m.get("measurements") or [{}])[-1]
        value = last.get("value", "")
        value = value.strip("[]") if isinstance(value, str) else value
        try:
            value = f"{float(value):.4g}"
        except (TypeError, ValueError):
            pass
        parts.append(" ".join(str(x) for x in (m["name"], value, m.get("phase", "")) if x not in ("", None)))
    return ", ".join(parts)


def ready_by_hash(pods) -> collections.Counter:
    """Ready pods per pod-template hash (Argo Rollouts' label), from the API's pod objects."""
    ready: collections.Counter = collections.Counter()
    for p in pods:
        if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []):
            ready[(p.metadata.labels or {}).get(HASH_LABEL, "")] += 1
    return ready


def rollout_state(ro: dict, ready: collections.Counter) -> tuple[str, str]:
    """(key, line): where a Rollout stands, the key changing when a line is worth printing."""
    st, steps = ro.get("status", {}), ro["spec"].get("strategy", {}).get("canary", {}).get("steps", [])
    stable, current = st.get("stableRS", ""), st.get("currentPodHash", "")
    run = st.get("canary", {}).get("currentStepAnalysisRunStatus") or {}
    pods_line = f"stable {stable or '-'} {ready.get(stable, 0)} Ready"
    if current and current != stable:
        pods_line = f"canary {current} {ready.get(current, 0)} Ready, " + pods_line
    analysis = f", analysis {run['name']} {run.get('status', '')}" if run else ""
    phase = st.get("phase", "?") + (" aborted" if st.get("abort") else "")
    line = f"{describe_step(steps, st.get('currentStepIndex'))}: {pods_line}{analysis} ({phase})"
    key = (
        f"{st.get('currentStepIndex')}|{phase}|{current}|{run.get('name')}|{run.get('status')}|{sorted(ready.items())}"
    )
    return key, line


def verdict(ro: dict, workload_generation: int | None) -> bool | None:
    """True: the newest template is promoted (or nothing is new); False: it was aborted and the stable
    version is back; None: not yet. Only once the controller has seen the newest template (of the
    Deployment the Rollout refers to), so a previous abort is not taken for this one's."""
    st = ro.get("status", {})
    if workload_generation is not None:
        seen = str(st.get("workloadObservedGeneration", "")) == str(workload_generation)
    else:
        seen = st.get("observedGeneration") == str(ro["metadata"].get("generation"))
    if not seen:
        return None
    if st.get("abort") and st.get("phase") == "Degraded":
        return False
    if st.get("phase") == "Healthy" and st.get("stableRS") and st.get("stableRS") == st.get("currentPodHash"):
        return True
    return None


def watch_rollout(api, namespace: str, name: str, timeout: float, out=print) -> bool:
    """Follow a Rollout to its verdict, one line per change (step, Ready pods per version, each
    analysis with its figures and the quality gate's scores): True once the newest version is
    promoted (or nothing is new), False once it is aborted and the stable version is back."""
    from kubernetes import client

    custom, core, apps = client.CustomObjectsApi(api), client.CoreV1Api(api), client.AppsV1Api(api)
    t0 = time.monotonic()
    seen, printed = "", set(finished_runs(custom, namespace, name))

    def say(line: str) -> None:
        out(f"rollout {name} [{time.monotonic() - t0:4.0f}s] {line}", flush=True)

    while True:
        ro = custom.get_namespaced_custom_object(*ROLLOUTS, namespace, "rollouts", name)
        selector = ",".join(f"{k}={v}" for k, v in ro["spec"]["selector"]["matchLabels"].items())
        key, line = rollout_state(ro, ready_by_hash(core.list_namespaced_pod(namespace, label_selector=selector).items))
        if key != seen:
            say(line)
            seen = key
        for run_name, run in sorted(finished_runs(custom, namespace, name).items()):
            if run_name not in printed:
                printed.add(run_name)
                phase = run["status"]["phase"]
                say(f"analysis {run_name}: {phase}: {measurement_summary(run)}{gate_lines(core, namespace, run)}")
        ref = ro["spec"].get("workloadRef", {}).get("name")
        generation = apps.read_namespaced_deployment(ref, namespace).metadata.generation if ref else None
        done = verdict(ro, generation)
        st = ro.get("status", {})
        if done is False:
            say(f"ABORTED: {st.get('message', '')}; the stable version {st.get('stableRS')} serves")
            return False
        if done:
            say(f"promoted: {st.get('stableRS')} is stable, {st.get('readyReplicas', 0)} pods Ready")
            return True
        if time.monotonic() - t0 > timeout:
            raise CLIError(f"rollout {namespace}/{name}: no verdict in {timeout:.0f}s ({line})")
        time.sleep(2)


def finished_runs(custom, namespace: str, rollout: str) -> dict[str, dict]:
    """The Rollout's finished AnalysisRuns, by name."""
    runs = custom.list_namespaced_custom_object(*ROLLOUTS, namespace, "analysisruns")["items"]
    return {
        r["metadata"]["name"]: r
        for r in runs
        if any(
            o.get("kind") == "Rollout" and o.get("name") == rollout for o in r["metadata"].get("ownerReferences", [])
        )
        and r.get("status", {}).get("phase") in ("Successful", "Failed", "Error", "Inconclusive")
    }


def gate_lines(core, namespace: str, run: dict) -> str:
    """The quality gate's verdict lines from the logs of the run's Jobs, if it ran any."""
    lines = []
    for m in run.get("status", {}).get("metricResults", []):
        for meas in m.get("measurements") or []:
            job = (meas.get("metadata") or {}).get("job-name")
            if not job:
                continue
            for pod in core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items:
                try:
                    log = core.read_namespaced_pod_log(pod.metadata.name, namespace, tail_lines=20)
                except Exception:  # the pod is gone: its verdict is the metric's phase
                    continue
                lines += [line for line in log.splitlines() if line.startswith("gate:")]
    return "".join(f"\n    {line}" for line in lines)


def smoke(api, pod, model: str, payload, port: int = 8080, timeout: float = 30) -> tuple[int, bytes]:
    from kubernetes import client
    from kubernetes.stream import portforward

    from .client import encode_payload

    core = client.CoreV1Api(api)
    pf = portforward(
        core.connect_get_namespaced_pod_portforward, pod.metadata.name, pod.metadata.namespace, ports=str(port)
    )
    sock = pf.socket(port)
    body, content_type = encode_payload(payload)
    try:
        return http_over_socket(sock, "POST", f"/predictions/{model}", body, content_type, timeout)
    finally:
        sock.close()


def smoke_inputs(models: list[str], text: str) -> dict[str, object]:
    """A representative request per model: the registry's demo input; ``text`` for an unregistered model."""
    from . import registry
    from .registry import sample_inputs

    samples = sample_inputs([m for m in models if m in registry.REGISTRY])
    return {m: samples[m][1] if m in samples else text for m in models}


def delete(api, docs: list[dict]) -> None:
    from kubernetes.dynamic import DynamicClient
    from kubernetes.dynamic.exceptions import NotFoundError

    dyn = DynamicClient(api)
    for doc in reversed(docs):
        if doc["kind"] == "Namespace":
            continue  # may hold other things; remove it yourself
        res = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        try:
            res.delete(name=doc["metadata"]["name"], namespace=doc["metadata"].get("namespace"))
            print(f"deleted {doc['kind']}/{doc['metadata']['name']}")
        except NotFoundError:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "command",
        choices=["apply", "delete", "rollout"],
        help="what to do; rollout: follow each Rollout of the manifests (or --rollout NAME) to its verdict",
    )
    p.add_argument(
        "--rollout", default=None, help="rollout: the Rollout to follow (default: every one of the manifests)"
    )
    p.add_argument("--manifests", type=Path, default=MANIFESTS, help="rendered manifests (default: k8s/manifests)")
    p.add_argument(
        "--values",
        "-f",
        type=Path,
        action="append",
        default=[],
        help="render the chart with this values file for the cluster instead of using --manifests (repeatable)",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a value for the chart, as helm's --set (repeatable; implies rendering the chart)",
    )
    p.add_argument("--namespace", default=None, help="deploy into this namespace (default: the manifests', ml-serving)")
    p.add_argument("--timeout", type=float, default=900, help="seconds for the rollout (default: %(default)s)")
    p.add_argument(
        "--smoke-text",
        default="A gripping, beautifully acted film.",
        help="the smoke input of a model the registry does not know (the others send their demo input)",
    )
    args = p.parse_args(argv)
    api, version = connect()
    print(f"cluster: Kubernetes {version}")
    if args.command == "rollout" and args.rollout:
        namespace = args.namespace or "ml-serving"
        return 0 if watch_rollout(api, namespace, args.rollout, args.timeout) else 1
    if args.values or args.sets:
        full_version, apis = api_versions(api)
        docs = in_namespace(render_chart(args.values, args.sets, full_version, apis), args.namespace)
    else:
        docs = load_manifests(args.manifests, args.namespace)
    if args.command == "delete":
        delete(api, docs)
        return 0
    if args.command == "rollout":
        rollouts = [d for d in docs if d["kind"] == "Rollout"]
        if not rollouts:
            raise CLIError("no Rollout in the manifests (set rollout.enabled)")
        verdicts = [
            watch_rollout(api, r["metadata"]["namespace"], r["metadata"]["name"], args.timeout) for r in rollouts
        ]
        return 0 if all(verdicts) else 1
    from kubernetes import client

    deps = deployments_of(docs)
    wanted = sorted({r for d in deps for r in gpu_requests(d)})
    if wanted:
        nodes = client.CoreV1Api(api).list_node().items
        for resource in wanted:
            capacity = gpu_capacity(nodes, resource)
            if not capacity:
                raise CLIError(
                    f"no GPU nodes: no schedulable node advertises {resource} "
                    "(install the NVIDIA device plugin, or render with gpu.count=0)"
                )
            listed = ", ".join(f"{n} ({c})" for n, c in list(capacity.items())[:5])
            more = f", and {len(capacity) - 5} more" if len(capacity) > 5 else ""
            print(
                f"{resource}: {sum(capacity.values())} allocatable on {len(capacity)} schedulable nodes: {listed}{more}"
            )
    apply(api, docs)
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    inputs = smoke_inputs(sorted({m for d in deps for m in served_models(d)}), args.smoke_text)
    for dep in deps:
        name = dep["metadata"]["name"]
        ro = rollout_of(docs, dep)
        if ro and not watch_rollout(
            api, ro["metadata"]["namespace"], ro["metadata"]["name"], deadline - time.monotonic()
        ):
            raise CLIError(f"rollout {ro['metadata']['name']} aborted: the stable version still serves")
        pods = wait_for_rollout(api, dep, max(1.0, deadline - time.monotonic()))
        print(f"rollout of {name} done in {time.monotonic() - t0:.0f}s: {len(pods)} pods Ready")
        for model in served_models(dep):
            status, body = smoke(api, pods[0], model, inputs[model])
            if status != 200:
                raise CLIError(f"smoke prediction of {model} on {pods[0].metadata.name}: HTTP {status} {body[:200]!r}")
            print(f"smoke: {model} on {pods[0].metadata.name} -> {json.dumps(json.loads(body))[:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("deploy", main))
