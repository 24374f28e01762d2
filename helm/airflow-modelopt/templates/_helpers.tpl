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

{{/* "true" when the chart's MLflow runs MLflow's basic-auth app. */}}
{{- define "modelopt.basicAuth" -}}
{{- and .Values.mlflow.enabled (eq .Values.mlflow.auth.mode "basic-auth") -}}
{{- end -}}

{{- define "modelopt.mlflowAuthSecretName" -}}
{{- printf "%s-auth" (include "modelopt.mlflowName" .) -}}
{{- end -}}

{{/* Secret holding the admin's `username` and `password`: the one named in values, or the chart's. */}}
{{- define "modelopt.mlflowAdminSecretName" -}}
{{- default (include "modelopt.mlflowAuthSecretName" .) .Values.mlflow.auth.existingSecret -}}
{{- end -}}

{{/*
The MLflow admin account as JSON {"username", "password"}: for the auth Secret, Airflow's
connection and the step pods' Secret, which must agree. The password is, in order: the one in
values; the one already in the cluster (lookup: `helm upgrade` keeps it); a new random one. It is
worked out once per render and kept in .Values.mlflow.auth (shared by every template), so a
generated password is the same in all three Secrets. With mlflow.auth.existingSecret it is read
from that Secret, which must then exist (lookup; `helm template` cannot read the cluster).
*/}}
{{- define "modelopt.mlflowAdmin" -}}
{{- $auth := .Values.mlflow.auth -}}
{{- if not (hasKey $auth "resolvedAdmin") -}}
{{- $admin := dict "username" $auth.admin.username "password" $auth.admin.password -}}
{{- if $auth.existingSecret -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $auth.existingSecret -}}
{{- $data := (and $existing $existing.data) | default dict -}}
{{- if not (and (hasKey $data "username") (hasKey $data "password")) -}}
{{- fail (printf "mlflow.auth.existingSecret: cannot read keys username and password of Secret %s in namespace %s, which Airflow's connection and the step pods' Secret are made from. Create it before installing (`helm template` and --dry-run cannot read the cluster), or set connection.create=false and connection.credentialsSecret to give both yourself." $auth.existingSecret .Release.Namespace) -}}
{{- end -}}
{{- $admin = dict "username" (index $data "username" | b64dec) "password" (index $data "password" | b64dec) -}}
{{- else if not $admin.password -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "modelopt.mlflowAuthSecretName" .) -}}
{{- if and $existing $existing.data (hasKey $existing.data "password") -}}
{{- $_ := set $admin "password" (index $existing.data "password" | b64dec) -}}
{{- else -}}
{{- $_ := set $admin "password" (randAlphaNum 32) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $auth "resolvedAdmin" $admin -}}
{{- end -}}
{{- $auth.resolvedAdmin | toJson -}}
{{- end -}}

{{/* Secret and key of the auth database's URI: its own, or MLflow's backend store (same database). */}}
{{- define "modelopt.authDatabaseSecretName" -}}
{{- default (include "modelopt.backendSecretName" .) .Values.mlflow.auth.database.existingSecret -}}
{{- end -}}

{{- define "modelopt.authDatabaseSecretKey" -}}
{{- if .Values.mlflow.auth.database.existingSecret -}}{{ .Values.mlflow.auth.database.uriKey }}{{- else -}}{{ include "modelopt.backendSecretKey" . }}{{- end -}}
{{- end -}}

{{/* [modelopt] kubernetes_mlflow_secret: the user's Secret, else the chart's when MLflow asks for credentials. */}}
{{- define "modelopt.stepCredentialsSecretName" -}}
{{- if .Values.connection.credentialsSecret -}}
{{- .Values.connection.credentialsSecret -}}
{{- else if eq (include "modelopt.basicAuth" .) "true" -}}
{{- printf "%s-credentials" (include "modelopt.mlflowName" .) -}}
{{- end -}}
{{- end -}}

{{/* AIRFLOW_CONN_<ID>: the tracking URI, with the admin's credentials when MLflow asks for them. */}}
{{- define "modelopt.connectionUri" -}}
{{- $uri := include "modelopt.trackingUri" . -}}
{{- if eq (include "modelopt.basicAuth" .) "true" -}}
{{- $admin := include "modelopt.mlflowAdmin" . | fromJson -}}
{{- $u := urlParse $uri -}}
{{- printf "%s://%s:%s@%s%s%s" $u.scheme (urlquery $admin.username) (urlquery $admin.password) $u.host $u.path (ternary (printf "?%s" $u.query) "" (ne $u.query "")) -}}
{{- else -}}
{{- $uri -}}
{{- end -}}
{{- end -}}

{{/* Selector of the step pods: the label the provider's Kubernetes launcher puts on each one. */}}
{{- define "modelopt.stepPodSelector" -}}
matchExpressions:
  - key: airflow-modelopt/step
    operator: Exists
{{- end -}}
