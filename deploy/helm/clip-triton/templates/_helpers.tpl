{{/* Names and labels shared by every object of the chart. */}}
{{- define "clip-triton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* At most 40 characters (a longer name keeps 33 and adds 6 of its sha256), so that every object name, fullname plus
the longest suffix (-build-repository), and the names KServe derives from the InferenceService stay within the 63 of
a DNS label, for any release name Helm accepts (53). */}}
{{- define "clip-triton.fullname" -}}
{{- $full := .Values.fullnameOverride }}
{{- if not $full }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- $full = ternary .Release.Name (printf "%s-%s" .Release.Name $name) (contains $name .Release.Name) }}
{{- end }}
{{- if gt (len $full) 40 }}
{{- printf "%s-%s" ($full | trunc 33 | trimSuffix "-") (sha256sum $full | trunc 6) }}
{{- else }}
{{- $full | trimSuffix "-" }}
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

{{/* image: pass (dict "img" .Values.x.image "ctx" $): registry/repository, then @digest or :tag */}}
{{- define "clip-triton.image" -}}
{{- $registry := default .ctx.Values.imageRegistry .img.registry }}
{{- $name := ternary (printf "%s/%s" $registry .img.repository) .img.repository (ne (toString $registry) "") }}
{{- if .img.digest }}{{ printf "%s@%s" $name .img.digest }}{{ else }}{{ printf "%s:%s" $name (toString .img.tag) }}{{ end }}
{{- end }}

{{- define "clip-triton.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}{{ default (include "clip-triton.fullname" .) .Values.serviceAccount.name }}
{{- else }}{{ default "default" .Values.serviceAccount.name }}{{ end }}
{{- end }}

{{/* Pod metadata of a component: pass (dict "ctx" $ "component" "triton" "values" .Values.triton), optionally
"annotations" (dict ...) of the chart's own, merged over the component's podAnnotations. */}}
{{- define "clip-triton.podMetadata" -}}
labels: {{- include "clip-triton.labels" .ctx | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with .values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with merge (dict) (default (dict) .annotations) (default (dict) .values.podAnnotations) }}
annotations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* What the repository is built from: checkpoint, dtype, instance kind, limits, builder image, chart version. Its
hash keys the repository's folder in the PVC and the build Job's name; the Triton pods carry it as an annotation. */}}
{{- define "clip-triton.buildKey" -}}
{{- $b := .Values.modelRepository.build }}
{{- $what := dict "checkpoint" (toString $b.checkpoint) "dtype" (toString $b.dtype) "instanceKind" (toString $b.instanceKind) "limits" .Values.limits "image" (include "clip-triton.image" (dict "img" $b.image "ctx" .)) "chart" .Chart.Version }}
{{- toJson $what | sha256sum | trunc 12 }}
{{- end }}

{{/* source=build: the repository's folder under /models (the claim's subPath): <model>-<dtype>-<key>. */}}
{{- define "clip-triton.repositoryFolder" -}}
{{- if eq .Values.modelRepository.source "build" }}
{{- $b := .Values.modelRepository.build }}
{{- $model := regexReplaceAll "[^a-z0-9.-]+" (base (toString $b.checkpoint) | lower) "-" | trunc 40 | trimSuffix "-" }}
{{- printf "%s-%s-%s" $model (toString $b.dtype) (include "clip-triton.buildKey" .) }}
{{- end }}
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
{{- if include "clip-triton.localRepository" . }}/models{{ with include "clip-triton.repositoryFolder" . }}/{{ . }}{{ end }}{{ else }}{{ required "modelRepository.uri is required for source s3/gs" .Values.modelRepository.uri }}{{ end }}
{{- end }}

{{/* Build defaults of the request limits the gateway's body cap derives from (clip_runtime.params; a test keeps
them equal), the gateway's default cap (clip_server.gateway.DEFAULT_MAX_BODY_BYTES) and the names --limit takes
(clip_build.repository.BUILD_LIMITS). */}}
{{- define "clip-triton.limitDefaults" -}}
max_items_per_request: 64
max_text_bytes: 16384
max_image_bytes: 20971520
{{- end }}
{{- define "clip-triton.defaultMaxBodyBytes" -}}67108864{{- end }}
{{- define "clip-triton.limitNames" -}}
max_items_per_request max_text_bytes max_image_bytes max_pixels max_aspect_ratio allowed_formats jpeg_draft_gap decode_threads default_top_k
{{- end }}

{{/* The body cap the gateway will use: gateway.maxBodyBytes, else what `limits` allow, at most the default cap. */}}
{{- define "clip-triton.gatewayBodyCap" -}}
{{- if .Values.gateway.maxBodyBytes }}
{{- int64 .Values.gateway.maxBodyBytes }}
{{- else }}
{{- $l := include "clip-triton.limitDefaults" . | fromYaml }}
{{- range .Values.limits }}
{{- $kv := splitn "=" 2 (toString .) }}
{{- if hasKey $l $kv._0 }}{{ $_ := set $l $kv._0 (atoi $kv._1) }}{{ end }}
{{- end }}
{{- $derived := add (mul (int64 $l.max_items_per_request) (add (int64 $l.max_text_bytes) (int64 $l.max_image_bytes) 8)) 65536 }}
{{- min $derived (int64 (include "clip-triton.defaultMaxBodyBytes" .)) }}
{{- end }}
{{- end }}

