"""Knative Serving's core install for the e2e cluster, from the YAML of its module (build-go.sh copies it).

    python k8s/cluster/knative.py CONFIG_DIR VERSION OUT_DIR --dns IP --registry HOST:PORT

Writes OUT_DIR/crds.yaml (serving's and networking's CRDs) and OUT_DIR/install.yaml (the rest), the
upstream files with only these changes:

- every ``ko://knative.dev/serving/cmd/NAME`` image is ``localhost/knative-NAME:VERSION``, the images
  build-go.sh made and the cluster imported;
- config-deployment skips tag resolution for those images and the cluster's registry, which the
  controller could otherwise not reach without the cluster's CA;
- config-features is merged with k8s/knative-features.yaml, what the chart's serverless groups need;
- the four components ask for 25m of CPU each instead of up to 300m: a one-node, two-core cluster
  that must also hold the tests' model pods (their limits stay upstream's);
- their pods resolve names with the cluster's DNS (IP, CoreDNS), where the autoscaler probes each
  revision by its cluster-local name before scaling it to zero and the activator dials the
  autoscaler; the other e2e pods keep the node's resolver;
- the components' HPAs and PodDisruptionBudgets are left out: one replica each on this node, and a
  budget of 80% of one activator would refuse the node drain the e2e tests.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
FEATURES = ROOT / "k8s" / "knative-features.yaml"
LEFT_OUT = {"activator-hpa.yaml", "webhook-hpa.yaml"}
COMPONENTS = {"activator", "autoscaler", "controller", "webhook"}
CPU_REQUEST = "25m"
NAMESPACE = "knative-serving"


def documents(config: Path) -> list[dict]:
    docs = []
    for path in sorted(config.rglob("*.yaml")):
        if path.name in LEFT_OUT:
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def images(doc: dict, version: str) -> dict:
    text = yaml.safe_dump(doc, sort_keys=False)
    text = re.sub(r"ko://knative\.dev/serving/cmd/([a-z-]+)", rf"localhost/knative-\1:{version}", text)
    return yaml.safe_load(text)


def patch(doc: dict, dns: str, registry: str) -> dict:
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
    if kind == "ConfigMap" and name == "config-deployment":
        skip = ["kind.local", "ko.local", "dev.local", "localhost", registry]
        doc.setdefault("data", {})["registries-skipping-tag-resolving"] = ",".join(skip)
    elif kind == "ConfigMap" and name == "config-features":
        doc.setdefault("data", {}).update(yaml.safe_load(FEATURES.read_text())["data"])
    elif kind == "Deployment" and name in COMPONENTS:
        spec = doc["spec"]["template"]["spec"]
        for container in spec["containers"]:
            container.setdefault("resources", {}).setdefault("requests", {})["cpu"] = CPU_REQUEST
        spec["dnsPolicy"] = "None"
        spec["dnsConfig"] = {
            "nameservers": [dns],
            "searches": [f"{NAMESPACE}.svc.cluster.local", "svc.cluster.local", "cluster.local"],
            "options": [{"name": "ndots", "value": "5"}],
        }
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path, help="the folder build-go.sh filled: core/, networking/ and caching/")
    p.add_argument("version", help="the images' tag: Knative Serving's version")
    p.add_argument("out", type=Path)
    p.add_argument("--dns", required=True, help="the cluster DNS Service's IP")
    p.add_argument("--registry", required=True, help="the cluster's registry, host:port")
    args = p.parse_args(argv)
    crds, rest = [], []
    for doc in documents(args.config):
        doc = patch(images(doc, args.version), args.dns, args.registry)
        (crds if doc.get("kind") == "CustomResourceDefinition" else rest).append(doc)
    missing = COMPONENTS - {d["metadata"]["name"] for d in rest if d.get("kind") == "Deployment"}
    if missing or not crds:
        raise SystemExit(f"knative.py: {args.config} lacks the Deployments {sorted(missing)} or the CRDs")
    left = [d for d in rest if "ko://" in yaml.safe_dump(d)]
    if left:
        raise SystemExit(f"knative.py: ko:// images left in {[d['metadata']['name'] for d in left]}")
    args.out.mkdir(parents=True, exist_ok=True)
    # The namespace first, so that everything in it can be created in one apply.
    rest.sort(key=lambda d: d.get("kind") != "Namespace")
    (args.out / "crds.yaml").write_text(yaml.safe_dump_all(crds, sort_keys=False))
    (args.out / "install.yaml").write_text(yaml.safe_dump_all(rest, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
