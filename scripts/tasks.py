"""Training tasks: what differs between kinds of model (data, config, batching, loss, metrics).

A model's registry entry (scripts/registry.py) names its task. Three tasks cover the shipped
models; a new model of an existing kind reuses one. Each task also says how a client sends its
inputs, which the bench, the soak, the demo and the tests use.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.image import normalize
from models.text import PAD_ID, SubwordTokenizer, Vocab, frame, pad_batch, tokenize

from .common import CLIError
from .data import DataKind, Dataset


@dataclass(frozen=True)
class TaskOptions:
    """The training options a task reads (the translator's); the rest are the loop's."""

    max_tokens: int = 96  # translation: train on pairs of at most this many subword tokens per side
    vocab_size: int = 8000  # translation: pieces in the joint (source and target) subword vocabulary
    batch_tokens: int = 4000  # translation: source + target tokens per training batch, padding included
    bleu_samples: int = 500  # translation: validation pairs decoded for BLEU after each epoch
    eval_beam: int = 5  # translation: the test split is also decoded with this beam (1: greedy only)

    @classmethod
    def from_args(cls, args) -> TaskOptions:
        """From train's flags, or a checkpoint's train_args (a dict)."""
        get = args.get if isinstance(args, dict) else lambda k, d: getattr(args, k, d)
        given = {f: get(f, None) for f in cls.__dataclass_fields__}
        return cls(**{f: v for f, v in given.items() if v is not None})


class Task:
    """What differs between models: config, batching, loss, metrics, checkpoint extras."""

    name: str  # the checkpoint's task, which its handler must serve
    data_kind: DataKind  # what its dataset holds, and so how a user's own file is read
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

    def n_batches(self, split: str, batch_size: int, rng: np.random.Generator | None) -> int:
        """How many batches ``batches`` yields with these arguments (the LR schedule's length)."""
        return math.ceil(len(self.ds.splits[split]) / batch_size)

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
    name, data_kind = "image-classification", DataKind.IMAGES

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
    name, data_kind = "text-classification", DataKind.LABELLED_TEXT
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
    """Translation with a joint subword vocabulary, trained on token-bounded batches.

    Training and validation keep the pairs whose sides both fit in ``max_tokens`` subword tokens.
    The test split is kept whole (test_all; a longer source is truncated to the model's length)
    and also reported on test20, its pairs of at most 20 words per side.
    """

    name, data_kind = "translation", DataKind.PAIRS
    primary, score = "bleu", "bleu"  # the checkpoint is chosen by validation BLEU, not loss

    def __init__(self, ds, saved=None, options=TaskOptions()):
        super().__init__(ds, saved, options)
        self.max_tokens = options.max_tokens
        if saved:
            self.tokenizer = SubwordTokenizer(saved["tokenizer"])
        else:
            src, tgt = ds.take("train")
            self.tokenizer = SubwordTokenizer.train([*src, *tgt], options.vocab_size)
        limit = self.max_tokens + 2
        src = [self.tokenizer.encode(s) for s in ds.x]
        tgt = [self.tokenizer.encode(t) for t in ds.y]
        fits = np.array([max(len(a), len(b)) <= self.max_tokens for a, b in zip(src, tgt, strict=True)])
        for split in ("train", "val"):
            ds.splits[split] = ds.splits[split][fits[ds.splits[split]]]
        if min(len(v) for v in ds.splits.values()) == 0:
            raise CLIError(f"no pairs of at most --max-tokens {self.max_tokens} tokens in some split")
        # The model's positions end at ``limit``: longer test pairs are cut there (a handful).
        self.src = [frame(ids, limit, bos_eos=True) for ids in src]
        self.tgt = [frame(ids, limit, bos_eos=True) for ids in tgt]
        test = ds.splits["test"]
        self.test20 = test[[len(tokenize(ds.x[i])) <= 20 and len(tokenize(ds.y[i])) <= 20 for i in test]]

    def config_fields(self):
        n = len(self.tokenizer)
        return {"src_vocab_size": n, "tgt_vocab_size": n, "max_len": self.max_tokens + 2, "tie_embeddings": True}

    def _size(self, i: int) -> int:
        return len(self.src[i]) + len(self.tgt[i])

    def plan(self, split: str, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
        """Batches of similar lengths, each at most ``batch_size`` pairs and ``batch_tokens`` tokens
        (padding included); in a seeded random order for training, by length otherwise."""
        idx = self.ds.splits[split]
        if rng is not None:
            idx = rng.permutation(idx)
            # Sort within large random pools, so batches carry little padding yet differ each epoch.
            pool = batch_size * 50
            idx = np.concatenate([sorted(idx[i : i + pool], key=self._size) for i in range(0, len(idx), pool)])
        else:
            idx = np.array(sorted(idx, key=self._size), dtype=np.int64)
        groups, start, widest = [], 0, 0
        for end, i in enumerate(idx):
            widest = max(widest, len(self.src[i]), len(self.tgt[i]))
            if end > start and (
                (end - start + 1) * 2 * widest > self.options.batch_tokens or end - start == batch_size
            ):
                groups.append(idx[start:end])
                start, widest = end, max(len(self.src[i]), len(self.tgt[i]))
        groups.append(idx[start:])
        if rng is not None:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        return groups

    def n_batches(self, split, batch_size, rng):
        return len(self.plan(split, batch_size, rng))

    def batches(self, split, batch_size, rng):
        for g in self.plan(split, batch_size, rng):
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

    def translate(self, model, idx: np.ndarray, device, beam: int = 1) -> dict[int, str]:
        """The pairs ``idx``'s sources translated greedily or with a beam, by pair index."""
        out = {}
        order = sorted(idx, key=lambda i: len(self.src[i]))
        rows = 64 if beam == 1 else max(1, 64 // beam)
        for n in range(0, len(order), rows):
            g = order[n : n + rows]
            src = pad_batch([self.src[i] for i in g]).to(device)
            ids = model.greedy_decode(src) if beam == 1 else model.beam_decode(src, beam=beam)
            out.update(zip(g, map(self.tokenizer.decode, ids.tolist()), strict=True))
        return out

    def bleu(self, hyps: dict[int, str], idx: np.ndarray) -> float:
        """Corpus BLEU (sacrebleu, lower-cased) of the translations ``hyps`` of the pairs ``idx``."""
        import sacrebleu

        return sacrebleu.corpus_bleu([hyps[i] for i in idx], [[self.ds.y[i] for i in idx]], lowercase=True).score

    @torch.no_grad()
    def evaluate(self, model, split, device):
        total, tokens = 0.0, 0
        for src, tgt, g in self.batches(split, 256, None):
            src, tgt = src.to(device), tgt.to(device)
            total += self.loss(model, (src, tgt, g), reduction="sum").item()
            tokens += (tgt[:, 1:] != PAD_ID).sum().item()
        loss = total / max(tokens, 1)
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
        if split != "test":  # a fixed seeded sample of validation pairs, decoded greedily
            sample = self.ds.splits[split][: self.options.bleu_samples]
            out["bleu"] = self.bleu(self.translate(model, sample, device), sample)
            return out
        # test_all is decoded once per beam width; test20 is scored from the same translations.
        test, k = self.ds.splits["test"], self.options.eval_beam
        for suffix, beam in [("", 1)] + ([(f"_beam{k}", k)] if k > 1 else []):
            hyps = self.translate(model, test, device, beam)
            out[f"bleu{suffix}"], out[f"bleu20{suffix}"] = self.bleu(hyps, test), self.bleu(hyps, self.test20)
        return out

    def extras(self):
        return {"tokenizer": self.tokenizer.model, "preprocess": {"max_tokens": self.max_tokens}}

    @staticmethod
    def request_inputs(ds, n):
        # Sentences of up to 20 words (test20): what the bench and the demo send.
        return [s for s in ds.take("test")[0] if len(tokenize(s)) <= 20][:n]

    def forward_example(self, tensors):
        return (tensors[0], tensors[1][:, :-1])  # source, and the target shifted right (teacher forcing)

    def parity_outputs(self, model, tensors):
        return model(*self.forward_example(tensors))

    def timed_call(self, model, tensors):
        return lambda: model.greedy_decode(tensors[0])
