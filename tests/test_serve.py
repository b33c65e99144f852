"""End to end on a real TorchServe (Java frontend + Python workers) on free loopback ports."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from scripts import hostile, pod, registry, serve
from scripts.client import (
    BadInput,
    Client,
    ModelNotFound,
    Overloaded,
    RestTransport,
    ServerError,
    Timeout,
    Unauthorized,
)
from scripts.common import ROOT, CLIError
from scripts.registry import load_dataset
from tests.e2e.harness.load import Load
from tests.helpers import free_ports, load_handler, png, run_batch, server_config, settings

pytestmark = pytest.mark.slow


@pytest.fixture(params=["rest", "grpc"])
def client(request, server):
    with Client(request.param, settings(server)) as c:
        yield c


@pytest.fixture(scope="module")
def digit() -> bytes:
    x, _ = load_dataset("cnn").take("test")
    return png(x[0])


INPUTS = {
    "lstm": [{"text": "A gripping, beautifully acted film."}, "Dull and far too long."],
    "transformer": [
        {"text": "God is love.", "max_length": 10},
        "The Lord is my shepherd.",
        # A paragraph: split into sentences, each translated, joined (REST and gRPC alike).
        "In the beginning God created the heavens and the earth. The earth was without form. "
        "And God said, Let there be light: and there was light. God saw the light, that it was good. "
        "And the evening and the morning were the first day.",
    ],
}


def in_process(model, tiny_checkpoints, payloads):
    handler, ctx = load_handler(model, tiny_checkpoints[model])
    answers, statuses, _ = run_batch(handler, ctx, [{"body": p} for p in payloads])
    assert all(s == 200 for s, _ in statuses)
    return answers


# ----------------------------------------------------------------------------- serving


def test_every_model_is_ready_and_status_lists_its_workers(server):
    rows = serve.status_rows(server)
    assert {m for m, _, _ in rows} == {"cnn", "lstm", "transformer"}
    assert all("READY" in workers for _, _, workers in rows)


def test_predictions_equal_the_in_process_handler(client, tiny_checkpoints, digit):
    assert client.health() == {"status": "Healthy"}
    assert {m["modelName"] for m in client.list_models()} == {"cnn", "lstm", "transformer"}
    assert client.predict("cnn", digit) == in_process("cnn", tiny_checkpoints, [digit])[0]
    b64 = {"data": base64.b64encode(digit).decode(), "topk": 5}
    assert client.predict("cnn", b64) == in_process("cnn", tiny_checkpoints, [b64])[0]
    for model, payloads in INPUTS.items():
        expected = in_process(model, tiny_checkpoints, payloads)
        assert [client.predict(model, p) for p in payloads] == expected


def test_versioned_prediction_and_describe(client):
    info = client.describe("lstm")
    assert info[0]["modelVersion"] == "1.0" and info[0]["batchSize"] == 16
    assert client.predict("lstm", "fine", version="1.0")["label"] in ("rotten", "fresh")


def test_concurrent_requests_are_batched(server):
    with Client("rest", settings(server)) as c:

        def one(i):
            answer = c.transport.predict("lstm", f"review number {i} was a fine film", None)
            assert answer[1]["X-Model-Version"] == "1.0"  # the archive's version, through the frontend
            return json.loads(answer[0]), int(answer[1]["X-Batch-Size"])

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(48)))
    assert all(r[0]["label"] in ("rotten", "fresh") for r in results)
    assert max(size for _, size in results) > 1, "no request shared a batch"


def test_the_frontend_uses_our_log_config_one_line_per_request(server):
    """handlers/config/log4j2.xml: a broken file leaves TorchServe silently without logs, and
    TorchServe's own config writes each request line three times."""

    def lines(name):
        path = server.log_dir / name
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    before = sum("/predictions/lstm" in line for line in lines("access_log.log"))
    with Client("rest", settings(server)) as c:
        for i in range(5):
            c.predict("lstm", f"log line {i}")
    deadline = time.monotonic() + 5
    while (
        sum("/predictions/lstm" in line for line in lines("access_log.log")) < before + 5
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert sum("/predictions/lstm" in line for line in lines("access_log.log")) == before + 5
    ts_log = lines("ts_log.log")
    assert any("Initialize Inference server" in line for line in ts_log), ts_log[:5]
    assert not [
        line for line in ts_log if "[DEBUG]" in line or "Sending response for jobId" in line or "ACCESS_LOG" in line
    ]
    assert not [
        line for line in lines("torchserve.out") if "ACCESS_LOG" in line or "[INFO ]" in line or "StatusLogger" in line
    ]
    assert any("W-" in line and "lstm" in line for line in lines("model_log.log")), "worker output not logged"


# ----------------------------------------------------------------------------- auth


def test_token_auth_is_on_rest_and_grpc(server):
    for transport in ("rest", "grpc"):
        with Client(transport, settings(server, inference_token="", management_token="")) as c:
            with pytest.raises(Unauthorized):
                c.predict("lstm", "hello")
            with pytest.raises(Unauthorized):
                c.describe("lstm")
        with Client(transport, settings(server, inference_token="wrong")) as c:
            with pytest.raises(Unauthorized):
                c.predict("lstm", "hello")
    with Client("rest", settings(server, inference_token="")) as c:
        assert "ts_inference_requests_total" in c.metrics()  # the metrics port takes no token


# ----------------------------------------------------------------------------- bad input


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, format="PNG")
    return buf.getvalue()


