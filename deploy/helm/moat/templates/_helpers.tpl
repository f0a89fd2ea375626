{{- define "moat.fullname" -}}
{{- printf "%s-moat" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{- define "moat.selectorLabels" -}}
app.kubernetes.io/name: moat
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moat.labels" -}}
{{ include "moat.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "moat.secretName" -}}
{{- if .Values.secrets.create -}}
{{ include "moat.fullname" . }}
{{- else -}}
{{ required "secrets.existingSecret is required when secrets.create is false" .Values.secrets.existingSecret }}
{{- end -}}
{{- end }}
