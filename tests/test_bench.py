"""The benchmark and the variant comparison, run for real on tiny archives (figures go to files)."""

import json

import pytest
import torch

from handlers import checkpoint
from scripts import bench, registry, variants
from scripts.client import BadInput

pytestmark = pytest.mark.slow


def test_which_side_saturated():
    assert bench.saturated({"client": 0.95, "frontend": 0.2, "workers": 0.3}, 1.0, 2) == "client"
    assert bench.saturated({"client": 0.3, "frontend": 0.4, "workers": 1.1}, 1.0, 2) == "server"
    assert bench.saturated({"client": 0.1, "frontend": 0.1, "workers": 0.2}, 1.0, 16) == "neither"
    # Two generator processes can use two cores before the client is the limit.
    assert bench.saturated({"client": 1.0, "frontend": 0.5, "workers": 1.0}, 1.0, 16, client_processes=2) == "neither"


def test_a_row_with_errors_is_named_with_one_example():
    class Refusing:
        def predict(self, model, data):
            if data == "long":
                raise BadInput("text too long for the model's window (413)", 413)
            return b"{}"

    row = bench.run_level(Refusing(), "transformer", ["ok", "long", "ok"], concurrency=2, requests=9)
    assert row["errors"] == {"BadInput": 3} and row["ok"] == 6
    result = {"models": {"transformer": {"served": {"rest": [row]}}, "cnn": {"served": {"rest": []}}}}
    [line] = bench.errors_of(result)
    assert line.startswith("transformer rest c=2: 3 x BadInput (e.g. ") and "413" in line
    row["errors"], row["error_examples"] = {}, {}
    assert bench.errors_of(result) == []


def test_percentile_and_queue_counters():
    assert bench.percentile([5, 1, 3, 2, 4], 50) == 3 and bench.percentile([5, 1, 3, 2, 4], 99) == 5
    text = (
        '# HELP ts_queue_latency_microseconds x\nts_queue_latency_microseconds{model_name="a",} 1500.0\n'
        'ts_queue_latency_microseconds{model_name="b",} 500.0\nts_inference_requests_total{model_name="a",} 4.0\n'
    )
    assert bench.queue_counters(text) == (2000.0, 4.0)


def test_a_tiny_bench_run_writes_its_figures(archive_store, tmp_path):
    ckpts, store = archive_store
    out = tmp_path / "results"
    assert (
        bench.main(
            [
                "--models",
                "lstm",
                "--concurrency",
                "1",
                "3",
                "--requests",
                "12",
                "--transports",
                "rest",
                "grpc",
                "--model-store",
                str(store),
                "--checkpoints",
                str(ckpts),
                "--output",
                str(out),
                "--min-seconds",
                "0.5",
                "--client-processes",
                "2",
                "--quick",
            ]
        )
        == 0
    )
    [js] = out.glob("*.json")
    result = json.loads(js.read_text())
    lstm = result["models"]["lstm"]
    for transport in ("rest", "grpc"):
        rows = lstm["served"][transport]
        assert [r["concurrency"] for r in rows] == [1, 3]
        # At least the requests asked for, and for at least the minimum duration.
        assert all(r["ok"] == r["requests"] >= 12 and r["seconds"] >= 0.5 for r in rows), rows
        assert all(r["errors"] == {} and r["p50_ms"] <= r["p99_ms"] for r in rows)
        assert all(r["saturated"] in ("client", "server", "neither") for r in rows)
    assert lstm["limit"]["16"]["handler_items_per_s"] > 0 and lstm["served_over_limit"] > 0
    assert result["cold_start_s"] > 0 and result["rss_loaded"]["frontend_mib"] > 50
    md = next(out.glob("*.md")).read_text()
    assert "| lstm | grpc | 3 |" in md and next(out.glob("*.png")).stat().st_size > 10_000


