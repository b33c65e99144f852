{{/* Chart name, overridable. */}}
{{- define "tsm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "tsm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tsm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tsm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tsm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "tsm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: inference
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "tsm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tsm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image reference: digest when given, else the pinned tag. */}}
{{- define "tsm.image" -}}
{{- include "tsm.imageRef" .Values.image -}}
{{- end -}}

{{/* The in-pod tool (scripts/pod.py) as the image installs it. */}}
{{- define "tsm.podTool" -}}
/opt/torchserve-k8s/pod.py
{{- end -}}

{{/* The user and group the pods run as; omitted when podSecurity.runAsUser is null, so that
OpenShift's restricted SCC can assign its arbitrary UID (the image writes only to volumes). */}}
{{- define "tsm.runAs" -}}
{{- with .Values.podSecurity.runAsUser }}
runAsUser: {{ . }}
runAsGroup: {{ . }}
{{- end }}
{{- end -}}

{{/* Security context every container shares: non-root, read-only root, no capabilities. */}}
{{- define "tsm.containerSecurityContext" -}}
runAsNonRoot: true
{{- include "tsm.runAs" . }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The per-pod request-rate target of one served model; a served model without one is an error. */}}
{{- define "tsm.rateTarget" -}}
{{- $root := index . 0 -}}{{- $model := index . 1 -}}
{{- $t := index $root.Values.autoscaling.targetRequestsPerSecond $model -}}
{{- if not $t -}}
{{- fail (printf "autoscaling.targetRequestsPerSecond has no entry for model %s (models.names)" $model) -}}
{{- end -}}
{{- $t -}}
{{- end -}}

{{/* The serving groups, each resolved against the release-wide values, as JSON:
name -> {models, replicaCount, resources, gpu, minReplicas, maxReplicas, maxUnavailable, source,
image, canary, serverless}. A key a group sets replaces the release-wide value of the same name. Refuses, in
one line naming the group: a group with no models, a model not in models.names, a model in two
Deployment groups (a serverless group may serve a model another group serves too: Knative routes
one protocol per revision, so REST and gRPC on h2c are two groups). allInOnePod replaces the groups with one, "all", serving every model in each pod. */}}
{{- define "tsm.groups" -}}
{{- $v := .Values -}}
{{- $groups := $v.groups | default dict -}}
{{- if $v.allInOnePod }}{{ $groups = dict "all" (dict "models" $v.models.names) }}{{ end -}}
{{- if not $groups }}{{ fail "groups: no group, so no model would be served (set groups, or allInOnePod=true)" }}{{ end -}}
{{- $owner := dict -}}
{{- $out := dict -}}
{{- range $name, $g := $groups -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,28}[a-z0-9])?$" $name) -}}
{{- fail (printf "groups.%s: a group name is a DNS label of at most 30 characters (a-z, 0-9, -)" $name) -}}
{{- end -}}
{{- $g = $g | default dict -}}
{{- $models := compact ($g.models | default list) -}}
{{- if not $models }}{{ fail (printf "groups.%s: lists no models" $name) }}{{ end -}}
{{- range $m := $models -}}
{{- if not (has $m $v.models.names) -}}
{{- fail (printf "groups.%s: model %s is not in models.names (the archives in the model source's manifest.json)" $name $m) -}}
{{- end -}}
{{- if not (dig "serverless" "enabled" $v.serverless.enabled $g) -}}
{{- if hasKey $owner $m }}{{ fail (printf "groups.%s: model %s is already served by group %s" $name $m (get $owner $m)) }}{{ end -}}
{{- $_ := set $owner $m $name -}}
{{- end -}}
{{- end -}}
{{- $source := dict
  "type" (dig "modelSource" "type" $v.models.source.type $g)
  "url" (dig "modelSource" "url" $v.models.source.url $g)
  "imagePath" (dig "modelSource" "imagePath" $v.models.source.imagePath $g)
  "pvc" (dig "modelSource" "pvc" $v.models.source.pvc $g)
  "bearerTokenSecret" (dig "modelSource" "bearerTokenSecret" $v.models.source.bearerTokenSecret $g) -}}
{{- $image := dict
  "repository" (dig "image" "repository" $v.image.repository $g)
  "tag" (dig "image" "tag" $v.image.tag $g)
  "digest" (dig "image" "digest" $v.image.digest $g)
  "pullPolicy" (dig "image" "pullPolicy" $v.image.pullPolicy $g) -}}
{{- $canary := dict
  "enabled" (dig "canary" "enabled" false $g)
  "replicas" (dig "canary" "replicas" 1 $g)
  "source" (dict
    "type" (dig "canary" "modelSource" "type" $source.type $g)
    "url" (dig "canary" "modelSource" "url" $source.url $g)
    "imagePath" (dig "canary" "modelSource" "imagePath" $source.imagePath $g)
    "pvc" (dig "canary" "modelSource" "pvc" $source.pvc $g)
    "bearerTokenSecret" (dig "canary" "modelSource" "bearerTokenSecret" $source.bearerTokenSecret $g))
  "image" (dict
    "repository" (dig "canary" "image" "repository" $image.repository $g)
    "tag" (dig "canary" "image" "tag" $image.tag $g)
    "digest" (dig "canary" "image" "digest" $image.digest $g)
    "pullPolicy" (dig "canary" "image" "pullPolicy" $image.pullPolicy $g)) -}}
{{- $sv := $v.serverless -}}
{{- $target := dig "serverless" "targetConcurrency" "" $g -}}
{{- if not $target -}}
{{- range $m := $models -}}
{{- $t := index $sv.targetConcurrency $m | default 0 -}}
{{- if and (dig "serverless" "enabled" $sv.enabled $g) (not $t) -}}
{{- fail (printf "groups.%s: serverless, and model %s has no serverless.targetConcurrency (set serverless.targetConcurrency.%s, or the group's serverless.targetConcurrency)" $name $m $m) -}}
{{- end -}}
{{- if or (not $target) (and $t (lt (float64 $t) (float64 $target))) }}{{ $target = $t }}{{ end -}}
{{- end -}}
{{- end -}}
{{- $serverless := dict
  "enabled" (dig "serverless" "enabled" $sv.enabled $g)
  "protocol" (dig "serverless" "protocol" $sv.protocol $g)
  "minScale" (dig "serverless" "minScale" $sv.minScale $g)
  "maxScale" (dig "serverless" "maxScale" $sv.maxScale $g)
  "targetConcurrency" $target
  "window" (dig "serverless" "window" $sv.window $g)
  "scaleToZeroRetention" (dig "serverless" "scaleToZeroRetention" $sv.scaleToZeroRetention $g)
  "timeoutSeconds" (dig "serverless" "timeoutSeconds" $sv.timeoutSeconds $g) -}}
{{- if and $serverless.enabled $canary.enabled -}}
{{- fail (printf "groups.%s: serverless and canary together: a Knative Service rolls out its own revisions" $name) -}}
{{- end -}}
{{- $rollout := dict
  "enabled" (dig "rollout" "enabled" $v.rollout.enabled $g)
  "canaryWeights" (dig "rollout" "canaryWeights" $v.rollout.canaryWeights $g)
  "analysis" (mergeOverwrite (deepCopy $v.rollout.analysis) (dig "rollout" "analysis" dict $g))
  "qualityGate" (mergeOverwrite (deepCopy $v.rollout.qualityGate) (dig "rollout" "qualityGate" dict $g)) -}}
{{- if and $rollout.enabled $serverless.enabled -}}
{{- fail (printf "groups.%s: serverless and rollout together: a Knative Service rolls out its own revisions" $name) -}}
{{- end -}}
{{- if and $rollout.enabled $rollout.qualityGate.enabled $v.torchserve.tokenAuth -}}
{{- fail (printf "groups.%s: the rollout's quality gate calls the pods without a token: it needs torchserve.tokenAuth=false (NetworkPolicy limits the callers), or rollout.qualityGate.enabled=false" $name) -}}
{{- end -}}
{{- if and $rollout.enabled $canary.enabled -}}
{{- fail (printf "groups.%s: rollout and canary together: the Rollout runs the canary itself (leave canary.enabled off)" $name) -}}
{{- end -}}
{{- $_ := set $out $name (dict
  "models" $models
  "replicaCount" (dig "replicaCount" $v.replicaCount $g)
  "resources" (dig "resources" $v.resources $g)
  "gpu" (dict "count" (dig "gpu" "count" $v.gpu.count $g) "resourceName" (dig "gpu" "resourceName" $v.gpu.resourceName $g))
  "minReplicas" (dig "autoscaling" "minReplicas" $v.autoscaling.minReplicas $g)
  "maxReplicas" (dig "autoscaling" "maxReplicas" $v.autoscaling.maxReplicas $g)
  "maxUnavailable" (dig "podDisruptionBudget" "maxUnavailable" $v.podDisruptionBudget.maxUnavailable $g)
  "source" $source
  "image" $image
  "canary" $canary
  "rollout" $rollout
  "serverless" $serverless) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* The groups of tsm.groups that run as Deployments (with their Services, HPA or ScaledObject and
PDB), and those that run as Knative Services (serverless.enabled), each as JSON. */}}
{{- define "tsm.deploymentGroups" -}}
{{- $out := dict -}}
{{- range $name, $g := include "tsm.groups" . | fromJson }}{{ if not $g.serverless.enabled }}{{ $_ := set $out $name $g }}{{ end }}{{ end -}}
{{- toJson $out -}}
{{- end -}}
{{- define "tsm.serverlessGroups" -}}
{{- $out := dict -}}
{{- range $name, $g := include "tsm.groups" . | fromJson }}{{ if $g.serverless.enabled }}{{ $_ := set $out $name $g }}{{ end }}{{ end -}}
{{- toJson $out -}}
{{- end -}}

{{/* <fullname>-<suffix>, the fullname cut so that the whole stays within 63 characters. */}}
{{- define "tsm.nameWith" -}}
{{- $suffix := index . 1 -}}
{{- printf "%s-%s" (include "tsm.fullname" (index . 0) | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix -}}
{{- end -}}

{{/* <fullname>-<group>: a group's Deployment, Services, HPA, PDB and ConfigMap. The fullname is cut
first, so that a long release name never cuts the group away (which made two groups' objects one),
and 7 characters are left for the suffixes (-grpc, -canary, -config): every name stays within 63. */}}
{{- define "tsm.groupName" -}}
{{- $group := index . 1 -}}
{{- printf "%s-%s" (include "tsm.fullname" (index . 0) | trunc (int (sub 55 (len $group))) | trimSuffix "-") $group -}}
{{- end -}}

{{/* Selector labels of one group's pods, every track (the group's Services select these). */}}
{{- define "tsm.groupSelectorLabels" -}}
{{ include "tsm.selectorLabels" (index . 0) }}
torchserve-models/group: {{ index . 1 }}
{{- end -}}

{{/* An image reference from a resolved {repository, tag, digest}. */}}
{{- define "tsm.imageRef" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
{{- end -}}

{{/* config.properties of a pod serving the given models: files/config.properties with the pod's
own settings replacing the keys they name. */}}
{{- define "tsm.configProperties" -}}
{{- $root := index . 0 -}}{{- $models := index . 1 -}}
{{- $base := $root.Files.Get "files/config.properties" -}}
{{- $mgmt := ternary "0.0.0.0" "127.0.0.1" $root.Values.torchserve.exposeManagementApi -}}
{{- $vmargs := regexReplaceAll "-Xmx[^ ]+" (regexFind "(?m)^vmargs=.*$" $base | trimPrefix "vmargs=") (printf "-Xmx%s" $root.Values.torchserve.jvmHeap) -}}
{{- $loads := list -}}
{{- range ($models | sortAlpha) }}{{ $loads = append $loads (printf "%s=%s.mar" . .) }}{{ end -}}
{{- $pod := dict
  "inference_address" "http://0.0.0.0:8080"
  "grpc_inference_address" "0.0.0.0"
  "grpc_inference_port" "7070"
  "management_address" (printf "http://%s:8081" $mgmt)
  "grpc_management_address" $mgmt
  "grpc_management_port" "7071"
  "metrics_address" "http://0.0.0.0:8082"
  "model_store" "/home/model-server/model-store"
  "load_models" (join "," $loads)
  "disable_token_authorization" (toString (not $root.Values.torchserve.tokenAuth))
  "job_queue_size" (toString $root.Values.torchserve.jobQueueSize)
  "vmargs" (trim (printf "%s %s" $vmargs $root.Values.torchserve.jvmOptions))
  "grpc_inference_max_connection_age_ms" (toString (mul $root.Values.drain.grpcConnectionAgeSeconds 1000))
  "grpc_inference_max_connection_age_grace_ms" (toString (mul $root.Values.drain.timeoutSeconds 1000))
-}}
{{- $pod = mergeOverwrite $pod ($root.Values.torchserve.extraConfig | default dict) -}}
{{- range splitList "\n" $base }}
{{- if not (hasKey $pod (trim (first (splitList "=" .)))) }}
{{ . }}
{{- end }}
{{- end }}
# Set by the chart for the pod. Inference and gRPC listen on all interfaces (the Service and
# NetworkPolicy decide who reaches them); management stays on localhost, for the probes and
# preStop inside the pod. load_models takes name=file entries: a bare name is read as a file.
{{- range $k, $v := $pod }}
{{ $k }}={{ $v }}
{{- end }}
{{- end -}}

{{/*
How long the preStop drain waits before it looks at the queue: for the Services to stop routing
new connections here, then for every gRPC connection still open to reach its maximum age and be
closed (GOAWAY), so its client reconnects to another pod; 1 s for the server's jitter on that age.
*/}}
{{- define "tsm.drainSettle" -}}
{{ add .Values.drain.settleSeconds .Values.drain.grpcConnectionAgeSeconds 1 }}
{{- end }}

{{/*
The HPA's scaling behaviour, shared by the chart's HPA and the one KEDA makes from the ScaledObject:
scale up at once (double, or two pods, per 30 s), scale down one pod at a time after the window.
*/}}
{{- define "tsm.hpaBehavior" -}}
scaleUp:
  stabilizationWindowSeconds: {{ .Values.autoscaling.scaleUpWindowSeconds }}
  selectPolicy: Max
  policies:
    - type: Percent
      value: 100
      periodSeconds: 30
    - type: Pods
      value: 2
      periodSeconds: 30
scaleDown:
  stabilizationWindowSeconds: {{ .Values.autoscaling.scaleDownWindowSeconds }}
  selectPolicy: Min
  policies:
    - type: Pods
      value: 1
      periodSeconds: {{ .Values.autoscaling.scaleDownPeriodSeconds }}
{{- end }}
