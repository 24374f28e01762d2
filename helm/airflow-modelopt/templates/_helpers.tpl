{{/* Names. "<release>-airflow-modelopt", or the release name when it already says so. */}}
{{- define "modelopt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "modelopt.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "modelopt.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "modelopt.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "modelopt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: include "modelopt.selectorLabels" (list . "mlflow") */}}
{{- define "modelopt.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "modelopt.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* Namespace step pods run in ([modelopt] kubernetes_namespace). */}}
{{- define "modelopt.stepNamespace" -}}
{{- default .Release.Namespace .Values.provider.stepNamespace -}}
{{- end -}}

{{/* Step pods' ServiceAccount ([modelopt] kubernetes_service_account); empty = namespace default. */}}
{{- define "modelopt.stepServiceAccountName" -}}
{{- if .Values.stepServiceAccount.create -}}
{{- default (printf "%s-steps" (include "modelopt.fullname" .)) .Values.stepServiceAccount.name -}}
{{- else -}}
{{- .Values.stepServiceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "modelopt.stepImageTag" -}}
{{- default .Chart.AppVersion .Values.stepImages.tag -}}
{{- end -}}

{{- define "modelopt.configName" -}}
{{- printf "%s-config" (include "modelopt.fullname" .) -}}
{{- end -}}

{{- define "modelopt.connectionSecretName" -}}
{{- printf "%s-connection" (include "modelopt.fullname" .) -}}
{{- end -}}

{{/* AIRFLOW_CONN_<ID>: how Airflow reads a connection from the environment. */}}
{{- define "modelopt.connectionEnvName" -}}
{{- printf "AIRFLOW_CONN_%s" (upper .Values.provider.mlflowConnId) -}}
{{- end -}}

{{- define "modelopt.mlflowName" -}}
{{- printf "%s-mlflow" (include "modelopt.fullname" .) -}}
{{- end -}}

{{/* The Service's DNS names, shortest first. */}}
{{- define "modelopt.mlflowHostnames" -}}
{{- $svc := include "modelopt.mlflowName" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) | toJson -}}
{{- end -}}

{{/* Tracking URI Airflow and the step pods use: fully qualified, since steps may run in another namespace. */}}
{{- define "modelopt.trackingUri" -}}
{{- if .Values.connection.trackingUri -}}
{{- .Values.connection.trackingUri -}}
{{- else -}}
{{- $hosts := include "modelopt.mlflowHostnames" . | fromJsonArray -}}
{{- printf "http://%s:%d" (last $hosts) (int .Values.mlflow.service.port) -}}
{{- end -}}
{{- end -}}

{{/* --allowed-hosts: the Service's names with and without a port, localhost for port-forward, extras. */}}
{{- define "modelopt.mlflowAllowedHosts" -}}
{{- $hosts := list -}}
{{- range (include "modelopt.mlflowHostnames" . | fromJsonArray) -}}
{{- $hosts = append $hosts . -}}
{{- $hosts = append $hosts (printf "%s:*" .) -}}
{{- end -}}
{{- $hosts = concat $hosts (list "localhost" "localhost:*" "127.0.0.1" "127.0.0.1:*") .Values.mlflow.allowedHosts -}}
{{- join "," $hosts -}}
{{- end -}}

{{- define "modelopt.postgresqlName" -}}
{{- printf "%s-postgresql" (include "modelopt.fullname" .) -}}
{{- end -}}

{{/* Secret and key holding MLflow's backend store URI. */}}
{{- define "modelopt.backendSecretName" -}}
{{- if .Values.postgresql.enabled -}}
{{- include "modelopt.postgresqlName" . -}}
{{- else -}}
{{- required "postgresql.enabled=false needs externalDatabase.existingSecret: the name of a Secret holding MLflow's backend store URI (postgresql+psycopg2://user:password@host:5432/db)" .Values.externalDatabase.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "modelopt.backendSecretKey" -}}
{{- if .Values.postgresql.enabled -}}backend-store-uri{{- else -}}{{ .Values.externalDatabase.uriKey }}{{- end -}}
{{- end -}}

{{- define "modelopt.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