{{/* Values that would render but not run fail here, at template time, with what to change. */}}
{{- define "clip-triton.validate" -}}
{{- $sources := list "build" "pvc" "s3" "gs" }}
{{- $source := .Values.modelRepository.source }}
{{- if not (has $source $sources) }}
{{- fail (printf "modelRepository.source must be one of %s, not %q" (join ", " $sources) (toString $source)) }}
{{- end }}
{{- if and (eq $source "pvc") (not .Values.modelRepository.pvc.existingClaim) }}
{{- fail "modelRepository.source=pvc needs modelRepository.pvc.existingClaim: the claim that holds the repository" }}
{{- end }}
{{- if and (has $source (list "s3" "gs")) (not (hasPrefix (printf "%s://" $source) (toString .Values.modelRepository.uri))) }}
{{- fail (printf "modelRepository.source=%s needs modelRepository.uri = %s://bucket/path, not %q" $source $source (toString .Values.modelRepository.uri)) }}
{{- end }}
{{- if and .Values.kserve.enabled (not (.Capabilities.APIVersions.Has "serving.kserve.io/v1beta1/InferenceService")) }}
{{- fail "kserve.enabled needs KServe's CRDs (serving.kserve.io/v1beta1 InferenceService) in the cluster: install KServe first" }}
{{- end }}
{{- $g := .Values.gateway }}
{{- if and $g.enabled (not .Values.kserve.enabled) (has (toString $g.service.type) (list "LoadBalancer" "NodePort")) (or (not $g.tls.enabled) (not $g.auth.enabled)) (not $g.allowInsecureExposure) }}
{{- fail (printf "gateway.service.type=%s with gateway.tls.enabled=%v and gateway.auth.enabled=%v would expose inference in plain text or without keys: keep both on, or set gateway.allowInsecureExposure=true" (toString $g.service.type) $g.tls.enabled $g.auth.enabled) }}
{{- end }}
{{- if and .Values.openai.enabled (not $g.enabled) (not .Values.kserve.enabled) }}
{{- fail "openai.enabled is served behind the gateway (Envoy routes /v1/*): it needs gateway.enabled=true" }}
{{- end }}
{{- $names := splitList " " (include "clip-triton.limitNames" .) }}
{{- range .Values.limits }}
{{- $kv := splitn "=" 2 (toString .) }}
{{- if or (not (has $kv._0 $names)) (not $kv._1) }}
{{- fail (printf "limits: %q is not NAME=VALUE with NAME one of %s" (toString .) (join ", " $names)) }}
{{- end }}
{{- if and (has $kv._0 (list "max_items_per_request" "max_text_bytes" "max_image_bytes")) (not (regexMatch "^[1-9][0-9]*$" $kv._1)) }}
{{- fail (printf "limits: %q: %s must be a positive integer" (toString .) $kv._0) }}
{{- end }}
{{- end }}
{{- if or (lt (int64 $g.maxBodyBytes) 0) (gt (int64 $g.maxBodyBytes) 4294967295) }}
{{- fail (printf "gateway.maxBodyBytes must be 0 (derived from limits) or 1..4294967295 (Envoy's buffer takes a uint32), not %v" $g.maxBodyBytes) }}
{{- end }}
{{- $cap := int64 (include "clip-triton.gatewayBodyCap" .) }}
{{- if lt (mul (int64 $g.maxHeapBytes) 9) (mul $cap 20) }}
{{- fail (printf "gateway.maxHeapBytes %v leaves no room for two bodies of the cap (%d bytes): raise it to at least %d, or lower the cap" $g.maxHeapBytes $cap (add (div (mul $cap 20) 9) 1)) }}
{{- end }}
{{- end }}

{{- define "clip-triton.apiKeySecret" -}}
{{- default (printf "%s-api-keys" (include "clip-triton.fullname" .)) .Values.gateway.auth.existingSecret }}
{{- end }}

{{- define "clip-triton.tlsSecret" -}}
{{- default (printf "%s-gateway-tls" (include "clip-triton.fullname" .)) .Values.gateway.tls.existingSecret }}
{{- end }}

{{- define "clip-triton.openaiService" -}}
{{- printf "%s-openai" (include "clip-triton.fullname" .) }}
{{- end }}

{{/* A PodDisruptionBudget: pass (dict "ctx" $ "component" "triton" "name" NAME "pdb" .Values.triton.pdb) */}}
{{- define "clip-triton.pdb" -}}
{{- if .pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  labels: {{- include "clip-triton.labels" .ctx | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  maxUnavailable: {{ .pdb.maxUnavailable }}
  selector:
    matchLabels: {{- include "clip-triton.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 6 }}
{{- end }}
{{- end }}
