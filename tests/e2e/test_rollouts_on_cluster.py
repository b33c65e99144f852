"""Progressive delivery with a model-quality gate, on Argo Rollouts v1.10.2 (e2e.sh starts its
controller; its CRDs come from its module).

One release of the cnn group with ``rollout.enabled``: a Rollout that takes its pods from the
group's Deployment (workloadRef) and that the group's HPA scales, held at 4 pods; canary steps of
25% (1 of 4 pods) and 50%, each followed by the health analysis (the canary pods' non-2xx rate and
mean latency from the e2e's Prometheus), and the quality gate (scripts/gate.py, a Job from the
serving image) at the first. The first version is the image's own cnn; each later one is an archive
on a volume (models.source pvc, one subPath per version), built by the real archiver:

1. good: cnn trained again with another seed (``--init-seed 1``: same data split), version 2.0.
   Promoted through every step by itself, 0 failed requests, the gate's two scores in the log.
2. quietly bad: cnn trained on shuffled labels (``--shuffle-labels``), 3.0. It answers 200, fast:
   the health analysis passes; the gate aborts it at the first step, the stable version serves
   again by itself, 0 failed requests.
3. loudly bad: the good cnn with a handler that fails every other batch
   (tests/e2e/failing_handler.py), 4.0. The error-rate check aborts it at the first step; the
   failed requests are counted, all of them the canary's while it was in the Service.

All under constant REST and gRPC load on the group's Service. The deploy tool (``python -m
scripts.deploy rollout``) follows each rollout, one line per step, and exits 1 on an abort. The
timeline (pods per version, steps, each analysis with its figures) goes to
bench/results/rollouts.json and rollouts.png.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")  # files only: the e2e has no display
import matplotlib.pyplot as plt

from scripts import archive, registry
from scripts.common import ROOT
from scripts.registry import sample_inputs
from tests.e2e import failing_handler
from tests.e2e.harness.cluster import Cluster, StepFailed
from tests.e2e.harness.load import Load, serves
from tests.e2e.harness.release import (
    CHART,
    CNN_ONLY,
    GRACE_S,
    READY_BOUND_S,
    ROUTED_BOUND_S,
    VALUES,
    Release,
    image_values,
)
from tests.e2e.harness.results import record, save_figure

NAMESPACE = "e2e-rollouts"
RELEASE = Release("tsro")
CLAIM = "rollout-models"
PODS = 4
WEIGHTS = (25, 50)
INTERVAL_S, COUNT, INITIAL_DELAY_S, WINDOW_S = 10, 2, 15, 20  # the health analysis (scrapes every 5 s)
TOLERANCE = 0.05  # accuracy: the gate's 200 held-out digits; two seeds of the quick cnn differ by 1-2 points
LOAD_RPS = 16  # REST and gRPC in turn, open-loop
# A step: a canary pod started and Ready (measured 10-20 s), then its analyses: the health checks'
# delay and measurements, the gate's Job (its pod, 400 requests). A whole rollout is two steps and
# the last scale-down; every bound here is well above what it measured.
STEP_BOUND_S = READY_BOUND_S + INITIAL_DELAY_S + COUNT * INTERVAL_S + 180
ROLLOUT_BOUND_S = 2 * STEP_BOUND_S + GRACE_S
VERSIONS = {"good": "2.0", "quiet": "3.0", "loud": "4.0"}
RESULTS: dict = {"versions": {}}

# stage rollouts: needs Argo Rollouts and Prometheus
pytestmark = [
    pytest.mark.stage("rollouts"),
    pytest.mark.skipif(
        not Path(ROOT / "checkpoints" / "cnn" / "checkpoint.pt").is_file(), reason="no cnn checkpoint (make archive)"
    ),
]


def train(out: Path, *flags: str) -> Path:
    """cnn trained as its quick checkpoint was (its split), with ``flags``: what each version differs by."""
    cmd = [
        sys.executable,
        "-m",
        "scripts.train",
        "--model",
        "cnn",
        "--quick",
        "--no-progress",
        "--output-dir",
        str(out),
    ]
    proc = subprocess.run([*cmd, *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise StepFailed(f"training cnn {' '.join(flags)} failed:\n{proc.stdout[-800:]}{proc.stderr[-1500:]}")
    print(f"cnn {' '.join(flags)}: {proc.stdout.strip().splitlines()[-1]}")
    return out / "checkpoint.pt"


def version_stores(root: Path) -> Path:
    """root/<version>/ with cnn.mar and manifest.json, one folder per later version."""
    config = registry.get("cnn").config_path
    good = train(root / "ckpt-good", "--init-seed", "1")
    quiet = train(root / "ckpt-quiet", "--shuffle-labels")
    stores = root / "stores"
    archive.build("cnn", good, VERSIONS["good"], stores / "good", config)
    archive.build("cnn", quiet, VERSIONS["quiet"], stores / "quiet", config)
    archive.build("cnn", good, VERSIONS["loud"], stores / "loud", config, handler_file=Path(failing_handler.__file__))
    return stores


@dataclasses.dataclass
class Rollouts:
    c: Cluster
    rollout: str
    load: Load
    install: list[str]  # helm install's arguments after the chart, which each upgrade repeats
    samples: list = dataclasses.field(default_factory=list)
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)

    def status(self) -> dict:
        return self.c.json("get", "rollout", self.rollout).get("status", {})

    def ready_by_hash(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.c.ready_pods(RELEASE.group_selector("cnn")):
            h = p["metadata"]["labels"].get("rollouts-pod-template-hash", "")
            out[h] = out.get(h, 0) + 1
        return out

    def sample(self) -> None:
        """Every 2 s: the Rollout's step and phase, and the Ready pods of each version."""
        while not self._stop.wait(2.0):
            try:
                st = self.status()
                self.samples.append(
                    {
                        "t": round(time.monotonic() - self.load.t0, 1),
                        "step": st.get("currentStepIndex"),
                        "phase": st.get("phase"),
                        "abort": bool(st.get("abort")),
                        "stable": st.get("stableRS"),
                        "current": st.get("currentPodHash"),
                        "ready": self.ready_by_hash(),
                    }
                )
            except Exception as e:  # a slow API answer: the next sample
                print(f"sample skipped: {e}")

    def analysis_runs(self) -> list[dict]:
        runs = self.c.json("get", "analysisruns")["items"]
        out = []
        for r in sorted(runs, key=lambda r: r["metadata"]["creationTimestamp"]):
            metrics = []
            for m in r.get("status", {}).get("metricResults", []):
                metrics.append(
                    {
                        "name": m["name"],
                        "phase": m.get("phase"),
                        "values": [x.get("value") for x in m.get("measurements") or [] if x.get("value")],
                        "message": m.get("message", ""),
                    }
                )
            out.append({"name": r["metadata"]["name"], "phase": r.get("status", {}).get("phase"), "metrics": metrics})
        return out

    def upgrade_to(self, version: str) -> tuple[bool, list[str], float, float]:
        """helm upgrade to that version's archive; the deploy tool follows the rollout to its verdict.
        Records the version's figures; returns (promoted, the tool's lines, seconds to the verdict,
        the load's clock at the upgrade)."""
        at = time.monotonic() - self.load.t0
        self.c.helm(
            "upgrade",
            RELEASE.name,
            str(CHART),
            *self.install,
            *("--set", "groups.cnn.modelSource.type=pvc", "--set", f"groups.cnn.modelSource.pvc.claimName={CLAIM}"),
            *("--set", f"groups.cnn.modelSource.pvc.subPath={version}"),
        )
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "scripts.deploy", "rollout", "--namespace", NAMESPACE, "--rollout", self.rollout]
        cmd += ["--timeout", str(ROLLOUT_BOUND_S)]
        proc = subprocess.run(
            cmd, cwd=ROOT, env=self.c.env, capture_output=True, text=True, timeout=ROLLOUT_BOUND_S + 60
        )
        lines = proc.stdout.splitlines()
        print(f"--- deploy rollout ({version}): exit {proc.returncode}\n{proc.stdout}{proc.stderr[-2000:]}")
        if proc.returncode not in (0, 1):
            raise StepFailed(f"deploy rollout failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
        took = time.monotonic() - t0
        RESULTS["versions"][version] = {
            "archive_version": VERSIONS[version],
            "upgraded_at_s": round(at, 1),
            "verdict_s": round(took, 1),
            "lines": lines,
            "gate": gate_scores(lines),
        }
        return proc.returncode == 0, lines, took, at


@pytest.fixture(scope="module")
def rollouts(cluster: Cluster, tmp_path_factory):
    c = dataclasses.replace(cluster, namespace=NAMESPACE)
    c.create_namespace(NAMESPACE)
    stores = version_stores(tmp_path_factory.mktemp("rollouts"))
    remove_volume = c.host_volume(NAMESPACE, CLAIM, stores)
    rollout = RELEASE.group("cnn")
    values = [
        *CNN_ONLY,
        *("--set", "rollout.enabled=true", "--set", f"rollout.canaryWeights={{{','.join(map(str, WEIGHTS))}}}"),
        *("--set", f"autoscaling.minReplicas={PODS}", "--set", f"autoscaling.maxReplicas={PODS}"),
        *("--set", f"rollout.analysis.prometheusAddress={c.prometheus_url()}"),
        *("--set", f"rollout.analysis.interval={INTERVAL_S}s", "--set", f"rollout.analysis.count={COUNT}"),
        *(
            "--set",
            f"rollout.analysis.initialDelay={INITIAL_DELAY_S}s",
            "--set",
            f"rollout.analysis.window={WINDOW_S}s",
        ),
        *("--set", f"rollout.qualityGate.tolerance.accuracy={TOLERANCE}"),
    ]
    install = ["-f", str(VALUES), *image_values(c), *values]
    c.helm("install", RELEASE.name, str(CHART), *install)
    load = None
    try:
        payload = sample_inputs(["cnn"])["cnn"][1]
        c.wait(
            f"the Rollout at {PODS} Ready pods (its HPA scales it)",
            lambda: (
                c.json("get", "rollout", rollout).get("status", {}).get("phase") == "Healthy"
                and len(c.ready_pods(RELEASE.group_selector("cnn"))) == PODS
            ),
            READY_BOUND_S,
        )
        ip = c.json("get", "service", RELEASE.group("cnn"))["spec"]["clusterIP"]
        c.wait("the group's Service routing", lambda: serves(ip, "cnn", payload), ROUTED_BOUND_S, poll=1.0)
        load = Load(ip, [("cnn", payload)], rate=LOAD_RPS, workers=4, max_seconds=3 * ROLLOUT_BOUND_S)
        r = Rollouts(c, rollout, load.start(), install)
        sampler = threading.Thread(target=r.sample, daemon=True)
        sampler.start()
        yield r
        r._stop.set()
        sampler.join(10)
    finally:
        if load is not None:
            load.stop()
        c.helm("uninstall", RELEASE.name, "--wait", "--timeout", "120s", timeout=150, check=False)
        remove_volume()
        c.kubectl("delete", "namespace", NAMESPACE, "--wait=false", namespaced=False, check=False)


GATE_LINE = re.compile(
    r"gate: (\S+) (\S+) on (\d+) held-out examples: canary ([\d.]+) .*stable ([\d.]+) .*: (PASS|FAIL)"
)


def gate_scores(lines: list[str]) -> list[dict]:
    """The quality gate's verdicts as the deploy tool printed them from the Job's log."""
    out = []
    for line in lines:
        if m := GATE_LINE.search(line):
            model, metric, n, canary, stable, verdict = m.groups()
            out.append(
                {
                    "model": model,
                    "metric": metric,
                    "examples": int(n),
                    "canary": float(canary),
                    "stable": float(stable),
                    "verdict": verdict,
                }
            )
    return out


def failed_between(load: Load, a: float, b: float) -> list:
    return [s for s in load.non_ok() if a <= s.start <= b]


def hpa_scales_the_rollout(c: Cluster) -> None:
    hpa = c.json("get", "hpa", RELEASE.group("cnn"))
    ref = hpa["spec"]["scaleTargetRef"]
    able = {x["type"]: x["status"] for x in hpa.get("status", {}).get("conditions", [])}.get("AbleToScale")
    assert ref["kind"] == "Rollout" and able == "True" and hpa["status"].get("currentReplicas") == PODS, hpa["status"]


def test_a_good_new_version_is_promoted_through_every_step_by_itself(rollouts):
    r = rollouts
    hpa_scales_the_rollout(r.c)
    before = r.status()["stableRS"]
    failed_before = len(r.load.non_ok())
    promoted, lines, _, at = r.upgrade_to("good")
    st = r.status()
    gate = [line.strip() for line in lines if line.strip().startswith("gate: cnn accuracy")]
    assert promoted, "\n".join(lines)
    assert st["stableRS"] != before and st["stableRS"] == st["currentPodHash"], st
    assert r.ready_by_hash() == {st["stableRS"]: PODS}
    # Every step ran: each weight and its analyses, the gate with its two scores.
    assert sum(": Successful:" in line and "error-rate" in line for line in lines) == len(WEIGHTS), lines
    assert sum(": Successful:" in line and "model-quality" in line for line in lines) == 1, lines
    assert len(gate) == 1 and "canary" in gate[0] and "stable" in gate[0] and gate[0].endswith("PASS"), lines
    assert len(r.load.non_ok()) == failed_before == 0, r.load.failures[:10]


def rolled_back(r: Rollouts, version: str, metric: str) -> tuple[list[str], float]:
    """Roll ``version`` out and see it aborted by ``metric``'s failure and the stable version alone
    again, by itself. Returns the deploy tool's lines and the load's clock at the upgrade."""
    stable = r.status()["stableRS"]
    promoted, lines, _, at = r.upgrade_to(version)
    st = r.status()
    assert not promoted and st.get("abort") and st["stableRS"] == stable, st
    assert [line for line in lines if ": Failed:" in line and metric in line], lines
    assert metric in st.get("message", ""), st
    r.c.wait("the stable version alone again", lambda: r.ready_by_hash() == {stable: PODS}, GRACE_S + 60)
    RESULTS["versions"][version]["rolled_back_s"] = round(time.monotonic() - r.load.t0 - at, 1)
    return lines, at


def test_a_quietly_bad_version_is_aborted_by_the_quality_gate_and_rolled_back(rollouts):
    r = rollouts
    lines, _ = rolled_back(r, "quiet", "model-quality")
    # The health analysis passed (error rate and latency cannot tell), then the gate failed it.
    assert any(": Successful:" in line and "error-rate" in line for line in lines), lines
    gate = [line.strip() for line in lines if line.strip().startswith("gate: cnn accuracy")]
    assert gate and gate[-1].endswith("FAIL"), lines
    assert not r.load.non_ok(), r.load.failures[:10]


def test_a_loudly_bad_version_is_aborted_by_the_error_rate_check(rollouts):
    r = rollouts
    lines, at = rolled_back(r, "loud", "error-rate")
    assert not any("model-quality" in line for line in lines), (
        "the gate ran: the error-rate check should have aborted first"
    )
    end = time.monotonic() - r.load.t0
    # The failures: the canary's requests only, while it was Ready in the Service.
    canary = r.status().get("currentPodHash", "")  # the aborted version's pods
    canary_ready = [s["t"] for s in r.samples if s["t"] >= at and s["ready"].get(canary, 0)]
    fails = failed_between(r.load, at, end)
    sent = [s for s in r.load.sent if at <= s.start <= end]
    RESULTS["versions"]["loud"].update(
        {
            "failed": len(fails),
            "sent": len(sent),
            "failed_window_s": [round(fails[0].start, 1), round(fails[-1].start, 1)] if fails else None,
            "outcomes": dict(collections.Counter(s.outcome for s in fails)),
        }
    )
    assert fails, "the loudly bad version failed no request: the test shows nothing"
    assert len(r.load.non_ok()) == len(fails), r.load.failures[:10]  # none before this version
    # At most the canary's share (1 of 4 pods) of the requests in the window, half of which fail.
    assert len(fails) <= len(sent) * WEIGHTS[0] / 100, RESULTS["versions"]["loud"]
    assert canary_ready and canary_ready[0] - 5 <= fails[0].start, (canary_ready[:3], fails[0])
    save(r)


def save(r: Rollouts) -> None:
    runs = r.analysis_runs()
    RESULTS.update(
        {
            "pods": PODS,
            "weights": list(WEIGHTS),
            "analysis": {"interval_s": INTERVAL_S, "count": COUNT, "initial_delay_s": INITIAL_DELAY_S},
            "tolerance": {"accuracy": TOLERANCE},
            "load": {"rps": LOAD_RPS, "requests": r.load.count, "outcomes": r.load.outcomes()},
            "analysis_runs": runs,
            "timeline": r.samples,
        }
    )
    path = record("rollouts", RESULTS)
    hashes: list[str] = []
    for s in r.samples:
        for h in s["ready"]:
            if h and h not in hashes:
                hashes.append(h)
    fig, ax = plt.subplots(figsize=(10, 4))
    names = ["1.0 (image)", *(f"{v} ({k})" for k, v in VERSIONS.items())]
    for i, h in enumerate(hashes):
        ax.step(
            [s["t"] for s in r.samples],
            [s["ready"].get(h, 0) for s in r.samples],
            where="post",
            label=names[i] if i < len(names) else h,
        )
    for name, v in RESULTS["versions"].items():
        ax.axvline(v["upgraded_at_s"], color="grey", ls=":")
        ax.annotate(f"upgrade to {name}", (v["upgraded_at_s"], PODS + 0.3), fontsize=8)
    fails = r.load.non_ok()
    if fails:
        ax.plot([s.start for s in fails], [0.1] * len(fails), "rx", label=f"{len(fails)} failed requests")
    ax.set_xlabel("s since the load started")
    ax.set_ylabel("Ready pods")
    ax.set_ylim(0, PODS + 1)
    ax.legend(fontsize=8, loc="center right")
    save_figure(
        fig, f"Rollouts of cnn under {LOAD_RPS} req/s: good promoted, quiet and loud aborted", path.with_suffix(".png")
    )
