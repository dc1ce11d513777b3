{{/*
Names and labels (the usual Helm helpers), then arserve's own: the Redis
URL, generated secrets, the Ray containers' environment, and the serve
config that becomes the RayService's serveConfigV2.
*/}}

{{/* Chart name, 63 characters at most. */}}
{{- define "arserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: release-chart, or the release alone when it already contains the
chart name. KubeRay derives service names from it (<fullname>-head-svc), so
it is cut to 40 characters to leave room for its suffixes.
*/}}
{{- define "arserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "arserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "arserve.labels" -}}
helm.sh/chart: {{ include "arserve.chart" . }}
{{ include "arserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select this release's pods (add app.kubernetes.io/component). */}}
{{- define "arserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "arserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The serving image of a pod: the CUDA image (deploy/Dockerfile.cuda) where it has GPUs. Call with (dict "root" $ "gpus" N). */}}
{{- define "arserve.image" -}}
{{- $i := .root.Values.image }}
{{- if .gpus }}
{{- printf "%s:%s" $i.cuda.repository (default .root.Chart.AppVersion $i.cuda.tag) }}
{{- else }}
{{- printf "%s:%s" $i.repository (default .root.Chart.AppVersion $i.tag) }}
{{- end }}
{{- end }}

{{/* The models' device: model.device, or cuda when the backbone asks for GPUs. */}}
{{- define "arserve.device" -}}
{{- $v := .Values }}
{{- $device := $v.model.device | default (ternary "cuda" "cpu" (gt (float64 $v.backbone.numGpus) 0.0)) }}
{{- if and (hasPrefix "cuda" $device) (not (gt (float64 $v.backbone.numGpus) 0.0)) }}
{{- fail (printf "model.device is %q but backbone.numGpus is 0: give the backbone GPUs (backbone.numGpus, on a worker group with gpus)" $device) }}
{{- end }}
{{- if and (hasPrefix "cuda" $device) (not (gt (float64 $v.drafter.numGpus) 0.0)) }}
{{- fail (printf "model.device is %q (the drafters compute there too) but drafter.numGpus is 0: give the drafter a GPU share (e.g. drafter.numGpus: 0.25 on a worker group with gpus)" $device) }}
{{- end }}
{{- $device }}
{{- end }}

{{/* The six services, in the order of arserve.rayserve.config.SERVICES. */}}
{{- define "arserve.services" -}}
{{- list "gateway" "tokenizer" "verifier" "drafter" "backbone" "diffusion_head" | toJson }}
{{- end }}

{{/* ---------------------------------------------------------------- Redis */}}

{{- define "arserve.redis.name" -}}
{{- printf "%s-redis" (include "arserve.fullname" .) }}
{{- end }}

{{/* In-cluster DNS name of the chart's Redis Service. */}}
{{- define "arserve.redis.host" -}}
{{- printf "%s.%s.svc" (include "arserve.redis.name" .) .Release.Namespace }}
{{- end }}

{{/* Secret (and key) that hold the password of the chart's Redis. */}}
{{- define "arserve.redis.secretName" -}}
{{- default (include "arserve.redis.name" .) .Values.redis.auth.existingSecret }}
{{- end }}

{{- define "arserve.redis.secretKey" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecretPasswordKey }}
{{- else -}}
redis-password
{{- end }}
{{- end }}

{{/*
A generated secret value that stays put: the value already in the cluster
(lookup; empty when rendering offline), else one generated once per render.
Helm gives each template a shallow copy of .Values, so the generated value is
remembered inside a nested values map (`holder`) that all templates share.
Call with (dict "root" $ "holder" MAP "secret" NAME "key" KEY).
*/}}
{{- define "arserve.generated" -}}
{{- if not (hasKey .holder "_generated") }}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret | default dict }}
{{- $value := dig "data" .key "" $existing | b64dec }}
{{- $_ := set .holder "_generated" (default (randAlphaNum 32) $value) }}
{{- end }}
{{- index .holder "_generated" }}
{{- end }}

