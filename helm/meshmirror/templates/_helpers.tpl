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
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
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
{{- default (printf "%s-gossip" (include "meshmirror.fullname" .)) .Values.gossip.existingSecret -}}
{{- end -}}

{{- define "meshmirror.gossipKeyDir" -}}/etc/meshmirror/gossip{{- end -}}

{{/*
Mirror targets written into hosts.toml, as a JSON list: the node's own mirror
(hostPort) first, then the NodePort Service reaching any node, then anything extra.
$(NODE_IP) is expanded by the kubelet; a bare IPv6 address is bracketed by
meshmirror itself.
*/}}
{{- define "meshmirror.mirrorTargets" -}}
{{- $registry := .Values.service.registry -}}
{{- $targets := list (printf "http://%s:%d" $registry.mirrorHost (int $registry.hostPort)) -}}
{{- if gt (int $registry.nodePort) 0 -}}
{{- $targets = append $targets (printf "http://%s:%d" $registry.mirrorHost (int $registry.nodePort)) -}}
{{- end -}}
{{- toJson (concat $targets .Values.meshmirror.additionalMirrorTargets) -}}
{{- end -}}

{{/*
The hosts.toml settings as MESHMIRROR_* variables, shared by the `configure` init
container and the meshmirror container (whose `run --write-hosts-config` repeats
the step at every start, and whose `meshmirror doctor` checks against the same
values). Registries and targets never contain a comma, so a list travels as one
comma-separated variable.
*/}}
{{- define "meshmirror.hostsEnv" -}}
# The host's address: containerd runs in the host's network namespace.
- name: NODE_IP
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
- name: MESHMIRROR_CONTAINERD_REGISTRY_CONFIG_PATH
  value: {{ .Values.meshmirror.containerdRegistryConfigPath | quote }}
{{- with .Values.meshmirror.mirroredRegistries }}
- name: MESHMIRROR_MIRRORED_REGISTRIES
  value: {{ join "," . | quote }}
{{- end }}
- name: MESHMIRROR_MIRROR_TARGETS
  value: {{ include "meshmirror.mirrorTargets" . | fromJsonArray | join "," | quote }}
- name: MESHMIRROR_RESOLVE_TAGS
  value: {{ ternary "upstream-first" "off" .Values.meshmirror.resolveTags | quote }}
- name: MESHMIRROR_PREPEND_EXISTING
  value: {{ printf "%t" .Values.meshmirror.prependExisting | quote }}
{{- end -}}

{{/*
A listen address for `port`: every address, or with meshmirror.listenOnPodIP the
pod's own (bracketed, which meshmirror reads for IPv4 and IPv6 alike).
*/}}
{{- define "meshmirror.listenAddr" -}}
{{- $host := ternary "[$(MESHMIRROR_ADVERTISE_ADDR)]" "" .root.Values.meshmirror.listenOnPodIP -}}
{{- printf "%s:%d" $host (int .port) -}}
{{- end -}}

{{/*
Arguments of `meshmirror run`: what the chart fixes, plus the filters. Scalar
settings and the hosts.toml lists travel as MESHMIRROR_* variables instead (see
the container's env); a filter is a regular expression, which may hold a comma.
*/}}
{{- define "meshmirror.runArgs" -}}
{{- $args := list "run" "--store=containerd" (printf "--join-dns=%s" (include "meshmirror.joinDNS" .)) -}}
{{- range .Values.meshmirror.registryFilters -}}
{{- $args = append $args (printf "--registry-filters=%s" .) -}}
{{- end -}}
{{- $args = concat $args .Values.extraArgs -}}
{{- toYaml $args -}}
{{- end -}}

{{/* The post-delete cleanup's readiness port, inside its pods' own network namespace. */}}
{{- define "meshmirror.cleanupPort" -}}8080{{- end -}}

