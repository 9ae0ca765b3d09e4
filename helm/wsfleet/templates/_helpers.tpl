{{/*
Names. Kubernetes names are DNS labels (63 characters), and the longest
suffix used here is "-controller" / "-redis-headless", so the base name is cut
to leave room for it.
*/}}
{{- define "wsfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 48 | trimSuffix "-" }}
{{- end }}

{{- define "wsfleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "wsfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels shared by every object of the release. `component` tells the gateway,
the controller and Redis apart, because they share name and instance.
*/}}
{{- define "wsfleet.labels" -}}
helm.sh/chart: {{ include "wsfleet.chart" . }}
app.kubernetes.io/name: {{ include "wsfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wsfleet
{{- end }}

{{/* Selector labels of the gateway pods (immutable once deployed). */}}
{{- define "wsfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wsfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "wsfleet.controller.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wsfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "wsfleet.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wsfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "wsfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wsfleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "wsfleet.controller.fullname" -}}
{{- printf "%s-controller" (include "wsfleet.fullname" .) }}
{{- end }}

{{- define "wsfleet.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (include "wsfleet.controller.fullname" .) .Values.controller.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "wsfleet.redis.fullname" -}}
{{- printf "%s-redis" (include "wsfleet.fullname" .) }}
{{- end }}

{{/*
maxmemory of the in-chart Redis, in bytes: redis.maxmemory when set, else
redis.maxmemoryPercent of the container's memory limit, so that Redis
refuses writes (wsfleet answers 503) before the kernel kills it. Empty when
neither is known (no limit: Redis grows until the node runs out).
*/}}
{{- define "wsfleet.redis.maxmemory" -}}
{{- $r := .Values.redis }}
{{- if $r.maxmemory }}
{{- $r.maxmemory }}
{{- else }}
{{- $limit := toString (dig "limits" "memory" "" ($r.resources | default dict)) }}
{{- if $limit }}
{{- $units := dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 }}
{{- $number := regexFind "^[0-9]+" $limit }}
{{- $unit := trimPrefix $number $limit }}
{{- if or (not $number) (not (hasKey $units $unit)) }}
{{- fail (printf "redis.resources.limits.memory %q: write it as a whole number with Ki, Mi, Gi, Ti, K, M, G or T (or set redis.maxmemory)" $limit) }}
{{- end }}
{{- $percent := int ($r.maxmemoryPercent | default 80) }}
{{- if or (lt $percent 1) (gt $percent 100) }}
{{- fail (printf "redis.maxmemoryPercent %d: must be between 1 and 100" $percent) }}
{{- end }}
{{- div (mul (int64 $number) (get $units $unit) $percent) 100 }}
{{- end }}
{{- end }}
{{- end }}

{{- define "wsfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "wsfleet.controller.image" -}}
{{- $repo := default .Values.image.repository .Values.controller.image.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.controller.image.tag }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/*
The Secret the pods read from: the user's, or the one this chart renders.
*/}}
{{- define "wsfleet.secretName" -}}
{{- default (printf "%s-secrets" (include "wsfleet.fullname" .)) .Values.secret.existingSecret }}
{{- end }}

{{/*
Data of the chart-rendered Secret, as a dict of key -> plain value. Only
non-empty settings are included, so an all-default install renders no Secret
at all. Used both to render the Secret and to decide which env vars point at it.
*/}}
{{- define "wsfleet.secretData" -}}
{{- $k := .Values.secret.keys }}
{{- $d := dict }}
{{- if .Values.auth.jwt.hs256Secret }}{{ $_ := set $d $k.jwtHs256Secret .Values.auth.jwt.hs256Secret }}{{ end }}
{{- $apiKey := include "wsfleet.apiKey" . }}
{{- if $apiKey }}{{ $_ := set $d $k.apiKey $apiKey }}{{ end }}
{{- if and (not .Values.redis.enabled) .Values.redis.url }}{{ $_ := set $d $k.redisUrl .Values.redis.url }}{{ end }}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled .Values.redis.auth.password }}{{ $_ := set $d $k.redisPassword .Values.redis.auth.password }}{{ end }}
{{- toJson $d }}
{{- end }}

{{/*
The backend API key of the chart's Secret: `apiKey` when given; else the
one the release's Secret already holds (so upgrades keep it and backends
keep working); else a new random one. Empty only with secret.existingSecret
(the chart cannot see or write that one) or generateApiKey=false. Memoised
in .Values so every include in one render sees the same random key.
*/}}
{{- define "wsfleet.apiKey" -}}
{{- if .Values.apiKey }}
{{- .Values.apiKey }}
{{- else if and (not .Values.secret.existingSecret) .Values.generateApiKey }}
{{- if not (hasKey .Values "_generatedApiKey") }}
{{- $key := "" }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "wsfleet.secretName" .) }}
{{- if and $existing $existing.data (hasKey $existing.data .Values.secret.keys.apiKey) }}
{{- $key = index $existing.data .Values.secret.keys.apiKey | b64dec }}
{{- else }}
{{- $key = randAlphaNum 40 }}
{{- end }}
{{- $_ := set .Values "_generatedApiKey" $key }}
{{- end }}
{{- index .Values "_generatedApiKey" }}
{{- end }}
{{- end }}

{{/*
One env var read from the Secret.
  With an existing Secret every key is optional: the chart cannot see inside it,
  and a missing key must just leave the setting unset.
  With the chart's Secret only keys that exist are referenced.
Args: dict "ctx" . "env" NAME "key" KEY
*/}}
{{- define "wsfleet.secretEnv" -}}
{{- $ctx := .ctx }}
{{- if $ctx.Values.secret.existingSecret }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "wsfleet.secretName" $ctx }}
      key: {{ .key }}
      optional: true
{{- else }}
{{- $data := include "wsfleet.secretData" $ctx | fromJson }}
{{- if hasKey $data .key }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "wsfleet.secretName" $ctx }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- end }}

