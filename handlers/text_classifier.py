"""TorchServe handler for the LSTM sentiment classifier.

Accepts per request: raw UTF-8 text, or JSON {"text": "..."} / {"text": ["...", "..."]}.
Answers {"label": ..., "probabilities": {label: p}} per text (a list when a list was sent).
"""

from __future__ import annotations

from typing import Any

import torch

from handlers.base import CheckpointHandler, InvalidInput, PayloadTooLarge, TokenIds, text_field
from models.text import PAD_ID, UNK_ID, Vocab, pad_batch, tokenize


class TextClassifierHandler(CheckpointHandler):
    task = "text-classification"
    defaults = {
        "max_chars": 5000,  # longer text gets 413; the model reads at most the checkpoint's max_tokens
        "max_texts": 64,  # texts in one request's list
        "explain_steps": 32,  # Integrated Gradients steps per explained text (its cost: steps x a forward+backward)
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
        words = tokenize(text)[: self.max_tokens]
        ids = TokenIds(self.vocab.ids(words) or [PAD_ID])  # punctuation-only text still runs
        ids.words = words  # as sent, where the vocabulary has <unk>
        return ids

    def preprocess(self, items):
        return pad_batch(items).to(self.device)

    def inference(self, batch, items=None):
        return torch.softmax(self.model(batch).float(), dim=-1)

    def explain_items(self, items):
        """The predicted label, and each token's Integrated Gradients attribution to its logit
        (positive: pushed towards the label), over the words the model read."""
        from handlers.explain import token_attributions

        self.explanation_allowed()
        ids = self.preprocess(items)
        with torch.inference_mode():
            probs = self.inference(ids)
        target = probs.argmax(-1)
        attr = token_attributions(self.model, self.model.embed, ids, target, UNK_ID, self.options["explain_steps"])
        out = []
        for row, t, p, a in zip(items, target.tolist(), probs.cpu(), attr.cpu().tolist(), strict=True):
            tokens = row.words
            out.append(
                {
                    "label": self.labels[t],
                    "probability": round(float(p[t]), 6),
                    "method": f"layer integrated gradients on the embeddings, {self.options['explain_steps']} steps, <unk> baseline",
                    "tokens": [[tok, round(score, 5)] for tok, score in zip(tokens, a, strict=False)],
                }
            )
        return out

    def postprocess(self, probs, items=None):
        # One copy to Python for the batch: per-row tensor calls cost more than the work.
        return [
            {
                "label": self.labels[max(range(len(row)), key=row.__getitem__)],
                "probabilities": {line: round(p, 6) for line, p in zip(self.labels, row, strict=True)},
            }
            for row in probs.cpu().tolist()
        ]
