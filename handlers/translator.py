"""TorchServe handler for the English->Spanish Transformer translator.

Accepts per request: raw UTF-8 text, or JSON {"text": str | [str], "max_length": N}.
Answers {"translation": "..."} per text (a list when a list was sent). The whole batch is
decoded greedily together, each row stopping at its own <eos> or max_length.
"""

from __future__ import annotations

from typing import Any

from handlers.base import CheckpointHandler, InvalidInput, PayloadTooLarge, positive_int, text_field
from models.text import Vocab, pad_batch, tokenize


class TranslatorHandler(CheckpointHandler):
    task = "translation"
    defaults = {
        "max_chars": 1000,  # longer text gets 413
        "max_texts": 16,  # texts in one request's list
        "max_length": None,  # default output tokens; None = the model's limit
    }

    def setup(self, ckpt: dict) -> None:
        self.src_vocab = Vocab(ckpt["vocab"]["src"])
        self.tgt_vocab = Vocab(ckpt["vocab"]["tgt"])
        self.max_len = ckpt["config"]["max_len"]  # positions, <bos>/<eos> included

    def parse(self, payload: Any):
        limit = self.max_len - 1
        max_length = self.options["max_length"] or limit
        if isinstance(payload, dict) and "max_length" in payload:
            max_length = positive_int(payload["max_length"], "max_length", limit)
        texts, many = text_field(payload, self.options["max_texts"], frozenset({"max_length"}))
        return [(self.check(t), max_length) for t in texts], many

    def check(self, text: str) -> list[int]:
        if len(text) > self.options["max_chars"]:
            raise PayloadTooLarge(f"text is {len(text)} characters, the limit is {self.options['max_chars']}")
        if not text.strip():
            raise InvalidInput("empty text")
        n = len(tokenize(text))
        if n > self.max_len - 2:
            raise PayloadTooLarge(f"text is {n} tokens, this model translates at most {self.max_len - 2}")
        return self.src_vocab.encode(text, self.max_len, bos_eos=True)

    def preprocess(self, items):
        return pad_batch([ids for ids, _ in items]).to(self.device)

    def inference(self, batch, items=None):
        return self.model.greedy_decode(batch, max_length=max(n for _, n in items))

    def postprocess(self, ids, items=None):
        return [
            {"translation": self.tgt_vocab.decode(row[:n])}
            for row, (_, n) in zip(ids.cpu().tolist(), items, strict=True)
        ]
