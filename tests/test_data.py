import gzip
import shutil

import numpy as np
import pytest
from PIL import Image

from scripts import data
from scripts.data import DataError, DataKind
from scripts.registry import load_dataset


@pytest.mark.parametrize(
    "model,n,labels",
    [
        ("cnn", 5000, [str(i) for i in range(10)]),
        ("lstm", 12808, ["rotten", "fresh"]),
        ("transformer", 30337, None),
    ],
)
def test_bundled_datasets_load_verified_with_deterministic_disjoint_splits(model, n, labels):
    ds = load_dataset(model, seed=0)
    assert len(ds) == n and ds.labels == labels
    parts = [set(ds.splits[k].tolist()) for k in ("train", "val", "test")]
    assert sum(map(len, parts)) == n and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    again = load_dataset(model, seed=0)
    assert all(np.array_equal(ds.splits[k], again.splits[k]) for k in ds.splits)
    assert ds.fingerprint == again.fingerprint
    assert load_dataset(model, seed=1).fingerprint != ds.fingerprint


def test_bundled_content_is_what_it_claims():
    cnn = load_dataset("cnn")
    assert cnn.x.shape == (5000, 28, 28) and cnn.x.dtype == np.uint8
    assert np.bincount(cnn.y).tolist() == [500] * 10
    lstm = load_dataset("lstm")
    assert np.bincount(lstm.y).tolist() == [5405, 7403]
    pairs = load_dataset("transformer")
    assert pairs.x[0].startswith("In the beginning") and pairs.y[0].startswith("EN el principio")


def test_limit_takes_a_seeded_subset():
    a, b = load_dataset("lstm", limit=100, seed=3), load_dataset("lstm", limit=100, seed=3)
    assert len(a) == 100 and a.x == b.x


def test_a_corrupted_bundled_file_is_refused_by_its_sha256(tmp_path, monkeypatch):
    bad = tmp_path / "data" / "en-es-bible.tsv.gz"
    bad.parent.mkdir()
    shutil.copy(data.ROOT / "data" / "en-es-bible.tsv.gz", bad)
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    monkeypatch.setattr(data, "ROOT", tmp_path)
    with pytest.raises(DataError, match=r"en-es-bible\.tsv\.gz: sha256 .* does not match the pinned"):
        load_dataset("transformer")


def test_user_csv_with_a_malformed_line_names_file_and_line(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text(
        "text,label\ngreat film,pos\nawful film,neg\nfine,pos\nbad,neg\nok,pos\nmeh,neg\n"
        "nice,pos\npoor,neg\nwow,pos\nugh,neg\n"
    )
    ds = load_dataset("lstm", str(good))
    assert ds.labels == ["neg", "pos"] and len(ds) == 10
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngreat film,pos\nawful film\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: expected 2 fields"):
        load_dataset("lstm", str(bad))
    (tmp_path / "nohead.csv").write_text("great,pos\n")
    with pytest.raises(DataError, match=r"nohead\.csv:1: header must name"):
        load_dataset("lstm", str(tmp_path / "nohead.csv"))


def test_user_tsv_with_a_malformed_line_names_file_and_line(tmp_path):
    lines = [f"hello {i}\thola {i}" for i in range(20)]
    (tmp_path / "ok.tsv").write_text("\n".join(lines) + "\n")
    assert len(load_dataset("transformer", str(tmp_path / "ok.tsv"))) == 20
    lines[6] = "no tab here"
    (tmp_path / "bad.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.tsv:7: expected 2 tab-separated fields, got 1"):
        load_dataset("transformer", str(tmp_path / "bad.tsv"))
    with gzip.open(tmp_path / "trunc.tsv.gz", "wb") as f:
        f.write(("\n".join(lines[:5]) + "\n").encode())
    (tmp_path / "trunc.tsv.gz").write_bytes((tmp_path / "trunc.tsv.gz").read_bytes()[:-12])
    with pytest.raises(DataError, match=r"trunc\.tsv\.gz: unreadable"):
        load_dataset("transformer", str(tmp_path / "trunc.tsv.gz"))


def test_user_images_from_a_folder_and_an_npz(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / label / f"{i}.png"
            )
    ds = load_dataset("cnn", str(tmp_path / "imgs"))
    assert ds.x.shape == (10, 28, 28) and ds.labels == ["cat", "dog"]
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        load_dataset("cnn", str(tmp_path / "imgs"))
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (12, 28, 28), dtype=np.uint8), y=np.arange(12) % 3)
    assert load_dataset("cnn", str(tmp_path / "d.npz")).labels == ["0", "1", "2"]
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 32, 32)), y=np.zeros(4))
    with pytest.raises(DataError, match=r"wrong\.npz: x must be \(N,28,28\)"):
        load_dataset("cnn", str(tmp_path / "wrong.npz"))


def test_missing_user_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="nope.csv: file not found"):
        load_dataset("lstm", str(tmp_path / "nope.csv"))


def test_data_knows_datasets_and_kinds_not_models():
    ds = data.load("en_es_bible", DataKind.PAIRS, limit=50)
    assert len(ds) == 50 and ds.name == "en_es_bible"
    with pytest.raises(DataError, match="holds pairs, not images"):
        data.load("en_es_bible", DataKind.IMAGES)
    with pytest.raises(DataError, match="no bundled dataset 'imagenet'"):
        data.load("imagenet", DataKind.IMAGES)
    # A model's dataset and kind come from the registry, which asks data for them.
    assert load_dataset("transformer", limit=50).fingerprint == ds.fingerprint


def test_the_digit_the_docs_send_is_written_from_the_test_split(tmp_path, capsys):
    out = tmp_path / "digit.png"
    assert data.main(["--digit", str(out)]) == 0
    x, y = data.load("mnist", data.PINNED["mnist"].kind).take("test")
    assert (np.asarray(Image.open(out)) == x[0]).all()
    assert f"{out}: a test-split digit, label {int(y[0])}" in capsys.readouterr().out
