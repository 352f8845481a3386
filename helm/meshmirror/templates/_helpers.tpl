{{/* Names are truncated to 63 characters: Kubernetes DNS label limit. */}}
{{- define "meshmirror.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshmirror.fullname" -}}
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

{{- define "meshmirror.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{- define "meshmirror.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "meshmirror.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "meshmirror.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshmirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "meshmirror.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "meshmirror.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "meshmirror.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The headless Service every pod resolves to find the mesh (--join-dns). */}}
{{- define "meshmirror.meshServiceName" -}}
{{- printf "%s-mesh" (include "meshmirror.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshmirror.joinDNS" -}}
{{- printf "%s.%s.svc.%s" (include "meshmirror.meshServiceName" .) (include "meshmirror.namespace" .) .Values.clusterDomain -}}
{{- end -}}

{{- define "meshmirror.gossipSecretName" -}}
{{- default (printf "%s-gossip" (include "meshmirror.fullname" .)) .Values.mesh.encryption.existingSecret -}}
{{- end -}}

{{- define "meshmirror.gossipKeyDir" -}}/etc/meshmirror/gossip{{- end -}}

{{/*
Repeated --mirrored-registries flags (a list), shared by run, configure and cleanup
so the three always agree on which registries are ours.
*/}}
{{- define "meshmirror.mirroredRegistryArgs" -}}
{{- $args := list -}}
{{- range .Values.mirroredRegistries -}}
{{- $args = append $args (printf "--mirrored-registries=%s" .) -}}
{{- end -}}
{{- toJson $args -}}
{{- end -}}

{{/* Arguments of `meshmirror configure` (the init container). */}}
{{- define "meshmirror.configureArgs" -}}
{{- $v := .Values -}}
{{- $args := list "configure" (printf "--containerd-registry-config-path=%s" $v.containerd.registryConfigPath) -}}
{{- $args = concat $args (include "meshmirror.mirroredRegistryArgs" . | fromJsonArray) -}}
{{- /* The node's own mirror first, then the Service, then anything extra. */ -}}
{{- $args = append $args (printf "--mirror-targets=http://%s:%d" $v.registry.mirrorHost (int $v.registry.hostPort)) -}}
{{- if gt (int $v.registry.nodePort) 0 -}}
{{- $args = append $args (printf "--mirror-targets=http://%s:%d" $v.registry.mirrorHost (int $v.registry.nodePort)) -}}
{{- end -}}
{{- range $v.additionalMirrorTargets -}}
{{- $args = append $args (printf "--mirror-targets=%s" .) -}}
{{- end -}}
{{- $args = append $args (printf "--resolve-tags=%t" $v.resolveTags) -}}
{{- $args = append $args (printf "--prepend-existing=%t" $v.prependExisting) -}}
{{- toYaml $args -}}
{{- end -}}

{{/* Command of the preStop hook: `meshmirror cleanup` for the same registries. */}}
{{- define "meshmirror.cleanupCommand" -}}
{{- $args := list "meshmirror" "cleanup" (printf "--containerd-registry-config-path=%s" .Values.containerd.registryConfigPath) -}}
{{- $args = concat $args (include "meshmirror.mirroredRegistryArgs" . | fromJsonArray) -}}
{{- toYaml $args -}}
{{- end -}}

{{/*
Arguments of `meshmirror run`: what the chart fixes, plus the lists. Scalar
settings travel as MESHMIRROR_* variables instead (see the container's env).
*/}}
{{- define "meshmirror.runArgs" -}}
{{- $args := list "run" "--store=containerd" (printf "--join-dns=%s" (include "meshmirror.joinDNS" .)) -}}
{{- $args = concat $args (include "meshmirror.mirroredRegistryArgs" . | fromJsonArray) -}}
{{- range .Values.registryFilters -}}
{{- $args = append $args (printf "--registry-filters=%s" .) -}}
{{- end -}}
{{- $args = concat $args .Values.extraArgs -}}
{{- toYaml $args -}}
{{- end -}}
