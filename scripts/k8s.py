"""Render the chart into plain manifests and check both, offline.

  python -m scripts.k8s render            # k8s/chart -> k8s/manifests/*.yaml + kustomization.yaml
  python -m scripts.k8s check             # lint, render per Kubernetes version, schema, policy, in sync

`check` runs: helm lint --strict; helm template for every supported Kubernetes version (1.28 to
1.34) with kubernetes-validate --strict on each rendered object; checkov on the chart and the
manifests; and a fresh render compared with the committed k8s/manifests.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from .common import ROOT, CLIError, run_cli

CHART = ROOT / "k8s" / "chart"
MANIFESTS = ROOT / "k8s" / "manifests"
TOOLS = ROOT / ".venv" / "k8s" / "bin"
RELEASE = "torchserve-models"
NAMESPACE = "ml-serving"  # of the plain manifests; `helm install -n` picks its own
KUBE_VERSIONS = ("1.28.0", "1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0")
HEADER = "# Rendered from k8s/chart with its default values by `make manifests`; edit the chart, not this file.\n"


def tool(name: str) -> str:
    path = TOOLS / name
    if not path.exists():
        raise CLIError(f"{path} not found; run `make k8s-tools`")
    return str(path)


def run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CLIError(f"{what} failed:\n{(proc.stdout + proc.stderr).strip()}")
    return proc.stdout


def template(
    kube_version: str = KUBE_VERSIONS[-1], *extra: str, tests: bool = False, api_versions: list[str] | None = None
) -> list[dict]:
    """The chart's objects as ``helm template`` renders them for one Kubernetes version.

    ``api_versions``: the API group/versions a real cluster serves (its discovery), so that
    ``.Capabilities`` (and the chart's kubeVersion floor) see what that cluster has."""
    cmd = [
        tool("helm"),
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        kube_version,
        *extra,
    ]
    for api in api_versions or []:
        cmd += ["--api-versions", api]
    if not tests:
        cmd.append("--skip-tests")
    return [d for d in yaml.safe_load_all(run(cmd, f"helm template (Kubernetes {kube_version})")) if d]


# Pod Security Admission's labels for a namespace that enforces the restricted profile, which every
# pod of the chart meets (and warns about any other pod at admission).
POD_SECURITY_RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/warn": "restricted",
}


def namespace_doc(name: str, labels: dict[str, str] | None = None) -> dict:
    """A Namespace that enforces Pod Security's restricted profile, with ``labels`` besides."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {**POD_SECURITY_RESTRICTED, **(labels or {})}},
    }


def with_namespace(docs: list[dict]) -> list[dict]:
    """The chart's objects preceded by their namespace, restricted by Pod Security Admission."""
    return [namespace_doc(NAMESPACE), *docs]


def render_files(docs: list[dict]) -> dict[str, str]:
    """One file per object, named <kind>-<name>.yaml, plus a kustomization listing them."""
    docs = with_namespace(docs)
    files = {}
    for doc in docs:
        name = f"{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
        files[name] = HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)
    files["kustomization.yaml"] = HEADER + yaml.safe_dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": sorted(files)},
        sort_keys=False,
    )
    return files


def render(out: Path = MANIFESTS) -> list[str]:
    files = render_files(template())
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.yaml"):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        (out / name).write_text(text)
    return sorted(files)


def out_of_sync() -> list[str]:
    files = render_files(template())
    committed = {p.name: p.read_text() for p in MANIFESTS.glob("*.yaml")}
    problems = [f"k8s/manifests/{n}: missing" for n in files if n not in committed]
    problems += [f"k8s/manifests/{n}: not rendered from the chart" for n in committed if n not in files]
    problems += [
        f"k8s/manifests/{n}: differs from the chart" for n in files if n in committed and committed[n] != files[n]
    ]
    return problems


