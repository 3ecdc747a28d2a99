{{- define "fedkube.name" -}}{{ .Release.Name }}-operator{{- end -}}
{{- define "fedkube.image" -}}{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}{{- end -}}
{{- define "fedkube.labels" -}}
app.kubernetes.io/name: fedkube
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "fedkube.selector" -}}
app.kubernetes.io/name: fedkube
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}
