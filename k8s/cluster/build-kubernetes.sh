#!/usr/bin/env bash
# Build the Kubernetes server binaries (v1.20.2) from Debian bookworm's source package, once.
#
#   k8s/cluster/build-kubernetes.sh OUT_DIR
#
# No newer API server, kind, k3s or minikube is obtainable from the registries these machines reach
# (../shared/docs/K8S.md), but Debian ships the full upstream source with vendor/. The result is
# cached in OUT_DIR (keyed by the caller on this script and the source version): a warm run is a
# no-op. Takes 6.5-13.5 min on 2 cores.
set -euo pipefail

SRC_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
BINS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy"

out=${1:?usage: build-kubernetes.sh OUT_DIR}
if [ -f "$out/.complete" ]; then
  echo "kubernetes binaries: cached in $out"
  exit 0
fi
for tool in go apt-get dpkg-source make; do
  command -v "$tool" >/dev/null || { echo "build-kubernetes: needs $tool (apt-get install golang-go dpkg-dev make)" >&2; exit 2; }
done

work=$(mktemp -d /var/tmp/k8s-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
# A private apt configuration adds deb-src lines without touching the host's sources.
mkdir -p lists/partial
cat > sources.list <<SRC
deb-src http://deb.debian.org/debian bookworm main
SRC
apt=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$work/lists")
apt-get -qq "${apt[@]}" update
# apt checks the .dsc against the signed Sources index, and dpkg-source the tarballs against the .dsc.
apt-get -qq "${apt[@]}" source --download-only "kubernetes=$SRC_VERSION" >"$work/fetch.log" 2>&1 \
  || { cat "$work/fetch.log" >&2; exit 1; }
# (Its "cannot verify inline signature" warning is about the .dsc's own signature, which apt's chain covers.)
dpkg-source -x "kubernetes_${SRC_VERSION}.dsc" src >>"$work/fetch.log" 2>&1 \
  || { cat "$work/fetch.log" >&2; exit 1; }   # also applies Debian's security patches

cd src
export GOPATH="$work/gopath" GOCACHE="$work/gocache" CGO_ENABLED=0 HOME="$work"
# The tarball is a `git archive` of the v1.20.2 tag, so hack/lib/version.sh stamps v1.20.2 itself.
make WHAT="$(printf 'cmd/%s ' $BINS)" >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; exit 1; }

mkdir -p "$out"
for b in $BINS; do install -m 0755 "_output/bin/$b" "$out/$b"; done
"$out/kube-apiserver" --version
touch "$out/.complete"
