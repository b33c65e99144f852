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

from tests.e2e.harness.cluster import Cluster


def phase_of(item) -> str:
    """The stage after which e2e.sh runs the test (its `stage` mark), or core."""
    mark = item.get_closest_marker("stage")
    return mark.args[0] if mark else "core"


def pytest_collection_modifyitems(config, items):
    # e2e.sh runs pytest once per phase (E2E_PHASE): the core's tests while the later stages' parts
    # still build, then each later stage's once it is up.
    phase = os.environ.get("E2E_PHASE")
    if phase:
        keep = [item for item in items if phase_of(item) == phase]
        config.hook.pytest_deselected(items=[item for item in items if phase_of(item) != phase])
        items[:] = keep
    # The simulated fleet fills the API server with 600 to 940 pods: it goes last, after every test
    # of the real node.
    items.sort(key=lambda item: item.get_closest_marker("fleet") is not None)


def pytest_collection_finish(session):
    """With E2E_PHASES_OUT set, the phases of the tests that the arguments select, one a line, for
    e2e.sh to start only the stages they need."""
    out = os.environ.get("E2E_PHASES_OUT")
    if out:
        with open(out, "w") as f:
            f.writelines(f"{phase}\n" for phase in sorted({phase_of(item) for item in session.items}))


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    return Cluster.from_env()


_reported: list[BaseException] = []  # failures whose evidence is attached already


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # A failing module fixture (the release not getting Ready) fails at setup, and the same error
    # then errors every test that uses it: its evidence is attached once, to the first.
    error = call.excinfo.value if call.excinfo else None
    if report.when in ("setup", "call") and report.failed and not any(error is e for e in _reported):
        _reported.append(error)
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


def pytest_terminal_summary(terminalreporter):
    """After the passes' output, each failure again in short: the figures of the passes are long, and
    a CI log that keeps only its tail must still show what failed and why. The whole evidence is in
    the FAILURES and ERRORS sections above."""
    failed = [*terminalreporter.stats.get("failed", []), *terminalreporter.stats.get("error", [])]
    if not failed:
        return
    terminalreporter.section(f"{len(failed)} failed, in short (the evidence is above)")
    for report in failed:
        lines = report.longreprtext.splitlines()
        terminalreporter.write_line(f"--- {report.nodeid} ({report.when})")
        for line in lines[-12:]:
            terminalreporter.write_line(line[:300])
        evidence = dict(report.sections).get("cluster evidence", "")
        events = next((part for part in evidence.split("--- kubectl ") if part.startswith("get events")), "")
        if events:
            terminalreporter.write_line("    the cluster's last events:")
            for line in events.splitlines()[-15:]:
                terminalreporter.write_line("    " + line[:300])
