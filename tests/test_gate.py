"""The model-quality gate (scripts/gate.py): its held-out sets, its scores, its verdict, and a
comparison of two real TorchServe endpoints."""

from __future__ import annotations

import json
import time

import pytest
import torch

from scripts import gate, registry
from tests.helpers import settings


def test_accuracy_is_the_share_of_top_labels_right_and_a_failed_request_is_wrong():
    answers = [{"7": 0.9, "1": 0.1}, {"2": 0.6, "7": 0.4}, None, {}]
    assert gate.score("accuracy", answers, ["7", "7", "7", "7"]) == 0.25


def test_bleu_is_the_corpus_score_lowercased_and_a_failed_request_an_empty_translation():
    refs = ["en el principio creo dios los cielos y la tierra", "dios es amor y paz para todos"]
    assert gate.score("bleu", [{"translation": r.upper()} for r in refs], refs) == pytest.approx(100.0)
    assert gate.score("bleu", [{"translation": refs[0]}, None], refs) < gate.score(
        "bleu", [{"translation": r} for r in refs], refs
    )


def test_the_verdict_allows_the_tolerance_and_no_more():
    assert gate.verdict("accuracy", 0.93, 0.95, 0.02)
    assert not gate.verdict("accuracy", 0.92, 0.95, 0.02)
    assert gate.verdict("bleu", 30.0, 29.0, 0.0)


def test_export_writes_the_test_split_the_checkpoint_was_scored_on(tiny_checkpoints, tmp_path):
    ckpts = tiny_checkpoints["cnn"].parents[1]
    [path] = gate.export(["cnn"], tmp_path, 25, ckpts)
    doc = json.loads(path.read_text())
    saved = torch.load(tiny_checkpoints["cnn"], map_location="cpu", weights_only=True)
    a = saved["train_args"]
    ds = registry.load_dataset("cnn", a.get("data"), seed=a["seed"], limit=a["limit"])
    assert doc["metric"] == "accuracy" and doc["data"]["fingerprint"] == ds.fingerprint
    assert len(doc["examples"]) == 25
    assert [x["expected"] for x in doc["examples"]] == [ds.labels[int(i)] for i in ds.take("test")[1][:25]]
    assert all(x["base64"] for x in doc["examples"])


def test_a_model_without_its_held_out_set_is_a_clear_error(tmp_path):
    with pytest.raises(gate.CLIError, match="lstm.json.*gate export"):
        gate.load_heldout(tmp_path, "lstm")


def test_the_pods_urls_are_the_ready_ones_on_the_inference_port():
    def pod(ip, ready="True", deleting=False):
        meta = {"deletionTimestamp": "2026-12-06T00:00:00Z"} if deleting else {}
        return {"metadata": meta, "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}}

    pods = [pod("10.0.0.9"), pod("10.0.0.2"), pod("10.0.0.3", "False"), pod("10.0.0.4", deleting=True)]
    assert gate.ready_urls(pods, 8080) == ["http://10.0.0.2:8080", "http://10.0.0.9:8080"]


def test_compare_needs_both_sides():
    assert gate.run_cli("gate", gate.main, ["compare", "--models", "cnn", "--canary", "http://127.0.0.1:9"]) == 1


def test_compare_scores_both_sides_on_a_real_torchserve_and_fails_a_canary_below_the_stable(
    server, tiny_checkpoints, tmp_path, monkeypatch, capsys
):
    gate.export(["cnn"], tmp_path, 30, tiny_checkpoints["cnn"].parents[1])
    s = settings(server)
    monkeypatch.setenv("TS_INFERENCE_TOKEN", s.token("inference") or "")
    url = f"http://{s.host}:{s.ports['inference']}"
    args = ["compare", "--models", "cnn", "--heldout", str(tmp_path), "--canary", url, "--stable", url]
    # The same pods on both sides: the same score, so it passes at zero tolerance...
    assert gate.main([*args, "--tolerance", "accuracy=0"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("gate: cnn accuracy on 30 held-out examples: canary ") and line.endswith("PASS"), line
    # ...and fails where the canary must beat the stable by more than it can.
    assert gate.main([*args, "--tolerance", "accuracy=-1.01"]) == 1
    assert capsys.readouterr().out.strip().endswith("FAIL")
    # A canary that cannot be reached is no measurement: exit 2, at once, naming it.
    dead = ["compare", "--models", "cnn", "--heldout", str(tmp_path), "--canary", "http://127.0.0.1:9", "--stable", url]
    t0 = time.monotonic()
    assert gate.main([*dead, "--reach-within", "4"]) == 2
    assert time.monotonic() - t0 < 15  # tried for its bound, not for every request's deadline
    assert "no answer to /ping from http://127.0.0.1:9" in capsys.readouterr().out
