#!/usr/bin/env bash
# A real Kubernetes (v1.34 control plane, etcd 3.6, kubelet, containerd, runc, bridge CNI,
# kube-proxy) inside a network namespace of its own, for the chart's end-to-end test: one node, and
# a second that joins for the node tests.
#
#   k8s/cluster/cluster.sh preflight        # exit 0 if this machine can run it, else say why (exit 3)
#   k8s/cluster/cluster.sh up               # start everything; returns once the node is Ready
#   k8s/cluster/cluster.sh import TAR...    # load docker-archive image tars into containerd
#   k8s/cluster/cluster.sh metrics          # start the metrics pipeline (below); returns once its APIs answer
#   k8s/cluster/cluster.sh keda             # start KEDA (after metrics); returns once its API answers
#   k8s/cluster/cluster.sh fleet            # start kwok for a simulated node fleet; returns once it is healthy
#   k8s/cluster/cluster.sh policy           # start kube-router's firewall (NetworkPolicy); returns once it is healthy
#   k8s/cluster/cluster.sh registry         # start the image registry (TLS, htpasswd); returns once it answers
#   k8s/cluster/cluster.sh dns              # start the cluster DNS (CoreDNS, Service kube-system/kube-dns); returns once ready
#   k8s/cluster/cluster.sh knative          # install Knative Serving's core (after dns, registry); returns once it admits a Service
#   k8s/cluster/cluster.sh rollouts         # Argo Rollouts' CRDs and controller; returns once it is healthy
#   k8s/cluster/cluster.sh join [IMAGE]     # a second real node (below); pulls IMAGE from the registry; returns once Ready
#   k8s/cluster/cluster.sh lose             # node loss: kill the second node's every process at once, cut its link
#   k8s/cluster/cluster.sh leave            # the second node gone, its Node object deleted, the first as before
#   k8s/cluster/cluster.sh logs             # the tail of every component's log (evidence on failure)
#   k8s/cluster/cluster.sh down             # stop everything by PID and put the host back as it was
#
# Environment: BIN_<part>, the folder build-go.sh filled for each part of parts.tsv that the command
# starts; PAUSE_TAR (from base-image.sh), KUBECTL (a kubectl binary), STATE (default
# /var/lib/torchserve-e2e); for `metrics`, ADAPTER_RULES (a prometheus-adapter config: the rules of
# k8s/prometheus-adapter-values.yaml). Configuration files are rendered from conf/.
#
# The metrics pipeline runs as processes in the same namespace, as the control plane does, each
# registered with the API server the way its upstream manifests do it (APIService objects behind
# Services whose endpoints are this node): metrics-server (metrics.k8s.io: `kubectl top`, the HPA's
# cpu mode), Prometheus scraping every pod that has the prometheus.io/* annotations and
# kube-state-metrics, and prometheus-adapter (custom.metrics.k8s.io); then, with `keda`, KEDA's
# operator and metrics API server (external.metrics.k8s.io, ScaledObjects).
#
# The second node (`join`) is what `kind` makes with a container: a network namespace of its own
# (NETNS-2, node address 10.200.0.3, pods 10.244.1.0/24) joined to the first by the veth pair of the
# first's uplink, with a route to each node's pod range; its own containerd (root, state, socket and
# runc state under $STATE/node2 and $RUN/node2), kubelet (root folder, cgroup tree e2e-node-2, pod
# log folder) and kube-proxy. It runs no kube-router: NetworkPolicy is enforced on the first node.
# The e2e joins it only for the node tests (tests/e2e/test_nodes_on_cluster.py), so every other
# test keeps one node.
#
# Isolation: every process runs with `nsenter --net` in the namespace NETNS, which has a dummy
# uplink and no route out, so nothing outside this machine is reachable. They share the host's
# mounts, so `down` unmounts what the kubelet and containerd mounted, removes their cgroups and the
# folders they created, and restores the host-global sysctls the kubelet sets.
set -euo pipefail