def test_int8_variant_is_compared_on_the_test_split(tiny_checkpoints, tmp_path):
    ckpts = tiny_checkpoints["lstm"].parent.parent
    assert (
        variants.main(
            [
                "--models",
                "lstm",
                "transformer",
                "--checkpoints",
                str(ckpts),
                "--repeats",
                "2",
                "--output",
                str(tmp_path),
            ]
        )
        == 0
    )
    [js] = tmp_path.glob("variants-*.json")
    results = json.loads(js.read_text())
    r = results["lstm"]
    assert r["variant"] == "int8" and r["speedup"] > 0
    assert abs(r["test_eager"]["accuracy"] - r["test_variant"]["accuracy"]) < 0.1  # int8 keeps the answers close
    assert 0 < r["max_abs_diff"] < 0.2
    t = results["transformer"]  # its test batches carry row indices beside the tensors
    assert t["variant"] == "int8" and t["speedup"] > 0 and "bleu" in t["test_variant"]
    export = r["export"]
    assert (export["exportable"] and export["max_abs_diff"] < 1e-4) or (not export["exportable"] and export["reason"])


def test_autocast_variants_are_refused_without_cuda_and_the_wrapper_keeps_the_answers(tiny_checkpoints, tmp_path):
    ckpts = tiny_checkpoints["cnn"].parent.parent
    assert (
        variants.main(
            ["--models", "cnn", "--variant", "bfloat16", "--checkpoints", str(ckpts), "--output", str(tmp_path)]
        )
        == 0
    )
    [js] = tmp_path.glob("variants-*.json")
    r = json.loads(js.read_text())["cnn"]
    if torch.cuda.is_available():
        assert r["speedup"] > 0 and abs(r["test_eager"]["accuracy"] - r["test_variant"]["accuracy"]) < 0.05
    else:
        assert "no GPU" in r["not_applicable"]
    # The wrapper itself, on CPU (autocast works there too): float32 out, the same predictions.
    ckpt = registry.load_checkpoint(tiny_checkpoints["cnn"])
    model = checkpoint.rebuild(ckpt)
    x = torch.randn(8, 1, 28, 28)
    with torch.inference_mode():
        eager, bf16 = model(x), variants.Autocast(model, torch.bfloat16, "cpu")(x)
    assert bf16.dtype == torch.float32 and (eager.argmax(-1) == bf16.argmax(-1)).float().mean() >= 0.75
    assert (eager - bf16).abs().max() < 0.5


def test_soak_mixes_good_and_hostile_requests_and_survives_a_killed_worker(archive_store, tmp_path):
    """A small `make soak`: every class's outcome is recorded, and it passes only by its own rules."""
    from scripts import soak

    _, store = archive_store
    assert (
        soak.main(
            [
                "--requests",
                "400",
                "--clients",
                "8",
                "--hostile-share",
                "0.1",
                "--model-store",
                str(store),
                "--output",
                str(tmp_path),
            ]
        )
        == 0
    )
    [js] = tmp_path.glob("soak-*.json")
    r = json.loads(js.read_text())
    assert r["requests"] == 400 and r["passed"] and r["hangs"] == 0 and not r["failures"]
    assert r["worker_restarts"] == {"lstm": [r["killed_worker"]["pid"]]}
    classes = r["outcomes_by_class"]
    assert {c.split()[0] for c in classes} >= {"good:cnn", "good:lstm", "good:transformer", "hostile:non_ascii_key"}
    assert all(set(o) <= {"400", "413", "500", "507"} for c, o in classes.items() if c.startswith("hostile:"))
    # Texts that break regex splitters, and the translator's largest legal requests, are in the mix.
    assert any(c.startswith("text:") for c in classes) and any(c.startswith("large:") for c in classes)
    assert all(set(o) <= {"2xx", "400", "413", "503 BatchFull"} for c, o in classes.items() if c.startswith("text:"))
    assert all(set(o) <= {"2xx", "503 BatchFull"} for c, o in classes.items() if c.startswith("large:"))


def test_soak_expects_each_kind_of_request_its_own_outcomes():
    from scripts.soak import expected

    assert expected("good:lstm", "2xx") and not expected("good:lstm", "400")
    assert expected("hostile:deep_json", "400") and not expected("hostile:deep_json", "2xx")
    assert expected("text:dots", "2xx") and expected("text:spaces", "400") and not expected("text:dots", "500")
    assert expected("text:dots", "503 BatchFull") and not expected("text:dots", "503")  # the queue's 503 is not
    assert expected("large:one_word_sentences", "503 BatchFull") and not expected("large:one_word_sentences", "413")
    assert not expected("large:one_word_sentences", "503") and not expected("good:transformer", "503 BatchFull")


