{{/*
Named templates of the hsm-agent sidecar.

Public, for application charts (README.md, "Adding the sidecar to your chart"). Each takes the
root context (.): the sidecar's values are .Values in this chart, and .Values.hsm-sidecar (the
dependency's name) or .Values.hsmSidecar (an alias) when called from a parent chart.

  hsm-sidecar.initContainers     list items: the module copy and SoftHSM token init containers
                                 when enabled, then the sidecar itself when it is native
  hsm-sidecar.containers         list item: the sidecar when it is classic, else nothing
  hsm-sidecar.nativeSidecar      string: "true" when the sidecar is native (nativeSidecar, or
                                 "auto" on Kubernetes >= 1.29), else ""
  hsm-sidecar.waitForSocket      string: a shell line that waits (up to 120 s) for the socket,
                                 for an app that starts beside a classic sidecar
  hsm-sidecar.container          list item: the sidecar container alone
  hsm-sidecar.volumes            list items: every pod volume the sidecar needs
  hsm-sidecar.appVolumeMounts    list item: the socket mount for an app container
  hsm-sidecar.appEnv             list items: the environment of an app container (the socket
                                 path; hsm::client's latency mode when client.busyPollMicros)
  hsm-sidecar.podSecurityContext map: the pod securityContext (fsGroup shares the socket)
  hsm-sidecar.podAnnotations     map: a checksum that restarts the pods when the policy changes
  hsm-sidecar.socketPath         string: the socket path, for the app's configuration

Private templates (leading underscore) take (dict "v" <sidecar values> "root" <root context>).
*/}}

{{/* Resolves the sidecar's values, then renders hsm-sidecar._<tpl> (trimmed: no blank first line). */}}
{{- define "hsm-sidecar.dispatch" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- if hasKey $root.Values "hsm-sidecar" -}}
{{- $v = index $root.Values "hsm-sidecar" -}}
{{- else if hasKey $root.Values "hsmSidecar" -}}
{{- $v = $root.Values.hsmSidecar -}}
{{- end -}}
{{- include (printf "hsm-sidecar._%s" .tpl) (dict "v" $v "root" $root) | trim -}}
{{- end -}}

{{- define "hsm-sidecar.initContainers" -}}
{{- include "hsm-sidecar.dispatch" (dict "tpl" "initContainers" "root" .) -}}
{{- end -}}
{{- define "hsm-sidecar.containers" -}}
{{- include "hsm-sidecar.dispatch" (dict "tpl" "containers" "root" .) -}}
{{- end -}}
{{- define "hsm-sidecar.container" -}}
{{- include "hsm-sidecar.dispatch" (dict "tpl" "container" "root" .) -}}
{{- end -}}
{{- define "hsm-sidecar.volumes" -}}
{{- include "hsm-sidecar.dispatch" (dict "tpl" "volumes" "root" .) -}}
{{- end -}}
{{- define "hsm-sidecar.appVolumeMounts" -}}
{{- include "hsm-sidecar.dispatch" (dict "tpl" "appVolumeMounts" "root" .) -}}
{{- end -}}
{{- define "hsm-sidecar.appEnv" -}}
{{- include "hsm-sidecar.dispatch" (dict "tpl" "appEnv" "root" .) -}}
{{- end -}}
{{- define "hsm-sidecar.podSecurityContext" -}}
{{- include "hsm-sidecar.dispatch" (dict "tpl" "podSecurityContext" "root" .) -}}
{{- end -}}
{{- define "hsm-sidecar.podAnnotations" -}}
{{- include "hsm-sidecar.dispatch" (dict "tpl" "podAnnotations" "root" .) -}}
{{- end -}}
{{- define "hsm-sidecar.socketPath" -}}
{{- include "hsm-sidecar.dispatch" (dict "tpl" "socketPath" "root" .) -}}
{{- end -}}
{{- define "hsm-sidecar.nativeSidecar" -}}
{{- include "hsm-sidecar.dispatch" (dict "tpl" "nativeSidecar" "root" .) -}}
{{- end -}}
{{- define "hsm-sidecar.waitForSocket" -}}
{{- include "hsm-sidecar.dispatch" (dict "tpl" "waitForSocket" "root" .) -}}
{{- end -}}
{{- define "hsm-sidecar.fullname" -}}
{{- include "hsm-sidecar.dispatch" (dict "tpl" "fullname" "root" .) -}}
{{- end -}}

