{{/* Common labels on every object the chart creates. */}}
{{- define "lever.labels" -}}
app.kubernetes.io/name: lever
app.kubernetes.io/part-of: lever
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* repository@digest when a digest is set, else repository:tag. */}}
{{- define "lever.imageRef" -}}
{{- if .digest -}}
{{ .repository }}@{{ .digest }}
{{- else -}}
{{ .repository }}:{{ .tag }}
{{- end -}}
{{- end }}

{{- define "lever.serviceAccountName" -}}
{{ .Values.serviceAccount.name }}
{{- end }}

{{/*
Patch one Hera-rendered Argo spec (WorkflowTemplate spec or CronWorkflow workflowSpec) in place
with the values that vary per install.  The Argo file is parsed with fromYaml and re-emitted
with toYaml, so Argo's own {{...}} expressions stay strings Helm never evaluates.
Args: dict "spec" <map> "root" <chart context>.
*/}}
{{- define "lever.patchArgoSpec" -}}
{{- $spec := .spec -}}
{{- $v := .root.Values -}}
{{- $sa := include "lever.serviceAccountName" .root -}}
{{- $args := dict "image" (include "lever.imageRef" $v.image) "slim-image" (include "lever.imageRef" $v.slimImage) "store" $v.store "pushgateway" $v.pushgatewayUrl "data-pvc" $v.data.pvc "models-pvc" $v.models.pvc -}}
{{- $dropped := list -}}
{{- if not $v.data.pvc }}{{ $dropped = append $dropped "data" }}{{ end -}}
{{- if not $v.models.pvc }}{{ $dropped = append $dropped "models" }}{{ end -}}
{{- $_ := set $spec "serviceAccountName" $sa -}}
{{- range $p := (dig "arguments" "parameters" (list) $spec) -}}
{{- if hasKey $args $p.name -}}
{{- $_ := set $p "value" (get $args $p.name) -}}
{{- end -}}
{{- end -}}
{{- range $t := $spec.templates -}}
{{- if hasKey $t "container" -}}
{{- $_ := set $t "serviceAccountName" $sa -}}
{{- range $e := ($t.container.env | default list) -}}
{{- if and $e.valueFrom (hasKey $e.valueFrom "secretKeyRef") -}}
{{- if eq $e.name "HF_TOKEN" -}}
{{- $_ := set $e.valueFrom.secretKeyRef "name" $v.modelsPull.hfSecretName -}}
{{- else -}}
{{- $_ := set $e.valueFrom.secretKeyRef "name" $v.s3.secretName -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* a volume whose claim is not configured (models on S3) is dropped with its mount */ -}}
{{- if $dropped -}}
{{- $vols := list -}}
{{- range $vol := ($t.volumes | default list) -}}
{{- if not (has $vol.name $dropped) }}{{ $vols = append $vols $vol }}{{ end -}}
{{- end -}}
{{- $_ := set $t "volumes" $vols -}}
{{- $mounts := list -}}
{{- range $m := ($t.container.volumeMounts | default list) -}}
{{- if not (has $m.name $dropped) }}{{ $mounts = append $mounts $m }}{{ end -}}
{{- end -}}
{{- $_ := set $t.container "volumeMounts" $mounts -}}
{{- end -}}
{{- if eq (dig "metadata" "labels" "lever.dev/gpu" "" $t) "true" -}}
{{- $gpus := toString $v.gpu.count -}}
{{- $_ := set $t.container.resources.limits "nvidia.com/gpu" $gpus -}}
{{- $_ := set $t.container.resources.requests "nvidia.com/gpu" $gpus -}}
{{- if $v.gpu.nodeSelector -}}
{{- $_ := set $t "nodeSelector" $v.gpu.nodeSelector -}}
{{- else -}}
{{- $_ := unset $t "nodeSelector" -}}
{{- end -}}
{{- if $v.gpu.tolerations -}}
{{- $_ := set $t "tolerations" $v.gpu.tolerations -}}
{{- else -}}
{{- $_ := unset $t "tolerations" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}