def test_soak_judges_failures_outside_the_kill_window():
    from scripts.soak import judge

    kill = {"at": 100.0, "pid": 7}
    before, after = {"lstm": {7, 8}, "cnn": {9}}, {"lstm": {8, 10}, "cnn": {9}}
    records = [
        ("good:lstm", "rest", "507", 100.5, 101.0, "Worker died."),
        ("good:cnn", "grpc", "2xx", 101.5, 102.0, ""),
        ("hostile:deep_json", "rest", "400", 102.5, 103.0, ""),
        # Sent before the kill to the killed model, never answered until the client's deadline.
        ("good:lstm", "grpc", "hang", 99.9, 129.9, "deadline exceeded"),
    ]
    ok = judge(records, before, after, kill, "lstm", 10.0, {"hostile:deep_json": "lstm"})
    assert ok["passed"] and ok["hangs"] == 0
    assert ok["killed_worker"]["in_flight_outcomes"] == {"good:lstm rest 507": 1, "good:lstm grpc hang": 1}
    # The same deadline on a request sent after the kill, or to another model, is a hang.
    for hung in [("good:lstm", "grpc", "hang", 100.1, 130.1, "x"), ("good:cnn", "grpc", "hang", 99.9, 129.9, "x")]:
        verdict = judge([*records, hung], before, after, kill, "lstm", 10.0, {"hostile:deep_json": "lstm"})
        assert not verdict["passed"] and verdict["hangs"] == 1, verdict
    late = judge(
        [*records, ("good:lstm", "grpc", "500", 129.0, 130.0, "Worker died.")],
        before,
        after,
        kill,
        "lstm",
        10.0,
        {"hostile:deep_json": "lstm"},
    )
    assert not late["passed"] and late["failures"] == {"good:lstm grpc 500": 1}
    restarted = judge(
        records, before, {"lstm": {8, 10}, "cnn": {11}}, kill, "lstm", 10.0, {"hostile:deep_json": "lstm"}
    )
    assert not restarted["passed"] and restarted["unexpected_restarts"] == {"cnn": [9]}


def test_stages_profile_the_handler_path_without_a_server(tiny_checkpoints, tmp_path):
    ckpts = tiny_checkpoints["cnn"].parent.parent
    argv = [
        "--stages",
        "--quick",
        "--models",
        *registry.names(),
        "--checkpoints",
        str(ckpts),
        "--output",
        str(tmp_path),
    ]
    assert bench.main(argv) == 0
    [js] = tmp_path.glob("*-stages.json")
    result = json.loads(js.read_text())
    for m, r in result["models"].items():
        row = r["limit"][str(registry.get(m).batch_size)]
        assert set(row["stage_cpu_ms"]) == set(bench.STAGES) == set(row["stage_wall_ms"])
        # Every stage ran and took time; together they are the handler path (which has a little more).
        assert all(v > 0 for v in row["stage_wall_ms"].values()), (m, row)
        # Timed in the same runs as the whole handle() (handler_ms is timed at torch's own thread
        # count, in other runs, and differs from these by the machine's load, not by the code).
        assert sum(row["stage_wall_ms"].values()) <= row["stage_handler_ms"]
    md = next(tmp_path.glob("*-stages.md")).read_text()
    assert "| cnn | cpu |" in md and "parse | preprocess | inference | postprocess | serialise" in md


def test_the_limit_uses_the_served_archives_profile(tmp_path):
    """An archive built with PROFILE=gpu serves batches of the profile's size: the in-process limit
    beside it must use that size, not the CPU config's."""
    from scripts import archive

    gpu = archive.profile_settings("gpu", "cnn")
    assert bench.served_config("cnn", tmp_path)["batchSize"] == registry.get("cnn").batch_size  # no manifest
    (tmp_path / "manifest.json").write_text(json.dumps({"archives": {"cnn": {"profile": "gpu"}}}))
    config = bench.served_config("cnn", tmp_path)
    assert config["batchSize"] == gpu["batchSize"] != registry.get("cnn").batch_size
    assert config["handler"] == {**registry.get("cnn").model_config()["handler"], **gpu["handler"]}
    (tmp_path / "manifest.json").write_text(json.dumps({"archives": {"cnn": {"profile": "default"}}}))
    assert bench.served_config("cnn", tmp_path) == registry.get("cnn").model_config()
