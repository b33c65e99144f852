"""Bidirectional LSTM text classifier over a vocabulary built at train time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .text import PAD_ID


@dataclass
class LSTMConfig:
    vocab_size: int = 20000  # set from the vocabulary built at train time
    num_classes: int = 2  # rotten / fresh
    embed_dim: int = 128  # token embedding width
    hidden: int = 128  # LSTM hidden size per direction
    num_layers: int = 1  # stacked LSTM layers
    bidirectional: bool = True  # read the snippet both ways
    dropout: float = 0.4  # on embeddings and the pooled features
    pad_id: int = PAD_ID  # padding id, masked out of the pooling


class LSTMClassifier(nn.Module):
    config_cls = LSTMConfig

    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.pad_id)
        self.lstm = nn.LSTM(
            config.embed_dim,
            config.hidden,
            num_layers=config.num_layers,
            bidirectional=config.bidirectional,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        feat = config.hidden * (2 if config.bidirectional else 1)
        self.drop = nn.Dropout(config.dropout)
        # Max- and mean-pooling over time, concatenated: more robust than the last hidden
        # state for short, opinionated snippets.
        self.head = nn.Linear(2 * feat, config.num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: (B, T) token ids, right-padded with pad_id -> logits (B, num_classes)
        mask = ids != self.config.pad_id  # (B, T)
        mask[:, 0] = True  # an all-padding row still pools one step instead of nothing
        lengths = mask.sum(1)
        emb = self.drop(self.embed(ids))  # (B, T, E)
        packed = nn.utils.rnn.pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.size(1))
        # out: (B, T, feat); padded steps are zero
        m = mask.unsqueeze(-1)  # (B, T, 1)
        mean = (out * m).sum(1) / lengths.unsqueeze(-1).to(out.dtype)  # (B, feat)
        mx = out.masked_fill(~m, torch.finfo(out.dtype).min).amax(1)  # (B, feat)
        return self.head(self.drop(torch.cat([mean, mx], dim=-1)))
