"""TorchServe handler for the English->Spanish Transformer translator.

Accepts per request: raw UTF-8 text, or JSON {"text": str | [str], "max_length": N, "beam": K}.
Answers {"translation": "..."} per text (a list when a list was sent).

A text of any length up to max_chars is translated: it is split into sentences (sentencex, whose
rules run on Rust's regex crate: linear in the text, whatever the text), and a sentence longer than
the model's positions is cut at its commas, semicolons and colons, else into windows of tokens.
Every piece of every text of the batch goes through one decode with the key/value cache, each row
stopping at its own <eos> or max_length (greedily, or with beam search for the requests that ask for
a beam, up to max_beam), and each text's pieces are joined back in order.

The work is bounded twice, so that no request can hold a worker near TorchServe's responseTimeout:
a request may ask for at most max_rows decoder rows (its pieces, all texts together, times its beam
width; 413 above), and a batch decodes at most max_batch_rows. A batch that would hold more admits
its requests smallest first; one that does not fit gets 503 (retry), and never fails the others.
"""

from __future__ import annotations

import re
from typing import Any

import sentencex
import torch

from handlers.base import CheckpointHandler, InvalidInput, PayloadTooLarge, positive_int, text_field
from handlers.checkpoint import CheckpointError
from models.text import PAD_ID, SubwordTokenizer, content, frame, pad_batch

# Where an over-long sentence may be cut before falling back to windows of tokens.
CLAUSE_END = re.compile(r"(?<=[,;:])\s+")
# Decoder rows (pieces x beam) per decode call. Beam search's cost per row grew with the rows of
# one call (default translator, one thread: 39 ms a row at 160 and 320 rows, 67 at 480, 78 at 640;
# its cache is reordered at every step), greedy's did not (35 ms at 64 rows, 33 at 256); chunks of
# at most this many keep a batch's time linear in its rows, which max_batch_rows bounds.
DECODE_ROWS = 256


def chunks(seq, size: int) -> list:
    """``seq`` in consecutive lists of at most ``size``."""
    seq = list(seq)
    return [seq[i : i + size] for i in range(0, len(seq), size)]


