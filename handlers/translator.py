"""TorchServe handler for the English->Spanish Transformer translator.

Accepts per request: raw UTF-8 text, or JSON {"text": str | [str], "max_length": N, "beam": K}.
Answers {"translation": "..."} per text (a list when a list was sent). The batch is decoded
together with the key/value cache, each row stopping at its own <eos> or max_length: greedily, or
with beam search for the requests that ask for a beam (up to the model config's max_beam).
"""

from __future__ import annotations

from typing import Any

import torch

from handlers.base import CheckpointHandler, InvalidInput, PayloadTooLarge, positive_int, text_field
from handlers.checkpoint import CheckpointError
from models.text import PAD_ID, SubwordTokenizer, content, pad_batch


class TranslatorHandler(CheckpointHandler):
    task = "translation"
    defaults = {
        "max_chars": 1000,  # longer text gets 413
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

    def check(self, text: str) -> list[int]:
        if len(text) > self.options["max_chars"]:
            raise PayloadTooLarge(f"text is {len(text)} characters, the limit is {self.options['max_chars']}")
        if not text.strip():
            raise InvalidInput("empty text")
        ids = self.tokenizer.encode(text, bos_eos=True)
        if len(ids) > self.max_len:
            raise PayloadTooLarge(
                f"text is {len(ids) - 2} subword tokens, this model translates at most {self.max_len - 2}"
            )
        return ids

    def preprocess(self, items):
        return pad_batch([ids for ids, _, _ in items]).to(self.device)

    def inference(self, batch, items=None):
        """One decode per beam width in the batch (usually one: greedy); rows back in item order."""
        out: list[list[int]] = [[] for _ in items]
        for beam in sorted({k for _, _, k in items}):
            rows = [i for i, (_, _, k) in enumerate(items) if k == beam]
            src = batch[rows]
            src = src[:, : int((src != PAD_ID).sum(1).max())]  # drop the columns only other rows needed
            length = max(items[i][1] for i in rows)
            if beam == 1:
                ids = self.model.greedy_decode(src, max_length=length)
            else:
                ids = self.model.beam_decode(src, beam=beam, max_length=length)
            for i, row in zip(rows, ids.cpu().tolist(), strict=True):
                out[i] = row
        return out

    def explain_items(self, items):
        """The greedy translation and its alignment: for each produced target token, the last
        decoder layer's attention over the source tokens (averaged over heads; each row sums to 1)."""
        self.explanation_allowed()
        src = self.preprocess(items)
        with torch.inference_mode():
            ids, align = self.model.greedy_decode(src, max_length=max(n for _, n, _ in items), alignment=True)
        out = []
        for (src_ids, n, _), row, a in zip(items, ids.cpu().tolist(), align.cpu(), strict=True):
            row = row[:n]
            produced = content(row)
            out.append(
                {
                    "translation": self.tokenizer.decode(row),
                    "method": "cross-attention of the last decoder layer, averaged over heads (greedy decode)",
                    "source_tokens": [self.tokenizer.piece(i) for i in src_ids],
                    "target_tokens": [self.tokenizer.piece(i) for i in produced],
                    "alignment": [[round(float(v), 4) for v in a[t, : len(src_ids)]] for t in range(len(produced))],
                }
            )
        return out

    def postprocess(self, ids, items=None):
        return [{"translation": self.tokenizer.decode(row[:n])} for row, (_, n, _) in zip(ids, items, strict=True)]
