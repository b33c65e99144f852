"""Encoder-decoder Transformer translator (English -> Spanish by default)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .text import BOS_ID, EOS_ID, PAD_ID


@dataclass
class TransformerConfig:
    src_vocab_size: int = 8000  # set from the source vocabulary built at train time
    tgt_vocab_size: int = 8000  # set from the target vocabulary built at train time
    d_model: int = 256  # embedding and attention width
    nhead: int = 4  # attention heads; d_model must divide by it
    num_encoder_layers: int = 2  # 2+2 layers train in minutes on 2 CPU cores
    num_decoder_layers: int = 2
    dim_feedforward: int = 512  # width of each position-wise feed-forward block
    dropout: float = 0.1
    max_len: int = 64  # longest sequence, in tokens with <bos>/<eos>, for positions and decoding
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID


class PositionalEncoding(nn.Module):
    """Fixed sinusoidal positions (Vaswani et al., 2017, section 3.5)."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        pos = torch.arange(max_len).unsqueeze(1)  # (L, 1)
        div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        self.register_buffer("pe", pe, persistent=False)  # derived from the config, not stored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D)
        return x + self.pe[: x.size(1)].to(x.dtype)


class Translator(nn.Module):
    config_cls = TransformerConfig

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        c = config
        self.src_embed = nn.Embedding(c.src_vocab_size, c.d_model, padding_idx=c.pad_id)
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, c.d_model, padding_idx=c.pad_id)
        self.pos = PositionalEncoding(c.d_model, c.max_len)
        self.drop = nn.Dropout(c.dropout)
        self.transformer = nn.Transformer(
            d_model=c.d_model,
            nhead=c.nhead,
            num_encoder_layers=c.num_encoder_layers,
            num_decoder_layers=c.num_decoder_layers,
            dim_feedforward=c.dim_feedforward,
            dropout=c.dropout,
            batch_first=True,
        )
        # The nested-tensor fast path is a prototype API that warns on every eval call; with
        # length-bucketed batches there is little padding for it to skip.
        self.transformer.encoder.use_nested_tensor = False
        self.out = nn.Linear(c.d_model, c.tgt_vocab_size)
        self.scale = math.sqrt(c.d_model)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # src: (B, S) -> memory (B, S, D) and its padding mask (B, S)
        src_mask = src == self.config.pad_id
        x = self.drop(self.pos(self.src_embed(src) * self.scale))
        return self.transformer.encoder(x, src_key_padding_mask=src_mask), src_mask

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        # tgt: (B, T) target prefix -> logits (B, T, V)
        t = tgt.size(1)
        # Boolean like the padding masks: mixing float and bool masks is deprecated in torch.
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tgt.device), diagonal=1)
        y = self.drop(self.pos(self.tgt_embed(tgt) * self.scale))
        h = self.transformer.decoder(
            y,
            memory,
            tgt_mask=causal,
            tgt_is_causal=True,  # it is, by construction; saying so skips a data-dependent check (exportable)
            tgt_key_padding_mask=tgt == self.config.pad_id,
            memory_key_padding_mask=src_mask,
        )
        return self.out(h)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        # Teacher forcing: src (B, S), tgt_in (B, T) starting with <bos> -> logits (B, T, V)
        memory, src_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_mask)

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, max_length: int | None = None) -> torch.Tensor:
        """Batched greedy decoding: src (B, S) -> ids (B, <=max_length) without <bos>.

        Each row stops at its own <eos>; finished rows are padded with pad_id.
        """
        c = self.config
        limit = min(max_length or c.max_len - 1, c.max_len - 1)
        memory, src_mask = self.encode(src)
        b = src.size(0)
        ys = torch.full((b, 1), c.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(b, dtype=torch.bool, device=src.device)
        for _ in range(limit):
            logits = self.decode(ys, memory, src_mask)[:, -1]  # (B, V)
            nxt = logits.argmax(-1)
            nxt = nxt.masked_fill(done, c.pad_id)
            ys = torch.cat([ys, nxt.unsqueeze(1)], dim=1)
            done |= nxt == c.eos_id
            if bool(done.all()):
                break
        return ys[:, 1:]
