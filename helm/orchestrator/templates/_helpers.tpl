{{/* Chart name, overridable. */}}
{{- define "orchestrator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the release name when it already contains the chart name, else release-chart. */}}
{{- define "orchestrator.fullname" -}}
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

{{- define "orchestrator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the service's pods; never change them on upgrade. */}}
{{- define "orchestrator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "orchestrator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "orchestrator.labels" -}}
helm.sh/chart: {{ include "orchestrator.chart" . }}
{{ include "orchestrator.selectorLabels" . }}
app.kubernetes.io/version: {{ include "orchestrator.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/part-of: incidentfox
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "orchestrator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "orchestrator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "orchestrator.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{- define "orchestrator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (include "orchestrator.imageTag" .) -}}
{{- end -}}
{{- end -}}

{{/*
The plain settings, as a YAML map of environment variable to string. The ConfigMap holds them for
the Deployment; the migration Job inlines them, because as a pre-install hook it runs before the
ConfigMap exists. `config` entries win over the chart's own settings.
*/}}
{{- define "orchestrator.settings" -}}
{{- $s := dict -}}
{{- $_ := set $s "ORCHESTRATOR_LISTEN_ADDR" (printf "0.0.0.0:%d" (int .Values.containerPort)) -}}
{{- $_ := set $s "ORCHESTRATOR_SHUTDOWN_GRACE_SECONDS" (toString (int .Values.shutdownGraceSeconds)) -}}
{{- $_ := set $s "RUST_LOG" (toString .Values.logging.level) -}}
{{- $_ := set $s "LOG_FORMAT" (toString .Values.logging.format) -}}
{{- $_ := set $s "CONFIG_SERVICE_URL" (toString .Values.neighbours.configServiceUrl) -}}
{{- $_ := set $s "AGENT_API_URL" (toString .Values.neighbours.agentApiUrl) -}}
{{- $_ := set $s "AI_PIPELINE_API_URL" (toString .Values.neighbours.aiPipelineApiUrl) -}}
{{- $_ := set $s "ORCHESTRATOR_NEIGHBOUR_TIMEOUT_SECONDS" (toString (int .Values.neighbours.timeoutSeconds)) -}}
{{- $_ := set $s "ORCHESTRATOR_AGENT_DIALECT" (toString .Values.neighbours.agentDialect) -}}
{{- $_ := set $s "K8S_NAMESPACE" (toString .Values.kubernetes.namespace) -}}
{{- $_ := set $s "AI_PIPELINE_IMAGE" (toString .Values.kubernetes.aiPipelineImage) -}}
{{- $_ := set $s "AI_PIPELINE_SERVICE_ACCOUNT" (toString .Values.kubernetes.aiPipelineServiceAccount) -}}
{{- $_ := set $s "DEPENDENCY_SERVICE_IMAGE" (toString .Values.kubernetes.dependencyServiceImage) -}}
{{- $_ := set $s "DEPENDENCY_SERVICE_ACCOUNT" (toString .Values.kubernetes.dependencyServiceAccount) -}}
{{- $_ := set $s "AGENT_IMAGE" (toString .Values.kubernetes.agentImage) -}}
{{- $_ := set $s "AGENT_SERVICE_ACCOUNT" (toString .Values.kubernetes.agentServiceAccount) -}}
{{- $_ := set $s "ORCHESTRATOR_DB_POOL_SIZE" (toString (int .Values.database.poolSize)) -}}
{{- $_ := set $s "ORCHESTRATOR_LOCK_POOL_SIZE" (toString (int .Values.database.lockPoolSize)) -}}
{{- if eq .Values.database.mode "parts" -}}
{{- $_ := set $s "DB_HOST" (toString .Values.database.host) -}}
{{- $_ := set $s "DB_PORT" (toString (int .Values.database.port)) -}}
{{- $_ := set $s "DB_NAME" (toString .Values.database.name) -}}
{{- $_ := set $s "DB_USERNAME" (toString .Values.database.user) -}}
{{- end -}}
{{- range $k, $v := .Values.config -}}
{{- $_ := set $s $k (toString $v) -}}
{{- end -}}
{{- toYaml $s -}}
{{- end -}}

{{/* Secret variables as env entries, each a secretKeyRef into the existing Secret. */}}
{{- define "orchestrator.secretEnv" -}}
{{- $root := index . 0 -}}
{{- $only := index . 1 -}}
{{- $keys := $root.Values.secrets.keys -}}
{{- $mode := $root.Values.database.mode -}}
{{- /* A variable that extraEnv sets (from another Secret) is not mapped here too. */ -}}
{{- $overridden := list -}}
{{- range $root.Values.extraEnv -}}{{- $overridden = append $overridden .name -}}{{- end -}}
{{- range $var := list "DATABASE_URL" "DB_PASSWORD" "SLACK_SIGNING_SECRET" "GITHUB_WEBHOOK_SECRET" "PAGERDUTY_WEBHOOK_SECRET" "INCIDENTIO_WEBHOOK_SECRET" "ORCHESTRATOR_INTERNAL_ADMIN_TOKEN" "ORCHESTRATOR_INTERNAL_TOKEN" "ORCHESTRATOR_SECRETS_KEY" "INVESTIGATE_AUTH_TOKEN" "SLACK_BOT_TOKEN" }}
{{- $key := index $keys $var | default "" }}
{{- /* DATABASE_URL in mode url, DB_PASSWORD in mode parts: required; the other one is not mapped. */}}
{{- $database := has $var (list "DATABASE_URL" "DB_PASSWORD") }}
{{- $required := or (and (eq $var "DATABASE_URL") (eq $mode "url")) (and (eq $var "DB_PASSWORD") (eq $mode "parts")) }}
{{- if and $key (or $required (not $database)) (or (not $only) (has $var $only)) (not (has $var $overridden)) }}
- name: {{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.secrets.existingSecret }}
      key: {{ $key }}
      optional: {{ not $required }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Refuse values that the schema cannot express. */}}
{{- define "orchestrator.validate" -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int .Values.shutdownGraceSeconds) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than shutdownGraceSeconds (%d), or Kubernetes kills the pod before it has drained" (int .Values.terminationGracePeriodSeconds) (int .Values.shutdownGraceSeconds)) -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- $urlFromExtraEnv := false -}}
{{- range .Values.extraEnv -}}
{{- if eq .name "DATABASE_URL" -}}{{- $urlFromExtraEnv = true -}}{{- end -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.targetMemoryUtilizationPercentage) -}}
{{- fail "autoscaling is enabled without a target: set autoscaling.targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" -}}
{{- end -}}
{{- if and (eq .Values.database.mode "url") (not (index .Values.secrets.keys "DATABASE_URL")) (not $urlFromExtraEnv) -}}
{{- fail "database.mode is url: secrets.keys.DATABASE_URL must name the Secret key holding the URL (or extraEnv must set DATABASE_URL from another Secret)" -}}
{{- end -}}
{{- if eq .Values.database.mode "parts" -}}
{{- if not .Values.database.host -}}
{{- fail "database.mode is parts: database.host is required" -}}
{{- end -}}
{{- if not (index .Values.secrets.keys "DB_PASSWORD") -}}
{{- fail "database.mode is parts: secrets.keys.DB_PASSWORD must name the Secret key holding the password" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.rbac.create (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) -}}
{{- fail "rbac.create with serviceAccount.create=false needs serviceAccount.name: the RoleBinding must name the pods' account" -}}
{{- end -}}
{{- end -}}