WIRE_BAD = {
    "cnn": [
        (b"\x00\x01garbage", 400, "not valid base64"),
        (b"\x89PNG\r\n\x1a\ntruncated", 400, "not a readable image"),
        ({"image": "x"}, 400, "JSON body must be"),
        ({"data": "aGk=", "topk": 99}, 400, "'topk' must be at most"),
        (_bomb(), 413, "5000x5000 pixels"),
        # Killer classes a hostile client found: a non-ASCII reason phrase dropped the worker and
        # its batch; deep nesting failed the batch with 503.
        ({"data": "aGk=", "topk": "\u00fc"}, 400, "got '\\xfc'"),
        (b'{"data":' * 100_000 + b"1" + b"}" * 100_000, 400, "nested too deeply"),
    ],
    "lstm": [
        (b"\xff\xfe\xfa", 400, "not valid UTF-8"),
        ("   ", 400, "empty text"),
        ("x" * 5001, 413, "5001 characters"),
        ({"txt": "hi"}, 400, "keys 'text'"),
        ({"text": 5}, 400, "string or a list"),
        ({"text": "x", "\u00e9": 1}, 400, "'\\xe9'"),
        ({"text": "x", "k" * 200_000: 1}, 400, "kkk..."),
        (b'{"text":' * 100_000 + b'"x"' + b"}" * 100_000, 400, "nested too deeply"),
    ],
    "transformer": [
        (b"\xc3\x28", 400, "not valid UTF-8"),
        ("word " * 900, 413, "4500 characters"),
        ({"text": "hi", "max_length": 0}, 400, "'max_length' must be a positive integer"),
        ({"text": "hi", "max_length": "\u00e9"}, 400, "'max_length' must be a positive integer"),
    ],
}
WIRE_GOOD = {"lstm": "a warm film", "transformer": "God is love."}
LIMITS = registry.get("transformer").model_config()["handler"]
WIRE_BAD["transformer"] += [
    (hostile.one_word_sentences(LIMITS["max_rows"] + 1, LIMITS["max_texts"]), 413, "decoder rows, the limit is"),
    (
        hostile.one_word_sentences(
            LIMITS["max_rows"] // LIMITS["max_beam"] + 1, LIMITS["max_texts"], LIMITS["max_beam"]
        ),
        413,
        f"x beam {LIMITS['max_beam']} =",
    ),
    (
        {"text": "Go. " * (LIMITS["max_explain_pieces"] + 1), "explain": True},
        413,
        f"an explanation covers at most {LIMITS['max_explain_pieces']} sentence pieces",
    ),
]


def worker_pids(cfg, model) -> list[int]:
    return pod.ready_worker_pids(serve.describe(cfg, model))


