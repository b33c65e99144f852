"""Rebuild data/en-es-bible.tsv.gz: English->Spanish verse pairs from two public-domain Bibles.

Sources (Debian packages, both texts public domain per their SWORD .conf files):
  sword-text-web    World English Bible (module engWEB2015eb)
  sword-text-sparv  Reina-Valera 1909   (module spaRV1909eb)
read through `diatheke` (package diatheke):

  apt-get install diatheke sword-text-web sword-text-sparv
  python -m scripts.build_pairs --output data/en-es-bible.tsv.gz

The output is deterministic (sorted by canonical verse order, gzip mtime 0), so rebuilding on
the same package versions reproduces the committed file's sha256.
"""

from __future__ import annotations

import argparse
import gzip
import html
import re
import shutil
import subprocess
import sys
from collections import defaultdict

import numpy as np

# The 66 books both modules share, in canonical order, as diatheke names them. The WEB module
# also carries the deuterocanon, which the Reina-Valera 1909 lacks.
BOOKS = [
    "Genesis",
    "Exodus",
    "Leviticus",
    "Numbers",
    "Deuteronomy",
    "Joshua",
    "Judges",
    "Ruth",
    "I Samuel",
    "II Samuel",
    "I Kings",
    "II Kings",
    "I Chronicles",
    "II Chronicles",
    "Ezra",
    "Nehemiah",
    "Esther",
    "Job",
    "Psalms",
    "Proverbs",
    "Ecclesiastes",
    "Song of Solomon",
    "Isaiah",
    "Jeremiah",
    "Lamentations",
    "Ezekiel",
    "Daniel",
    "Hosea",
    "Joel",
    "Amos",
    "Obadiah",
    "Jonah",
    "Micah",
    "Nahum",
    "Habakkuk",
    "Zephaniah",
    "Haggai",
    "Zechariah",
    "Malachi",
    "Matthew",
    "Mark",
    "Luke",
    "John",
    "Acts",
    "Romans",
    "I Corinthians",
    "II Corinthians",
    "Galatians",
    "Ephesians",
    "Philippians",
    "Colossians",
    "I Thessalonians",
    "II Thessalonians",
    "I Timothy",
    "II Timothy",
    "Titus",
    "Philemon",
    "Hebrews",
    "James",
    "I Peter",
    "II Peter",
    "I John",
    "II John",
    "III John",
    "Jude",
    "Revelation of John",
]
MODULES = {"en": "engWEB2015eb", "es": "spaRV1909eb"}
# Chapters whose English and Spanish verse lengths correlate below this are numbered
# differently in the two traditions (shifted verses), so their pairs would be misaligned.
MIN_LENGTH_CORRELATION = 0.3

_REF_RE = re.compile(
    r"(?:^|(?<=[\s>]))(" + "|".join(re.escape(b) for b in sorted(BOOKS, key=len, reverse=True)) + r") (\d+):(\d+): "
)
# Any verse reference, also of books outside BOOKS (the deuterocanon, "Esther (Greek)").
_ANY_REF_RE = re.compile(r"\S \d+:\d+: ")
_DROP_RE = re.compile(r"<(title|note)\b[^>]*?(?:/>|>.*?</\1>)", re.S)
_TAG_RE = re.compile(r"<[^>]+>")


def export(module: str) -> str:
    if shutil.which("diatheke") is None:
        sys.exit("build_pairs: error: diatheke not found; apt-get install diatheke sword-text-web sword-text-sparv")
    cmd = ["diatheke", "-b", module, "-f", "OSIS", "-k", "Genesis 1:1-Revelation of John 22:21"]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def clean(markup: str) -> str:
    text = _DROP_RE.sub(" ", markup)
    text = text.replace("</w><w", "</w> <w")  # adjacent word tags carry no space between them
    text = html.unescape(_TAG_RE.sub("", text))
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s+([,.;:!?])", r"\1", text)


def parse(osis: str) -> dict[tuple[int, int, int], str]:
    """diatheke OSIS output -> {(book index, chapter, verse): clean text}."""
    verses: dict[tuple[int, int, int], list[str]] = {}
    key = None
    for line in osis.splitlines():
        m = _REF_RE.search(line)
        if m:
            key = (BOOKS.index(m.group(1)), int(m.group(2)), int(m.group(3)))
            verses[key] = [line[m.end() :]]
        elif _ANY_REF_RE.search(line) or line.startswith("("):
            key = None  # a book we do not pair, or diatheke's closing "(module)" line
        elif key is not None:
            verses[key].append(line)  # a verse continued on the next line
    return {k: clean(" ".join(v)) for k, v in verses.items()}


def align(en: dict, es: dict) -> list[tuple[tuple[int, int, int], str, str]]:
    chapters: dict[tuple[int, int], list[tuple[int, int, int]]] = defaultdict(list)
    for key in sorted(set(en) | set(es)):
        chapters[key[:2]].append(key)
    pairs = []
    for keys in chapters.values():
        rows = [(k, en.get(k, ""), es.get(k, "")) for k in keys]
        if any(not e or not s for _, e, s in rows):
            continue  # a verse missing on either side: the chapter is numbered differently
        if len(rows) >= 3:
            le = np.array([len(e.split()) for _, e, _ in rows], dtype=float)
            ls = np.array([len(s.split()) for _, _, s in rows], dtype=float)
            if le.std() > 0 and ls.std() > 0 and np.corrcoef(le, ls)[0, 1] < MIN_LENGTH_CORRELATION:
                continue
        pairs.extend(rows)
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", default="data/en-es-bible.tsv.gz", help="gzipped TSV to write (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    en, es = parse(export(MODULES["en"])), parse(export(MODULES["es"]))
    pairs = align(en, es)
    body = "".join(f"{BOOKS[b]} {c}:{v}\t{e}\t{s}\n" for (b, c, v), e, s in pairs)
    with open(args.output, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(body.encode("utf-8"))
    print(f"{len(pairs)} pairs from {len(en)} English and {len(es)} Spanish verses -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