CONF=$(cd "$(dirname "$0")/conf" && pwd)  # the configuration templates (render)
NETNS=${NETNS:-tsk8s-e2e}
STATE=${STATE:-/var/lib/torchserve-e2e}
RUN=/run/torchserve-e2e
NODE_IP=10.200.0.2          # the node's address inside the namespace (no host or outside peer has it)
NODE_NAME=e2e-node
POD_CIDR=10.244.0.0/24
CLUSTER_CIDR=10.244.0.0/16  # every node's pod range
NODE_STATE=$STATE           # what is the node's own: containerd's root, CNI, the kubelet's pods
NODE_RUN=$RUN
CGROUP_ROOT=/               # the kubelet's cgroup tree
POD_LOGS_DIR=/var/log/pods  # the kubelet's default
NODE2_NETNS=$NETNS-2
NODE2_IP=10.200.0.3
NODE2_NAME=e2e-node-2
NODE2_POD_CIDR=10.244.1.0/24
NODE2_CGROUP=e2e-node-2
NODE2=(containerd-2 kubelet-2 kube-proxy-2)  # its processes
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
BIN_kubernetes=${BIN_kubernetes:-}
BIN_etcd=${BIN_etcd:-}
PAUSE_TAR=${PAUSE_TAR:-}
PAUSE_IMAGE=localhost/pause:3.2
KUBECTL=${KUBECTL:-kubectl}
SOCK=$RUN/containerd/containerd.sock
# Host-global sysctls the kubelet writes: saved by `up`, restored by `down`.
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
PARTS=$(dirname "$0")/parts.tsv  # the Go-built parts: binaries, processes and the stage that starts them
# stage_field STAGE FIELD: the FIELD (3 binaries, 4 processes) of every part that STAGE starts.
stage_field() { awk -F'\t' -v s="$1" -v f="$2" '!/^#/ && $5 == s {print $f}' "$PARTS" | tr ' ' '\n'; }
mapfile -t CORE < <(echo containerd; stage_field up 4)  # containerd is Debian's
mapfile -t METRICS < <(stage_field metrics 4)
mapfile -t KEDA < <(stage_field keda 4)
mapfile -t FLEET < <(stage_field fleet 4)
mapfile -t POLICY < <(stage_field policy 4)
mapfile -t REGISTRY < <(stage_field registry 4)
mapfile -t DNS < <(stage_field dns 4)
mapfile -t ROLLOUTS < <(stage_field rollouts 4)
COMPONENTS=("${CORE[@]}" "${POLICY[@]}" "${REGISTRY[@]}" "${DNS[@]}" "${METRICS[@]}" "${KEDA[@]}" "${FLEET[@]}" "${ROLLOUTS[@]}" "${NODE2[@]}")
BIN_metrics_server=${BIN_metrics_server:-}
BIN_prometheus_adapter=${BIN_prometheus_adapter:-}
BIN_keda=${BIN_keda:-}
ADAPTER_RULES=${ADAPTER_RULES:-}
BIN_prometheus=${BIN_prometheus:-}
BIN_kube_state_metrics=${BIN_kube_state_metrics:-}
KSM_PORT=8088            # kube-state-metrics's metrics of the cluster's objects, for Prometheus
KSM_TELEMETRY_PORT=8089  # its own metrics and readiness, on loopback
PROMETHEUS_PORT=9090
SCRAPE_INTERVAL=${SCRAPE_INTERVAL:-5s}
BIN_kwok=${BIN_kwok:-}
BIN_kube_router=${BIN_kube_router:-}
KUBE_ROUTER_HEALTH_PORT=20244
BIN_registry=${BIN_registry:-}
REGISTRY_PORT=5000
REGISTRY_USER=e2e-pusher
KWOK_PORT=10247
BIN_coredns=${BIN_coredns:-}
DNS_SERVICE_IP=10.96.0.10
DNS_HEALTH_PORT=8180
DNS_READY_PORT=8181
BIN_knative=${BIN_knative:-}
BIN_argo_rollouts=${BIN_argo_rollouts:-}
ROLLOUTS_METRICS_PORT=8090
ROLLOUTS_HEALTH_PORT=8091
PY=${PY:-.venv/bin/python}  # a Python with PyYAML, for knative.py
# The simulated fleet's pod addresses: kwok hands them out; nothing routes to them.
KWOK_POD_CIDR=10.250.0.0/16
# What the templates of conf/ name (render reads them from the environment).
export STATE RUN SOCK NODE_IP NODE_NAME POD_CIDR PAUSE_IMAGE SCRAPE_INTERVAL KSM_PORT REGISTRY_PORT CLUSTER_CIDR \
  NODE_STATE NODE_RUN CGROUP_ROOT POD_LOGS_DIR DNS_SERVICE_IP DNS_HEALTH_PORT DNS_READY_PORT

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
in_ns() { nsenter --net="/run/netns/$NETNS" -- "$@"; }

# render TEMPLATE OUT: conf/TEMPLATE with the $VARIABLES it names filled in from this script's
# settings (and the caller's environment), into OUT (- for standard output). Only the names the
# template holds are replaced: the $1 of a Prometheus replacement stays as it is.
render() {
  local vars
  vars=$(grep -o '\$[A-Z][A-Z_]*' "$CONF/$1" | sort -u | tr '\n' ' ')
  if [ "$2" = - ]; then envsubst "$vars" < "$CONF/$1"; else envsubst "$vars" < "$CONF/$1" > "$2"; fi
}
kc() { in_ns "$KUBECTL" --kubeconfig "$STATE/admin.kubeconfig" --request-timeout=20s "$@"; }

# Wait up to $1 seconds for the command in the remaining arguments to succeed.
wait_for() {
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then log "$what: not reached within ${limit}s"; return 1; fi
    sleep 1
  done
  log "$what (${SECONDS}s since start)"
}

