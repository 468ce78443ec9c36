{{- define "pe.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pe.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pe.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "pe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "pe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The service's host name inside the mesh. */}}
{{- define "pe.serviceHost" -}}
{{- printf "%s.%s.svc.cluster.local" (include "pe.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "pe.policiesConfigMap" -}}
{{- default (printf "%s-policies" (include "pe.fullname" .)) .Values.policies.existingConfigMap -}}
{{- end -}}

{{- define "pe.tenantsSecret" -}}
{{- default (printf "%s-tenants" (include "pe.fullname" .)) .Values.tenants.existingSecret -}}
{{- end -}}

{{- define "pe.redisSecret" -}}
{{- default (printf "%s-redis" (include "pe.fullname" .)) .Values.redis.existingSecret -}}
{{- end -}}

{{/* Fill the placeholders of a generated JSON file (policy-engine mesh-config chart-files). */}}
{{- define "pe.fillPlaceholders" -}}
{{- $root := index . 0 -}}
{{- $text := index . 1 -}}
{{- $cluster := printf "outbound|%d||%s" (int $root.Values.service.grpcPort) (include "pe.serviceHost" $root) -}}
{{- $text = $text | replace "@@POLICY_CLUSTER@@" $cluster -}}
{{- $text = $text | replace "@@PATCH_CONTEXT@@" $root.Values.istio.patchContext -}}
{{- $text = $text | replace "@@SERVICE_HOST@@" (include "pe.serviceHost" $root) -}}
{{- $text = $text | replace "\"@@GRPC_PORT@@\"" (toString (int $root.Values.service.grpcPort)) -}}
{{- $text = $text | replace "@@OTLP_HOST@@" $root.Values.istio.otlp.host -}}
{{- $text = $text | replace "\"@@OTLP_PORT@@\"" (toString (int $root.Values.istio.otlp.port)) -}}
{{- $text -}}
{{- end -}}

{{/* The meshConfig.extensionProviders entries (JSON is YAML: numbers stay as generated). */}}
{{- define "pe.meshConfig" -}}
{{- $json := include "pe.fillPlaceholders" (list . (.Files.Get "files/extension-providers.json")) -}}
{{- $json = $json | replace "\"name\": \"policy-engine\"" (printf "\"name\": %q" .Values.istio.authzProvider) -}}
{{- $json = $json | replace "\"name\": \"policy-engine-als\"" (printf "\"name\": %q" .Values.istio.accessLogProvider) -}}
{{- $json = $json | replace "\"name\": \"policy-engine-otel\"" (printf "\"name\": %q" .Values.istio.tracingProvider) -}}
meshConfig:
  extensionProviders:
    {{- $json | nindent 4 }}
{{- end -}}

{{/* The gateway pods' labels: istio.gatewaySelector, or Istio's default ingress gateway. A
default in values.yaml would be merged with the user's map by Helm, not replaced by it. */}}
{{- define "pe.gatewaySelector" -}}
{{- toYaml (default (dict "istio" "ingressgateway") .Values.istio.gatewaySelector) -}}
{{- end -}}
