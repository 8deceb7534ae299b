"""Fixtures for the e2e tests on a real Kubernetes API server.

Cluster, in order of preference:
- SPECSERVE_E2E_USE_KUBECONFIG=1 and $KUBECONFIG names an existing file: that cluster (the same
  tests; a fake node is registered there too, tainted so that only the test pods use it);
- otherwise etcd + kube-apiserver + kube-controller-manager + kube-scheduler 1.20.2 from the
  envtest assets built by `scripts/envtest.sh` (`make envtest`), started once per session by
  `specserve.controlplane` (the launcher `specserve demo` uses too) on loopback ports in a temp
  dir and stopped by PID at the end.
The tests skip (with that reason) only when neither is available; CI builds the assets.

Then, once per session: the Helm chart is installed with the pinned helm (CRD, ServiceAccount,
RBAC; `operator.enabled=false`), and the operator runs as a local process
(`python -m specserve.cli operator`) authenticated with a token of the chart's ServiceAccount
(TokenRequest API), so every API call it makes is checked by the chart's RBAC.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import (
    CHART,
    GROUP,
    PLURAL,
    RELEASE,
    RELEASE_NS,
    SERVICE_ACCOUNT,
    VERSION,
    Cluster,
    JobOutcomes,
    OperatorProcess,
    open_cluster,
    service_account_token,
    wait_for,
)
from fake_kubelet import FakeKubelet

from specserve.controlplane import EnvtestMissingError, write_kubeconfig

# An authorization denial, as opposed to other 403s (e.g. a namespace being terminated).
RBAC_DENIAL = re.compile(r'forbidden: User "[^"]+" cannot')


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    workdir = Path(tempfile.mkdtemp(prefix="specserve-e2e-session-"))
    try:
        with open_cluster(workdir) as handle:  # raises before it starts anything
            yield handle
    except EnvtestMissingError as e:
        pytest.skip(f"no Kubernetes API server: {e} (or SPECSERVE_E2E_USE_KUBECONFIG=1)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def job_outcomes() -> JobOutcomes:
    return JobOutcomes()


@pytest.fixture(scope="session")
def fake_node(cluster: Cluster, job_outcomes: JobOutcomes) -> Iterator[FakeKubelet]:
    """TEST HELPER node (see fake_kubelet.py): pods run, profiling pods finish with a fixture."""
    kubelet = FakeKubelet(cluster.api, job_outcome=job_outcomes).start()
    yield kubelet
    kubelet.stop()


@pytest.fixture(scope="session")
def chart(cluster: Cluster) -> Iterator[str]:
    """helm install: CRD + ServiceAccount + ClusterRole(+Binding), no in-cluster operator."""
    cluster.helm(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        RELEASE_NS,
        "--create-namespace",
        "--set",
        "operator.enabled=false",
        "--set",
        "grafana.dashboard.enabled=false",
        "--wait",
        "--timeout",
        "120s",
    )
    wait_for(
        lambda: (
            cluster.kubectl(
                "wait",
                "--for=condition=Established",
                "--timeout=30s",
                f"crd/{PLURAL}.{GROUP}",
                check=False,
            ).returncode
            == 0
        ),
        60,
        "the SpecService CRD to be Established",
    )
    yield RELEASE
    cluster.helm("uninstall", RELEASE, "--namespace", RELEASE_NS, check=False)


@pytest.fixture(scope="session")
def operator(cluster: Cluster, chart: str, fake_node: FakeKubelet) -> Iterator[OperatorProcess]:
    server = cluster.api.configuration.host
    token = service_account_token(cluster, RELEASE_NS, SERVICE_ACCOUNT)
    kc = write_kubeconfig(
        cluster.workdir / "operator.kubeconfig",
        server,
        token,
        user=f"system:serviceaccount:{RELEASE_NS}:{SERVICE_ACCOUNT}",
    )
    op = OperatorProcess(cluster, kc, cluster.workdir / "operator.log")
    op.start()
    yield op
    op.stop()
    keep = os.environ.get("SPECSERVE_E2E_KEEP_OPERATOR_LOG")
    if keep:
        shutil.copy(op.log_path, keep)
    denials = [ln for ln in op.log_text().splitlines() if RBAC_DENIAL.search(ln)]
    assert not denials, "the operator hit RBAC denials:\n" + "\n".join(denials[:20])


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace; its SpecServices are deleted (while the operator still runs, so kopf
    can release its finalizer) before the namespace itself."""
    name = f"e2e-{secrets.token_hex(3)}"
    cluster.core.create_namespace({"metadata": {"name": name, "labels": {"specserve-e2e": "1"}}})
    yield name
    cluster.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, name, PLURAL)
    wait_for(
        lambda: (
            not cluster.custom.list_namespaced_custom_object(GROUP, VERSION, name, PLURAL)["items"]
        ),
        30,
        f"SpecServices in {name} to be deleted",
    )
    cluster.core.delete_namespace(name)


def pytest_configure(config: pytest.Config) -> None:
    # the envtest apiserver self-signs its serving certificate; TLS checks are off on purpose
    config.addinivalue_line("filterwarnings", "ignore:Unverified HTTPS request")
