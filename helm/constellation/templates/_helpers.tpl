{{- define "constellation.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "constellation.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: constellation
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "constellation.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "constellation.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "constellation.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: the account to bind the operator's role to (not the namespace's default, which every pod uses)" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "constellation.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{- define "constellation.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "constellation.imageTag" .) -}}
{{- end -}}

{{- /* The objects of the release hook: made before `helm uninstall` deletes the rest, gone once it succeeded. */ -}}
{{- define "constellation.releaseHook" -}}
helm.sh/hook: pre-delete
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end -}}
