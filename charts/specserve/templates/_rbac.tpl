{{/*
Exactly the calls the operator makes (operator/specserve: reconcile.py through kube.py, plus kopf
itself). Nothing is deleted by the operator: owned objects go away through ownerReferences and
the garbage collector. tests/e2e/test_rbac.py checks allowed and denied verbs with
`kubectl auth can-i --as=system:serviceaccount:NS:SA`, and the e2e suite runs the operator with
this ServiceAccount's token, so a missing verb fails the e2e tests.
*/}}
{{- define "specserve.rbacRules" -}}
# The custom resource: kopf lists and watches it and patches its finalizer and progress annotations.
- apiGroups: [specserve.io]
  resources: [specservices]
  verbs: [get, list, watch, patch]
- apiGroups: [specserve.io]
  resources: [specservices/status]
  verbs: [patch]
# The SLO controller moves spec.replicas through the scale subresource.
- apiGroups: [specserve.io]
  resources: [specservices/scale]
  verbs: [patch]
# Profiling Job: created once (create, or read it back on 409 AlreadyExists).
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, create]
# The finished profiling pod's termination message carries the profile.
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
# Engine Deployment (rolling update and replicas by patch), Service, profile/policy ConfigMaps.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [get, create]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
# kopf and the operator post events about progress and errors.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- if include "specserve.hasMonitoringAPI" . }}
# One PodMonitor per SpecService (only when the Prometheus Operator API is served).
- apiGroups: [monitoring.coreos.com]
  resources: [podmonitors]
  verbs: [get, create]
{{- end }}
{{- end -}}