{{/*
Object name prefix. Built from the release name only (not .Chart, which is the parent's when a
parent includes these templates), so the subchart's objects and the parent's references agree.
*/}}
{{- define "hsm-sidecar._fullname" -}}
{{- if .v.fullnameOverride -}}
{{- .v.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains "hsm-sidecar" .root.Release.Name -}}
{{- .root.Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-hsm-sidecar" .root.Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of the objects this chart creates (rendered in this chart's own context). */}}
{{- define "hsm-sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: hsm-sidecar
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Pod labels of the demo Deployment (its selector and the default PodMonitor selector). */}}
{{- define "hsm-sidecar.demoSelectorLabels" -}}
app.kubernetes.io/name: hsm-sidecar-demo
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* A number as the agent expects it: whole numbers without exponent (values arrive as float64). */}}
{{- define "hsm-sidecar._number" -}}
{{- if and (kindIs "float64" .) (eq (float64 .) (float64 (int64 .))) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{- define "hsm-sidecar._image" -}}
{{- $tag := .v.image.tag | toString -}}
{{- if .v.softhsm.enabled -}}
{{- $tag = printf "%s%s" $tag .v.softhsm.tagSuffix -}}
{{- end -}}
{{- printf "%s:%s" .v.image.repository $tag -}}
{{- end -}}

{{/*
"true" when the agent runs as a native sidecar, else "". nativeSidecar "auto" asks the cluster
(.Capabilities.KubeVersion: the API server's version on install, --kube-version with helm
template): init containers with restartPolicy: Always exist from Kubernetes 1.29 (beta, on by
default); before that the kubelet refuses them and the pod never leaves Init.
*/}}
{{- define "hsm-sidecar._nativeSidecar" -}}
{{- $mode := .v.nativeSidecar -}}
{{- if eq (toString $mode) "auto" -}}
{{- if semverCompare ">=1.29.0-0" .root.Capabilities.KubeVersion.Version -}}true{{- end -}}
{{- else if $mode -}}
true
{{- end -}}
{{- end -}}

{{/*
A POSIX shell line that waits for the agent's socket, up to 120 s, then fails (the container
restarts). A classic sidecar starts beside the app, not before it: an app that does not retry
its first connection runs this first (sh -c '<this> && exec myapp').
*/}}
{{- define "hsm-sidecar._waitForSocket" -}}
{{- $path := include "hsm-sidecar._socketPath" . -}}
i=0; until [ -S {{ $path | squote }} ]; do i=$((i+1)); if [ "$i" -gt 120 ]; then echo "no hsm-agent socket at {{ $path }} after 120 s" >&2; exit 1; fi; sleep 1; done
{{- end -}}

{{- define "hsm-sidecar._socketPath" -}}
{{- printf "%s/%s" (.v.agent.socket.dir | trimSuffix "/") .v.agent.socket.name -}}
{{- end -}}

{{- define "hsm-sidecar._pinSecretName" -}}
{{- if .v.pin.create -}}
{{- printf "%s-pin" (include "hsm-sidecar._fullname" .) -}}
{{- else -}}
{{- required "hsm-sidecar: set pin.existingSecret to the Secret holding the PIN (or pin.create for a dev PIN)" .v.pin.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "hsm-sidecar._policyConfigMapName" -}}
{{- .v.policy.existingConfigMap | default (printf "%s-policy" (include "hsm-sidecar._fullname" .)) -}}
{{- end -}}

{{- define "hsm-sidecar._modulePath" -}}
{{- if .v.agent.module -}}
{{- .v.agent.module -}}
{{- else if .v.softhsm.enabled -}}
{{- .v.softhsm.module -}}
{{- else -}}
{{- fail "hsm-sidecar: set agent.module to the PKCS#11 library's path in the container (or softhsm.enabled for a demo token)" -}}
{{- end -}}
{{- end -}}


{{/* The restricted Pod Security Standard's container settings, for a given uid/gid. */}}
{{- define "hsm-sidecar._restrictedSecurityContext" -}}
runAsUser: {{ include "hsm-sidecar._number" .uid }}
runAsGroup: {{ include "hsm-sidecar._number" .gid }}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
The agent's arguments. Flags whose value is null are left out (the agent's default applies);
numeric flags are one table.
*/}}
{{- define "hsm-sidecar._args" -}}
{{- $a := .v.agent -}}
- --module={{ include "hsm-sidecar._modulePath" . }}
{{- with $a.tokenLabel }}
- --token-label={{ . }}
{{- end }}
{{- if not (kindIs "invalid" $a.slotIndex) }}
- --slot-index={{ include "hsm-sidecar._number" $a.slotIndex }}
{{- end }}
- --pin-file={{ .v.pin.mountPath | trimSuffix "/" }}/pin
- --socket={{ include "hsm-sidecar._socketPath" . }}
- --socket-mode={{ $a.socket.mode }}
{{- /* The socket volume is always an emptyDir: 0777 and root-owned, which the agent refuses
       unless told it is a pod volume (a mount of its own; only the agent mounts it writable). */}}