def validate(docs: list[dict], kube_version: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, doc in enumerate(docs):
            if doc.get("apiVersion", "").startswith(("keda.sh/", "monitoring.coreos.com/")):
                continue  # CRDs: kubernetes-validate carries no schema for them
            path = Path(tmp) / f"{i}.yaml"
            path.write_text(yaml.safe_dump(doc))
            paths.append(str(path))
        run(
            [tool("kubernetes-validate"), "--strict", "--quiet", "-k", kube_version, *paths],
            f"kubernetes-validate --strict -k {kube_version}",
        )


def checkov(target: Path, framework: str) -> None:
    env_path = f"{TOOLS}:{Path(sys.executable).parent}"
    cmd = [
        tool("checkov"),
        "--quiet",
        "--compact",
        "--skip-download",
        "--framework",
        framework,
        "-d",
        str(target),
        "--config-file",
        str(ROOT / "k8s" / ".checkov.yaml"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": env_path, "HOME": tempfile.gettempdir()})
    if proc.returncode != 0:
        raise CLIError(f"checkov ({framework}) found problems in {target}:\n{proc.stdout.strip()[-3000:]}")


VARIANTS = {  # value sets every check also covers, beside the defaults
    "cpu-only": ["--set", "gpu.count=0", "--set", "autoscaling.metric=cpu"],
    "url-source-keda": [
        "--set",
        "models.source.type=url",
        "--set",
        "models.source.url=https://models.example.com/v1",
        "--set",
        "autoscaling.keda.enabled=true",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "ingress.enabled=true",
        "--set",
        "metrics.dashboard.enabled=true",
    ],
    "queue-latency": ["--set", "autoscaling.metric=queueLatency"],
    "all-in-one-pod-grpc-ingress": [
        "--set",
        "allInOnePod=true",
        "--set",
        "ingress.enabled=true",
        "--set",
        "ingress.grpc.enabled=true",
        "--set",
        "ingress.grpc.tlsSecret=grpc-tls",
    ],
    "canary-per-group-gpus": [
        "--set",
        "groups.lstm.canary.enabled=true",
        "--set",
        "groups.lstm.canary.image.tag=0.2.0",
        "--set",
        "groups.cnn.gpu.count=0",
        "--set",
        "groups.transformer.gpu.resourceName=nvidia.com/mig-1g.10gb",
        "--set",
        "groups.transformer.autoscaling.maxReplicas=16",
    ],
    "gpu-profile": ["-f", str(CHART / "values-gpu.yaml")],
    "pvc-source-token-auth": [
        "--set",
        "models.source.type=pvc",
        "--set",
        "models.source.pvc.claimName=models",
        "--set",
        "torchserve.tokenAuth=true",
        "--set",
        "autoscaling.enabled=false",
    ],
}


def check() -> list[str]:
    done = []
    run([tool("helm"), "lint", "--strict", str(CHART)], "helm lint --strict")
    for extra in VARIANTS.values():
        run([tool("helm"), "lint", "--strict", str(CHART), *extra], "helm lint --strict " + " ".join(extra))
    done.append("helm lint --strict (defaults and variants)")
    for version in KUBE_VERSIONS:
        validate(template(version, tests=True), version)
        for extra in VARIANTS.values():
            validate(template(version, *extra, tests=True), version)
    done.append(f"kubernetes-validate --strict for {', '.join(KUBE_VERSIONS)} (defaults and variants)")
    checkov(CHART, "helm")
    checkov(MANIFESTS, "kubernetes")
    done.append("checkov on the chart and the manifests")
    problems = out_of_sync()
    if problems:
        raise CLIError("rendered manifests are out of date; run `make manifests`:\n" + "\n".join(problems))
    done.append("k8s/manifests in sync with the chart")
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="k8s", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["render", "check"], help="what to do")
    args = p.parse_args(argv)
    if args.command == "render":
        names = render()
        print(f"rendered {len(names)} files into {MANIFESTS.relative_to(ROOT)}")
    else:
        for line in check():
            print(f"ok: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("k8s", main))
