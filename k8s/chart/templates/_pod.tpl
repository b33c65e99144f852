{{- /* The pod pieces a group's Deployment (deployment.yaml) and its Knative Service (knative-service.yaml)
share. Each takes a dict: root (the chart's top context), group (its name), g (the group, from
tsm.groups), source and image (the track's model source and image). */ -}}

{{/* The pod's security context: non-root, the model-server user, RuntimeDefault seccomp. */}}
{{- define "tsm.podSecurityContext" -}}
{{- $g := .g }}{{- $source := .source }}{{- $image := .image }}{{- $group := .group }}{{- $gpu := int $g.gpu.count }}
{{- with .root -}}
runAsNonRoot: true
{{- include "tsm.runAs" . | nindent 0 }}
{{- with .Values.podSecurity.runAsUser }}
fsGroup: {{ . }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}
{{- end -}}

{{/* The init container that copies or downloads the group's archives and checks them. */}}
{{- define "tsm.fetchModelsContainer" -}}
{{- $g := .g }}{{- $source := .source }}{{- $image := .image }}{{- $group := .group }}{{- $gpu := int $g.gpu.count }}
{{- with .root -}}
- name: fetch-models
  image: {{ include "tsm.imageRef" $image }}
  imagePullPolicy: {{ $image.pullPolicy }}
  # Copies or downloads each archive, checks size and sha256 against manifest.json, and
  # fails the pod on any mismatch: a bad archive is never served.
  command: ["python3", {{ include "tsm.podTool" . | quote }}, "fetch", "--dest", "/home/model-server/model-store",
            "--models", {{ range $i, $m := $g.models }}{{ if $i }}, {{ end }}{{ $m | quote }}{{ end }}]
  env:
    - name: MODEL_SOURCE
      value: {{ if eq $source.type "url" }}{{ $source.url | quote }}{{ else if eq $source.type "pvc" }}"/mnt/model-source"{{ else }}{{ $source.imagePath | quote }}{{ end }}
    {{- if $source.bearerTokenSecret }}
    - name: MODEL_SOURCE_BEARER_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $source.bearerTokenSecret }}
          key: token
    {{- end }}
  securityContext:
    {{- include "tsm.containerSecurityContext" . | nindent 4 }}
  resources:
    requests:
      cpu: 100m
      memory: 128Mi
    limits:
      cpu: "1"
      memory: 256Mi
  volumeMounts:
    - name: model-store
      mountPath: /home/model-server/model-store
    {{- if eq $source.type "pvc" }}
    - name: model-source
      mountPath: /mnt/model-source
      subPath: {{ $source.pvc.subPath | default "" | quote }}
      readOnly: true
    {{- end }}
{{- end }}
{{- end -}}

{{/* The TorchServe container: name, image, command and environment. */}}
{{- define "tsm.torchserveHead" -}}
{{- $g := .g }}{{- $source := .source }}{{- $image := .image }}{{- $group := .group }}{{- $gpu := int $g.gpu.count }}
{{- with .root -}}
- name: torchserve
  image: {{ include "tsm.imageRef" $image }}
  imagePullPolicy: {{ $image.pullPolicy }}
  workingDir: /home/model-server/tmp  # writable: TorchServe writes key_file.json to its cwd
  # dumb-init (PID 1) forwards SIGTERM; `pod.py serve` clears the previous container's drain
  # state, then stays until the JVM has shut down cleanly.
  command: ["dumb-init", "--", "python3", {{ include "tsm.podTool" . | quote }}, "serve", "--", "--ncs",
            "--model-store", "/home/model-server/model-store",
            "--ts-config", "/etc/torchserve/config.properties",
            "--log-config", "/opt/torchserve-k8s/log4j2.xml"]
  env:
    - name: LOG_LOCATION
      value: /home/model-server/logs
    - name: METRICS_LOCATION
      value: /home/model-server/logs
    - name: TEMP
      value: /home/model-server/tmp
    - name: TS_KEY_FILE
      value: /home/model-server/tmp/key_file.json
    # Workers mark a running batch here; the preStop drain waits for these (scripts/pod.py).
    - name: TS_BUSY_DIR
      value: /tmp
    # Idle OpenMP threads sleep rather than spin on the cores the frontend needs (make bench).
    - name: OMP_WAIT_POLICY
      value: PASSIVE
{{- end }}
{{- end -}}

