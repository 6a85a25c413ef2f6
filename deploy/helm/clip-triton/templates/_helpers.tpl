{{/* Names and labels shared by every object of the chart. */}}
{{- define "clip-triton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "clip-triton.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "clip-triton.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "clip-triton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* selectorLabels: pass (dict "ctx" $ "component" "triton") */}}
{{- define "clip-triton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "clip-triton.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "clip-triton.image" -}}
{{- printf "%s:%s" .repository .tag }}
{{- end }}

{{- define "clip-triton.tritonHeadless" -}}
{{- printf "%s-triton-headless" (include "clip-triton.fullname" .) }}
{{- end }}

{{- define "clip-triton.gatewayService" -}}
{{- printf "%s-gateway" (include "clip-triton.fullname" .) }}
{{- end }}

{{- define "clip-triton.adminSecret" -}}
{{- default (printf "%s-admin" (include "clip-triton.fullname" .)) .Values.triton.adminKey.existingSecret }}
{{- end }}

{{/* The PVC holding the repository (source build or pvc). */}}
{{- define "clip-triton.repositoryClaim" -}}
{{- default (printf "%s-models" (include "clip-triton.fullname" .)) .Values.modelRepository.pvc.existingClaim }}
{{- end }}

{{- define "clip-triton.localRepository" -}}
{{- if has .Values.modelRepository.source (list "build" "pvc") }}true{{ end }}
{{- end }}

{{/* --model-repository for tritonserver */}}
{{- define "clip-triton.repositoryPath" -}}
{{- if include "clip-triton.localRepository" . }}/models{{ else }}{{ required "modelRepository.uri is required for source s3/gs" .Values.modelRepository.uri }}{{ end }}
{{- end }}
