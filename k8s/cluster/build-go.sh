#!/usr/bin/env bash
# Build one of the e2e cluster's Go components from the Go module proxy, once.
#
#   k8s/cluster/build-go.sh NAME OUT_DIR
#
# NAME is a part of k8s/cluster/parts.tsv and a folder of k8s/cluster/go/: a small module whose go.mod
# requires the component at an exact version (its `tool` lines name the commands to build, or its
# own main.go is the command) and whose go.sum pins every module's checksum. The table names the
# module whose version the binaries report and the binaries that must come out. The result is
# cached in OUT_DIR, which the caller keys on this script, the part's line of the table and the
# module's go.mod and go.sum: a warm run is a no-op. Go keeps its own content-addressed module and
# build caches (GOMODCACHE, GOCACHE), so a rebuild after a change to one module compiles only what
# changed.
set -euo pipefail

name=${1:?usage: build-go.sh NAME OUT_DIR}
out=${2:?usage: build-go.sh NAME OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
mod=$here/go/$name
IFS=$'\t' read -r _ module binaries _ < <(awk -F'\t' -v p="$name" '$1 == p' "$here/parts.tsv") || true
if [ -z "${module:-}" ] || [ ! -d "$mod" ]; then
  echo "build-go: $name is not a part of parts.tsv with a go/$name module" >&2
  exit 2
fi
if [ -f "$out/.complete" ]; then
  echo "$name: cached in $out"
  exit 0
fi
missing=()
for tool in go sha256sum; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  echo "build-go: missing ${missing[*]} (Go 1.24 or newer from go.dev's toolchain, coreutils)" >&2
  exit 2
fi
# `tool` directives in go.mod need Go 1.24; an older go (Debian bookworm's is 1.19) cannot read them.
minor=$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')
if ! [[ $minor =~ ^[0-9]+$ ]] || ((minor < 24)); then
  echo "build-go: $(command -v go) is $(go env GOVERSION); these modules need Go 1.24 or newer first in PATH" >&2
  exit 2
fi

# A module whose go line asks for a newer Go than this one is built with Go 1.27.3, which the go
# command takes from the module proxy like any module (golang.org/toolchain, once per machine, kept
# in GOMODCACHE). The other parts keep the machine's Go, so their build cache stays valid.
need=$(awk '$1 == "go" {print $2; exit}' "$mod/go.mod")
have=$(go env GOVERSION | sed 's/^go//')
if [ "$(printf '%s\n' "$need" "$have" | sort -V | tail -1)" != "$have" ]; then
  export GOTOOLCHAIN=go1.27.3
fi

# What the version commands report: the versions the go.mod requires.
ldflags="-s -w" tags=""
version_of() { (cd "$mod" && go list -m -f '{{.Version}}' "$1"); }
case $name in
  kubernetes)
    v=$(version_of "$module")
    IFS=. read -r major minor_v _ <<< "${v#v}"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldflags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor_v -X $pkg.gitTreeState=clean"
    done
    ;;
  keda) ldflags+=" -X github.com/kedacore/keda/v2/version.Version=$(version_of "$module")" ;;
  registry) ldflags+=" -X github.com/distribution/distribution/v3/version.version=$(version_of "$module")" ;;
  kube-state-metrics) ldflags+=" -X github.com/prometheus/common/version.Version=$(version_of "$module")" ;;
  kwok) ldflags+=" -X sigs.k8s.io/kwok/pkg/consts.Version=$(version_of "$module" | sed 's/^v//')" ;;
  argo-rollouts)
    ldflags+=" -X github.com/argoproj/argo-rollouts/utils/version.version=$(version_of "$module" | sed 's/^v//')"
    ldflags+=" -X github.com/argoproj/argo-rollouts/utils/version.gitTreeState=clean"
    ;;
  metrics-server) ldflags+=" -X sigs.k8s.io/metrics-server/pkg/version.gitVersion=$(version_of "$module")" ;;
  prometheus)
    # Prometheus's module version v0.X.Y is its release 3.X.Y. Only the kubernetes service discovery
    # is compiled in (its build tags for slim builds), which also spares a few minutes of compiling.
    v=$(version_of "$module")
    v=${v#v0.}
    ldflags+=" -X github.com/prometheus/common/version.Version=3.$((${v%%.*} - 300)).${v#*.}"
    tags=remove_all_sd,enable_kubernetes_sd
    ;;
esac

# The commands to build: the go.mod's `tool` lines, single or in a block, and the module's own
# main package when it has one (a command of only some of a component's packages).
mapfile -t tools < <(awk '/^tool \(/{b=1; next} b && /^\)/{b=0} b{print $1} /^tool [^(]/{print $2}' "$mod/go.mod")
compgen -G "$mod/*.go" >/dev/null && tools+=(.)
tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/build-go.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
# -mod=readonly: the build fails rather than change go.mod or go.sum, so the pins hold.
# CGO off: static binaries that need nothing of the host's C libraries.
(cd "$mod" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$tmp/" "${tools[@]}") \
  >"$tmp/build.log" 2>&1 || { tail -40 "$tmp/build.log" >&2; exit 1; }
mkdir -p "$out"
for b in "$tmp"/*; do
  if [ ! -f "$b" ] || [ ! -x "$b" ]; then continue; fi
  bin=$(basename "$b")
  # etcd's command is its server module itself (go.etcd.io/etcd/server/v3): go names it "server".
  [ "$name" = etcd ] && [ "$bin" = server ] && bin=etcd
  install -m 0755 "$b" "$out/$bin"
done
if [ "$name" = keda ]; then
  # The CRDs of this KEDA version, from its module (config/crd), for `kubectl apply`.
  mkdir -p "$out/crds"
  cp "$(cd "$mod" && go list -m -f '{{.Dir}}' "$module")"/config/crd/bases/*.yaml "$out/crds/"
fi
if [ "$name" = argo-rollouts ]; then
  # The CRDs of this version (Rollout, AnalysisTemplate, AnalysisRun, ...), from its module.
  mkdir -p "$out/crds"
  cp "$(cd "$mod" && go list -m -f '{{.Dir}}' "$module")"/manifests/crds/*-crd.yaml "$out/crds/"
  chmod u+w "$out"/crds/*.yaml
fi
if [ "$name" = kwok ]; then
  # The upstream Stage definitions that make kwok's nodes Ready (with heartbeats through leases)
  # and its pods Running and Ready, and let them be deleted, for kwok's --config.
  src=$(cd "$mod" && go list -m -f '{{.Dir}}' "$module")/kustomize/stage
  mkdir -p "$out/stages"
  cp "$src"/node/fast/node-initialize.yaml "$src"/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    "$src"/pod/fast/pod-ready.yaml "$src"/pod/fast/pod-complete.yaml "$src"/pod/fast/pod-delete.yaml "$out/stages/"
fi
if [ "$name" = knative ]; then
  # Knative runs as pods: one image per command (the static binary, as a non-root user, the way
  # Knative's own releases build them), as docker-archive tars for `cluster.sh import`. Its YAML:
  # serving's config/core and the networking CRDs and config-network its controller reads.
  command -v buildah >/dev/null || { echo "build-go: knative's images need buildah (apt-get install buildah)" >&2; exit 2; }
  v=$(version_of "$module")
  store=(--root "$tmp/storage" --runroot "$tmp/run")
  mkdir -p "$out/images"
  for bin in $binaries; do
    ctr=$(STORAGE_DRIVER=vfs buildah "${store[@]}" from scratch)
    STORAGE_DRIVER=vfs buildah "${store[@]}" copy --quiet "$ctr" "$out/$bin" "/ko-app/$bin"
    STORAGE_DRIVER=vfs buildah "${store[@]}" config --entrypoint "[\"/ko-app/$bin\"]" --user 65532:65532 "$ctr"
    STORAGE_DRIVER=vfs buildah "${store[@]}" commit --quiet "$ctr" "localhost/knative-$bin:$v" >/dev/null
    STORAGE_DRIVER=vfs buildah "${store[@]}" push --quiet "localhost/knative-$bin:$v" \
      "docker-archive:$out/images/$bin.tar:localhost/knative-$bin:$v"
  done
  STORAGE_DRIVER=vfs buildah "${store[@]}" rm --all >/dev/null 2>&1 || true
  serving=$(cd "$mod" && go list -m -f '{{.Dir}}' "$module")
  networking=$(cd "$mod" && go list -m -f '{{.Dir}}' knative.dev/networking)
  caching=$(cd "$mod" && go list -m -f '{{.Dir}}' knative.dev/caching)
  mkdir -p "$out/config/core" "$out/config/networking" "$out/config/caching"
  (cd "$serving/config/core" && find . -name '*.yaml' -exec cp --parents {} "$out/config/core/" \;)
  cp "$networking"/config/*.yaml "$out/config/networking/"
  cp "$caching"/config/*.yaml "$out/config/caching/"
  chmod -R u+w "$out/config"
  echo "$v" > "$out/version"
fi
for b in $binaries; do
  [ -x "$out/$b" ] || { echo "build-go: $name built no $b (parts.tsv names it)" >&2; exit 1; }
done
echo "$name: built $(find "$out" -mindepth 1 -maxdepth 1 -printf '%f ')in $((SECONDS - start))s"
touch "$out/.complete"
