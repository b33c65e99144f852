"""TorchServe handler for the LSTM sentiment classifier.

Accepts per request: raw UTF-8 text, or JSON {"text": "..."} / {"text": ["...", "..."]}.
Answers {"label": ..., "probabilities": {label: p}} per text (a list when a list was sent).
"""

from __future__ import annotations

from typing import Any

import torch

from handlers.base import CheckpointHandler, InvalidInput, PayloadTooLarge, text_field
from models.text import PAD_ID, Vocab, pad_batch


class TextClassifierHandler(CheckpointHandler):
    task = "text-classification"
    defaults = {
        "max_chars": 5000,  # longer text gets 413; the model reads at most the checkpoint's max_tokens
        "max_texts": 64,  # texts in one request's list
    }

    def setup(self, ckpt: dict) -> None:
        self.labels = list(ckpt["labels"])
        self.vocab = Vocab(ckpt["vocab"])
        self.max_tokens = ckpt["preprocess"]["max_tokens"]

    def parse(self, payload: Any):
        texts, many = text_field(payload, self.options["max_texts"])
        return [self.check(t) for t in texts], many

    def check(self, text: str) -> list[int]:
        if len(text) > self.options["max_chars"]:
            raise PayloadTooLarge(f"text is {len(text)} characters, the limit is {self.options['max_chars']}")
        if not text.strip():
            raise InvalidInput("empty text")
        return self.vocab.encode(text, self.max_tokens) or [PAD_ID]  # punctuation-only text still runs

    def preprocess(self, items):
        return pad_batch(items).to(self.device)

    def inference(self, batch, items=None):
        return torch.softmax(self.model(batch).float(), dim=-1)

    def postprocess(self, probs, items=None):
        return [
            {
                "label": self.labels[int(row.argmax())],
                "probabilities": {line: round(float(p), 6) for line, p in zip(self.labels, row.tolist(), strict=True)},
            }
            for row in probs.cpu()
        ]