@pytest.mark.parametrize("transport", ["rest", "grpc"])
@pytest.mark.parametrize("model", ["cnn", "lstm", "transformer"])
def test_bad_input_over_the_wire_gets_its_4xx_neighbours_succeed_worker_survives(server, transport, model, digit):
    good = WIRE_GOOD.get(model, digit)
    pids = worker_pids(server, model)
    with Client(transport, settings(server)) as c:
        expected = c.predict(model, good)
        for bad, code, message in WIRE_BAD[model]:
            # Good neighbours sent together with the bad request, so they share its batch when they can.
            with ThreadPoolExecutor(3) as pool:
                futures = [pool.submit(c.predict, model, p) for p in (good, bad, good)]
                with pytest.raises(BadInput) as err:
                    futures[1].result()
                assert futures[0].result() == expected and futures[2].result() == expected
            assert err.value.status == code and message in str(err.value), (bad, err.value)
        assert c.predict(model, good) == expected
    assert worker_pids(server, model) == pids, "a worker restarted"


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_splitter_texts_and_the_largest_requests_are_answered_and_spare_their_neighbours(server, transport):
    """Every text of scripts/hostile.py (regex splitters backtrack on them) and the largest legal
    requests, each between two good neighbours: a 2xx or a clear 4xx, the neighbours' answers
    unchanged, no worker replaced."""
    cases = [*hostile.texts(LIMITS["max_chars"]).values()]
    cases += [
        hostile.one_word_sentences(LIMITS["max_rows"], LIMITS["max_texts"]),
        hostile.one_word_sentences(LIMITS["max_rows"] // LIMITS["max_beam"], LIMITS["max_texts"], LIMITS["max_beam"]),
    ]
    pids, good, answered = worker_pids(server, "transformer"), WIRE_GOOD["transformer"], 0
    with Client(transport, settings(server)) as c:
        expected = c.predict("transformer", good)
        for body in cases:
            with ThreadPoolExecutor(3) as pool:
                futures = [pool.submit(c.predict, "transformer", p) for p in (good, body, good)]
                try:
                    answer = futures[1].result()
                    assert "translation" in (answer if isinstance(body, str) else answer[-1]), body
                    answered += 1
                except BadInput as e:  # too many pieces, or nothing the tokenizer keeps
                    assert ("decoder rows" in str(e) and e.status == 413) or "nothing to translate" in str(e), e
                assert futures[0].result() == expected and futures[2].result() == expected
    assert answered >= len(cases) // 2  # most are translated, not refused
    assert worker_pids(server, "transformer") == pids, "a worker restarted"


def test_handlers_report_handler_time_and_refused_requests_on_the_metrics_endpoint(server):
    """The server is shared: other tests' refusals count too, so the count must rise by ours."""

    def scrape(c) -> tuple[float, bool]:
        text = c.metrics().splitlines()
        refused = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text
            if line.startswith("HandlerRequestErrors{") and 'ModelName="lstm"' in line and 'Status="400"' in line
        )
        timed = any(line.startswith("HandlerTime{") and 'ModelName="lstm"' in line for line in text)
        return refused, timed

    with Client("rest", settings(server)) as c:
        c.predict("lstm", "a warm film")
        before, _ = scrape(c)
        with pytest.raises(BadInput):
            c.predict("lstm", {"txt": "not the key"})
        deadline = time.monotonic() + 15
        while True:
            after, timed = scrape(c)
            if (after > before and timed) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert timed, "no HandlerTime for lstm on /metrics"
    assert after >= before + 1, f"HandlerRequestErrors for lstm, status 400: {before} -> {after}"


