"""Texts that break regex sentence splitters: one home for the fuzz tests, the soak and
``make limits``.

REGRESSIONS kept pysbd 0.3.4 (the translator's earlier splitter) in catastrophic backtracking; the
first, 43 characters long, ran for more than 20 s and had TorchServe kill the worker with its batch.
UNITS are the shapes that break regex splitters when repeated: runs of dots and other punctuation,
numbered references in brackets, digit strings, unclosed tags and quotes, abbreviations, long
words, mixed scripts, whitespace floods.
"""

from __future__ import annotations

REGRESSIONS = {
    "pysbd_numbered_reference": "..[111 111 111 111 111 111 111 111 111 111]",
    "pysbd_unclosed_reference": "......[289852000000260698,289852000000260744",
    "pysbd_digits_after_dot": "f.302205302116302416302500302513915bd",
    "pysbd_long_number": "Rok bud.2027777983834843834843042003200220012000199919981997199619951994199319921991199019891988198",
    "pysbd_unclosed_tag": '<iframe width="100%" height="166" src="url ' + "Lorem ipsum dolor sit amet, " * 20,
}

UNITS = {
    "dots": ".",
    "double_dots": "..",
    "ellipses": "...",
    "bangs": "!?",
    "bang_dots": "?!.",
    "dash_dots": "-.",
    "dot_spaces": ". ",
    "references": "[1]",
    "spaced_references": "[12] ",
    "unclosed_references": "[111 ",
    "number_groups": "111 ",
    "digits": "1",
    "numbered": "1.",
    "decimals": "3.14 ",
    "commas": ",",
    "semicolons": ";",
    "unclosed_tags": "<a ",
    "tags": "<b>",
    "attributes": '="',
    "quotes": '"',
    "apostrophes": "'",
    "curly_quotes": "\u201c",
    "curly_apostrophes": "\u2019",
    "open_parens": "(",
    "close_parens": ")",
    "long_word": "x",
    "words": "word ",
    "one_word_sentences": "Go. ",
    "abbreviations": "Mr. ",
    "initialisms": "U.S.",
    "latin": "e.g. ",
    "emails": "a@b.c ",
    "urls": "http://a.b/c. ",
    "spaces": " ",
    "newlines": "\n",
    "tabs": "\t",
    "cjk_stops": "\u3002",
    "cjk": "\u6f22",
    "hebrew": "\u05e7",
    "arabic_commas": "\u060c",
    "accents": "\u00e9",
    "zero_width_spaces": "\u200b",
}


def texts(max_chars: int) -> dict[str, str]:
    """name -> text: every regression as it is and repeated up to ``max_chars``, and every unit
    repeated up to ``max_chars``."""
    out = dict(REGRESSIONS)
    for name, text in REGRESSIONS.items():
        out[f"{name}_repeated"] = ((text + " ") * (max_chars // (len(text) + 1)))[:max_chars]
    for name, unit in UNITS.items():
        out[name] = (unit * (max_chars // len(unit) + 1))[:max_chars]
    return out


def one_word_sentences(pieces: int, max_texts: int, beam: int = 1) -> dict:
    """The translator's largest legal request of one-word sentences: ``pieces`` of them spread over
    ``max_texts`` texts (``pieces`` = max_rows / beam)."""
    per_text = [pieces // max_texts + (i < pieces % max_texts) for i in range(max_texts)]
    body: dict = {"text": [("Go. " * n).strip() for n in per_text if n]}
    if beam > 1:
        body["beam"] = beam
    return body
