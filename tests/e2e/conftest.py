"""Fixtures for the real-cluster e2e (`make e2e-k8s`, k8s/cluster/e2e.sh).

These tests run inside the cluster's network namespace, against a real Kubernetes that
k8s/cluster/cluster.sh started; the serving image is already imported. On a failure the step's
evidence (events, pod states and logs, the kubelet's and other components' log lines) is
attached to the report, so CI prints it under the failing test.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.e2e.cluster import Cluster


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    return Cluster.from_env()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        script = os.environ.get("E2E_CLUSTER_SCRIPT")
        c = Cluster.from_env()
        report.sections.append(("cluster evidence", c.evidence()))
        if script:
            logs = subprocess.run(
                ["bash", script, "logs"],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "LOG_LINES": "30"},
            )
            report.sections.append(("component logs (kubelet, containerd, apiserver, ...)", logs.stdout + logs.stderr))
