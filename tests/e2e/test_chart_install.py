"""The full chart (operator Deployment included) is accepted by a real API server: server-side
dry-run apply of every rendered variant, so the manifests are valid for the cluster under test
(Kubernetes 1.20.2 by default), not only for the offline schemas of scripts/chart-check.sh."""

from __future__ import annotations

import pytest
from e2e_support import CHART, Cluster


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", "rbac.scope=namespaced"],
        ["--set", "operator.logFormat=plain", "--set", "operator.verbose=true"],
    ],
    ids=["cluster", "namespaced", "plain-logs"],
)
def test_rendered_chart_passes_server_side_dry_run(
    cluster: Cluster, chart: str, namespace: str, values: list[str]
) -> None:
    rendered = cluster.helm("template", "dryrun", str(CHART), "--namespace", namespace,
                            *values).stdout  # fmt: skip
    res = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                          input_text=rendered, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    for kind in ("serviceaccount/", "deployment.apps/", "configmap/"):
        assert kind in res.stdout, res.stdout
