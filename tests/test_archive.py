"""Archives built by the real torch-model-archiver through `make archive`: reproducible and verified."""

import json
import shutil
import zipfile

import pytest

from scripts import archive, registry
from scripts.common import sha256_file
from tests.helpers import make

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(archive_store):
    return archive_store


def test_archives_carry_handler_packages_checkpoint_and_config(store):
    _, store = store
    for model, entry in registry.REGISTRY.items():
        handler = entry.handler_file.name
        with zipfile.ZipFile(store / f"{model}.mar") as z:
            names = set(z.namelist())
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        assert {
            "checkpoint.pt",
            handler,
            f"{model}.yaml",
            "handlers/base.py",
            "handlers/__init__.py",
            "models/__init__.py",
            "models/text.py",
            entry.network.__module__.replace(".", "/") + ".py",
        } <= names
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
        assert manifest["model"] == {
            "configFile": f"{model}.yaml",
            "handler": handler,
            "modelName": model,
            "modelVersion": "1.0",
            "serializedFile": "checkpoint.pt",
        }


def test_make_archive_is_reproducible_and_does_no_work_when_nothing_changed(store):
    ckpts, store = store
    digests = {m: sha256_file(store / f"{m}.mar") for m in registry.REGISTRY}
    mtimes = {m: (store / f"{m}.mar").stat().st_mtime_ns for m in registry.REGISTRY}
    again = make("archive", f"CHECKPOINT_DIR={ckpts}", f"STORE={store}")
    assert again.returncode == 0 and "scripts.archive build" not in again.stdout
    assert {m: (store / f"{m}.mar").stat().st_mtime_ns for m in registry.REGISTRY} == mtimes
    (store / "lstm.mar").unlink()  # rebuilt later, from the same inputs: the same bytes
    rebuilt = make("archive", f"CHECKPOINT_DIR={ckpts}", f"STORE={store}", "MODELS=lstm")
    assert rebuilt.returncode == 0 and "scripts.archive build --model lstm" in rebuilt.stdout
    assert sha256_file(store / "lstm.mar") == digests["lstm"]
    manifest = json.loads((store / "manifest.json").read_text())["archives"]
    assert {m: e["sha256"] for m, e in manifest.items()} == digests


def test_a_new_version_rebuilds(store, tmp_path):
    ckpts, _ = store
    out = tmp_path / "store"
    assert make("archive", f"CHECKPOINT_DIR={ckpts}", f"STORE={out}", "MODELS=cnn", "VERSION=2.1").returncode == 0
    entry = json.loads((out / "manifest.json").read_text())["archives"]["cnn"]
    assert entry["version"] == "2.1"
    assert entry["checkpoint_sha256"] == sha256_file(ckpts / "cnn" / "checkpoint.pt")
    assert entry["size"] > entry["checkpoint_size"] * 0.5 and entry["metrics"]["accuracy"] >= 0


def test_another_handler_is_archived_at_the_root_and_in_the_handlers_package(store, tmp_path):
    ckpts, _ = store
    handler = tmp_path / "other_handler.py"
    handler.write_text(
        "from handlers.image_classifier import ImageClassifierHandler\n\n\nclass Other(ImageClassifierHandler):\n    pass\n"
    )
    config = archive.ROOT / "handlers" / "config" / "cnn.yaml"
    entry = archive.build("cnn", ckpts / "cnn" / "checkpoint.pt", "1.0", tmp_path / "s", config, handler_file=handler)
    assert entry["handler"] == "other_handler.py"
    with zipfile.ZipFile(tmp_path / "s" / "cnn.mar") as z:
        assert z.read("other_handler.py") == z.read("handlers/other_handler.py") == handler.read_bytes()
        assert json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["handler"] == "other_handler.py"
        assert "handlers/image_classifier.py" in z.namelist()
    assert not archive.verify(tmp_path / "s")


def rebuild_one(store, tmp_path, model: str, setting: str) -> tuple:
    """A copy of the store, with ``model`` rebuilt by `make archive <setting>` (e.g. PROFILE=gpu);
    returns (the copy, its manifest entry for the model)."""
    ckpts, src = store
    out = tmp_path / "store"
    shutil.copytree(src, out)
    proc = make("archive", f"CHECKPOINT_DIR={ckpts}", f"STORE={out}", f"MODELS={model}", setting)
    flag = {"PROFILE": "--profile", "VARIANT": "--optimize"}[setting.split("=")[0]]
    assert proc.returncode == 0 and f"{flag} {setting.split('=')[1]}" in proc.stdout, proc.stderr
    return out, json.loads((out / "manifest.json").read_text())["archives"][model]