{{/* Password of the chart's Redis when the chart owns its Secret. */}}
{{- define "arserve.redis.password" -}}
{{- if .Values.redis.auth.password }}
{{- .Values.redis.auth.password }}
{{- else }}
{{- include "arserve.generated" (dict "root" . "holder" .Values.redis.auth "secret" (include "arserve.redis.name" .) "key" "redis-password") }}
{{- end }}
{{- end }}

{{/* True (non-empty) when replicas get a Redis tier at all. */}}
{{- define "arserve.redis.configured" -}}
{{- if or .Values.redis.enabled .Values.redis.externalUrl .Values.redis.externalSecret.name }}true{{ end }}
{{- end }}

{{/*
The redis_url of the serve config. Call with (dict "root" $ "mask" BOOL);
mask replaces the password with **** (for the ConfigMap copy).
*/}}
{{- define "arserve.redis.url" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- if not (include "arserve.redis.configured" $root) }}
{{- else if eq $v.kv.redisUrlFrom "secretEnv" -}}
env:ARSERVE_REDIS_URL
{{- else if $v.redis.enabled }}
{{- if $v.redis.auth.existingSecret }}
{{- fail "redis.auth.existingSecret needs kv.redisUrlFrom=secretEnv: the chart cannot write a password it does not know into serveConfigV2" }}
{{- end }}
{{- $password := ternary "****" (include "arserve.redis.password" $root | urlquery) .mask }}
{{- printf "redis://:%s@%s:6379/%d" $password (include "arserve.redis.host" $root) (int $v.redis.db) }}
{{- else if $v.redis.externalSecret.name }}
{{- fail "redis.externalSecret needs kv.redisUrlFrom=secretEnv: the chart cannot write a URL it does not know into serveConfigV2" }}
{{- else }}
{{- $url := $v.redis.externalUrl }}
{{- if not (regexMatch "^rediss?://" $url) }}
{{- fail (printf "redis.externalUrl must start with redis:// or rediss://, got %q" $url) }}
{{- end }}
{{- if .mask }}
{{- regexReplaceAll "^(rediss?://[^:@/]*):[^@/]*@" $url "${1}:****@" }}
{{- else }}
{{- $url }}
{{- end }}
{{- end }}
{{- end }}

{{/* ----------------------------------------------------------------- Auth */}}

