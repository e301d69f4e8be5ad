{{/* Chart name, shortened to the 63 characters Kubernetes allows in names and labels. */}}
{{- define "eva-ws.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name of every object: <release>-<chart>, or the release name when it already holds the chart name. */}}
{{- define "eva-ws.fullname" -}}
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

{{- define "eva-ws.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eva-ws.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "eva-ws.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "eva-ws.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: eva-ws
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* metadata.annotations body shared by every object (may be empty). */}}
{{- define "eva-ws.annotations" -}}
{{- with .Values.commonAnnotations }}
{{- toYaml . }}
{{- end }}
{{- end -}}

{{- define "eva-ws.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "eva-ws.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret the operator manages; the chart only references it. */}}
{{- define "eva-ws.secretName" -}}
{{- default (include "eva-ws.fullname" .) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "eva-ws.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
Seconds Kubernetes waits between the start of termination and SIGKILL: the preStop sleep, then
the pod's own drain (EVA_WS_DRAIN_DELAY_S, then 1012 closes over EVA_WS_DRAIN_SPREAD_S), plus a margin
for the last socket writes and process exit.
*/}}
{{- define "eva-ws.terminationGracePeriodSeconds" -}}
{{- $drain := add (ceil .Values.config.drainDelayS | int) (ceil .Values.config.drainSpreadS | int) -}}
{{- add .Values.lifecycle.preStopSleepSeconds $drain .Values.lifecycle.shutdownMarginSeconds -}}
{{- end -}}

{{- define "eva-ws.alertSelector" -}}
namespace="{{ .Release.Namespace }}",job="{{ include "eva-ws.fullname" . }}"
{{- end -}}

{{/* Combinations the schema cannot express; each would leave pods that never start or never share events. */}}
{{- define "eva-ws.validate" -}}
{{- if eq (int .Values.config.port) (int .Values.config.opsPort) -}}
{{- fail "config.opsPort must differ from config.port: probes and /metrics live on the ops port" -}}
{{- end -}}
{{- if and (not .Values.redis.urlKey) (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) -}}
{{- fail "redis.urlKey is empty (embedded broker) but more than one pod is requested: pods would not see each other's events; set redis.urlKey or replicaCount=1" -}}
{{- end -}}
{{- $hmac := 0 -}}
{{- range .Values.config.jwtAlgorithms -}}
{{- if hasPrefix "HS" . -}}{{- $hmac = add1 $hmac -}}{{- end -}}
{{- end -}}
{{- if and (gt $hmac 0) (lt $hmac (len .Values.config.jwtAlgorithms)) -}}
{{- fail "config.jwtAlgorithms mixes HMAC (HS*) and public-key algorithms" -}}
{{- end -}}
{{- if and (gt $hmac 0) (not (or .Values.auth.jwtSecretKey .Values.auth.jwtKeysKey)) -}}
{{- fail "config.jwtAlgorithms are HMAC: set auth.jwtSecretKey (EVA_WS_JWT_SECRET) or auth.jwtKeysKey (EVA_WS_JWT_KEYS) to a key of the Secret" -}}
{{- end -}}
{{- if and (gt $hmac 0) .Values.config.jwksUrl -}}
{{- fail "config.jwksUrl needs public-key config.jwtAlgorithms: JWKS keys are public keys" -}}
{{- end -}}
{{- if and (eq $hmac 0) (not (or .Values.auth.jwtPublicKeyKey .Values.auth.jwtKeysKey .Values.config.jwksUrl)) -}}
{{- fail "config.jwtAlgorithms are public-key algorithms: set auth.jwtPublicKeyKey (EVA_WS_JWT_PUBLIC_KEY), auth.jwtKeysKey (EVA_WS_JWT_KEYS) or config.jwksUrl" -}}
{{- end -}}
{{- if le (float64 .Values.config.brokerCanaryMaxLagS) (float64 .Values.config.brokerCanaryIntervalS) -}}
{{- fail "config.brokerCanaryMaxLagS must be longer than config.brokerCanaryIntervalS, or pods are never ready" -}}
{{- end -}}
{{- end -}}