{{/*
How the pods find Redis. Env vars shared by the gateway and the controller.
  redis.enabled: the in-chart Service; with auth, the password comes from the
    Secret into REDIS_PASSWORD and Kubernetes splices it into the URL with
    $(REDIS_PASSWORD), so the Deployment never contains it.
  otherwise: WSFLEET_REDIS_URL from the Secret if there is one (external
    Redis); no URL at all means embedded mode.
*/}}
{{- define "wsfleet.redisEnv" -}}
{{- $k := .Values.secret.keys }}
{{- if .Values.redis.enabled }}
{{- /* Short name: the pods are in the Service's namespace, and it keeps the
       URL valid if the rendered manifests are moved to another namespace. */}}
{{- $host := include "wsfleet.redis.fullname" . }}
{{- if .Values.redis.auth.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "wsfleet.secretName" . }}
      key: {{ $k.redisPassword }}
- name: WSFLEET_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" $host | quote }}
{{- else }}
- name: WSFLEET_REDIS_URL
  value: {{ printf "redis://%s:6379/0" $host | quote }}
{{- end }}
{{- else }}
{{- include "wsfleet.secretEnv" (dict "ctx" . "env" "WSFLEET_REDIS_URL" "key" $k.redisUrl) }}
{{- end }}
{{- end }}

{{/*
Refuse combinations that would deploy a broken fleet.
*/}}
{{- define "wsfleet.validate" -}}
{{- $needed := add (int .Values.preStopSeconds) (int .Values.drain.windowSeconds) 12 }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be greater than preStopSeconds (%v) + drain.windowSeconds (%v) + 12 (wsfleet's grace, last closes and webhook flush) = %v: otherwise the kubelet kills pods mid-drain" .Values.terminationGracePeriodSeconds .Values.preStopSeconds .Values.drain.windowSeconds $needed) }}
{{- end }}
{{- $multi := or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}
{{- $bus := or .Values.redis.enabled .Values.redis.url .Values.secret.existingSecret }}
{{- if and $multi (not $bus) }}
{{- fail "more than one gateway replica (or autoscaling) needs a shared bus: set redis.enabled=true, redis.url, or secret.existingSecret with a redis-url key. Without one every pod runs in embedded mode as a separate fleet." }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled (not .Values.redis.auth.password) (not .Values.secret.existingSecret) }}
{{- fail "redis.auth.enabled needs redis.auth.password or secret.existingSecret holding the password" }}
{{- end }}
{{- if not (has .Values.auth.mode (list "none" "jwt")) }}
{{- fail (printf "auth.mode must be none or jwt, not %q" .Values.auth.mode) }}
{{- end }}
{{- if not (has .Values.logFormat (list "text" "json")) }}
{{- fail (printf "logFormat must be text or json, not %q" .Values.logFormat) }}
{{- end }}
{{- if and .Values.auth.jwt.rs256PublicKey .Values.auth.jwt.rs256PublicKeyConfigMap.name }}
{{- fail "set either auth.jwt.rs256PublicKey or auth.jwt.rs256PublicKeyConfigMap.name, not both" }}
{{- end }}
{{- end }}

{{/* Name of the ConfigMap holding the RS256 public key, if any. */}}
{{- define "wsfleet.jwtKeyConfigMap" -}}
{{- if .Values.auth.jwt.rs256PublicKeyConfigMap.name }}
{{- .Values.auth.jwt.rs256PublicKeyConfigMap.name }}
{{- else if .Values.auth.jwt.rs256PublicKey }}
{{- printf "%s-jwt-public-key" (include "wsfleet.fullname" .) }}
{{- end }}
{{- end }}

{{- define "wsfleet.jwtKeyConfigMapKey" -}}
{{- if .Values.auth.jwt.rs256PublicKeyConfigMap.name }}
{{- .Values.auth.jwt.rs256PublicKeyConfigMap.key }}
{{- else }}
{{- print "public.pem" }}
{{- end }}
{{- end }}

{{/*
OTEL_* variables of a container (gateway or controller) when tracing is on.
Needs POD_NAME and POD_NAMESPACE defined before it in the container's env.
Call with (dict "ctx" . "service" "<service name>").
*/}}
{{- define "wsfleet.otelEnv" -}}
{{- $t := .ctx.Values.tracing -}}
{{- if $t.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $t.otlpEndpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .service | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $t.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $t.samplerArg | toString | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)%s" (ternary (printf ",%s" $t.resourceAttributes) "" (ne $t.resourceAttributes "")) | quote }}
{{- end }}
{{- end }}