- --shared-socket-dir
{{- with $a.socket.group }}
- --socket-group={{ include "hsm-sidecar._number" . }}
{{- end }}
- --metrics-listen={{ $a.metrics.host }}:{{ include "hsm-sidecar._number" $a.metrics.port }}
{{- if $a.readOnly }}
- --read-only
{{- end }}
- --log-level={{ $a.logLevel }}
- --log-format={{ $a.logFormat }}
{{- with $a.auditLog }}
- --audit-log={{ . }}
{{- end }}
{{- if $a.auditFailOpen }}
- --audit-fail-open
{{- end }}
{{- if .v.policy.enabled }}
- --policy={{ .v.policy.mountPath | trimSuffix "/" }}/policy.yaml
{{- else }}
{{- range $a.allowUids }}
- --allow-uid={{ include "hsm-sidecar._number" . }}
{{- end }}
{{- range $a.allowGids }}
- --allow-gid={{ include "hsm-sidecar._number" . }}
{{- end }}
{{- range $a.adminUids }}
- --admin-uid={{ include "hsm-sidecar._number" . }}
{{- end }}
{{- end }}
{{- range $flag := list
      (list "sessions" "--sessions")
      (list "maxSessions" "--max-sessions")
      (list "sessionIdleTimeoutSeconds" "--session-idle-timeout")
      (list "maxMessageBytes" "--max-message-bytes")
      (list "maxConnections" "--max-connections")
      (list "maxInflightPerConnection" "--max-inflight-per-connection")
      (list "maxQueue" "--max-queue")
      (list "busyPollMicros" "--busy-poll-us")
      (list "requestTimeoutMs" "--request-timeout")
      (list "maxWriteBuffer" "--max-write-buffer")
      (list "idleTimeoutSeconds" "--idle-timeout")
      (list "shutdownTimeoutSeconds" "--shutdown-timeout")
      (list "probeIntervalSeconds" "--probe-interval")
      (list "rateLimit" "--rate-limit")
      (list "rateBurst" "--rate-burst") }}
{{- $value := index $a (index $flag 0) }}
{{- if not (kindIs "invalid" $value) }}
- {{ index $flag 1 }}={{ include "hsm-sidecar._number" $value }}
{{- end }}
{{- end }}
{{- range $a.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "hsm-sidecar._container" -}}
{{- $a := .v.agent -}}
- name: hsm-agent
  image: {{ include "hsm-sidecar._image" . | quote }}
  imagePullPolicy: {{ .v.image.pullPolicy }}
  {{- if include "hsm-sidecar._nativeSidecar" . }}
  restartPolicy: Always
  {{- end }}
  args:
    {{- include "hsm-sidecar._args" . | nindent 4 }}
  {{- with $a.extraEnv }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    - name: metrics
      containerPort: {{ include "hsm-sidecar._number" $a.metrics.port }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /healthz
      port: metrics
    {{- toYaml $a.probes.startup | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: metrics
    {{- toYaml $a.probes.liveness | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: metrics
    {{- toYaml $a.probes.readiness | nindent 4 }}
  {{- with $a.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "hsm-sidecar._restrictedSecurityContext" (dict "uid" $a.runAsUser "gid" $a.runAsGroup) | nindent 4 }}
  volumeMounts:
    - name: hsm-socket
      mountPath: {{ $a.socket.dir }}
    - name: hsm-pin
      mountPath: {{ .v.pin.mountPath }}
      readOnly: true
    {{- if .v.policy.enabled }}
    - name: hsm-policy
      mountPath: {{ .v.policy.mountPath }}
      readOnly: true
    {{- end }}
    {{- if or .v.module.copyFromImage.enabled .v.module.volume }}
    - name: pkcs11-module
      mountPath: {{ .v.module.mountPath }}
      readOnly: true
    {{- end }}
    {{- if .v.softhsm.enabled }}
    - name: hsm-tokens
      mountPath: /var/lib/hsm-agent/tokens
    {{- end }}
    - name: hsm-agent-tmp
      mountPath: /tmp
    {{- with $a.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{- define "hsm-sidecar._initContainers" -}}
{{- $a := .v.agent -}}
{{- if .v.module.copyFromImage.enabled }}
- name: copy-pkcs11-module
  image: {{ required "hsm-sidecar: module.copyFromImage.image is required" .v.module.copyFromImage.image | quote }}
  imagePullPolicy: {{ .v.image.pullPolicy }}
  command: ["cp", "-R", {{ .v.module.copyFromImage.source | quote }}, {{ printf "%s/" (.v.module.mountPath | trimSuffix "/") | quote }}]
  securityContext:
    {{- include "hsm-sidecar._restrictedSecurityContext" (dict "uid" $a.runAsUser "gid" $a.runAsGroup) | nindent 4 }}
  resources:
    requests: { cpu: 10m, memory: 16Mi }
    limits: { memory: 64Mi }
  volumeMounts:
    - name: pkcs11-module
      mountPath: {{ .v.module.mountPath }}
{{- end }}
{{- if .v.softhsm.enabled }}
{{- /* DEMO ONLY: softhsm2-util takes the PINs in argv, visible inside this short-lived container. */}}
- name: init-softhsm-token
  image: {{ include "hsm-sidecar._image" . | quote }}
  imagePullPolicy: {{ .v.image.pullPolicy }}
  command:
    - sh
    - -ec
    - |
      if softhsm2-util --show-slots | grep -q "Label: *${TOKEN_LABEL} *\$"; then exit 0; fi  # labels are space-padded
      pin="$(cat {{ .v.pin.mountPath | trimSuffix "/" }}/pin)"
      softhsm2-util --init-token --free --label "${TOKEN_LABEL}" --so-pin "$pin" --pin "$pin"
  env:
    - name: TOKEN_LABEL
      value: {{ required "hsm-sidecar: softhsm.enabled initialises the token agent.tokenLabel: set it" .v.agent.tokenLabel | quote }}
  securityContext:
    {{- include "hsm-sidecar._restrictedSecurityContext" (dict "uid" $a.runAsUser "gid" $a.runAsGroup) | nindent 4 }}
  resources:
    requests: { cpu: 10m, memory: 16Mi }
    limits: { memory: 64Mi }
  volumeMounts:
    - name: hsm-tokens
      mountPath: /var/lib/hsm-agent/tokens
    - name: hsm-pin
      mountPath: {{ .v.pin.mountPath }}
      readOnly: true
{{- end }}
{{- if include "hsm-sidecar._nativeSidecar" . }}
{{ include "hsm-sidecar._container" . }}
{{- end }}
{{- end -}}

{{- define "hsm-sidecar._containers" -}}
{{- if not (include "hsm-sidecar._nativeSidecar" .) -}}
{{ include "hsm-sidecar._container" . }}
{{- end -}}
{{- end -}}

{{- define "hsm-sidecar._volumes" -}}
- name: hsm-socket
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
- name: hsm-pin
  secret:
    secretName: {{ include "hsm-sidecar._pinSecretName" . }}
    defaultMode: 288  # 0440: owner root, group fsGroup
    items:
      - key: {{ .v.pin.key }}
        path: pin
{{- if .v.policy.enabled }}
- name: hsm-policy
  configMap:
    name: {{ include "hsm-sidecar._policyConfigMapName" . }}
    items:
      - key: policy.yaml
        path: policy.yaml
{{- end }}
{{- if .v.module.copyFromImage.enabled }}
- name: pkcs11-module
  emptyDir:
    sizeLimit: {{ .v.module.copyFromImage.sizeLimit }}
{{- else if .v.module.volume }}
- name: pkcs11-module
  {{- toYaml .v.module.volume | nindent 2 }}
{{- end }}
{{- if .v.softhsm.enabled }}
- name: hsm-tokens
  emptyDir:
    sizeLimit: 16Mi
{{- end }}
- name: hsm-agent-tmp
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
{{- with .v.agent.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "hsm-sidecar._appVolumeMounts" -}}
- name: hsm-socket
  mountPath: {{ .v.agent.socket.dir }}
  readOnly: true
{{- end -}}

{{- define "hsm-sidecar._appEnv" -}}
- name: HSM_AGENT_SOCKET
  value: {{ include "hsm-sidecar._socketPath" . | quote }}
{{- $client := .v.client | default dict }}
{{- if not (kindIs "invalid" $client.busyPollMicros) }}
- name: HSM_CLIENT_BUSY_POLL_US
  value: {{ include "hsm-sidecar._number" $client.busyPollMicros | quote }}
{{- end }}
{{- end -}}

{{- define "hsm-sidecar._podSecurityContext" -}}
{{- toYaml .v.podSecurityContext -}}
{{- end -}}

{{- define "hsm-sidecar._podAnnotations" -}}
{{- if and .v.policy.enabled (not .v.policy.existingConfigMap) -}}
checksum/hsm-policy: {{ toYaml .v.policy.rules | sha256sum }}
{{- else -}}
{}
{{- end -}}
{{- end -}}