def back_to_default(store, out, model: str) -> None:
    """`make archive` without the setting rebuilds the archive as it was, byte for byte."""
    ckpts, src = store
    assert make("archive", f"CHECKPOINT_DIR={ckpts}", f"STORE={out}", f"MODELS={model}").returncode == 0
    assert sha256_file(out / f"{model}.mar") == sha256_file(src / f"{model}.mar")


def test_the_gpu_profile_rebuilds_with_its_settings_and_leaves_the_rest_of_the_config(store, tmp_path):
    import yaml

    out, entry = rebuild_one(store, tmp_path, "transformer", "PROFILE=gpu")
    assert entry["profile"] == "gpu"
    with zipfile.ZipFile(out / "transformer.mar") as z:
        served = yaml.safe_load(z.read("transformer.yaml"))
    base = yaml.safe_load(registry.get("transformer").config_path.read_text())
    profile = yaml.safe_load((archive.PROFILES / "gpu.yaml").read_text())
    assert profile["node"] and set(profile["models"]) == set(registry.REGISTRY)
    changes = profile["models"]["transformer"]
    assert served == {**base, **changes, "handler": {**base["handler"], **changes["handler"]}}
    assert served["minWorkers"] != base["minWorkers"] and served["handler"]["max_beam"] == base["handler"]["max_beam"]
    with pytest.raises(archive.CLIError, match="--profile tpu: no handlers/config/profiles/tpu.yaml"):
        archive.profile_settings("tpu", "cnn")
    back_to_default(store, out, "transformer")


def test_a_variant_change_rebuilds_and_the_aoti_archive_answers_like_eager(store, tmp_path):
    """make archive VARIANT=aoti: the forward compiled by AOTInductor (a real C++ build, ~40 s)."""
    from scripts.registry import load_dataset
    from tests.helpers import load_handler, png, run_batch

    ckpts, _ = store
    out, entry = rebuild_one(store, tmp_path, "cnn", "VARIANT=aoti")
    assert entry["optimize"] == "aoti"
    with zipfile.ZipFile(out / "cnn.mar") as z:
        z.extractall(tmp_path / "cnn")
    x, _ = load_dataset("cnn").take("test")
    bodies = [{"body": png(x[i])} for i in range(5)]
    eager, ctx = load_handler("cnn", ckpts / "cnn" / "checkpoint.pt")
    fast, ctx_fast = load_handler("cnn", tmp_path / "cnn" / "checkpoint.pt", {"optimize": "aoti"})
    assert type(fast.model).__name__ == "CompiledForward"
    a, sa, _ = run_batch(eager, ctx, bodies)
    b, sb, _ = run_batch(fast, ctx_fast, bodies)
    assert [s for s, _ in sa] == [s for s, _ in sb] == [200] * 5
    for ea, fa in zip(a, b, strict=True):
        assert list(ea) == list(fa) and max(abs(ea[k] - fa[k]) for k in ea) < 1e-4, (ea, fa)
    back_to_default(store, out, "cnn")


def test_aoti_is_refused_where_it_cannot_work(store, tmp_path):
    from scripts.common import CLIError
    from tests.helpers import load_handler

    ckpts, _ = store
    with pytest.raises(CLIError, match="optimize aoti: lstm does not export"):
        archive.build(
            "lstm",
            ckpts / "lstm" / "checkpoint.pt",
            "1.0",
            tmp_path / "s",
            archive.ROOT / "handlers" / "config" / "lstm.yaml",
            "aoti",
        )
    with pytest.raises(ValueError, match="aoti needs model.pt2 in the archive"):
        load_handler("cnn", ckpts / "cnn" / "checkpoint.pt", {"optimize": "aoti"})


def test_verify_refuses_a_flipped_byte_and_a_truncated_archive(store, tmp_path):
    _, src = store
    shutil.copytree(src, tmp_path / "s")
    s = tmp_path / "s"
    assert archive.verify(s) == []
    data = bytearray((s / "cnn.mar").read_bytes())
    data[len(data) // 2] ^= 0x01
    (s / "cnn.mar").write_bytes(bytes(data))
    (s / "lstm.mar").write_bytes((s / "lstm.mar").read_bytes()[:-100])
    problems = archive.verify(s)
    assert any("cnn.mar: sha256" in p for p in problems)
    assert any("lstm.mar: size" in p for p in problems)
    proc = make("verify-archives", f"STORE={s}")
    assert proc.returncode != 0 and "cnn.mar: sha256" in proc.stderr
    # The manifest itself is checked as the pods' init container checks it (scripts/pod.py).
    manifest = json.loads((s / "manifest.json").read_text())
    manifest["archives"]["cnn"]["file"] = "../cnn.mar"
    (s / "manifest.json").write_text(json.dumps(manifest))
    [problem] = archive.verify(s)
    assert "entry 'cnn' needs a plain file name ending in .mar" in problem
