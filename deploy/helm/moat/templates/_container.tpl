{{- define "moat.container" -}}
image: {{ .Values.image.repository }}:{{ .Values.image.tag }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args: ["serve", "--config", "/etc/moat/config/config.yaml"]
env:
  - name: MOAT_REDIS_URL
    value: {{ .Values.redis.url | quote }}
# The admin service listens on the pod's loopback only: `kubectl exec` or `kubectl port-forward`.
ports:
  - {name: grpc, containerPort: {{ .Values.ports.grpc }}}
  - {name: metrics, containerPort: {{ .Values.ports.metrics }}}
# Kubernetes' gRPC probes speak grpc.health.v1, which moat serves without an API key.
startupProbe:
  grpc: {port: {{ .Values.ports.grpc }}}
  periodSeconds: 2
  failureThreshold: 60
readinessProbe:
  grpc: {port: {{ .Values.ports.grpc }}}
  periodSeconds: 5
livenessProbe:
  grpc: {port: {{ .Values.ports.grpc }}}
  periodSeconds: 10
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {drop: [ALL]}
resources:
  {{- toYaml .Values.resources | nindent 2 }}
volumeMounts:
  - {name: moat-config, mountPath: /etc/moat/config, readOnly: true}
  - {name: moat-secrets, mountPath: /etc/moat/secrets, readOnly: true}
{{- end }}
