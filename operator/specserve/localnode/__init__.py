"""Local node agent: runs the pods bound to one Node as local processes (dev/test tool only).

This is NOT a kubelet replacement. It exists so that a laptop or CI machine with no container
runtime, no cluster and no GPU can run the whole SpecServe loop against a real API server:
the scheduler binds pods to the Node this agent registers, and the agent

- runs each container's command/args from the *current Python environment* (images are
  ignored; `adaspec` resolves to the venv's entry point), with env incl. downward-API fields;
- gives each pod its own loopback address 127.0.0.x (status.podIP), so Service endpoints are
  real and distinct; `--host 0.0.0.0` in args becomes the pod IP;
- materialises ConfigMap volumes kubelet-style (timestamped dir + atomic `..data` symlink swap)
  and refreshes them when the ConfigMap changes; emptyDir volumes become temp dirs;
- rewrites container paths (mount paths, terminationMessagePath) to those host dirs (see
  `paths.PathMap`), and exports the mapping as SPECSERVE_PATH_MAP;
- evaluates httpGet startup/readiness/liveness probes and reports Ready, container exit codes
  and termination messages; on pod deletion sends SIGTERM, then SIGKILL after the grace period.

No isolation, no resource limits, no image pulls, no exec/tcp probes, no secrets/projected
volumes, no init containers: pods that need those fail with a message saying so.
"""