def test_a_form_encoded_upload_is_refused_with_415(server, digit):
    import requests

    token = serve.read_token(server, "inference")
    resp = requests.post(
        f"{server.url('inference')}/predictions/cnn",
        data=digit,
        timeout=30,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status_code == 415 and "curl -T" in resp.json()["message"]
    ok = requests.post(
        f"{server.url('inference')}/predictions/transformer",
        data=b"God is love.",
        timeout=30,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"},
    )
    assert ok.headers["content-type"].startswith("application/json") and "\\u00" not in ok.text


def test_wrong_model_wrong_version_and_oversized_body(client, server):
    with pytest.raises(ModelNotFound):
        client.predict("resnet", "hi")
    with pytest.raises(ModelNotFound):
        client.predict("lstm", "hi", version="9.9")
    if isinstance(client.transport, RestTransport):
        with pytest.raises(BadInput) as err:
            client.predict("lstm", b"x" * 7_000_000)  # over max_request_size: the frontend refuses it
        assert err.value.status == 413
    assert client.predict("lstm", "still fine")["label"]


# ----------------------------------------------------------------------------- failures


def test_a_killed_worker_comes_back_and_no_request_hangs(server):
    before = worker_pids(server, "lstm")
    victim = before[0]
    outcomes = []
    with Client("rest", settings(server, timeout=20)) as c:
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60  # lstm's startupTimeout
        while time.monotonic() < deadline:
            try:
                outcomes.append(c.predict("lstm", "after the crash")["label"])
            except (ServerError, Overloaded, Timeout) as e:  # documented: 500 Worker died, or 503
                outcomes.append(type(e).__name__)
            now = worker_pids(server, "lstm")
            if len(now) == len(before) and victim not in now:
                break
            time.sleep(0.2)
        after = worker_pids(server, "lstm")
        assert len(after) == len(before) and victim not in after, "killed worker not replaced by a READY one"
        assert c.predict("lstm", "and again")["label"] in ("rotten", "fresh")
    assert outcomes and all(o in ("rotten", "fresh", "ServerError", "Overloaded") for o in outcomes), outcomes


def test_start_refuses_a_port_in_use_and_a_second_server(server, archive_store, tmp_path):
    _, store = archive_store
    busy = server_config(tmp_path / "a", store)
    busy.ports["inference"] = server.ports["inference"]
    with pytest.raises(CLIError, match=rf"port {server.ports['inference']} \(inference\) .* is in use"):
        serve.start(busy)
    with pytest.raises(CLIError, match="already running"):
        serve.start(server)


def test_a_broken_archive_is_refused_in_one_line_before_anything_starts(archive_store, tmp_path):
    _, store = archive_store

    def flip(at: float):
        return lambda b: b[: int(len(b) * at)] + bytes([b[int(len(b) * at)] ^ 0x40]) + b[int(len(b) * at) + 1 :]

    # A flipped byte fails a CRC or breaks the deflate stream itself, depending on where it lands.
    damages = [("truncated", lambda b: b[: len(b) // 2])] + [
        (f"flipped-{at}", flip(at)) for at in (0.01, 0.3, 0.6, 0.9)
    ]
    for name, damage in damages:
        bad = tmp_path / name
        bad.mkdir()
        (bad / "lstm.mar").write_bytes(damage((store / "lstm.mar").read_bytes()))
        cfg = server_config(tmp_path / f"run-{name}", bad)
        with pytest.raises(CLIError, match=r"lstm.mar: (not a readable model archive|corrupted archive)") as err:
            serve.start(cfg)
        assert "rebuild it with `make archive`" in str(err.value) and "\n" not in str(err.value)
        assert serve.running_pid(cfg) is None
        serve.check_ports_free(cfg)  # nothing was left listening


def test_expired_keys_are_renewed_for_readiness_and_status(archive_store, tmp_path, monkeypatch):
    """With token auth, keys expire and nothing renewed them: readiness failed for good."""
    _, store = archive_store
    base = tmp_path / "config.properties"
    base.write_text(serve.BASE_CONFIG.read_text() + "token_expiration_min=0.1\n")  # 6 s
    monkeypatch.setattr(serve, "BASE_CONFIG", base)
    cfg = server_config(tmp_path / "run", store, models=["lstm"])
    serve.start(cfg)
    try:
        first = serve.read_token(cfg, "management")
        time.sleep(7)
        env = {**os.environ, "TS_KEY_FILE": str(cfg.key_file)}
        ready = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "pod.py"), "ready", "--url", cfg.url("management")],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ready.returncode == 0, ready.stderr
        assert serve.read_token(cfg, "management") != first
        time.sleep(7)
        assert all("READY" in w for _, _, w in serve.status_rows(cfg))
    finally:
        serve.stop(cfg)


def test_stop_ends_workers_still_starting_from_a_scale_up(archive_store, tmp_path):
    """`stop` printed "stopped" while workers of a scale-up under way were still alive."""
    import requests

    _, store = archive_store
    cfg = server_config(tmp_path / "run", store, models=["lstm"])
    serve.start(cfg)
    sid = os.getsid(serve.running_pid(cfg))
    try:
        token = serve.read_token(cfg, "management")
        resp = requests.put(
            f"{cfg.url('management')}/models/lstm?min_worker=6&synchronous=false",
            timeout=10,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert resp.status_code == 202, resp.text
        time.sleep(1.5)  # the new workers are being spawned
    finally:
        assert serve.stop(cfg)
    assert not serve.session_processes(sid), "processes of the server outlived stop"


def test_a_model_that_cannot_load_fails_start_with_its_worker_log(tiny_checkpoints, tmp_path):
    from scripts import archive

    bad_config = tmp_path / "lstm.yaml"
    bad_config.write_text((ROOT / "handlers" / "config" / "lstm.yaml").read_text().replace("max_texts:", "max_textz:"))
    store = tmp_path / "store"
    archive.build("lstm", tiny_checkpoints["lstm"], "1.0", store, bad_config)
    cfg = server_config(tmp_path / "run", store)
    with pytest.raises(CLIError, match=r"(?s)model lstm has no READY worker.*unknown handler options"):
        serve.start(cfg, wait=25)
    assert serve.running_pid(cfg) is None


def test_make_serve_cli_round_trip_without_auth(archive_store, tmp_path):
    """The CLI a user types: start with --no-auth, predict without a token, status, stop."""
    _, store = archive_store
    ports = dict(zip(serve.PORTS, free_ports(5), strict=True))
    flags = [f"--{k.replace('_', '-')}-port={v}" for k, v in ports.items()]
    base = [
        sys.executable,
        "-m",
        "scripts.serve",
        "--run-dir",
        str(tmp_path / "run"),
        "--model-store",
        str(store),
        *flags,
    ]
    run = lambda *a: subprocess.run([*base, *a], cwd=ROOT, capture_output=True, text=True, timeout=180)
    started = run("start", "--no-auth", "--models", "lstm")
    try:
        assert started.returncode == 0, started.stderr
        assert "ready" in started.stdout and "auth            off" in started.stdout
        client = subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.client",
                f"--inference-port={ports['inference']}",
                "--key-file",
                str(tmp_path / "none.json"),
                "predict",
                "lstm",
                "--text",
                "lovely",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert client.returncode == 0 and '"label"' in client.stdout, client.stderr
        status = run("status", "--models", "lstm")
        assert "READY" in status.stdout
    finally:
        stopped = run("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert run("status").returncode == 1


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_explanations_over_the_wire(server, transport, digit):
    """REST on /explanations/<model>; gRPC, which has no explanations call in TorchServe 0.12, with
    "explain": true in the body. Both give the same explanation."""
    with Client(transport, settings(server)) as c:
        cnn = c.explain("cnn", digit, heatmap=True)
        assert len(cnn["attributions"]) == 28 and cnn["heatmap_png"]
        lstm = c.explain("lstm", "a warm, funny film")
        assert [t for t, _ in lstm["tokens"]] == ["a", "warm", ",", "funny", "film"]
        translation = c.explain("transformer", "God is love.")
        [sentence] = translation["sentences"]
        assert len(sentence["alignment"]) == len(sentence["target_tokens"])
        with pytest.raises(BadInput, match="'explain' must be true or false"):
            c.predict("lstm", {"text": "x", "explain": 1})


def test_make_explain_writes_the_heatmap(server, digit, tmp_path):
    image = tmp_path / "digit.png"
    image.write_bytes(digit)
    out = tmp_path / "heat.png"
    cfg = settings(server)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.client",
            "--inference-port",
            str(cfg.ports["inference"]),
            "--key-file",
            str(cfg.key_file),
            "explain",
            "cnn",
            "--file",
            str(image),
            "--heatmap",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (224, 224) and '"label"' in proc.stdout


def test_the_e2e_load_generator_records_every_request_closed_and_open_loop(server, digit):
    """tests/e2e/harness/load.py, on which the cluster's "no failed request" claims rest, against a
    real TorchServe: closed-loop it sends exactly its bound, REST and gRPC in turn, and records each
    client error with its class and status; open-loop request i is due at i / rate whatever the
    answers take."""
    bad, code, _ = WIRE_BAD["cnn"][0]
    with Load(settings(server), [("cnn", digit), ("lstm", WIRE_GOOD["lstm"]), ("cnn", bad)], max_requests=30) as load:
        load.finish()
    failed = load.non_ok()
    assert load.count == 30 and load.outcomes()["rest ok"] + load.outcomes()["grpc ok"] == 20, load.outcomes()
    assert len(failed) == 10 and {s.outcome for s in failed} == {f"BadInput {code}"}, load.failures
    assert {s.transport for s in failed} == {"rest", "grpc"} and {s.model for s in failed} == {"cnn"}
    assert len(load.failures) == 10 and all("not valid base64" in f for f in load.failures), load.failures

    with Load(settings(server), [("lstm", WIRE_GOOD["lstm"])], rate=20, max_seconds=1.0, workers=4) as paced:
        paced.finish()
    assert sorted(s.due for s in paced.sent) == pytest.approx([i / 20 for i in range(21)])
    assert all(s.ok and s.start >= s.due for s in paced.sent), paced.failures
