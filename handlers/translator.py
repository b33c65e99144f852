"""TorchServe handler for the English->Spanish Transformer translator.

Accepts per request: raw UTF-8 text, or JSON {"text": str | [str], "max_length": N, "beam": K}.
Answers {"translation": "..."} per text (a list when a list was sent).

A text of any length up to max_chars is translated: it is split into sentences (pysbd, a rule-based
sentence boundary detector), and a sentence longer than the model's positions is cut at its commas,
semicolons and colons, else into windows of tokens. Every piece of every text of the batch goes
through one decode with the key/value cache, each row stopping at its own <eos> or max_length
(greedily, or with beam search for the requests that ask for a beam, up to max_beam), and each
text's pieces are joined back in order.
"""

from __future__ import annotations

import re
from typing import Any

import pysbd
import torch

from handlers.base import CheckpointHandler, InvalidInput, PayloadTooLarge, positive_int, text_field
from handlers.checkpoint import CheckpointError
from models.text import PAD_ID, SubwordTokenizer, content, frame, pad_batch

# Where an over-long sentence may be cut before falling back to windows of tokens.
CLAUSE_END = re.compile(r"(?<=[,;:])\s+")


class TranslatorHandler(CheckpointHandler):
    task = "translation"
    defaults = {
        "max_chars": 4000,  # longer text gets 413; anything up to it is translated, sentence by sentence
        "max_texts": 16,  # texts in one request's list
        "max_length": None,  # default output tokens; None = the model's limit
        "beam": 1,  # beam width unless the request sets "beam"; 1 = greedy
        "max_beam": 5,  # the widest beam a request may ask for (cost grows with it)
    }

    def setup(self, ckpt: dict) -> None:
        if "tokenizer" not in ckpt:
            raise CheckpointError(
                f"{ckpt['model_name']}: no subword tokenizer (an older word-level translator); train it again"
            )
        # The checkpoint's own sentencepiece model: the pieces it was trained on, for both sides.
        self.tokenizer = SubwordTokenizer(ckpt["tokenizer"])
        self.max_len = ckpt["config"]["max_len"]  # positions, <bos>/<eos> included
        self.segmenter = pysbd.Segmenter(language="en", clean=False)

    def parse(self, payload: Any):
        limit = self.max_len - 1
        max_length = self.options["max_length"] or limit
        beam = self.options["beam"]
        if isinstance(payload, dict) and "max_length" in payload:
            max_length = positive_int(payload["max_length"], "max_length", limit)
        if isinstance(payload, dict) and "beam" in payload:
            beam = positive_int(payload["beam"], "beam", self.options["max_beam"])
        texts, many = text_field(payload, self.options["max_texts"], frozenset({"max_length", "beam"}))
        return [(self.check(t), max_length, beam) for t in texts], many

    def check(self, text: str) -> list[list[int]]:
        """The text's pieces, each framed token ids that fit the model's positions."""
        if len(text) > self.options["max_chars"]:
            raise PayloadTooLarge(f"text is {len(text)} characters, the limit is {self.options['max_chars']}")
        if not text.strip():
            raise InvalidInput("empty text")
        pieces = []
        for sentence in self.segmenter.segment(text):
            if not sentence.strip():
                continue
            ids = self.tokenizer.encode(sentence.strip(), bos_eos=True)
            pieces.extend([ids] if len(ids) <= self.max_len else self.cut(sentence.strip()))
        if not pieces:
            raise InvalidInput("empty text")
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
        """One decode per beam width in the batch (usually one: greedy) over every piece of every
        item; rows back in piece order."""
        rows = self.rows(items)
        out: list[list[int]] = [[] for _ in rows]
        for beam in sorted({k for _, _, k in rows}):
            chosen = [i for i, (_, _, k) in enumerate(rows) if k == beam]
            src = batch[chosen]
            src = src[:, : int((src != PAD_ID).sum(1).max())]  # drop the columns only other rows needed
            length = max(rows[i][1] for i in chosen)
            if beam == 1:
                ids = self.model.greedy_decode(src, max_length=length)
            else:
                ids = self.model.beam_decode(src, beam=beam, max_length=length)
            for i, row in zip(chosen, ids.cpu().tolist(), strict=True):
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
        """The greedy translation and its alignment: for each produced target token, the last
        decoder layer's attention over the source tokens (averaged over heads; each row sums to 1).
        A text of several pieces gets each piece's alignment over that piece's tokens, as blocks of
        one matrix over all its source tokens, and the pieces themselves under "sentences"."""
        self.explanation_allowed()
        src = self.preprocess(items)
        with torch.inference_mode():
            ids, align = self.model.greedy_decode(src, max_length=max(n for _, n, _ in items), alignment=True)
        rows = self.rows(items)
        pieces = []
        for (src_ids, n, _), row, a in zip(rows, ids.cpu().tolist(), align.cpu(), strict=True):
            produced = content(row[:n])
            pieces.append(
                {
                    "translation": self.tokenizer.decode(row[:n]),
                    "source_tokens": [self.tokenizer.piece(i) for i in src_ids],
                    "target_tokens": [self.tokenizer.piece(i) for i in produced],
                    "alignment": [[round(float(v), 4) for v in a[t, : len(src_ids)]] for t in range(len(produced))],
                }
            )
        out = []
        for group in self.per_item(pieces, items):
            width = sum(len(p["source_tokens"]) for p in group)
            alignment, offset = [], 0
            for p in group:
                n = len(p["source_tokens"])
                alignment += [[0.0] * offset + r + [0.0] * (width - offset - n) for r in p["alignment"]]
                offset += n
            out.append(
                {
                    "translation": " ".join(p["translation"] for p in group if p["translation"]),
                    "method": "cross-attention of the last decoder layer, averaged over heads (greedy decode)",
                    "source_tokens": [t for p in group for t in p["source_tokens"]],
                    "target_tokens": [t for p in group for t in p["target_tokens"]],
                    "alignment": alignment,
                    "sentences": [{k: p[k] for k in ("translation", "source_tokens", "target_tokens")} for p in group],
                }
            )
        return out

    def postprocess(self, ids, items=None):
        texts = [self.tokenizer.decode(row[:n]) for row, (_, n, _) in zip(ids, self.rows(items), strict=True)]
        return [{"translation": " ".join(t for t in group if t)} for group in self.per_item(texts, items)]