{{- define "meshmirror.cleanupName" -}}
{{- printf "%s-cleanup" (include "meshmirror.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Where blobs from peers wait until verified: the `spool` emptyDir volume. */}}
{{- define "meshmirror.spoolDir" -}}/var/spool/meshmirror{{- end -}}

{{/*
mirrorSpoolLimit in bytes, read the way `meshmirror.cli.parse_size` reads it:
Ki/Mi/Gi/Ti are powers of 1024, k/K/M/G/T powers of 1000, a trailing B changes
nothing. values.schema.json admits only these forms, with few enough digits that
the arithmetic stays within 64 bits; the checks here hold the same line when the
schema is skipped (--skip-schema-validation).
*/}}
{{- define "meshmirror.spoolLimitBytes" -}}
{{- include "meshmirror.sizeBytes" (dict "key" "mirrorSpoolLimit" "value" .Values.meshmirror.mirrorSpoolLimit) -}}
{{- end -}}

{{/* upstreamCacheLimit in bytes; empty means mirrorSpoolLimit, as for the CLI. */}}
{{- define "meshmirror.cacheLimitBytes" -}}
{{- if eq (toString .Values.meshmirror.upstreamCacheLimit) "" -}}
{{- include "meshmirror.spoolLimitBytes" . -}}
{{- else -}}
{{- include "meshmirror.sizeBytes" (dict "key" "upstreamCacheLimit" "value" .Values.meshmirror.upstreamCacheLimit) -}}
{{- end -}}
{{- end -}}

{{/* MESHMIRROR_UPSTREAM_CACHE_LIMIT, written as meshmirror.spoolLimitEnv writes its value. */}}
{{- define "meshmirror.cacheLimitEnv" -}}
{{- if kindIs "string" .Values.meshmirror.upstreamCacheLimit -}}
{{- .Values.meshmirror.upstreamCacheLimit -}}
{{- else -}}
{{- include "meshmirror.cacheLimitBytes" . -}}
{{- end -}}
{{- end -}}

{{/* A size value ("key", "value") in bytes, read as meshmirror.spoolLimitBytes says. */}}
{{- define "meshmirror.sizeBytes" -}}
{{- $key := .key -}}
{{- $v := .value -}}
{{- if kindIs "string" $v -}}
{{- if not (regexMatch "^([0-9]{1,15}B?|[0-9]{1,6}(Ki|Mi|Gi|Ti|k|K|M|G|T)B?)$" $v) -}}
{{- fail (printf "meshmirror.%s: expected bytes or a size such as 4Gi or 512Mi, got %q" $key $v) -}}
{{- end -}}
{{- $units := dict "" 1 "k" 1000 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000
      "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 -}}
{{- $unit := regexReplaceAll "^[0-9]+" $v "" | trimSuffix "B" -}}
{{- mul (regexFind "^[0-9]+" $v | atoi) (get $units $unit) -}}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "float64" $v) -}}
{{- if or (lt (float64 $v) 0.0) (gt (float64 $v) 999999999999999.0) (ne (float64 $v) (float64 (int64 $v))) -}}
{{- fail (printf "meshmirror.%s: expected a whole number of bytes from 0 to 999999999999999, got %v" $key $v) -}}
{{- end -}}
{{- int64 $v -}}
{{- else -}}
{{- fail (printf "meshmirror.%s: expected bytes or a size such as 4Gi or 512Mi, got %v" $key $v) -}}
{{- end -}}
{{- end -}}

{{/*
MESHMIRROR_MIRROR_SPOOL_LIMIT: a string as written (every form the schema admits
is one parse_size reads), a number in plain digits (toString would print a large
float from a values file as 4.294967296e+09, which no parser takes).
*/}}
{{- define "meshmirror.spoolLimitEnv" -}}
{{- if kindIs "string" .Values.meshmirror.mirrorSpoolLimit -}}
{{- .Values.meshmirror.mirrorSpoolLimit -}}
{{- else -}}
{{- include "meshmirror.spoolLimitBytes" . -}}
{{- end -}}
{{- end -}}

{{/*
sizeLimit of the `spool` volume (which also holds the blob cache): the larger of
mirrorSpoolLimit and upstreamCacheLimit rounded up to whole MiB, plus an
eighth of it and at least 64Mi. The process never reserves more than the limit,
but the kubelet counts what the filesystem uses, not what the budget counts:
every file ends on a whole block, and filesystems allocate ahead of a growing
file (XFS's speculative preallocation). A few KiB over an exact limit would
evict the pod and break every pull in flight on the node, while the margin only
raises a cap (sizeLimit reserves nothing). The margin needs the value in bytes
anyway, so the sizeLimit is written from those bytes as whole MiB with the Mi
suffix: a valid quantity whatever form the value was written in (4GiB, 500M,
plain bytes), with no need to narrow the forms to those Kubernetes reads alike.
The schema refuses lower-case units other than k ("512m", "4gi"): "m" is milli
to Kubernetes and mega to parse_size, so neither reading can be assumed.
*/}}
{{- define "meshmirror.spoolSizeLimit" -}}
{{- $bytes := max (include "meshmirror.spoolLimitBytes" . | atoi) (include "meshmirror.cacheLimitBytes" . | atoi) -}}
{{- $mi := div (add $bytes 1048575) 1048576 -}}
{{- printf "%dMi" (add $mi (max 64 (div $mi 8))) -}}
{{- end -}}

{{/*
meshmirror.logLevel as the CLI spells it: the schema admits any case and Spegel's
"warn", the CLI takes debug, info, warning and error.
*/}}
{{- define "meshmirror.logLevel" -}}
{{- $level := lower .Values.meshmirror.logLevel -}}
{{- ternary "warning" $level (eq $level "warn") -}}
{{- end -}}