preflight() {
  local why=()
  [ "$(id -u)" = 0 ] || why+=("not root")
  [ -d /sys/fs/cgroup/memory ] && [ -d /sys/fs/cgroup/cpu ] || why+=("no cgroup v1 memory/cpu hierarchy (this kubelet needs cgroupfs v1)")
  grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || why+=("no overlay filesystem")
  for tool in ip nsenter setsid sysctl iptables iptables-save iptables-restore ipset htpasswd conntrack containerd ctr runc openssl curl awk envsubst; do
    command -v "$tool" >/dev/null || why+=("no $tool")
  done
  [ -x /usr/lib/cni/bridge ] || why+=("no CNI plugins in /usr/lib/cni")
  if [ "$(id -u)" = 0 ] && command -v ip >/dev/null; then
    local probe="tsk8s-probe-$$"
    if ip netns add "$probe" 2>/dev/null; then ip netns delete "$probe"; else why+=("cannot create network namespaces"); fi
  fi
  if ((${#why[@]})); then
    printf 'cluster: this machine cannot run a local Kubernetes: %s\n' "$(IFS=';'; echo "${why[*]}")"
    return 3
  fi
}

# ca DIR NAME CN: a self-signed CA, DIR/NAME.crt and DIR/NAME.key.
ca() {
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=$3" -keyout "$1/$2.key" -out "$1/$2.crt" 2>/dev/null
}

# cert DIR NAME SUBJECT CA EXTENSIONS: a key DIR/NAME.key and a certificate DIR/NAME.crt for
# SUBJECT, signed by the CA DIR/CA.{crt,key}, with the openssl extensions given as text.
cert() {
  local d=$1 name=$2 subject=$3 ca=$4 extensions=$5
  openssl genrsa -out "$d/$name.key" 2048 2>/dev/null
  openssl req -new -key "$d/$name.key" -subj "$subject" -out "$d/$name.csr" 2>/dev/null
  printf '%s\n' "$extensions" > "$d/$name.ext"
  openssl x509 -req -in "$d/$name.csr" -CA "$d/$ca.crt" -CAkey "$d/$ca.key" -CAcreateserial -days 3650 \
    -extfile "$d/$name.ext" -out "$d/$name.crt" 2>/dev/null
}

pki() {
  local d=$STATE/pki
  mkdir -p "$d"
  [ -f "$d/admin.crt" ] && return
  ca "$d" ca torchserve-e2e-ca
  cert "$d" apiserver /CN=kube-apiserver ca "subjectAltName=IP:$NODE_IP,IP:$API_SERVICE_IP,IP:127.0.0.1,DNS:localhost,\
DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
  # One client identity in system:masters for every component: the cluster lives for one test run
  # inside its own network namespace, so per-component identities would buy nothing here.
  cert "$d" admin "/O=system:masters/CN=e2e-admin" ca extendedKeyUsage=clientAuth
  # The aggregation layer (metrics-server, prometheus-adapter, KEDA): the API server proxies to them
  # with a front-proxy client certificate, which they check against this CA.
  ca "$d" front-proxy-ca torchserve-e2e-front-proxy-ca
  cert "$d" front-proxy-client /CN=front-proxy-client front-proxy-ca extendedKeyUsage=clientAuth
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
  render admin.kubeconfig "$STATE/admin.kubeconfig"
}

# configs: the node's own configuration files, in NODE_STATE.
configs() {
  mkdir -p "$NODE_STATE/cni" "$STATE/logs" "$NODE_RUN"
  render 10-bridge.conflist "$NODE_STATE/cni/10-bridge.conflist"
  render containerd.toml "$NODE_STATE/containerd.toml"
  render kubelet.yaml "$NODE_STATE/kubelet.yaml"
  render kube-proxy.yaml "$NODE_STATE/kube-proxy.yaml"
}

# binaries STAGE: dies naming every binary of STAGE's parts that is not in the part's BIN_<part>.
binaries() {
  local missing=() part bins var b
  while IFS=$'\t' read -r part _ bins _; do
    var=BIN_${part//-/_}
    for b in $bins; do
      [ -x "${!var:-}/$b" ] || missing+=("$var=${!var:-} has no $b (build-go.sh $part)")
    done
  done < <(awk -F'\t' -v s="$1" '!/^#/ && $5 == s' "$PARTS")
  ((${#missing[@]} == 0)) || die "$1: $(IFS=';'; echo "${missing[*]}")"
}

# start NAME CMD...: run CMD in the namespace (START_NETNS, default NETNS), logging to
# $STATE/logs/NAME.log, PID in $RUN/NAME.pid.
start() {
  local name=$1; shift
  setsid nsenter --net="/run/netns/${START_NETNS:-$NETNS}" -- "$@" >"$STATE/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
}

node_ready() {
  kc get node "${1:-$NODE_NAME}" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True
}

running() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

up() {
  binaries up
  [ -f "$PAUSE_TAR" ] || die "PAUSE_TAR=$PAUSE_TAR not found (run base-image.sh)"
  ! ip netns list | grep -qw "$NETNS" || die "network namespace $NETNS exists: run \`$0 down\` first"
  mkdir -p "$STATE" "$RUN"
  # What `down` must put back: sysctls, and whether the kubelet's hard-coded /var/log/pods existed.
  : > "$STATE/host.saved"
  for s in "${SYSCTLS[@]}"; do echo "$s=$(sysctl -n "$s")" >> "$STATE/host.saved"; done
  [ -e /var/log/pods ] || echo "created=/var/log/pods" >> "$STATE/host.saved"
  [ -e /var/log/containers ] || echo "created=/var/log/containers" >> "$STATE/host.saved"
  # containerd names each pod sandbox's network namespace cni-<uuid>: `down` removes the ones that
  # were not there before, which a pod still terminating at teardown leaves behind.
  ip netns list 2>/dev/null | awk '$1 ~ /^cni-/ {print $1}' > "$STATE/netns.before"

  ip netns add "$NETNS"
  ip -n "$NETNS" link set lo up
  # The node's uplink is one end of a veth pair whose other end stays in the namespace too: kubelet
  # and kube-proxy want an address and a default route; the route leads nowhere.
  ip -n "$NETNS" link add uplink0 type veth peer name uplink1
  ip -n "$NETNS" addr add "$NODE_IP/24" dev uplink0
  ip -n "$NETNS" link set uplink0 up
  ip -n "$NETNS" link set uplink1 up
  ip -n "$NETNS" route add default via "${NODE_IP%.*}.1" dev uplink0 onlink
  in_ns sysctl -qw net.ipv4.ip_forward=1
  pki
  configs

  start etcd "$BIN_etcd/etcd" --name e2e --data-dir "$STATE/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster e2e=http://127.0.0.1:2380
  start containerd containerd --config "$STATE/containerd.toml"
  start kube-apiserver "$BIN_kubernetes/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --advertise-address="$NODE_IP" --bind-address="$NODE_IP" --secure-port=6443 \
    --service-cluster-ip-range="$SERVICE_CIDR" --client-ca-file="$STATE/pki/ca.crt" \
    --tls-cert-file="$STATE/pki/apiserver.crt" --tls-private-key-file="$STATE/pki/apiserver.key" \
    --kubelet-client-certificate="$STATE/pki/admin.crt" --kubelet-client-key="$STATE/pki/admin.key" \
    --service-account-key-file="$STATE/pki/sa.pub" --service-account-signing-key-file="$STATE/pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --authorization-mode=Node,RBAC --allow-privileged=false --profiling=false \
    --kubelet-preferred-address-types=InternalIP \
    --requestheader-client-ca-file="$STATE/pki/front-proxy-ca.crt" --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- --enable-aggregator-routing=true \
    --proxy-client-cert-file="$STATE/pki/front-proxy-client.crt" --proxy-client-key-file="$STATE/pki/front-proxy-client.key"
  wait_for 60 "containerd answers" test -S "$SOCK" || return 1
  ctr --address "$SOCK" -n k8s.io images import "$PAUSE_TAR" >/dev/null
  wait_for 90 "API server ready" kc get --raw /readyz || return 1
  start kube-controller-manager "$BIN_kubernetes/kube-controller-manager" --kubeconfig="$STATE/admin.kubeconfig" \
    --service-account-private-key-file="$STATE/pki/sa.key" --root-ca-file="$STATE/pki/ca.crt" \
    --leader-elect=false --use-service-account-credentials=false --bind-address=127.0.0.1 \
    --horizontal-pod-autoscaler-sync-period="${HPA_SYNC_PERIOD:-5s}" \
    --kube-api-qps=100 --kube-api-burst=200  # the fleet test's 600 to 940 pods: 20/s (the default) would pace them
  start kube-scheduler "$BIN_kubernetes/kube-scheduler" --kubeconfig="$STATE/admin.kubeconfig" --leader-elect=false \
    --bind-address=127.0.0.1
  start kubelet "$BIN_kubernetes/kubelet" --config="$STATE/kubelet.yaml" --kubeconfig="$STATE/admin.kubeconfig" \
    --root-dir="$STATE/kubelet" --node-ip="$NODE_IP" --hostname-override="$NODE_NAME"
  start kube-proxy "$BIN_kubernetes/kube-proxy" --config="$STATE/kube-proxy.yaml"
  wait_for 120 "node Ready" node_ready || return 1
  wait_for 60 "default service account" kc get serviceaccount default -n default || return 1
  for c in "${CORE[@]}"; do running "$c" || die "$c exited: $(tail -5 "$STATE/logs/$c.log")"; done
}

# node_service NAMESPACE NAME PORT TARGET: a Service whose endpoints are this node's TARGET port
# (conf/node-service.yaml).
node_service() {
  NAMESPACE=$1 NAME=$2 PORT=$3 TARGET=$4 render node-service.yaml - | kc apply -f - >/dev/null
}

# api_service GROUP VERSION NAMESPACE NAME: an APIService served by the Service NAME (conf/api-service.yaml).
api_service() {
  GROUP=$1 VERSION=$2 NAMESPACE=$3 NAME=$4 render api-service.yaml - | kc apply -f - >/dev/null
}

api_available() {
  kc get apiservice "$1" -o jsonpath='{.status.conditions[?(@.type=="Available")].status}' 2>/dev/null | grep -qx True
}

# The flags every aggregated API server here shares (metrics-server, prometheus-adapter, KEDA's): the
# admin identity (system:masters) for delegated authentication and authorization. Each names the
# kubeconfig for its own calls its way.
AGGREGATED=(--authentication-kubeconfig="$STATE/admin.kubeconfig" --authorization-kubeconfig="$STATE/admin.kubeconfig"
  --bind-address="$NODE_IP")

metrics() {
  local c
  binaries metrics
  [ -f "$ADAPTER_RULES" ] || die "metrics: ADAPTER_RULES=$ADAPTER_RULES not found"
  kc create namespace monitoring >/dev/null

  # metrics-server: the kubelet's resource metrics (the kubelet's serving certificate is self-signed).
  start metrics-server "$BIN_metrics_server/metrics-server" "${AGGREGATED[@]}" --kubeconfig="$STATE/admin.kubeconfig" \
    --secure-port=4443 --cert-dir="$STATE/metrics-server" --kubelet-insecure-tls \
    --kubelet-preferred-address-types=InternalIP --metric-resolution=10s --kubelet-request-timeout=5s
  node_service kube-system metrics-server 443 4443
  api_service metrics.k8s.io v1beta1 kube-system metrics-server

  # Prometheus: every pod with the prometheus.io/* annotations (conf/prometheus.yml).
  mkdir -p "$STATE/prometheus"
  render prometheus.yml "$STATE/prometheus/prometheus.yml"
  start prometheus "$BIN_prometheus/prometheus" --config.file="$STATE/prometheus/prometheus.yml" \
    --storage.tsdb.path="$STATE/prometheus/data" --storage.tsdb.retention.time=2h \
    --web.listen-address="$NODE_IP:$PROMETHEUS_PORT"
  # The Service the chart's defaults name (prometheus-operated.monitoring), for clients in the cluster.
  node_service monitoring prometheus-operated "$PROMETHEUS_PORT" "$PROMETHEUS_PORT"

  # kube-state-metrics: the state of the objects the dashboard reads (a Deployment's available
  # replicas, an HPA's desired ones), and of pods, nodes and PDBs, scraped by Prometheus.
  start kube-state-metrics "$BIN_kube_state_metrics/kube-state-metrics" --kubeconfig="$STATE/admin.kubeconfig" \
    --host="$NODE_IP" --port="$KSM_PORT" --telemetry-host=127.0.0.1 --telemetry-port="$KSM_TELEMETRY_PORT" \
    --resources=deployments,horizontalpodautoscalers,pods,nodes,poddisruptionbudgets

  # prometheus-adapter: the chart's Pods metrics, by the rules of k8s/prometheus-adapter-values.yaml.
  start prometheus-adapter "$BIN_prometheus_adapter/adapter" "${AGGREGATED[@]}" \
    --lister-kubeconfig="$STATE/admin.kubeconfig" --secure-port=6444 \
    --cert-dir="$STATE/prometheus-adapter" --prometheus-url="http://$NODE_IP:$PROMETHEUS_PORT/" \
    --metrics-relist-interval=10s --config="$ADAPTER_RULES"
  node_service monitoring prometheus-adapter 443 6444
  api_service custom.metrics.k8s.io v1beta1 monitoring prometheus-adapter
  api_service custom.metrics.k8s.io v1beta2 monitoring prometheus-adapter

  wait_for 120 "metrics.k8s.io available" api_available v1beta1.metrics.k8s.io || return 1
  wait_for 60 "Prometheus ready" in_ns curl -fsS "http://$NODE_IP:$PROMETHEUS_PORT/-/ready" || return 1
  wait_for 60 "custom.metrics.k8s.io available" api_available v1beta1.custom.metrics.k8s.io || return 1
  wait_for 60 "kube-state-metrics ready" in_ns curl -fsS "http://127.0.0.1:$KSM_TELEMETRY_PORT/readyz" || return 1
  for c in "${METRICS[@]}"; do running "$c" || die "$c exited: $(tail -5 "$STATE/logs/$c.log")"; done
}

# KEDA: its CRDs, then the operator and its metrics API server (external.metrics.k8s.io), after
# `metrics` (its queries go to that Prometheus).
keda() {
  local c
  binaries keda
  kc create namespace keda >/dev/null
  # The operator and its metrics API server talk over mutual TLS with the certificates in keda-certs
  # (what the operator's cert rotation writes in a pod).
  kc apply --server-side -f "$BIN_keda/crds" >/dev/null
  keda_pki
  local keda_env=(env POD_NAMESPACE=keda WATCH_NAMESPACE= KEDA_CLUSTER_OBJECT_NAMESPACE=keda
                  KUBECONFIG="$STATE/admin.kubeconfig")
  start keda-operator "${keda_env[@]}" "$BIN_keda/operator" --leader-elect=false \
    --metrics-bind-address=127.0.0.1:8085 --health-probe-bind-address=127.0.0.1:8086 \
    --metrics-service-bind-address="$NODE_IP:9666" --cert-dir="$STATE/keda-certs" --enable-cert-rotation=false \
    --enable-webhook-patching=false --enable-apiservice-patching=false --ca-dir="$STATE/keda-certs" \
    --zap-log-level=info --zap-encoder=console
  start keda-metrics-apiserver "${keda_env[@]}" "$BIN_keda/adapter" "${AGGREGATED[@]}" \
    --lister-kubeconfig="$STATE/admin.kubeconfig" --secure-port=6445 \
    --cert-dir="$STATE/keda-certs" --metrics-service-address="$NODE_IP:9666" \
    --metrics-service-grpc-authority=keda-operator.keda.svc --port=8087
  node_service keda keda-metrics-apiserver 443 6445
  api_service external.metrics.k8s.io v1beta1 keda keda-metrics-apiserver

  wait_for 120 "external.metrics.k8s.io available" api_available v1beta1.external.metrics.k8s.io || return 1
  for c in "${KEDA[@]}"; do running "$c" || die "$c exited: $(tail -5 "$STATE/logs/$c.log")"; done
}

crds_established() {
  local crd
  for crd in "$@"; do
    kc get crd "$crd" -o jsonpath='{.status.conditions[?(@.type=="Established")].status}' 2>/dev/null | grep -qx True || return 1
  done
}

# Argo Rollouts' controller, cluster-wide, as a host process with the admin kubeconfig (in a cluster:
# its Deployment and ClusterRole from the project's install.yaml). Its CRDs come from its module.
# It queries the e2e's Prometheus (loopback) for AnalysisRuns and creates their Jobs.
rollouts() {
  binaries rollouts
  kc apply --server-side -f "$BIN_argo_rollouts/crds" >/dev/null
  wait_for 60 "Argo Rollouts' CRDs established" crds_established rollouts.argoproj.io analysistemplates.argoproj.io \
    analysisruns.argoproj.io || return 1
  start rollouts-controller "$BIN_argo_rollouts/rollouts-controller" --kubeconfig="$STATE/admin.kubeconfig" \
    --leader-elect=false --metricsPort="$ROLLOUTS_METRICS_PORT" --healthzPort="$ROLLOUTS_HEALTH_PORT" --loglevel=info
  wait_for 60 "argo rollouts controller healthy" in_ns curl -fsS "http://127.0.0.1:$ROLLOUTS_HEALTH_PORT/healthz" || return 1
  running rollouts-controller || die "rollouts-controller exited: $(tail -5 "$STATE/logs/rollouts-controller.log")"
}

# kwok: the simulated GPU fleet's nodes and pods, beside the real control plane. It manages only the
# nodes annotated kwok.x-k8s.io/node=fake and the pods bound to them; the real node and its pods stay
# the kubelet's. kwok's own Stages (built with it) make its nodes Ready, with heartbeats through
# leases, and its pods Running and Ready. Its pods run no container.
fleet() {
  binaries fleet
  local stages=() f
  for f in "$BIN_kwok"/stages/*.yaml; do stages+=(--config="$f"); done
  ((${#stages[@]})) || die "fleet: no Stage files in $BIN_kwok/stages"
  start kwok "$BIN_kwok/kwok" "${stages[@]}" --kubeconfig="$STATE/admin.kubeconfig" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --cidr="$KWOK_POD_CIDR" --node-lease-duration-seconds=40 --server-address="127.0.0.1:$KWOK_PORT"
  wait_for 60 "kwok healthy" in_ns curl -fsS "http://127.0.0.1:$KWOK_PORT/healthz" || return 1
  running kwok || die "kwok exited: $(tail -5 "$STATE/logs/kwok.log")"
}

# kube-router, firewall only: it enforces NetworkPolicy with iptables and ipset in this namespace,
# where kube-proxy's rules are, through the same `iptables` (the same backend); bridged pod-to-pod
# traffic passes the FORWARD chain through br_netfilter. It routes nothing and proxies nothing (the
# bridge and kube-proxy do), so the parts of v2.1.0 with published advisories (the service proxy and
# the BGP router's GoBGP) never run. A policy change applies at its next sync, seconds later.
policy() {
  binaries policy
  [ "$(in_ns sysctl -n net.bridge.bridge-nf-call-iptables 2>/dev/null)" = 1 ] \
    || die "policy: bridged traffic skips iptables (net.bridge.bridge-nf-call-iptables is not 1: br_netfilter)"
  start kube-router "$BIN_kube_router/kube-router" --kubeconfig="$STATE/admin.kubeconfig" \
    --hostname-override="$NODE_NAME" --run-firewall=true --run-router=false --run-service-proxy=false \
    --run-loadbalancer=false --enable-cni=false --service-cluster-ip-range="$SERVICE_CIDR" \
    --health-port="$KUBE_ROUTER_HEALTH_PORT" --metrics-port=0 --iptables-sync-period=1m
  wait_for 60 "kube-router healthy" in_ns curl -fsS "http://127.0.0.1:$KUBE_ROUTER_HEALTH_PORT/healthz" || return 1
  running kube-router || die "kube-router exited: $(tail -5 "$STATE/logs/kube-router.log")"
}

# The image registry (distribution v3) on the node's address, as a cluster's private registry is
# reached: TLS with a certificate from the cluster's CA, which containerd trusts for that host
# (certs.d/<host:port>/hosts.toml), and a bcrypt htpasswd login with a random password. It writes
# what a client needs under $STATE/registry: address, credentials (user:password) and client/ca.crt.
registry() {
  binaries registry
  local d=$STATE/registry password
  mkdir -p "$d/data" "$d/client" "$STATE/certs.d/$NODE_IP:$REGISTRY_PORT"
  cert "$STATE/pki" registry /CN=e2e-registry ca "subjectAltName=IP:$NODE_IP
extendedKeyUsage=serverAuth"
  cp "$STATE/pki/ca.crt" "$d/client/ca.crt"
  password=$(openssl rand -hex 16)
  (umask 077; htpasswd -Bbn "$REGISTRY_USER" "$password" > "$d/htpasswd"; echo "$REGISTRY_USER:$password" > "$d/credentials")
  echo "$NODE_IP:$REGISTRY_PORT" > "$d/address"
  REGISTRY_HTTP_SECRET=$(openssl rand -hex 16) render registry.yml "$d/config.yml"
  render registry-hosts.toml "$STATE/certs.d/$NODE_IP:$REGISTRY_PORT/hosts.toml"
  start registry "$BIN_registry/registry" serve "$d/config.yml"
  # Without a login the registry answers 401: it is up, and it asks for one.
  wait_for 60 "registry answers (401 without a login)" registry_asks_login || return 1
  running registry || die "registry exited: $(tail -5 "$STATE/logs/registry.log")"
}

registry_asks_login() {
  [ "$(in_ns curl -sS -o /dev/null -w '%{http_code}' --cacert "$STATE/pki/ca.crt" "https://$NODE_IP:$REGISTRY_PORT/v2/")" = 401 ]
}

# The cluster DNS: CoreDNS as a process here, answering for Services and pods under cluster.local
# from the API server, behind the Service kube-system/kube-dns at DNS_SERVICE_IP. The kubelets keep
# the node's resolver for pods: only the pods that ask for it (Knative's, through dnsConfig) use it.
dns() {
  binaries dns
  mkdir -p "$STATE/dns"
  render Corefile "$STATE/dns/Corefile"
  start coredns "$BIN_coredns/coredns" -conf "$STATE/dns/Corefile"
  render dns-service.yaml - | kc apply -f - >/dev/null
  wait_for 60 "CoreDNS ready" in_ns curl -fsS "http://127.0.0.1:$DNS_READY_PORT/ready" || return 1
  running coredns || die "coredns exited: $(tail -5 "$STATE/logs/coredns.log")"
}

# Knative Serving's core (controller, webhook, autoscaler, activator) as pods in knative-serving,
# from its own YAML with the changes knative.py lists, and no networking layer: clients call a
# revision's cluster-local Service, which Knative points at the activator while it has no pods.
knative() {
  binaries knative
  local d=$STATE/knative v deploy
  v=$(cat "$BIN_knative/version")
  import_images "$BIN_knative"/images/*.tar
  "$PY" "$(dirname "$0")/knative.py" "$BIN_knative/config" "$v" "$d" --dns "$DNS_SERVICE_IP" \
    --registry "$NODE_IP:$REGISTRY_PORT" || die "knative: knative.py failed"
  kc apply --server-side -f "$d/crds.yaml" >/dev/null
  kc wait --for condition=established --timeout=60s -f "$d/crds.yaml" >/dev/null
  kc apply --server-side --force-conflicts -f "$d/install.yaml" >/dev/null
  for deploy in controller webhook autoscaler activator; do
    kc -n knative-serving rollout status "deployment/$deploy" --timeout=180s >/dev/null \
      || { log "knative: $deploy not available within 180s"; knative_evidence; return 1; }
  done
  # The webhook writes its own serving certificate into its configurations: a Service is admitted
  # only once it has.
  wait_for 120 "Knative's webhook admits a Service" knative_admits || { knative_evidence; return 1; }
  log "Knative Serving $v: $(kc -n knative-serving get pods --no-headers 2>&1 | awk '{print $1, $3}' | tr '\n' ' ')"
}

knative_evidence() {
  kc -n knative-serving get pods -o wide 2>&1 || true
  kc -n knative-serving get events --sort-by=.lastTimestamp 2>&1 | tail -20 || true
  local deploy
  for deploy in controller webhook autoscaler activator; do
    echo "----- knative-serving/$deploy (last 15 lines)"
    kc -n knative-serving logs "deployment/$deploy" --tail=15 2>&1 || true
  done
}

knative_admits() {
  kc apply --dry-run=server -f - <<'YAML'
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: admission-check, namespace: default}
spec: {template: {spec: {containers: [{image: localhost/pause:3.2}]}}}
YAML
}

# The settings `configs` and `start` read, for the second node.
node2_settings() {
  NODE_STATE=$STATE/node2 NODE_RUN=$RUN/node2 SOCK=$RUN/node2/containerd/containerd.sock
  NODE_IP=$NODE2_IP NODE_NAME=$NODE2_NAME POD_CIDR=$NODE2_POD_CIDR
  CGROUP_ROOT=/$NODE2_CGROUP POD_LOGS_DIR=$STATE/node2/pod-logs
}

# in_ns2 CMD...: CMD in the second node's network namespace.
in_ns2() { nsenter --net="/run/netns/$NODE2_NETNS" -- "$@"; }

# node2_cgroups: the second kubelet's cgroup tree under every v1 hierarchy (the kubelet wants its
# cgroupRoot to exist), deepest first for removal with `rmdir`.
node2_cgroups() {
  local h
  for h in /sys/fs/cgroup/*/; do
    [ -L "${h%/}" ] && continue  # cpu and cpuacct: links to cpu,cpuacct
    echo "$h$NODE2_CGROUP"
  done
}

# join [IMAGE]: the second node, Ready; IMAGE (in the e2e's registry) pulled onto it beforehand with
# the registry's login, so that both nodes can start a pod of it alike.
join() {
  local image=${1:-} g
  binaries up
  running kubelet || die "join: the first node is not up (\`$0 up\`)"
  ! ip netns list | grep -qw "$NODE2_NETNS" || die "join: $NODE2_NETNS exists: run \`$0 leave\` first"
  # The link: the first node's uplink peer moves into the new namespace and takes the node's address.
  ip netns add "$NODE2_NETNS"
  ip -n "$NODE2_NETNS" link set lo up
  ip -n "$NETNS" link set uplink1 netns "$NODE2_NETNS"
  ip -n "$NODE2_NETNS" addr add "$NODE2_IP/24" dev uplink1
  ip -n "$NODE2_NETNS" link set uplink1 up
  ip -n "$NODE2_NETNS" route add default via "${NODE2_IP%.*}.1" dev uplink1 onlink
  ip -n "$NODE2_NETNS" route add "$POD_CIDR" via "$NODE_IP"
  ip -n "$NETNS" route add "$NODE2_POD_CIDR" via "$NODE2_IP"
  in_ns2 sysctl -qw net.ipv4.ip_forward=1
  node2_settings
  for g in $(node2_cgroups); do mkdir -p "$g"; done
  if [ -d "/sys/fs/cgroup/cpuset/$NODE2_CGROUP" ]; then  # a new cpuset has no CPUs until given some
    cat /sys/fs/cgroup/cpuset/cpuset.cpus > "/sys/fs/cgroup/cpuset/$NODE2_CGROUP/cpuset.cpus"
    cat /sys/fs/cgroup/cpuset/cpuset.mems > "/sys/fs/cgroup/cpuset/$NODE2_CGROUP/cpuset.mems"
  fi
  configs
  START_NETNS=$NODE2_NETNS start containerd-2 containerd --config "$NODE_STATE/containerd.toml"
  wait_for 60 "node 2: containerd answers" test -S "$SOCK" || return 1
  ctr --address "$SOCK" -n k8s.io images import "$PAUSE_TAR" >/dev/null
  if [ -n "$image" ]; then
    local t0=$SECONDS
    in_ns2 ctr --address "$SOCK" -n k8s.io images pull --hosts-dir "$STATE/certs.d" \
      --user "$(cat "$STATE/registry/credentials")" "$image" >/dev/null
    log "node 2: pulled $image from the registry in $((SECONDS - t0))s"
  fi
  START_NETNS=$NODE2_NETNS start kubelet-2 "$BIN_kubernetes/kubelet" --config="$NODE_STATE/kubelet.yaml" \
    --kubeconfig="$STATE/admin.kubeconfig" --root-dir="$NODE_STATE/kubelet" --node-ip="$NODE_IP" \
    --hostname-override="$NODE_NAME"
  START_NETNS=$NODE2_NETNS start kube-proxy-2 "$BIN_kubernetes/kube-proxy" --config="$NODE_STATE/kube-proxy.yaml"
  wait_for 120 "node 2 Ready" node_ready "$NODE2_NAME" || return 1
  for g in "${NODE2[@]}"; do running "$g" || die "$g exited: $(tail -5 "$STATE/logs/$g.log")"; done
}

# node2_tasks: the PIDs of every process of the second node's pods (its cgroup tree).
node2_tasks() {
  [ -d "/sys/fs/cgroup/memory/$NODE2_CGROUP" ] || return 0
  find "/sys/fs/cgroup/memory/$NODE2_CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null
}

node2_shims() { pgrep -f "containerd-shim-runc-v2 -namespace k8s.io .*-address $SOCK" || true; }

# lose: the second node fails as a machine does when it loses power: its kubelet, containerd,
# kube-proxy, containerd's shims and every pod's processes are killed in one signal, and its link
# goes down, so its address stops answering. Its Node object stays: the control plane finds out.
lose() {
  node2_settings
  local targets=() name pid
  for name in "${NODE2[@]}"; do [ -f "$RUN/$name.pid" ] && targets+=("-$(cat "$RUN/$name.pid")"); done
  for pid in $(node2_shims) $(node2_tasks); do targets+=("$pid"); done
  ((${#targets[@]})) || die "lose: node 2 runs nothing"
  kill -KILL -- "${targets[@]}" 2>/dev/null || true
  ip -n "$NODE2_NETNS" link set uplink1 down
  log "node 2 lost: ${#targets[@]} processes and process groups killed, its link down"
}

# leave: everything of the second node stopped and removed (whether it was lost or not), its Node
# object deleted, and the first node's uplink peer back in the first namespace.
leave() {
  node2_settings
  local g pid ids id
  stop kube-proxy-2; stop kubelet-2
  if running containerd-2; then
    ids=$(ctr --address "$SOCK" -n k8s.io tasks list -q 2>/dev/null || true)
    for id in $ids; do ctr --address "$SOCK" -n k8s.io tasks kill -s KILL "$id" >/dev/null 2>&1 || true; done
  fi
  for pid in $(node2_shims) $(node2_tasks); do kill -KILL "$pid" 2>/dev/null || true; done
  stop containerd-2
  awk -v s="$NODE_STATE" -v r="$NODE_RUN" '$2 ~ "^(" s "|" r ")/" {print $2}' /proc/self/mounts | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  for g in $(node2_cgroups); do
    if [ -d "$g" ]; then find "$g" -depth -type d -exec rmdir {} \; 2>/dev/null || true; fi
  done
  if ip netns list | grep -qw "$NODE2_NETNS"; then
    # Deleting the namespace would delete the veth pair, and with it the first node's address.
    ip -n "$NODE2_NETNS" link set uplink1 netns "$NETNS" 2>/dev/null || true
    ip netns delete "$NODE2_NETNS"
  fi
  if ip netns list | grep -qw "$NETNS"; then
    ip -n "$NETNS" link set uplink1 up 2>/dev/null || true
    ip -n "$NETNS" route del "$NODE2_POD_CIDR" 2>/dev/null || true
    kc delete node "$NODE2_NAME" --ignore-not-found >/dev/null 2>&1 || true
  fi
  rm -rf "$NODE_STATE" "$NODE_RUN"
  log "leave: node 2 stopped and removed"
}

keda_pki() {
  local d=$STATE/keda-certs
  mkdir -p "$d"
  ca "$d" ca keda-e2e-ca
  cert "$d" tls /CN=keda-operator.keda.svc ca "subjectAltName=IP:$NODE_IP,DNS:keda-operator.keda.svc,\
DNS:keda-metrics-apiserver.keda.svc,DNS:localhost
extendedKeyUsage=serverAuth,clientAuth"
}

import_images() {
  local tar
  for tar in "$@"; do
    log "importing $(basename "$tar") ($(du -h "$tar" | cut -f1))"
    ctr --address "$SOCK" -n k8s.io images import --no-unpack=false "$tar" >/dev/null
  done
}

logs() {
  local c
  for c in "${COMPONENTS[@]}"; do
    [ -f "$STATE/logs/$c.log" ] || continue
    echo "----- $c (last ${LOG_LINES:-25} lines; full log $STATE/logs/$c.log)"
    grep -v -e 'Failed to set rlimit on max file handles' -e 'perf_event' "$STATE/logs/$c.log" | tail -n "${LOG_LINES:-25}"
  done
}

# Stop one component: TERM, up to $2 seconds, then KILL.
stop() {
  local name=$1 grace=${2:-10} pid
  [ -f "$RUN/$name.pid" ] || return 0
  pid=$(cat "$RUN/$name.pid")
  # setsid made the nsenter'd process a group leader: signal its whole group.
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq $((grace * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$RUN/$name.pid"
}

down() {
  local c
  if [ -d "$STATE/node2" ] || ip netns list 2>/dev/null | grep -qw "$NODE2_NETNS"; then (leave) || true; fi
  for c in "${ROLLOUTS[@]}" "${FLEET[@]}" "${KEDA[@]}" "${METRICS[@]}" "${DNS[@]}" "${REGISTRY[@]}" "${POLICY[@]}"; do stop "$c"; done
  stop kube-proxy; stop kubelet; stop kube-scheduler; stop kube-controller-manager
  if running containerd; then
    # Every container and sandbox the kubelet left: kill its tasks, then let containerd go.
    local ids
    ids=$(ctr --address "$SOCK" -n k8s.io tasks list -q 2>/dev/null || true)
    for id in $ids; do ctr --address "$SOCK" -n k8s.io tasks kill -s KILL "$id" >/dev/null 2>&1 || true; done
    sleep 1
    for id in $ids; do ctr --address "$SOCK" -n k8s.io tasks delete -f "$id" >/dev/null 2>&1 || true; done
  fi
  # The shims outlive containerd by design; they live in its state folder's namespace.
  pkill -KILL -f "containerd-shim-runc-v2 -namespace k8s.io .*-address $SOCK" 2>/dev/null || true
  stop containerd; stop kube-apiserver 15; stop etcd
  # Mounts under our folders (volumes, rootfs overlays, sandbox shm), deepest first.
  awk -v s="$STATE" -v r="$RUN" '$2 ~ "^(" s "|" r ")/" {print $2}' /proc/self/mounts | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  # The cgroups the kubelet and runc made under each v1 hierarchy (empty now), deepest first.
  local h
  for h in /sys/fs/cgroup/*/; do
    [ -d "${h}kubepods" ] || continue
    find "${h}kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  ip netns list 2>/dev/null | grep -qw "$NETNS" && ip netns delete "$NETNS"
  if [ -f "$STATE/netns.before" ]; then
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^cni-/ {print $1}'); do
      grep -qx "$ns" "$STATE/netns.before" || ip netns delete "$ns" 2>/dev/null || true
    done
  fi
  if [ -f "$STATE/host.saved" ]; then
    while IFS='=' read -r key value; do
      case $key in
        created) rm -rf "$value" ;;
        *) sysctl -qw "$key=$value" ;;
      esac
    done < "$STATE/host.saved"
  fi
  rm -rf "$RUN" "$STATE"
  log "down: stopped every component and restored the host"
}

case ${1:-} in
  preflight) preflight ;;
  up) up ;;
  import) shift; import_images "$@" ;;
  metrics) metrics ;;
  keda) keda ;;
  fleet) fleet ;;
  rollouts) rollouts ;;
  policy) policy ;;
  registry) registry ;;
  dns) dns ;;
  knative) knative ;;
  join) shift; join "$@" ;;
  lose) lose ;;
  leave) leave ;;
  logs) logs ;;
  down) down ;;
  *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
