{{/*
Prometheus rule groups for SpecServe engines (rendered into the PrometheusRule; scripts/chart-check.sh
extracts them and runs `promtool test rules` against charts/specserve/tests/rules_test.yaml).

Series carry `namespace`, `pod` and the SpecService label (monitoring.serviceLabel, default
specserve_io_service: what the operator's per-service PodMonitors produce from the pod label
specserve.io/service, and what the operator's own PromQL expects).
The share of requests over the TPOT SLO is read from the TPOT histogram: each engine exports its
SLO as specserve_policy_tpot_slo_seconds; `specserve:tpot_slo_bucket:selected` marks, per pod, the
largest bucket bound <= that SLO (as an `le` label), and the good-request rate is that bucket's
rate. Bucket bounds are normalised ("1.0" -> "1") so Prometheus 2 and 3 label formats both match.
*/}}
{{- define "specserve.ruleGroups" -}}
{{- $slo := .Values.monitoring.slo -}}
{{- $svc := .Values.monitoring.serviceLabel -}}
{{- $buckets := .Values.monitoring.tpotBuckets -}}
{{- $n := len $buckets -}}
{{- $windows := uniq (list $slo.fastBurn.shortWindow $slo.fastBurn.longWindow $slo.slowBurn.shortWindow $slo.slowBurn.longWindow) -}}
{{- $budget := printf "(1 - %v)" $slo.objective -}}
- name: specserve.tpot-slo.recording
  rules:
    - record: specserve:tpot_slo_bucket:selected
      expr: |
        {{- range $i, $b := $buckets }}
        {{ if $i }}or {{ end }}label_replace(specserve_policy_tpot_slo_seconds >= {{ $b }}{{ if lt (add1 $i) $n }} < {{ index $buckets (add1 $i) }}{{ end }}, "le", "{{ $b }}", "", "")
        {{- end }}
    {{- range $w := $windows }}
    - record: specserve:tpot_requests:rate{{ $w }}
      expr: sum by (namespace, {{ $svc }}) (rate(specserve_request_tpot_seconds_count[{{ $w }}]))
    - record: specserve:tpot_slo_good:rate{{ $w }}
      expr: |
        sum by (namespace, {{ $svc }}) (
          label_replace(rate(specserve_request_tpot_seconds_bucket[{{ $w }}]), "le", "$1", "le", "(.+)\\.0")
          and on (namespace, pod, le) specserve:tpot_slo_bucket:selected
        )
    - record: specserve:tpot_slo_error_ratio:rate{{ $w }}
      expr: |
        clamp_min(1 - specserve:tpot_slo_good:rate{{ $w }} / specserve:tpot_requests:rate{{ $w }}, 0)
    {{- end }}
- name: specserve.engine.recording
  rules:
    - record: specserve:tpot_seconds:p90
      expr: |
        histogram_quantile(0.9, sum by (namespace, {{ $svc }}, le) (rate(specserve_request_tpot_seconds_bucket[2m])))
    - record: specserve:tpot_slo_seconds:max
      expr: max by (namespace, {{ $svc }}) (specserve_policy_tpot_slo_seconds)
    - record: specserve:draft_acceptance:ratio_rate2m
      expr: |
        sum by (namespace, {{ $svc }}) (rate(specserve_draft_tokens_accepted_total[2m]))
          / sum by (namespace, {{ $svc }}) (rate(specserve_draft_tokens_verified_total[2m]))
    - record: specserve:spec_length:mean2m
      expr: |
        sum by (namespace, {{ $svc }}) (rate(specserve_spec_length_sum[2m]))
          / sum by (namespace, {{ $svc }}) (rate(specserve_spec_length_count[2m]))
    - record: specserve:engine_replicas:count
      expr: count by (namespace, {{ $svc }}) (specserve_policy_generation)
- name: specserve.alerts
  rules:
    {{- range $key := list "fastBurn" "slowBurn" }}
    {{- $b := index $slo $key }}
    - alert: SpecServeTPOTBudget{{ if eq $key "fastBurn" }}FastBurn{{ else }}SlowBurn{{ end }}
      expr: |
        specserve:tpot_slo_error_ratio:rate{{ $b.longWindow }} > ({{ $b.rate }} * {{ $budget }})
        and
        specserve:tpot_slo_error_ratio:rate{{ $b.shortWindow }} > ({{ $b.rate }} * {{ $budget }})
      for: {{ $b.for }}
      labels:
        severity: {{ $b.severity }}
      annotations:
        summary: "SpecService {{ "{{" }} $labels.namespace {{ "}}" }}/{{ "{{" }} $labels.{{ $svc }} {{ "}}" }} burns its TPOT error budget {{ $b.rate }}x too fast"
        description: "{{ "{{" }} $value | humanizePercentage {{ "}}" }} of requests missed the TPOT SLO over the last {{ $b.shortWindow }} and {{ $b.longWindow }} (objective {{ $slo.objective }})."
    {{- end }}
    - alert: SpecServeSLOInfeasible
      expr: max by (namespace, {{ $svc }}) (specserve_slo_infeasible) > 0
      for: 10m
      labels:
        severity: warning
      annotations:
        summary: "SpecService {{ "{{" }} $labels.namespace {{ "}}" }}/{{ "{{" }} $labels.{{ $svc }} {{ "}}" }}: even plain decoding breaks the TPOT budget"
        description: "Add replicas or relax the SLO; speculation cannot help while a step without drafts already exceeds the budget."
    - alert: SpecServePolicyRejected
      expr: max by (namespace, {{ $svc }}, pod) (specserve_policy_invalid) > 0
      for: 5m
      labels:
        severity: warning
      annotations:
        summary: "Engine {{ "{{" }} $labels.namespace {{ "}}" }}/{{ "{{" }} $labels.pod {{ "}}" }} rejects its policy file and keeps the last good policy"
        description: "Check the operator log and the <name>-policy ConfigMap of SpecService {{ "{{" }} $labels.{{ $svc }} {{ "}}" }}."
{{- end -}}