{{- define "arserve.auth.secretName" -}}
{{- default (printf "%s-auth" (include "arserve.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "arserve.auth.secretKey" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecretKey }}
{{- else -}}
token
{{- end }}
{{- end }}

{{- define "arserve.auth.token" -}}
{{- if .Values.auth.token }}
{{- .Values.auth.token }}
{{- else }}
{{- include "arserve.generated" (dict "root" . "holder" .Values.auth "secret" (include "arserve.auth.secretName" .) "key" "token") }}
{{- end }}
{{- end }}

{{/* ------------------------------------------------------ Internal secret */}}

{{/*
The secret that every replica shares and no client holds
(ServiceSettings.internal_secret): internal gRPC calls, directory
announcements and Redis KV blocks are authenticated with keys derived from
it. Generated once, kept on upgrades (lookup), never in serveConfigV2.
*/}}
{{- define "arserve.internal.secretName" -}}
{{- default (printf "%s-internal" (include "arserve.fullname" .)) .Values.internalSecret.existingSecret }}
{{- end }}

{{- define "arserve.internal.secretKey" -}}
{{- if .Values.internalSecret.existingSecret }}
{{- .Values.internalSecret.existingSecretKey }}
{{- else -}}
secret
{{- end }}
{{- end }}

{{- define "arserve.internal.secret" -}}
{{- include "arserve.generated" (dict "root" . "holder" .Values.internalSecret "secret" (include "arserve.internal.secretName" .) "key" "secret") }}
{{- end }}

{{/* ------------------------------------------------------ Ray containers */}}

{{/*
Whether the pods of worker group `group` ("" for the head) may host replicas
of `service`: with steering.customResources only that service's worker group
does; without it Ray may place a replica on any Ray pod, so every one may.
Call with (dict "root" $ "group" NAME "service" SERVICE); non-empty is true.
*/}}
{{- define "arserve.hosts" -}}
{{- $v := .root.Values }}
{{- if not $v.steering.customResources }}true
{{- else if eq .group (index $v .service).workerGroup }}true
{{- end }}
{{- end }}

{{/*
Largest gRPC message in bytes: the application's max_message_bytes
(serve.extraArgs may set it) and Ray Serve's proxy limit, which must agree.
*/}}
{{- define "arserve.maxMessageBytes" -}}
{{- if hasKey .Values.serve.extraArgs "max_message_bytes" }}
{{- int64 (index .Values.serve.extraArgs "max_message_bytes") }}
{{- else }}
{{- int64 .Values.serve.maxMessageBytes }}
{{- end }}
{{- end }}

{{/*
Environment of a Ray container. Every Ray pod gets the internal secret and
the proxy's message limit; only the pods that may host the backbone get the
Redis URL (the backbone alone opens the KV tier), and only those that may
host the gateway get the client auth token. Call with (dict "root" $
"group" NAME), NAME "" for the head.
*/}}
{{- define "arserve.rayEnv" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
- name: ARSERVE_INTERNAL_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "arserve.internal.secretName" $root }}
      key: {{ include "arserve.internal.secretKey" $root }}
# Ray Serve's gRPC proxy refuses larger requests before it unpickles them
# into the gateway (its default is 2 GiB).
- name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
  value: {{ include "arserve.maxMessageBytes" $root | quote }}
{{- if and (eq $v.kv.redisUrlFrom "secretEnv") (include "arserve.redis.configured" $root) (include "arserve.hosts" (dict "root" $root "group" .group "service" "backbone")) }}
{{- if $v.redis.enabled }}
# The kubelet composes the URL from the Secret-held password ($(VAR) expansion).
- name: ARSERVE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "arserve.redis.secretName" $root }}
      key: {{ include "arserve.redis.secretKey" $root }}
- name: ARSERVE_REDIS_URL
  value: {{ printf "redis://:$(ARSERVE_REDIS_PASSWORD)@%s:6379/%d" (include "arserve.redis.host" $root) (int $v.redis.db) | quote }}
{{- else }}
- name: ARSERVE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (printf "%s-redis-url" (include "arserve.fullname" $root)) $v.redis.externalSecret.name }}
      key: {{ ternary $v.redis.externalSecret.key "url" (not (empty $v.redis.externalSecret.name)) }}
{{- end }}
{{- end }}
{{- if and $v.auth.enabled (include "arserve.hosts" (dict "root" $root "group" .group "service" "gateway")) }}
- name: ARSERVE_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "arserve.auth.secretName" $root }}
      key: {{ include "arserve.auth.secretKey" $root }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The Ray container of a pod. Call with (dict "root" $ "name" NAME "group"
GROUP "resources" REQS "gpus" N "ports" PORTS), GROUP "" for the head. The
root filesystem is read-only (securityContext); Ray writes its session (logs,
sockets, spilled objects) under /tmp/ray and Python libraries write under
/tmp, both emptyDirs.
*/}}
{{- define "arserve.rayContainer" -}}
{{- $root := .root }}
{{- $v := $root.Values -}}
- name: {{ .name }}
  image: {{ include "arserve.image" (dict "root" $root "gpus" .gpus) | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- with .ports }}
  ports:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $env := include "arserve.rayEnv" (dict "root" $root "group" .group) | trim }}
  {{- if $env }}
  env:
    {{- $env | nindent 4 }}
  {{- end }}
  {{- $resources := deepCopy (.resources | default dict) }}
  {{- if .gpus }}
  {{- $limits := $resources.limits | default dict }}
  {{- $_ := set $limits "nvidia.com/gpu" (int .gpus) }}
  {{- $_ := set $resources "limits" $limits }}
  {{- end }}
  {{- with $resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  lifecycle:
    preStop:
      exec:
        command: ["/bin/sh", "-c", "ray stop"]
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: ray-logs
      mountPath: /tmp/ray
    {{- with $v.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
Pod-level fields shared by the head and the workers. Call with (dict "root" $
"serviceAccountToken" BOOL "nodeSelector" ... "tolerations" ... "affinity"
...). Only the head's autoscaler sidecar talks to the Kubernetes API, so only
the head mounts a service account token, and only while it autoscales.
*/}}
{{- define "arserve.rayPodSpec" -}}
{{- $v := .root.Values -}}
automountServiceAccountToken: {{ .serviceAccountToken }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  - name: tmp
    emptyDir: {}
  - name: ray-logs
    emptyDir: {}
  {{- with $v.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* The label every Ray pod of the release carries (NetworkPolicies select on it). */}}
{{- define "arserve.rayPodLabel" -}}
arserve.dev/ray: "true"
{{- end }}

{{/* Pod metadata of a Ray pod. Call with (dict "root" $ "component" NAME). */}}
{{- define "arserve.rayPodMetadata" -}}
{{- $v := .root.Values -}}
labels:
  {{- include "arserve.selectorLabels" .root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- include "arserve.rayPodLabel" .root | nindent 2 }}
  {{- with $v.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $v.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
rayStartParams of the head (group "") or a worker group: its own, plus for a
worker group the custom resource that steering.customResources pins
deployments with. KubeRay types rayStartParams
as map<string,string>; `resources` is shell-quoted JSON, the form that both
`ray start` (through KubeRay's shell command) and the Ray autoscaler read.
*/}}
{{- define "arserve.startParams" -}}
{{- $v := .root.Values }}
{{- $params := dict }}
{{- range $k, $val := .params }}{{ $_ := set $params $k (toString $val) }}{{ end }}
{{- if and .group $v.steering.customResources }}
{{- $_ := set $params "resources" (printf "\"{\\\"arserve_%s\\\": %d}\"" .group (int $v.steering.unitsPerPod)) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/* --------------------------------------------------------- Serve config */}}

{{/*
The Ray Serve config (deploy/serve_config.yaml's schema): Ray's sections plus
the application's `args`, which arserve.rayserve.config.AppArgs validates.
Call with (dict "root" $ "mask" BOOL).
*/}}
{{- define "arserve.serveConfig" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $deployments := dict }}
{{- range $name := include "arserve.services" $root | fromJsonArray }}
{{- $d := index $v $name }}
{{- if not (hasKey $v.workerGroups $d.workerGroup) }}
{{- fail (printf "%s.workerGroup %q is not a key of workerGroups" $name $d.workerGroup) }}
{{- end }}
{{- $group := index $v.workerGroups $d.workerGroup }}
{{- if not $group.enabled }}
{{- fail (printf "%s.workerGroup %q is disabled (workerGroups.%s.enabled)" $name $d.workerGroup $d.workerGroup) }}
{{- end }}
{{- if and $d.numGpus (not $group.gpus) }}
{{- fail (printf "%s.numGpus is %v but its worker group %q has no GPUs (workerGroups.%s.gpus)" $name $d.numGpus $d.workerGroup $d.workerGroup) }}
{{- end }}
{{- $actor := dict "num_cpus" $d.numCpus }}
{{- if $d.numGpus }}{{ $_ := set $actor "num_gpus" $d.numGpus }}{{ end }}
{{- if $d.memory }}{{ $_ := set $actor "memory" (int64 $d.memory) }}{{ end }}
{{- if $v.steering.customResources }}
{{- $_ := set $actor "resources" (dict (printf "arserve_%s" $d.workerGroup) 1) }}
{{- end }}
{{- $opts := dict "num_replicas" (int $d.replicas) "ray_actor_options" $actor }}
{{- if $d.torchThreads }}{{ $_ := set $opts "torch_threads" (int $d.torchThreads) }}{{ end }}
{{- if and $v.autoscaling.enabled $d.autoscaling.enabled }}
{{- $a := $d.autoscaling }}
{{- if or (lt (int $d.replicas) (int $a.minReplicas)) (gt (int $d.replicas) (int $a.maxReplicas)) }}
{{- fail (printf "%s.replicas (%d) must lie in %s.autoscaling minReplicas..maxReplicas (%d..%d) while it autoscales" $name (int $d.replicas) $name (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- end }}
{{- $_ := set $opts "autoscaling" (dict "min_replicas" (int $a.minReplicas) "max_replicas" (int $a.maxReplicas) "target_inflight" $a.targetInflight "upscale_delay_s" $a.upscaleDelayS "downscale_delay_s" $a.downscaleDelayS) }}
{{- end }}
{{- $_ := set $deployments $name $opts }}
{{- end }}
{{- $model := dict "id" $v.model.id "source" $v.model.source "device" (include "arserve.device" $root) "default_max_tokens" (int $v.model.defaultMaxTokens) "speculative_methods" $v.model.speculativeMethods "default_speculative_method" $v.model.defaultSpeculativeMethod }}
{{- with $v.model.dtype }}{{ $_ := set $model "dtype" . }}{{ end }}
{{- with $v.model.draftModel }}{{ $_ := set $model "draft_model" . }}{{ end }}
{{- with $v.model.draftHeads }}{{ $_ := set $model "draft_heads" . }}{{ end }}
{{- /* Image models compute on cuda when the diffusion heads ask for GPUs (their backbone and draft then need GPUs too). */}}
{{- $imageDevice := ternary "cuda" "cpu" (gt (float64 $v.diffusion_head.numGpus) 0.0) }}
{{- $imageModels := list }}
{{- range $v.imageModels }}
{{- $m := deepCopy . }}
{{- if not (hasKey $m "device") }}{{ $_ := set $m "device" $imageDevice }}{{ end }}
{{- $imageModels = append $imageModels $m }}
{{- end }}
{{- $redisUrl := include "arserve.redis.url" (dict "root" $root "mask" .mask) }}
{{- $args := dict "models" (prepend (deepCopy $v.extraModels) $model) "num_draft_tokens" (int $v.speculation.numDraftTokens) "draft_timeout_s" $v.speculation.draftTimeoutS "kv_block_size" (int $v.kv.blockSize) "kv_local_bytes" (int64 $v.kv.localBytes) "kv_ttl_s" (int $v.kv.ttlS) "redis_url" (ternary $redisUrl nil (ne $redisUrl "")) "deployments" $deployments "image_models" $imageModels }}
{{- /* Secrets by name only: each replica reads the variable where it starts (ServiceSettings env:NAME). */}}
{{- $_ := set $args "internal_secret" "env:ARSERVE_INTERNAL_SECRET" }}
{{- if $v.auth.enabled }}{{ $_ := set $args "auth_token" "env:ARSERVE_AUTH_TOKEN" }}{{ end }}
{{- $_ := set $args "max_message_bytes" (int64 $v.serve.maxMessageBytes) }}
{{- $args = mergeOverwrite $args (deepCopy $v.serve.extraArgs) }}
{{- $app := dict "name" $v.serve.appName "route_prefix" "/" "import_path" "arserve.rayserve.app:build_app" "args" $args }}
{{- $grpc := dict "port" (int $v.serve.grpcPort) "grpc_servicer_functions" (list "arserve.rayserve.proxy.add_GenerationServicer_to_server" "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server") }}
{{- $http := dict "host" "0.0.0.0" "port" (int $v.serve.httpPort) }}
{{- dict "proxy_location" $v.serve.proxyLocation "http_options" $http "grpc_options" $grpc "applications" (list $app) | toYaml }}
{{- end }}

{{/* ------------------------------------------------------ NetworkPolicies */}}

{{/*
The container ports the public NetworkPolicy opens, as a JSON list: Ray
Serve's gRPC proxy port (a second front door adds its port here).
*/}}
{{- define "arserve.publicPorts" -}}
{{- $ports := list (int .Values.serve.grpcPort) }}
{{- if .Values.serve.exposeHttp }}{{ $ports = append $ports (int .Values.serve.httpPort) }}{{ end }}
{{- $ports | toJson }}
{{- end }}

{{/* Labels of the pods that may open the Redis KV tier (those that may host the backbone). */}}
{{- define "arserve.redisClients" -}}
{{- include "arserve.selectorLabels" . }}
{{- if .Values.steering.customResources }}
app.kubernetes.io/component: ray-worker-{{ .Values.backbone.workerGroup }}
{{- else }}
{{ include "arserve.rayPodLabel" . }}
{{- end }}
{{- end }}
