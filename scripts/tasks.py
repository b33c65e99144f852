"""Training tasks: what differs between kinds of model (data, config, batching, loss, metrics).

A model's registry entry (scripts/registry.py) names its task. Three tasks cover the shipped
models; a new model of an existing kind reuses one. Each task also says how a client sends its
inputs, which the bench, the soak, the demo and the tests use.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from models.image import normalize
from models.text import PAD_ID, Vocab, pad_batch, tokenize

from .common import CLIError

if TYPE_CHECKING:
    from .data import Dataset


@dataclass(frozen=True)
class TaskOptions:
    """The training options a task reads (the translator's); the rest are the loop's."""

    max_tokens: int = 20  # translation: keep pairs with at most this many tokens per side
    vocab_size: int = 8000  # translation: per-language vocabulary size
    bleu_samples: int = 500  # translation: validation sentences decoded for BLEU per epoch

    @classmethod
    def from_args(cls, args) -> TaskOptions:
        """From train's flags, or a checkpoint's train_args (a dict)."""
        get = args.get if isinstance(args, dict) else lambda k, d: getattr(args, k, d)
        return cls(**{f: get(f, getattr(cls, f)) for f in cls.__dataclass_fields__})


class Task:
    """What differs between models: config, batching, loss, metrics, checkpoint extras."""

    name: str  # the checkpoint's task, which its handler must serve
    data_kind: str  # how a user's own data file is read (scripts/data.py)
    primary: str  # validation metric that picks the best epoch
    score: str  # the test metric reports show
    higher_is_better: bool = True

    def __init__(self, ds: Dataset, saved: dict | None = None, options: TaskOptions = TaskOptions()):
        self.ds, self.options = ds, options

    def config_fields(self) -> dict:
        """The config fields the data decides (class count, vocabulary sizes); the rest keep defaults."""
        raise NotImplementedError

    def config(self, config_cls: type):
        return config_cls(**self.config_fields())

    def batches(self, split: str, batch_size: int, rng: np.random.Generator | None):
        raise NotImplementedError

    def loss(self, model, batch) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model, split: str, device) -> dict[str, float]:
        raise NotImplementedError

    def extras(self) -> dict:
        return {}

    def summary(self, metrics: dict[str, float]) -> str:
        return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())

    @staticmethod
    def request_inputs(ds: Dataset, n: int) -> list:
        """Up to ``n`` held-out test inputs as a client sends them."""
        raise NotImplementedError

    # What the variants tool compares: the forward's example inputs, outputs for parity, the timed call.
    def forward_example(self, tensors: list[torch.Tensor]) -> tuple:
        return (tensors[0],)

    def parity_outputs(self, model, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.softmax(model(*self.forward_example(tensors)), -1)

    def timed_call(self, model, tensors: list[torch.Tensor]):
        example = self.forward_example(tensors)
        return lambda: model(*example)


def _chunks(idx: np.ndarray, size: int, rng: np.random.Generator | None):
    if rng is not None:
        idx = rng.permutation(idx)
    for i in range(0, len(idx), size):
        yield idx[i : i + size]


class ClassifierTask(Task):
    primary = score = "accuracy"

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model, split, device):
        correct = total = 0
        loss = 0.0
        for x, y in self.batches(split, 256, None):
            x, y = x.to(device), y.to(device)
            logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            total += len(y)
        return {"accuracy": correct / total, "loss": loss / total}


class ImageTask(ClassifierTask):
    name, data_kind = "image-classification", "images"

    def __init__(self, ds, saved=None, options=TaskOptions()):
        super().__init__(ds, saved, options)
        if saved:
            self.mean, self.std = saved["preprocess"]["mean"], saved["preprocess"]["std"]
        else:  # standardise with the training split's statistics
            train = ds.x[ds.splits["train"]].astype(np.float32) / 255.0
            self.mean, self.std = float(train.mean()), float(train.std())

    def config_fields(self):
        return {"num_classes": len(self.ds.labels)}

    def batches(self, split, batch_size, rng):
        for idx in _chunks(self.ds.splits[split], batch_size, rng):
            x = torch.from_numpy(normalize(self.ds.x[idx], self.mean, self.std))
            yield x, torch.from_numpy(self.ds.y[idx])

    def extras(self):
        return {"labels": list(self.ds.labels), "preprocess": {"mean": self.mean, "std": self.std, "image_size": 28}}

    @staticmethod
    def request_inputs(ds, n):
        from PIL import Image

        x, _ = ds.take("test")
        out = []
        for img in x[:n]:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            out.append(buf.getvalue())
        return out


class TextTask(ClassifierTask):
    name, data_kind = "text-classification", "labelled_text"
    max_tokens = 64  # Rotten Tomatoes snippets average ~22 words; longer input is truncated

    def __init__(self, ds, saved=None, options=TaskOptions()):
        super().__init__(ds, saved, options)
        texts, _ = ds.take("train")
        self.vocab = Vocab(saved["vocab"]) if saved else Vocab.build(texts, max_size=20000, min_freq=1)
        self.ids = [self.vocab.encode(t, self.max_tokens) for t in ds.x]

    def config_fields(self):
        return {"vocab_size": len(self.vocab), "num_classes": len(self.ds.labels)}

    def batches(self, split, batch_size, rng):
        for idx in _chunks(self.ds.splits[split], batch_size, rng):
            yield pad_batch([self.ids[i] for i in idx]), torch.from_numpy(self.ds.y[idx])

    def extras(self):
        return {
            "labels": list(self.ds.labels),
            "vocab": list(self.vocab.itos),
            "preprocess": {"max_tokens": self.max_tokens},
        }

    @staticmethod
    def request_inputs(ds, n):
        return list(ds.take("test")[0][:n])


class TranslationTask(Task):
    name, data_kind = "translation", "pairs"
    primary, score = "loss", "bleu"
    higher_is_better = False

    def __init__(self, ds, saved=None, options=TaskOptions()):
        super().__init__(ds, saved, options)
        self.max_tokens = options.max_tokens
        # Keep pairs whose sides both fit; the splits are filtered the same way, test included.
        fits = [
            len(tokenize(s)) <= self.max_tokens and len(tokenize(t)) <= self.max_tokens
            for s, t in zip(ds.x, ds.y, strict=True)
        ]
        ds.splits = {k: v[[fits[i] for i in v]] for k, v in ds.splits.items()}
        if min(len(v) for v in ds.splits.values()) == 0:
            raise CLIError(f"no pairs of at most --max-tokens {self.max_tokens} tokens in some split")
        if saved:
            self.src_vocab, self.tgt_vocab = Vocab(saved["vocab"]["src"]), Vocab(saved["vocab"]["tgt"])
        else:
            src, tgt = ds.take("train")
            self.src_vocab = Vocab.build(src, max_size=options.vocab_size, min_freq=2)
            self.tgt_vocab = Vocab.build(tgt, max_size=options.vocab_size, min_freq=2)
        limit = self.max_tokens + 2
        self.src = [self.src_vocab.encode(s, limit, bos_eos=True) for s in ds.x]
        self.tgt = [self.tgt_vocab.encode(t, limit, bos_eos=True) for t in ds.y]

    def config_fields(self):
        return {
            "src_vocab_size": len(self.src_vocab),
            "tgt_vocab_size": len(self.tgt_vocab),
            "max_len": self.max_tokens + 2,
        }

    def batches(self, split, batch_size, rng):
        idx = self.ds.splits[split]
        if rng is not None:
            # Bucket by length so batches carry little padding, then shuffle the batches.
            idx = rng.permutation(idx)
            pools = [
                sorted(idx[i : i + batch_size * 50], key=lambda j: len(self.src[j]))
                for i in range(0, len(idx), batch_size * 50)
            ]
            groups = [np.array(p[i : i + batch_size]) for p in pools for i in range(0, len(p), batch_size)]
            order = rng.permutation(len(groups))
            groups = [groups[i] for i in order]
        else:
            groups = list(_chunks(idx, batch_size, None))
        for g in groups:
            yield pad_batch([self.src[i] for i in g]), pad_batch([self.tgt[i] for i in g]), g

    def loss(self, model, batch, reduction="mean"):
        src, tgt, _ = batch
        logits = model(src, tgt[:, :-1])
        smoothing = 0.1 if model.training else 0.0  # label smoothing as in Vaswani et al. (2017)
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            tgt[:, 1:].reshape(-1),
            ignore_index=PAD_ID,
            label_smoothing=smoothing,
            reduction=reduction,
        )

    @torch.no_grad()
    def evaluate(self, model, split, device):
        import sacrebleu

        total, tokens = 0.0, 0
        hyps, refs = [], []
        budget = None if split == "test" else self.options.bleu_samples
        for src, tgt, g in self.batches(split, 128, None):
            src, tgt = src.to(device), tgt.to(device)
            total += self.loss(model, (src, tgt, g), reduction="sum").item()
            tokens += (tgt[:, 1:] != PAD_ID).sum().item()
            if budget is None or len(hyps) < budget:
                out = model.greedy_decode(src).tolist()
                hyps += [self.tgt_vocab.decode(o) for o in out]
                refs += [self.ds.y[i] for i in g]
        if budget is not None:
            hyps, refs = hyps[:budget], refs[:budget]
        loss = total / max(tokens, 1)
        bleu = sacrebleu.corpus_bleu(hyps, [refs], lowercase=True).score
        return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "bleu": bleu}

    def extras(self):
        return {
            "vocab": {"src": list(self.src_vocab.itos), "tgt": list(self.tgt_vocab.itos)},
            "preprocess": {"max_tokens": self.max_tokens},
        }

    @staticmethod
    def request_inputs(ds, n):
        # Sentences of up to 20 tokens, the length the shipped translator trains on.
        return [s for s in ds.take("test")[0] if len(tokenize(s)) <= 20][:n]

    def forward_example(self, tensors):
        return (tensors[0], tensors[1][:, :-1])  # source, and the target shifted right (teacher forcing)

    def parity_outputs(self, model, tensors):
        return model(*self.forward_example(tensors))

    def timed_call(self, model, tensors):
        return lambda: model.greedy_decode(tensors[0])
