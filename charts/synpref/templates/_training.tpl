{{/* The training Job, written twice from the same values: as the spec file that
training/k8s_job.py turns into a Job, and as the CronJob's jobTemplate. A test renders
both and proves the Jobs equal. */}}

{{/* Labels of the training Jobs, their pods and Service: no chart or app version. The controller
finds its Jobs by these labels after a restart, and a `helm upgrade` that bumps a version restarts it:
with the version in them it would no longer see its running Job and resubmit under a taken name. */}}
{{- define "synpref.trainLabels" -}}
{{ include "synpref.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: synpref
app.kubernetes.io/component: train
{{- end }}

{{- define "synpref.trainService" -}}
{{- printf "%s-train" (include "synpref.fullname" .) }}
{{- end }}

{{/* Quantities rendered as strings, as training/k8s_job.py and the API server write them. */}}
{{- define "synpref.trainSpec.resources" -}}
{{- $t := .Values.training }}
{{- $limits := deepCopy (default dict $t.resources.limits) }}
{{- if gt (int $t.gpusPerNode) 0 }}
{{- $_ := set $limits .Values.gpu.resourceName (int $t.gpusPerNode) }}
{{- end }}
{{- with $t.resources.requests }}
requests:
{{- range $k, $v := . }}
  {{ $k }}: {{ toString $v | quote }}
{{- end }}
{{- end }}
{{- with $limits }}
limits:
{{- range $k, $v := . }}
  {{ $k }}: {{ toString $v | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Spec file for `synpref train submit` (TrainingJobSpec fields; name given at submit). */}}
{{- define "synpref.trainJobSpec" -}}
{{- $t := .Values.training }}
namespace: {{ .Release.Namespace | quote }}
image: {{ include "synpref.cudaImage" . }}
image_pull_policy: {{ .Values.cudaImage.pullPolicy }}
image_pull_secrets: {{ toJson .Values.imagePullSecrets }}
config_map: {{ include "synpref.fullname" . }}-config
config_key: train.yaml
config_dir: /etc/synpref
nodes: {{ $t.nodes }}
gpus_per_node: {{ $t.gpusPerNode }}
gpu_resource_name: {{ .Values.gpu.resourceName }}
resources: {{ toJson $t.resources }}
node_selector: {{ toJson $t.nodeSelector }}
tolerations: {{ toJson $t.tolerations }}
service_account: {{ include "synpref.serviceAccountName" . }}
data_claim: {{ include "synpref.dataClaim" . | default "null" }}
data_mount_path: /data
shm_size: {{ $t.shmSize }}
env: {{ toJson $t.extraEnv }}
env_from_secrets: {{ toJson (compact (list .Values.objectStore.existingSecret)) }}
backoff_limit: {{ $t.backoffLimit }}
ttl_seconds_after_finished: {{ $t.ttlSecondsAfterFinished }}
active_deadline_seconds: {{ if $t.activeDeadlineSeconds }}{{ $t.activeDeadlineSeconds }}{{ else }}null{{ end }}
rendezvous_service: {{ include "synpref.trainService" . }}
rendezvous_port: {{ $t.rendezvousPort }}
labels:
  {{- include "synpref.trainLabels" . | nindent 2 }}
security:
  run_as_user: {{ .Values.podSecurityContext.runAsUser }}
  run_as_group: {{ .Values.podSecurityContext.runAsGroup }}
  fs_group: {{ .Values.podSecurityContext.fsGroup }}
{{- end }}

{{/* The command training_command() builds. */}}
{{- define "synpref.trainCommand" -}}
{{- $t := .Values.training }}
{{- $config := "/etc/synpref/train.yaml" }}
{{- if and (le (int $t.nodes) 1) (le (int $t.gpusPerNode) 1) }}
{{- toJson (list "synpref" "train" "--config" $config) }}
{{- else }}
{{- $cmd := list "torchrun" "--nproc-per-node" (toString (max (int $t.gpusPerNode) 1)) }}
{{- if gt (int $t.nodes) 1 }}
{{- $endpoint := printf "$(SYNPREF_JOB_NAME)-0.%s:%d" (include "synpref.trainService" .) (int $t.rendezvousPort) }}
{{- $cmd = concat $cmd (list "--nnodes" (toString $t.nodes) "--rdzv-backend" "c10d" "--rdzv-endpoint" $endpoint "--rdzv-id" "$(SYNPREF_JOB_NAME)") }}
{{- else }}
{{- $cmd = append $cmd "--standalone" }}
{{- end }}
{{- toJson (concat $cmd (list "-m" "synpref.training.cli" "--config" $config)) }}
{{- end }}
{{- end }}

{{/* JobSpec of a training run (the CronJob's jobTemplate.spec). */}}
{{- define "synpref.trainJob" -}}
{{- $t := .Values.training }}
{{- $multi := gt (int $t.nodes) 1 }}
backoffLimit: {{ $t.backoffLimit }}
# A pod evicted, preempted or on a drained node is made again, not counted against backoffLimit.
podFailurePolicy:
  rules:
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
ttlSecondsAfterFinished: {{ $t.ttlSecondsAfterFinished }}
{{- if $t.activeDeadlineSeconds }}
activeDeadlineSeconds: {{ $t.activeDeadlineSeconds }}
{{- end }}
{{- if $multi }}
completionMode: Indexed
completions: {{ $t.nodes }}
parallelism: {{ $t.nodes }}
{{- end }}
template:
  metadata:
    labels:
      {{- include "synpref.trainLabels" . | nindent 6 }}
  spec:
    restartPolicy: Never
    serviceAccountName: {{ include "synpref.serviceAccountName" . }}
    automountServiceAccountToken: false
    {{- with $t.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $t.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with include "synpref.imagePullSecrets" . }}{{ . | trim | nindent 4 }}{{- end }}
    securityContext:
      {{- include "synpref.podSecurityContext" . | nindent 6 }}
    {{- if $multi }}
    subdomain: {{ include "synpref.trainService" . }}
    {{- end }}
    containers:
      - name: train
        image: {{ include "synpref.cudaImage" . }}
        imagePullPolicy: {{ .Values.cudaImage.pullPolicy }}
        command: {{ include "synpref.trainCommand" . }}
        env:
          - name: SYNPREF_JOB_NAME
            valueFrom:
              fieldRef:
                fieldPath: metadata.labels['batch.kubernetes.io/job-name']
          - name: HOME
            value: /tmp
          - name: HF_HOME
            value: /tmp/hf
          {{- with $t.extraEnv }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        {{- with .Values.objectStore.existingSecret }}
        envFrom:
          - secretRef:
              name: {{ . }}
        {{- end }}
        {{- if $multi }}
        ports:
          - name: rendezvous
            containerPort: {{ $t.rendezvousPort }}
        {{- end }}
        resources:
          {{- include "synpref.trainSpec.resources" . | trim | nindent 10 }}
        securityContext:
          {{- include "synpref.containerSecurityContext" . | nindent 10 }}
        volumeMounts:
          - name: config
            mountPath: /etc/synpref
            readOnly: true
          - name: tmp
            mountPath: /tmp
          - name: shm
            mountPath: /dev/shm
          {{- if .Values.persistence.enabled }}
          - name: data
            mountPath: /data
          {{- end }}
    volumes:
      - name: config
        configMap:
          name: {{ include "synpref.fullname" . }}-config
      - name: tmp
        emptyDir: {}
      - name: shm
        emptyDir:
          medium: Memory
          sizeLimit: {{ $t.shmSize }}
      {{- if .Values.persistence.enabled }}
      - name: data
        persistentVolumeClaim:
          claimName: {{ include "synpref.dataClaim" . }}
      {{- end }}
{{- end }}
