#!/usr/bin/env bash
# The chart's end-to-end test on a real Kubernetes built here (`make e2e-k8s`).
#
#   k8s/cluster/e2e.sh [--first COMMAND... --] [pytest arguments]
#
# --first: run COMMAND (`make test`'s unit and integration suite) while the Go parts build beside it
# at the lowest CPU priority, so a cold cache costs less; a failure of COMMAND stops the builds and
# is the exit status. Where the cluster cannot run, COMMAND still runs.
#
# 1. preflight: root, cgroup v1, overlayfs, network namespaces; else it says why and skips (exit 0,
#    or the --first command's status).
# 2. builds, cached outside the repo under E2E_CACHE (default /var/cache/torchserve-e2e), each keyed
#    on what makes it: Kubernetes v1.34, etcd, kube-router, the metrics components, KEDA, kwok, the
#    registry, CoreDNS, Knative Serving with its images and Argo Rollouts (from the
#    Go module proxy, pinned by k8s/cluster/go/*/go.sum), the Debian base and pause images. Nothing is
#    rebuilt when its key is unchanged. The Go builds run in the background beside steps 2-3.
# 3. the serving image from k8s/Dockerfile with buildah, offline from a wheelhouse, as a tar.
# 4. the cluster up in its own network namespace, the image imported and pushed to the cluster's
#    registry, kube-router's NetworkPolicy firewall, the metrics pipeline, KEDA, the cluster DNS
#    (CoreDNS), Knative Serving's core (for serverless groups), Argo Rollouts and kwok started, then
#    tests/e2e under pytest inside that namespace (helm install into Pod Security "restricted"
#    namespaces, predictions, rollout, drain, restart, helm test, deploy, NetworkPolicy enforcement,
#    pulls from the registry, a second real node joined for a node drain and a node loss under load,
#    autoscaling, serverless groups scaling to zero and back, GPU scheduling, the dashboard,
#    uninstall; last, the simulated GPU fleet, which `make e2e-fleet` runs alone). On a failure
#    pytest prints the step's events, kubelet lines and pod logs.
#    In a run of pytest per stage: the cluster comes up once the core's parts are built (parts.tsv
#    lists them first: Kubernetes, etcd, kube-router, the registry, CoreDNS), and the tests that
#    need no other part run while the rest build, still at the lowest priority. Then each later
#    stage (metrics, keda, knative, rollouts, fleet) starts once its parts are built, and the
#    tests marked with it (`stage`, tests/e2e/conftest.py) run while the next stages' parts build.
#    On a warm cache the runs follow each other at once. Each run prints its 30 slowest steps.
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
first=()
if [ "${1:-}" = --first ]; then
  shift
  while (($#)) && [ "$1" != -- ]; do first+=("$1"); shift; done
  [ "${1:-}" = -- ] && shift
fi
# The cluster cannot run here: say why, after the --first command, whose status is the exit status.
skip() {
  local rc=0
  ((${#first[@]})) && { "${first[@]}" || rc=$?; }
  echo "e2e-k8s: SKIPPED: $*"
  exit "$rc"
}

# Every command the e2e and its scripts call (here, cluster.sh, base-image.sh, build-image.sh), with
# the Debian package that brings it: what is missing is installed once, where apt and root are.
declare -A TOOLS=(
  [make]=make [python3]=python3 [curl]=curl [openssl]=openssl [sha256sum]=coreutils [mktemp]=coreutils [envsubst]=gettext-base
  [tar]=tar [awk]=mawk [find]=findutils [ip]=iproute2 [nsenter]=util-linux [setsid]=util-linux
  [umount]=mount [sysctl]=procps [pkill]=procps [iptables]=iptables [iptables-save]=iptables
  [iptables-restore]=iptables [ipset]=ipset [conntrack]=conntrack [htpasswd]=apache2-utils
  [containerd]=containerd [ctr]=containerd [runc]=runc
  [buildah]=buildah [debootstrap]=debootstrap [busybox]=busybox-static
)
packages() { local t; for t in "$@"; do echo "${TOOLS[$t]}"; done | sort -u; }
missing_tools() { local t; for t in "${!TOOLS[@]}"; do command -v "$t" >/dev/null || echo "$t"; done | sort; }
# The bridge and portmap CNI plugins are files, not commands on PATH.
cni=(); [ -x /usr/lib/cni/bridge ] || cni=(containernetworking-plugins)
mapfile -t missing < <(missing_tools)
if ((${#missing[@]} + ${#cni[@]})) && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  mapfile -t pkgs < <(packages "${missing[@]}"; printf '%s\n' "${cni[@]}")
  step "installing ${pkgs[*]} (apt) for: ${missing[*]} ${cni[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  mapfile -t missing < <(missing_tools)
fi
if ((${#missing[@]})); then
  skip "missing commands: ${missing[*]} (Debian packages: $(packages "${missing[@]}" | tr '\n' ' '))"
fi

if ! reason=$(bash "$here/cluster.sh" preflight); then
  skip "$reason"
fi

# The Go toolchain these machines ship (/usr/local/go) comes before any older distribution go.
[ -x /usr/local/go/bin/go ] && export PATH=/usr/local/go/bin:$PATH
mkdir -p "$CACHE/parts"  # each part's line of parts.tsv, a cache key input of its own
declare -A bin=()  # part -> the folder of its binaries, exported as BIN_<part> for cluster.sh
mapfile -t parts < <(awk -F'\t' '!/^#/ && NF {print $1}' "$here/parts.tsv")  # in build order
# The parts of the core's stages: the cluster, its firewall, its registry and its DNS.
mapfile -t core_parts < <(awk -F'\t' '!/^#/ && NF && $5 ~ /^(up|policy|registry|dns)$/ {print $1}' "$here/parts.tsv")
build_args=()
for part in "${parts[@]}"; do
  awk -F'\t' -v p="$part" '$1 == p' "$here/parts.tsv" > "$CACHE/parts/$part"
  bin[$part]="$CACHE/$part-$(key "$here/build-go.sh" "$CACHE/parts/$part" "$here/go/$part/go.mod" "$here/go/$part/go.sum")"
  build_args+=("$part" "${bin[$part]}")
  export "BIN_${part//-/_}=${bin[$part]}"
done
# The Go builds are CPU work; the --first command, the image and archive steps below leave cores
# idle: on a cold cache they run side by side, the builds at the lowest priority (nice 19) so they
# take only what the rest leaves. The builds run in a session of their own (so a failure here stops
# all of them), one part after another, logged to $CACHE/build-go.log; the cluster waits for them.
step "Go-built parts: ${parts[*]} (Go module proxy; cached), in the background"
builds_log=$CACHE/build-go.log
# shellcheck disable=SC2016 # the loop's $1 and $2 are the inner shell's arguments
setsid -w nice -n 19 bash -c 'while (($#)); do bash "$0" "$1" "$2" || exit 1; shift 2; done' \
  "$here/build-go.sh" "${build_args[@]}" >"$builds_log" 2>&1 </dev/null &
builds=$!
# With the kernel's autogroups, a new session's processes share the CPU with the rest as one equal
# group whatever their nice value: the group's own nice is what ranks them. Set once the builds'
# session exists (before, the autogroup is this script's own).
for _ in {1..50}; do
  if [ "$(awk '{print $6}' "/proc/$builds/stat" 2>/dev/null)" = "$builds" ]; then
    echo 19 2>/dev/null > "/proc/$builds/autogroup" || true
    break
  fi
  sleep 0.1
done
# shellcheck disable=SC2317 # called by the traps, which shellcheck does not follow
stop_builds() {
  if kill -0 "$builds" 2>/dev/null; then kill -TERM -- "-$builds" 2>/dev/null || true; wait "$builds" 2>/dev/null || true; fi
}
builds_failed() {
  tail -60 "$builds_log"
  echo "e2e-k8s: a Go build failed (the whole log: $builds_log)" >&2
  exit 1
}
# wait_for_parts PART...: until each has built (its .complete), while the builds go on; a build
# that fails ends the e2e. Bounded by the builds themselves, which stop at their first failure.
wait_for_parts() {
  local p ready
  while :; do
    ready=1
    for p in "$@"; do [ -f "${bin[$p]}/.complete" ] || ready=0; done
    ((ready)) && return 0
    if ! kill -0 "$builds" 2>/dev/null; then
      wait "$builds" || builds_failed
      for p in "$@"; do [ -f "${bin[$p]}/.complete" ] || { echo "e2e-k8s: the builds ended without $p" >&2; exit 1; }; done
      return 0
    fi
    sleep 2
  done
}
trap 'stop_builds; exit 130' INT TERM
trap 'rc=$?; stop_builds; exit $rc' EXIT

if ((${#first[@]})); then
  step "${first[*]} (the Go builds beside it)"
  "${first[@]}"
fi

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

export KUBECTL=${bin[kubernetes]}/kubectl HELM=$PWD/.venv/k8s/bin/helm
export STATE=${E2E_STATE:-/var/lib/torchserve-e2e} NETNS=${E2E_NETNS:-tsk8s-e2e}
tmp=$(mktemp -d /var/tmp/e2e-image.XXXXXX)
cluster_started=0
# shellcheck disable=SC2317 # called by the trap
cleanup() {
  local rc=$?
  stop_builds
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

step "waiting for the Go-built parts of the core: ${core_parts[*]}"
wait_for_parts "${core_parts[@]}"

step "cluster up"
cluster_started=1
if ! bash "$here/cluster.sh" up; then
  LOG_LINES=40 bash "$here/cluster.sh" logs
  exit 1
fi
step "image import"
bash "$here/cluster.sh" import "$image_tar"

step "registry: started, and the serving image pushed to it (buildah, TLS, login)"
if ! bash "$here/cluster.sh" registry; then
  LOG_LINES=40 bash "$here/cluster.sh" logs
  exit 1
fi
# Uncompressed, as the tar import above: the layers keep the digests containerd already holds.
E2E_REGISTRY_IMAGE=$(cat "$STATE/registry/address")/torchserve-models:${IMAGE##*:}
nsenter --net="/run/netns/$NETNS" -- env STORAGE_DRIVER=vfs buildah push --quiet --disable-compression \
  --cert-dir "$STATE/registry/client" --creds "$(cat "$STATE/registry/credentials")" \
  "$IMAGE" "docker://$E2E_REGISTRY_IMAGE" >/dev/null
export E2E_REGISTRY_IMAGE E2E_REGISTRY_CREDENTIALS=$STATE/registry/credentials

step "kube-router's firewall: NetworkPolicy enforced from here on"
if ! bash "$here/cluster.sh" policy; then
  LOG_LINES=40 bash "$here/cluster.sh" logs
  exit 1
fi

step "cluster DNS (CoreDNS), for Knative's pods"
if ! bash "$here/cluster.sh" dns; then
  LOG_LINES=40 bash "$here/cluster.sh" logs
  exit 1
fi

export KUBECONFIG=$STATE/admin.kubeconfig E2E_IMAGE=$IMAGE E2E_CLUSTER_SCRIPT=$PWD/$here/cluster.sh
# The stages after the core, in the order they start; parts.tsv builds their parts in this order.
late_stages=(metrics keda knative rollouts fleet)
# start_stage STAGE: start one of them (`cluster.sh STAGE`), once its parts are built.
start_stage() {
  local what
  case $1 in
    metrics)
      what="metrics pipeline: metrics-server, Prometheus, prometheus-adapter, kube-state-metrics"
      # prometheus-adapter's configuration is the rules of the values file users install it with, unchanged.
      export ADAPTER_RULES=$tmp/adapter-rules.yaml
      "$PY" -c 'import sys, yaml; v = yaml.safe_load(open(sys.argv[1])); yaml.safe_dump({"rules": v["rules"]["custom"]}, open(sys.argv[2], "w"))' \
        k8s/prometheus-adapter-values.yaml "$ADAPTER_RULES"
      ;;
    keda) what="KEDA" ;;
    knative) what="Knative Serving's core, for the serverless groups" ;;
    rollouts) what="Argo Rollouts' controller, for progressive delivery with analysis" ;;
    fleet) what="kwok, for the simulated GPU fleet (tests/e2e/test_fleet_on_cluster.py)" ;;
  esac
  step "$what"
  if ! PY=$PY bash "$here/cluster.sh" "$1"; then
    LOG_LINES=40 bash "$here/cluster.sh" logs
    exit 1
  fi
}
pytest_args=("$@")
# run_tests PHASE [pytest options]: pytest on the tests of one phase that the arguments select: core,
# or a late stage (the test's `stage` mark, tests/e2e/conftest.py).
run_tests() {
  local phase=$1
  shift
  nsenter --net="/run/netns/$NETNS" -- env E2E_PHASE="$phase" \
    "$PY" -m pytest tests/e2e -p no:cacheprovider "$@" "${pytest_args[@]}"
}
# The phases of the tests the arguments select, one a line. Where the collection fails, every phase:
# their runs report why.
collected=0
nsenter --net="/run/netns/$NETNS" -- env E2E_PHASES_OUT="$tmp/phases" \
  "$PY" -m pytest tests/e2e -p no:cacheprovider --collect-only -q "${pytest_args[@]}" >/dev/null 2>&1 || collected=$?
if ((collected != 0 && collected != 5)) || [ ! -f "$tmp/phases" ]; then
  printf '%s\n' core "${late_stages[@]}" > "$tmp/phases"
fi
rc=0
# run_phase PHASE TITLE: its selected tests, if any; the first failure's status is the exit status.
run_phase() {
  grep -qx "$1" "$tmp/phases" || return 0
  step "$2"
  local r=0
  # --durations: the 30 slowest steps at the end, where CI's time goes.
  run_tests "$1" -rfEP --durations=30 || r=$?
  ((rc)) || rc=$r
}
run_phase core "tests/e2e that need only the core (pytest inside the cluster's network namespace; the other parts build beside them)"

# Each later stage starts once its parts are built and runs its tests while the next ones build,
# up to the last stage that a selected test needs (a stage needs the ones before it).
last=""
for stage in "${late_stages[@]}"; do grep -qx "$stage" "$tmp/phases" && last=$stage; done
for stage in "${late_stages[@]}"; do
  [ -n "$last" ] || break
  mapfile -t stage_parts < <(awk -F'\t' -v s="$stage" '!/^#/ && $5 == s {print $1}' "$here/parts.tsv")
  step "waiting for the Go-built parts of stage $stage: ${stage_parts[*]}"
  wait_for_parts "${stage_parts[@]}"
  start_stage "$stage"
  run_phase "$stage" "tests/e2e that need stage $stage (the later parts build beside them)"
  [ "$stage" = "$last" ] && break
done
kill -0 "$builds" 2>/dev/null || cat "$builds_log"
[ -s "$tmp/phases" ] || exit 5
exit "$rc"
