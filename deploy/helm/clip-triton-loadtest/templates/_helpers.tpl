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

{{/* The clip-triton release's fullname, computed as its chart does (clip-triton.fullname): target.fullname when that
release set fullnameOverride/nameOverride. Empty without target.release. */}}
{{- define "loadtest.targetFullname" -}}
{{- $t := .Values.target }}
{{- if $t.fullname }}{{ $t.fullname }}
{{- else if $t.release }}
{{- $full := ternary $t.release (printf "%s-clip-triton" $t.release) (contains "clip-triton" $t.release) }}
{{- if gt (len $full) 40 }}{{ printf "%s-%s" ($full | trunc 33 | trimSuffix "-") (sha256sum $full | trunc 6) }}
{{- else }}{{ $full | trimSuffix "-" }}{{ end }}
{{- end }}
{{- end }}

{{/* LOCUST_HOST: target.host, else the gateway Service of the clip-triton release (https:// / grpcs:// when
target.tls.enabled, as that chart's default gateway). */}}
{{- define "loadtest.host" -}}
{{- if .Values.target.host }}{{ .Values.target.host }}
{{- else }}
{{- $full := include "loadtest.targetFullname" . }}
{{- $gw := printf "%s-gateway" (required "target.release (the clip-triton release) or target.host is required" $full) }}
{{- $s := ternary "s" "" .Values.target.tls.enabled }}
{{- if eq .Values.protocol "grpc" }}grpc{{ $s }}://{{ $gw }}:{{ .Values.target.grpcPort }}{{ else }}http{{ $s }}://{{ $gw }}:{{ .Values.target.httpPort }}{{ end }}
{{- end }}
{{- end }}

{{/* The Secret with the gateway's API keys: target.auth.existingSecret (= that release's gateway.auth.existingSecret),
else the one the clip-triton chart generates, <fullname>-api-keys. */}}
{{- define "loadtest.apiKeySecret" -}}
{{- $full := include "loadtest.targetFullname" . }}
{{- .Values.target.auth.existingSecret | default (printf "%s-api-keys" (required "target.auth.existingSecret or target.release is required for target.auth.enabled" $full)) }}
{{- end }}

{{/* The Secret with the gateway's CA (ca.crt): target.tls.existingSecret (= gateway.tls.existingSecret), else the
one the clip-triton chart generates, <fullname>-gateway-tls. */}}
{{- define "loadtest.tlsSecret" -}}
{{- $full := include "loadtest.targetFullname" . }}
{{- .Values.target.tls.existingSecret | default (printf "%s-gateway-tls" (required "target.tls.existingSecret or target.release is required for target.tls.caKey" $full)) }}
{{- end }}

{{/* CLIP_LT_* settings: the master's custom options override the workers' at each spawn, so both get the same. */}}
{{- define "loadtest.env" -}}
{{- $t := .Values.target -}}
- {name: CLIP_LT_MIX, value: {{ .Values.mix | quote }}}
- {name: CLIP_LT_IMAGE_SIZES, value: {{ .Values.imageSizes | quote }}}
{{- if and $t.tls.enabled $t.tls.caKey }}
- {name: CLIP_LT_CA_FILE, value: /etc/clip-triton/tls/ca.crt}
{{- end }}
{{- if $t.auth.enabled }}
- {name: CLIP_LT_API_KEY_FILE, value: /etc/clip-triton/api-keys/api-keys}
{{- end }}
{{- end }}

{{/* Values that would render but not run fail here. */}}
{{- define "loadtest.validate" -}}
{{- $t := .Values.target }}
{{- if and $t.host $t.tls.enabled (not (regexMatch "^(https|grpcs)://" $t.host)) }}
{{- fail (printf "target.host %q is plain text but target.tls.enabled=true: use https:// or grpcs://, or set target.tls.enabled=false" $t.host) }}
{{- end }}
{{- if and $t.host (not $t.tls.enabled) (regexMatch "^(https|grpcs)://" $t.host) }}
{{- fail (printf "target.host %q is TLS but target.tls.enabled=false: set it true (caKey \"\" for the system's CAs)" $t.host) }}
{{- end }}
{{- end }}
