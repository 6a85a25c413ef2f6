{{- define "loadtest.fullname" -}}
{{- default (printf "%s-%s" .Release.Name (default .Chart.Name .Values.nameOverride)) .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "loadtest.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "loadtest.selectorLabels" -}}
app.kubernetes.io/name: {{ default .ctx.Chart.Name .ctx.Values.nameOverride }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "loadtest.image" -}}
{{- $name := ternary (printf "%s/%s" .registry .repository) .repository (ne (toString .registry) "") }}
{{- if .digest }}{{ printf "%s@%s" $name .digest }}{{ else }}{{ printf "%s:%s" $name (toString .tag) }}{{ end }}
{{- end }}

{{/* LOCUST_HOST: target.host, else the gateway Service of the clip-triton release target.release. */}}
{{- define "loadtest.host" -}}
{{- if .Values.target.host }}{{ .Values.target.host }}
{{- else }}
{{- $gw := printf "%s-clip-triton-gateway" (required "target.release (the clip-triton release) or target.host is required" .Values.target.release) }}
{{- if contains "clip-triton" .Values.target.release }}{{ $gw = printf "%s-gateway" .Values.target.release }}{{ end }}
{{- if eq .Values.protocol "grpc" }}grpc://{{ $gw }}:{{ .Values.target.grpcPort }}{{ else }}http://{{ $gw }}:{{ .Values.target.httpPort }}{{ end }}
{{- end }}
{{- end }}