{{/* The TorchServe container: resources (GPUs added), security context, mounts. */}}
{{- define "tsm.torchserveTail" -}}
{{- $g := .g }}{{- $source := .source }}{{- $image := .image }}{{- $group := .group }}{{- $gpu := int $g.gpu.count }}
{{- with .root -}}
resources:
  requests:
    {{- toYaml $g.resources.requests | nindent 4 }}
    {{- if gt $gpu 0 }}
    {{ $g.gpu.resourceName }}: {{ $gpu | quote }}
    {{- end }}
  limits:
    {{- toYaml $g.resources.limits | nindent 4 }}
    {{- if gt $gpu 0 }}
    {{ $g.gpu.resourceName }}: {{ $gpu | quote }}
    {{- end }}
securityContext:
  {{- include "tsm.containerSecurityContext" . | nindent 2 }}
volumeMounts:
  - name: config
    mountPath: /etc/torchserve
    readOnly: true
  - name: model-store
    mountPath: /home/model-server/model-store
    readOnly: true
  - name: home
    mountPath: /home/model-server/tmp
    subPath: tmp
  - name: home
    mountPath: /home/model-server/logs
    subPath: logs
  - name: tmp
    mountPath: /tmp
{{- end }}
{{- end -}}

{{/* The pod's volumes: the group's config, the model store, scratch, the model source's claim. */}}
{{- define "tsm.podVolumes" -}}
{{- $g := .g }}{{- $source := .source }}{{- $image := .image }}{{- $group := .group }}{{- $gpu := int $g.gpu.count }}
{{- with .root -}}
- name: config
  configMap:
    name: {{ include "tsm.groupName" (list . $group) }}-config
- name: model-store
  emptyDir:
    sizeLimit: 4Gi
- name: home
  emptyDir:
    sizeLimit: 8Gi  # TorchServe unpacks each archive under tmp
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- if eq $source.type "pvc" }}
- name: model-source
  persistentVolumeClaim:
    claimName: {{ $source.pvc.claimName }}
    readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/* Where the pod may run: GPU node selector and tolerations, node-failure tolerations, affinity, spread. */}}
{{- define "tsm.podScheduling" -}}
{{- $g := .g }}{{- $source := .source }}{{- $image := .image }}{{- $group := .group }}{{- $gpu := int $g.gpu.count }}
{{- with .root -}}
{{- if gt $gpu 0 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- $nodeFailure := .Values.nodeFailureTolerationSeconds }}
{{- if or (and (gt $gpu 0) .Values.tolerations) (not (kindIs "invalid" $nodeFailure)) }}
tolerations:
  {{- if not (kindIs "invalid" $nodeFailure) }}
  # Off a failed node after nodeFailureTolerationSeconds, not Kubernetes's default 300 s.
  {{- range list "node.kubernetes.io/unreachable" "node.kubernetes.io/not-ready" }}
  - key: {{ . }}
    operator: Exists
    effect: NoExecute
    tolerationSeconds: {{ $nodeFailure }}
  {{- end }}
  {{- end }}
  {{- if gt $gpu 0 }}
  {{- with .Values.tolerations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- end }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $zone := .Values.topologySpread.zone.whenUnsatisfiable }}
{{- if or .Values.topologySpread.enabled $zone }}
# Each constraint counts the pods of this Deployment's revision only (pod-template-hash), so
# a rollout's new pods are spread among themselves, not around the old ones.
topologySpreadConstraints:
  {{- if .Values.topologySpread.enabled }}
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "tsm.groupSelectorLabels" (list . $group) | nindent 8 }}
    matchLabelKeys: [pod-template-hash]
  {{- end }}
  {{- if $zone }}
  - maxSkew: {{ .Values.topologySpread.zone.maxSkew }}
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: {{ $zone }}
    labelSelector:
      matchLabels:
        {{- include "tsm.groupSelectorLabels" (list . $group) | nindent 8 }}
    matchLabelKeys: [pod-template-hash]
  {{- end }}
{{- end }}
{{- end }}
{{- end -}}
