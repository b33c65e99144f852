#!/usr/bin/env bash
# The chart's end-to-end test on a real single-node Kubernetes (`make e2e-k8s`).
#
#   k8s/cluster/e2e.sh [pytest arguments]
#
# 1. preflight: root, cgroup v1, overlayfs, network namespaces; else it says why and skips (exit 0).
# 2. builds, cached outside the repo under E2E_CACHE (default /var/cache/torchserve-e2e), each keyed
#    on the script that makes it: the Kubernetes binaries (from Debian's source package), the
#    Debian base and pause images. Nothing is rebuilt when its key is unchanged.
# 3. the serving image from k8s/Dockerfile with buildah, offline from a wheelhouse, as a tar.
# 4. the cluster up in its own network namespace, the image imported, then tests/e2e under pytest
#    inside that namespace (helm install, predictions, rollout, drain, restart, helm test, deploy,
#    uninstall). On a failure pytest prints the step's events, kubelet lines and pod logs.
# 5. the cluster down, whatever happened: every process stopped by PID, the host restored.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=k8s/cluster
PY=${PY:-.venv/bin/python}
CACHE=${E2E_CACHE:-/var/cache/torchserve-e2e}
IMAGE=${E2E_IMAGE:-localhost/torchserve-models:e2e}
t0=$SECONDS
step() { printf '\n== e2e [%3ds] %s\n' $((SECONDS - t0)) "$*"; }
key() { sha256sum "$@" | sha256sum | cut -c1-16; }

# Debian packages the cluster and the builds need; installed once, on a machine that has apt and root.
PACKAGES=(golang-go make dpkg-dev containerd runc containernetworking-plugins etcd-server iptables conntrack
          buildah debootstrap busybox-static openssl)
missing=()
for p in "${PACKAGES[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if ((${#missing[@]})) && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  step "installing ${missing[*]} (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! reason=$(bash "$here/cluster.sh" preflight); then
  echo "e2e-k8s: SKIPPED: $reason"
  exit 0
fi

step "Kubernetes binaries (cached)"
export K8S_BIN="$CACHE/kubernetes-$(key "$here/build-kubernetes.sh")"
bash "$here/build-kubernetes.sh" "$K8S_BIN"

step "base and pause images (cached)"
images="$CACHE/images-$(key "$here/base-image.sh")"
bash "$here/base-image.sh" "$images"
export PAUSE_TAR="$images/pause.tar"

step "archives (make archive)"
# The cluster tests need a translator that loads and answers, not one that translates: one short
# epoch instead of the quick preset's six (about 2 min on 2 cores). Other checkpoints are quick already.
if [[ ! -f checkpoints/transformer/checkpoint.pt ]]; then
  make --no-print-directory train MODEL=transformer ARGS="--quick --epochs 1 --limit 4000 --no-progress"
fi
make --no-print-directory archive

export KUBECTL=$PWD/.venv/k8s/bin/kubectl HELM=$PWD/.venv/k8s/bin/helm
export STATE=${E2E_STATE:-/var/lib/torchserve-e2e} NETNS=${E2E_NETNS:-tsk8s-e2e}
tmp=$(mktemp -d /var/tmp/e2e-image.XXXXXX)
cluster_started=0
cleanup() {
  local rc=$?
  if ((cluster_started)); then
    step "cluster down"
    bash "$here/cluster.sh" down || true
  fi
  rm -rf "$tmp"
  step "done (exit $rc)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "serving image $IMAGE (buildah, offline wheelhouse; layers cached)"
image_tar=$tmp/image.tar
bash k8s/build-image.sh --engine buildah --image "$IMAGE" --base "$images/base.tar" --offline --output "$image_tar"
# The previous run's image lost its tag to this one: drop it (and any other untagged image), so
# runs do not pile up images; the layers this build reuses stay.
STORAGE_DRIVER=vfs buildah rmi --prune >/dev/null 2>&1 || true

step "cluster up"
cluster_started=1
if ! bash "$here/cluster.sh" up; then
  LOG_LINES=40 bash "$here/cluster.sh" logs
  exit 1
fi
step "image import"
bash "$here/cluster.sh" import "$image_tar"

step "tests/e2e (pytest inside the cluster's network namespace)"
export KUBECONFIG=$STATE/admin.kubeconfig E2E_IMAGE=$IMAGE E2E_CLUSTER_SCRIPT=$PWD/$here/cluster.sh
nsenter --net="/run/netns/$NETNS" -- "$PY" -m pytest tests/e2e -p no:cacheprovider -rP "$@"
