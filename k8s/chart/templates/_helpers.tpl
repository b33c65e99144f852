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
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}
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
