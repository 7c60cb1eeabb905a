{{/* Names, labels and the pieces every pod shares. */}}

{{- define "synpref.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-synpref unless the release name already holds the chart name; kept short so
suffixes like -gold-scorer stay under 63 characters. */}}
{{- define "synpref.fullname" -}}
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

{{- define "synpref.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "synpref.selectorLabels" -}}
app.kubernetes.io/name: {{ include "synpref.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end }}

{{- define "synpref.labels" -}}
helm.sh/chart: {{ include "synpref.chart" . }}
{{ include "synpref.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: synpref
{{- end }}

{{/* Labels of one component: (dict "ctx" $ "component" "filter") */}}
{{- define "synpref.componentLabels" -}}
{{ include "synpref.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "synpref.componentSelector" -}}
{{ include "synpref.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "synpref.serviceAccountName" -}}
{{- default (include "synpref.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{- define "synpref.controllerServiceAccountName" -}}
{{- printf "%s-controller" (include "synpref.fullname" .) }}
{{- end }}

{{- define "synpref.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "synpref.cudaImage" -}}
{{- printf "%s:%s" .Values.cudaImage.repository (default .Chart.AppVersion .Values.cudaImage.tag) }}
{{- end }}

{{- define "synpref.dataClaim" -}}
{{- if .Values.persistence.enabled }}
{{- default (printf "%s-data" (include "synpref.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}
{{- end }}

{{/* Pod-level hardening, the same for every pod (training/k8s_job.py builds the same). */}}
{{- define "synpref.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.podSecurityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "synpref.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end }}

{{- define "synpref.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Environment every SynPref process gets: its config file and Kafka secrets. */}}
{{- define "synpref.env" -}}
- name: SYNPREF_CONFIG
  value: /etc/synpref/config.yaml
- name: HOME
  value: /tmp
- name: HF_HOME
  value: /data/cache/hf
{{- if .Values.kafka.sasl.existingSecret }}
- name: SYNPREF_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.passwordKey }}
{{- end }}
{{- end }}

{{/* Volumes every SynPref pod mounts: config, data (PVC or emptyDir), /tmp, Kafka TLS. */}}
{{- define "synpref.volumes" -}}
- name: config
  configMap:
    name: {{ include "synpref.fullname" . }}-config
- name: tmp
  emptyDir: {}
- name: data
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "synpref.dataClaim" . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- if .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.tls.existingSecret }}
{{- end }}
{{- end }}

{{- define "synpref.volumeMounts" -}}
- name: config
  mountPath: /etc/synpref
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /data
{{- if .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  mountPath: /etc/synpref/kafka-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* Seconds a stage pod gets between SIGTERM and SIGKILL: on SIGTERM it finishes the batch in hand, sends
and commits it, then drains gRPC for service.shutdown_grace_s (20 s; config.service is the chart's). An
annotator batch runs up to annotator.batch_deadline_s (480 s) and a gold-scorer batch up to three scorer
deadlines per model (gold, best: 6 x scoring.timeout_s), so a fixed 30 s SIGKILLed every such batch in
flight on a rollout, node drain or HPA scale-down (its work redone, outputs already sent duplicated).
(dict "ctx" $ "component" "annotator") */}}
{{- define "synpref.stageGraceSeconds" -}}
{{- $cfg := .ctx.Values.config }}
{{- $batch := 0 }}
{{- if eq .component "annotator" }}
{{- $batch = dig "annotator" "batch_deadline_s" 480 $cfg }}
{{- else if eq .component "gold-scorer" }}
{{- $batch = mulf 6 (dig "scoring" "timeout_s" 60 $cfg) }}
{{- end }}
{{- if $batch }}{{ add (ceil $batch | int) 50 }}{{ else }}30{{ end }}
{{- end }}

{{/* failureThreshold of a stage's startupProbe (every 5 s): 300 s for imports and Kafka. An in-process gold scorer
(config.scoring.mode in_process, the Settings default) loads its gold and best RMs before it opens its gRPC port, on
every start: the restart after its device broke (StageBroken, exit 1) included. Each load gets what the scorer service
gives one, config.scorer.load_timeout_s (1200 s); 300 s in all killed a pod loading an 8B RM, and every restart again.
(dict "ctx" $ "component" "gold-scorer") */}}
{{- define "synpref.stageStartupFailures" -}}
{{- $cfg := .ctx.Values.config }}
{{- $loads := 0 }}
{{- if and (eq .component "gold-scorer") (eq (dig "scoring" "mode" "in_process" $cfg) "in_process") }}
{{- range $role := list "gold" "best" }}{{ if dig "scoring" $role "path" "" $cfg }}{{ $loads = add1 $loads }}{{ end }}{{ end }}
{{- end }}
{{- add 60 (ceil (divf (mulf $loads (dig "scorer" "load_timeout_s" 1200 $cfg)) 5) | int) }}
{{- end }}

{{/* The scorer's: first config.scorer.shutdown_delay_s (the chart's 5 s) not ready but still serving while the
pod leaves the endpoints; then in-flight requests get config.scorer.drain_s (30 s) on gRPC and on the HTTP
shims at once, then the models' batchers drain and close: 30 s beyond the drain for that (a grace of exactly
the drain killed that last step). At least 60 s plus the delay. */}}
{{- define "synpref.scorerGraceSeconds" -}}
{{- $cfg := .Values.config }}
{{- $delay := dig "scorer" "shutdown_delay_s" 0 $cfg }}
{{- add (ceil (addf (maxf 30 (dig "scorer" "drain_s" 30 $cfg)) $delay) | int) 30 }}
{{- end }}

{{/* Where the controller keeps its durable state (pairs.sqlite, vectors.f16, d_un.faiss, models):
config.controller.workdir, else a folder on the data volume. */}}
{{- define "synpref.controllerWorkdir" -}}
{{- default "/data/controller" (dig "controller" "workdir" "" .Values.config) }}
{{- end }}

{{/* The judges' example index the controller rewrites after each human round and every annotator
pod re-reads: config.annotator.examples_index, else a folder on the data volume they all mount. */}}
{{- define "synpref.examplesIndex" -}}
{{- default "/data/examples" (dig "annotator" "examples_index" "" .Values.config) }}
{{- end }}

{{/* The kafka section of config.yaml, from the kafka values. */}}
{{- define "synpref.kafkaConfig" -}}
{{- $k := .Values.kafka }}
{{- if .Values.devKafka.enabled }}
bootstrap_servers: {{ printf "%s-kafka:9092" (include "synpref.fullname" .) | quote }}
{{- else }}
bootstrap_servers: {{ $k.bootstrapServers | quote }}
{{- end }}
security_protocol: {{ $k.securityProtocol }}
partitions: {{ $k.partitions }}
replication_factor: {{ $k.replicationFactor }}
max_poll_interval_ms: {{ $k.maxPollIntervalMs | default 600000 | int }}
{{- if $k.sasl.mechanism }}
sasl_mechanism: {{ $k.sasl.mechanism }}
sasl_username: {{ $k.sasl.username | quote }}
{{- end }}
{{- if $k.tls.existingSecret }}
ssl_cafile: /etc/synpref/kafka-tls/{{ $k.tls.caKey }}
{{- if $k.tls.certKey }}
ssl_certfile: /etc/synpref/kafka-tls/{{ $k.tls.certKey }}
{{- end }}
{{- if $k.tls.keyKey }}
ssl_keyfile: /etc/synpref/kafka-tls/{{ $k.tls.keyKey }}
{{- end }}
{{- end }}
{{- end }}

{{/* Fail early, with a message, on values the schema cannot express. */}}
{{- define "synpref.validateValues" -}}
{{- $k := .Values.kafka }}
{{- if and (hasPrefix "SASL" $k.securityProtocol) (not $k.sasl.mechanism) }}
{{- fail "kafka.securityProtocol is SASL_* but kafka.sasl.mechanism is empty" }}
{{- end }}
{{- if and $k.sasl.mechanism (not (hasPrefix "SASL" $k.securityProtocol)) }}
{{- fail "kafka.sasl.mechanism is set but kafka.securityProtocol is not SASL_PLAINTEXT or SASL_SSL" }}
{{- end }}
{{- if and $k.sasl.mechanism (not $k.sasl.existingSecret) }}
{{- fail "kafka.sasl.mechanism needs kafka.sasl.existingSecret (the password is never put in values)" }}
{{- end }}
{{- if and .Values.devKafka.enabled (ne $k.securityProtocol "PLAINTEXT") }}
{{- fail "devKafka speaks PLAINTEXT only: set kafka.securityProtocol=PLAINTEXT or use an external cluster" }}
{{- end }}
{{- if and (hasKey .Values.config "kafka") }}
{{- fail "config.kafka is set by the chart from the kafka values; set those instead" }}
{{- end }}
{{- if and (hasKey .Values.config "service") }}
{{- fail "config.service is set by the chart (ports the probes and Services use); remove it from config" }}
{{- end }}
{{- /* config.yaml is a ConfigMap that every pod mounts and anyone who may read ConfigMaps reads: no secret
goes in it (kafka.sasl.existingSecret, desk.tokensSecret and secrets.apiKeys carry them as Secrets). */}}
{{- if dig "desk" "tokens" "" .Values.config }}
{{- fail "config.desk.tokens would put the desk's tokens in the release ConfigMap, in plain text: name a Secret holding them in desk.tokensSecret instead (or leave both empty and the chart's hook makes one)" }}
{{- end }}
{{- $llms := concat (dig "annotator" "judges" list .Values.config) (list (dig "annotator" "attribute_model" dict .Values.config)) }}
{{- range $llms }}
{{- if and (kindIs "map" .) (or (hasKey . "api_key") (hasKey . "apiKey")) }}
{{- fail "config.annotator judges and attribute_model take api_key_env (the name of an environment variable), never the key: the key would sit in the release ConfigMap in plain text. Put it in a Secret named by secrets.apiKeys" }}
{{- end }}
{{- end }}
{{- $writer := .Values.stages.writer }}
{{- if and $writer.enabled (or $writer.autoscaling.enabled (gt (int $writer.replicaCount) 1)) }}
{{- fail "stages.writer runs one pod per dataset version (its manifest has one author): set stages.writer.replicaCount=1 and stages.writer.autoscaling.enabled=false" }}
{{- end }}
{{- /* The schema checks each bound alone; the API server refuses an HPA whose minimum is above its maximum, so
the install failed half applied. */}}
{{- $scaled := dict "scorer" .Values.scorer }}
{{- range $key, $stage := .Values.stages }}{{ $_ := set $scaled (printf "stages.%s" $key) $stage }}{{ end }}
{{- range $path, $s := $scaled }}
{{- if and $s.enabled $s.autoscaling.enabled (gt (int $s.autoscaling.minReplicas) (int $s.autoscaling.maxReplicas)) }}
{{- fail (printf "%s.autoscaling.minReplicas (%d) is above %s.autoscaling.maxReplicas (%d): the API server refuses that HorizontalPodAutoscaler" $path (int $s.autoscaling.minReplicas) $path (int $s.autoscaling.maxReplicas)) }}
{{- end }}
{{- end }}
{{- if and (gt (int .Values.training.nodes) 1) (lt (int .Values.training.gpusPerNode) 1) }}
{{- fail "training.nodes > 1 runs torchrun across nodes and needs training.gpusPerNode >= 1" }}
{{- end }}
{{- /* No silent default stands in for the judges or the pairs: the services would only crash-loop
(the annotator with an empty panel, the controller with exit 2) on what is checkable here. The study's
simulated judges run in the controller's own process, never in the annotator pods. */}}
{{- $judges := dig "annotator" "judges" list .Values.config }}
{{- if and (or .Values.controller.enabled .Values.stages.annotator.enabled) (not $judges) }}
{{- fail "the controller and the annotator need LLM judges: set config.annotator.judges (OpenAI-compatible endpoints: name = the model name, base_url, api_key_env; see docs/deploy.md), or set controller.enabled=false and stages.annotator.enabled=false" }}
{{- end }}
{{- if .Values.controller.enabled }}
{{- /* The controller's state must outlive its pod, and the annotators must see the examples it writes:
both on the data PVC, which every SynPref pod mounts at /data. */}}
{{- if not .Values.persistence.enabled }}
{{- fail "controller.enabled needs persistence.enabled: the controller keeps its state (pairs.sqlite) and the judges' examples, which the annotator pods read, on the data volume; or set controller.enabled=false" }}
{{- end }}
{{- if not (hasPrefix "/data/" (include "synpref.controllerWorkdir" .)) }}
{{- fail "config.controller.workdir must be a folder under /data (the data volume): elsewhere the controller's state is lost with its pod" }}
{{- end }}
{{- if not (hasPrefix "/data/" (include "synpref.examplesIndex" .)) }}
{{- fail "config.annotator.examples_index must be a folder under /data (the data volume), where both the controller and the annotator pods see it" }}
{{- end }}
{{- end }}
{{- if and .Values.controller.enabled (not (dig "controller" "sources" list .Values.config)) }}
{{- fail "controller.enabled needs config.controller.sources: the pair files or folders to curate, on the volume (e.g. [/data/input]); or set controller.enabled=false" }}
{{- end }}
{{- end }}