class TranslatorHandler(CheckpointHandler):
    task = "translation"
    work_unit = "decoder rows"
    defaults = {
        "max_chars": 4000,  # longer text gets 413; anything up to it is translated, sentence by sentence
        "max_texts": 16,  # texts in one request's list
        "max_length": None,  # default output tokens; None = the model's limit
        "beam": 1,  # beam width unless the request sets "beam"; 1 = greedy
        "max_beam": 5,  # the widest beam a request may ask for (cost grows with it)
        "max_rows": 256,  # decoder rows of one request: pieces (all texts) x beam width; 413 above
        "max_batch_rows": 384,  # decoder rows of one batch; requests past it get 503
        "max_explain_pieces": 48,  # pieces of one explanation (its response grows with them); 413 above
    }

    def setup(self, ckpt: dict) -> None:
        if "tokenizer" not in ckpt:
            raise CheckpointError(
                f"{ckpt['model_name']}: no subword tokenizer (an older word-level translator); train it again"
            )
        # The checkpoint's own sentencepiece model: the pieces it was trained on, for both sides.
        self.tokenizer = SubwordTokenizer(ckpt["tokenizer"])
        self.max_len = ckpt["config"]["max_len"]  # positions, <bos>/<eos> included
        if not 0 < self.options["max_rows"] <= self.options["max_batch_rows"]:
            raise ValueError("handler options need 0 < max_rows <= max_batch_rows")

    @staticmethod
    def sentences(text: str) -> list[str]:
        """The text's sentences, stripped, in order (empty ones dropped). Linear time: sentencex's
        rules are compiled by Rust's regex crate, which never backtracks."""
        return [s.strip() for s in sentencex.segment("en", text) if s.strip()]

    def parse(self, payload: Any):
        limit = self.max_len - 1
        max_length = self.options["max_length"] or limit
        beam = self.options["beam"]
        if isinstance(payload, dict) and "max_length" in payload:
            max_length = positive_int(payload["max_length"], "max_length", limit)
        if isinstance(payload, dict) and "beam" in payload:
            beam = positive_int(payload["beam"], "beam", self.options["max_beam"])
        texts, many = text_field(payload, self.options["max_texts"], frozenset({"max_length", "beam"}))
        items = [(self.check(t), max_length, beam) for t in texts]
        pieces = sum(len(p) for p, _, _ in items)
        if pieces * beam > self.options["max_rows"]:
            raise PayloadTooLarge(
                f"{pieces} sentence pieces x beam {beam} = {pieces * beam} decoder rows, "
                f"the limit is {self.options['max_rows']}: send fewer or shorter texts, or a narrower beam"
            )
        return items, many

    def cost(self, items, explain: bool) -> int:
        """Decoder rows of one request's items (an explanation decodes greedily); over
        max_explain_pieces an explanation is refused, since its response grows with its pieces."""
        pieces = sum(len(p) for p, _, _ in items)
        if explain and pieces > self.options["max_explain_pieces"]:
            raise PayloadTooLarge(
                f"an explanation covers at most {self.options['max_explain_pieces']} sentence pieces, "
                f"the text has {pieces}: explain a shorter text"
            )
        return pieces if explain else sum(len(p) * k for p, _, k in items)

    def budget(self) -> int:
        return self.options["max_batch_rows"]

    def check(self, text: str) -> list[list[int]]:
        """The text's pieces, each framed token ids that fit the model's positions."""
        if len(text) > self.options["max_chars"]:
            raise PayloadTooLarge(f"text is {len(text)} characters, the limit is {self.options['max_chars']}")
        pieces = []
        for sentence in self.sentences(text):
            ids = self.tokenizer.encode(sentence, bos_eos=True)
            if len(ids) > 2:  # a sentence of characters the tokenizer drops (zero-width, controls) is no work
                pieces.extend([ids] if len(ids) <= self.max_len else self.cut(sentence))
        if not pieces:
            raise InvalidInput("empty text: nothing to translate")
        return pieces

    def cut(self, sentence: str) -> list[list[int]]:
        """A sentence longer than the model's positions: whole clauses while they fit, then windows."""
        window = self.max_len - 2
        chunks, current = [], ""
        for clause in CLAUSE_END.split(sentence):
            joined = f"{current} {clause}" if current else clause
            if current and len(self.tokenizer.encode(joined)) > window:
                chunks.append(current)
                joined = clause
            current = joined
        chunks.append(current)
        out = []
        for chunk in chunks:
            ids = self.tokenizer.encode(chunk)
            out.extend(frame(ids[i : i + window], None, bos_eos=True) for i in range(0, len(ids), window))
        return out

    @staticmethod
    def rows(items) -> list[tuple[list[int], int, int]]:
        """Every piece of every item, in order: (ids, max_length, beam)."""
        return [(ids, n, k) for pieces, n, k in items for ids in pieces]

    def preprocess(self, items):
        return pad_batch([ids for ids, _, _ in self.rows(items)]).to(self.device)

    def inference(self, batch, items=None):
        """Decodes per beam width in the batch (usually one: greedy) over every piece of every
        item, in chunks of similar lengths; rows back in piece order."""
        rows = self.rows(items)
        out: list[list[int]] = [[] for _ in rows]
        for beam in sorted({k for _, _, k in rows}):
            chosen = sorted((i for i, (_, _, k) in enumerate(rows) if k == beam), key=lambda i: len(rows[i][0]))
            for part in chunks(chosen, max(1, DECODE_ROWS // beam)):
                src = batch[part]
                src = src[:, : int((src != PAD_ID).sum(1).max())]  # drop the columns only other rows needed
                length = max(rows[i][1] for i in part)
                if beam == 1:
                    ids = self.model.greedy_decode(src, max_length=length)
                else:
                    ids = self.model.beam_decode(src, beam=beam, max_length=length)
                for i, row in zip(part, ids.cpu().tolist(), strict=True):
                    out[i] = row
        return out

    def per_item(self, values: list, items) -> list[list]:
        """Values given per piece, grouped back per item."""
        out, start = [], 0
        for pieces, _, _ in items:
            out.append(values[start : start + len(pieces)])
            start += len(pieces)
        return out

    def explain_items(self, items):
        """The greedy translation and its alignment, sentence by sentence: for each produced target
        token, the last decoder layer's attention over that sentence piece's source tokens
        (averaged over heads; each row sums to 1). Each piece has its own matrix, so the response
        grows with the pieces, not with their square."""
        self.explanation_allowed()
        rows = self.rows(items)
        batch = self.preprocess(items)
        decoded: list = [None] * len(rows)
        with torch.inference_mode():
            for part in chunks(range(len(rows)), DECODE_ROWS):
                src = batch[part]
                src = src[:, : int((src != PAD_ID).sum(1).max())]
                ids, align = self.model.greedy_decode(src, max_length=max(rows[i][1] for i in part), alignment=True)
                for i, row, a in zip(part, ids.cpu().tolist(), align.cpu(), strict=True):
                    decoded[i] = (row, a)
        pieces = []
        for (src_ids, n, _), (row, a) in zip(rows, decoded, strict=True):
            produced = content(row[:n])
            pieces.append(
                {
                    "translation": self.tokenizer.decode(row[:n]),
                    "source_tokens": [self.tokenizer.piece(i) for i in src_ids],
                    "target_tokens": [self.tokenizer.piece(i) for i in produced],
                    "alignment": [[round(float(v), 4) for v in a[t, : len(src_ids)]] for t in range(len(produced))],
                }
            )
        return [
            {
                "translation": " ".join(p["translation"] for p in group if p["translation"]),
                "method": "cross-attention of the last decoder layer, averaged over heads (greedy decode)",
                "sentences": group,
            }
            for group in self.per_item(pieces, items)
        ]

    def postprocess(self, ids, items=None):
        texts = [self.tokenizer.decode(row[:n]) for row, (_, n, _) in zip(ids, self.rows(items), strict=True)]
        return [{"translation": " ".join(t for t in group if t)} for group in self.per_item(texts, items)]
