"""Encoder-decoder Transformer translator (English -> Spanish by default)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
    # One matrix for the source and target embeddings and the output projection (Press & Wolf,
    # 2017): a joint subword vocabulary makes it possible, and it halves the parameters.
    tie_embeddings: bool = False
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
        if c.tie_embeddings:
            if c.src_vocab_size != c.tgt_vocab_size:
                raise ValueError("tie_embeddings needs one vocabulary: src_vocab_size == tgt_vocab_size")
            # Scaled so that the tied output layer starts with unit-scale logits.
            nn.init.normal_(self.src_embed.weight, std=c.d_model**-0.5)
            with torch.no_grad():
                self.src_embed.weight[c.pad_id].zero_()
            self.tgt_embed.weight = self.src_embed.weight
            self.out.weight = self.src_embed.weight

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

    # ------------------------------------------------------------------ incremental decoding
    #
    # nn.TransformerDecoder recomputes every earlier position for each new token. The step below
    # runs the same layers (post-norm, as nn.Transformer builds them) on the newest token only,
    # with each layer's self-attention keys and values cached and the cross-attention keys and
    # values of the source computed once: O(T) work per token instead of O(T^2).

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.config.nhead
        return x.view(b, t, h, d // h).transpose(1, 2)  # (B, H, T, D/H)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, t, dh = x.shape
        return x.transpose(1, 2).reshape(b, t, h * dh)

    def start_cache(self, memory: torch.Tensor, src_mask: torch.Tensor) -> dict:
        """Per decoder layer: the source's cross-attention keys/values, and empty self-attention caches."""
        d = self.config.d_model
        layers = []
        for layer in self.transformer.decoder.layers:
            w, bias = layer.multihead_attn.in_proj_weight, layer.multihead_attn.in_proj_bias
            k = F.linear(memory, w[d : 2 * d], bias[d : 2 * d])
            v = F.linear(memory, w[2 * d :], bias[2 * d :])
            layers.append({"mem_k": self._heads(k), "mem_v": self._heads(v), "k": None, "v": None})
        # Additive mask over source positions: padding gets -inf. (B, 1, 1, S)
        mask = torch.zeros(src_mask.shape, dtype=memory.dtype, device=memory.device)
        mask = mask.masked_fill(src_mask, float("-inf"))[:, None, None, :]
        return {"layers": layers, "src_mask": mask, "step": 0}

    def decode_step(self, token: torch.Tensor, cache: dict) -> torch.Tensor:
        """Logits (B, V) for the next token after ``token`` (B,), the newest of the cached prefix."""
        d = self.config.d_model
        pos = cache["step"]
        x = self.tgt_embed(token[:, None]) * self.scale + self.pos.pe[pos : pos + 1].to(self.tgt_embed.weight.dtype)
        layers = self.transformer.decoder.layers
        for n, (layer, c) in enumerate(zip(layers, cache["layers"], strict=True)):
            sa = layer.self_attn
            q, k, v = F.linear(x, sa.in_proj_weight, sa.in_proj_bias).split(d, dim=-1)
            k, v = self._heads(k), self._heads(v)
            c["k"] = k if c["k"] is None else torch.cat([c["k"], k], dim=2)
            c["v"] = v if c["v"] is None else torch.cat([c["v"], v], dim=2)
            att = F.scaled_dot_product_attention(self._heads(q), c["k"], c["v"])  # the prefix only: causal
            x = layer.norm1(x + sa.out_proj(self._merge(att)))
            ca = layer.multihead_attn
            q = self._heads(F.linear(x, ca.in_proj_weight[:d], ca.in_proj_bias[:d]))
            if "align" in cache and n == len(layers) - 1:
                # The last layer's attention over the source, averaged over heads: the alignment.
                probs = (q @ c["mem_k"].transpose(-1, -2) / math.sqrt(q.size(-1)) + cache["src_mask"]).softmax(-1)
                cache["align"].append(probs.mean(1)[:, 0])  # (B, S)
                att = probs @ c["mem_v"]
            else:
                att = F.scaled_dot_product_attention(q, c["mem_k"], c["mem_v"], attn_mask=cache["src_mask"])
            x = layer.norm2(x + ca.out_proj(self._merge(att)))
            x = layer.norm3(x + layer.linear2(layer.activation(layer.linear1(x))))
        if self.transformer.decoder.norm is not None:
            x = self.transformer.decoder.norm(x)
        cache["step"] = pos + 1
        return self.out(x[:, 0])

    @staticmethod
    def reorder_cache(cache: dict, index: torch.Tensor) -> None:
        """Keep the cache rows ``index`` (beam search: the hypotheses that survive a step)."""
        for c in cache["layers"]:
            for key in ("k", "v", "mem_k", "mem_v"):
                if c[key] is not None:
                    c[key] = c[key].index_select(0, index)
        cache["src_mask"] = cache["src_mask"].index_select(0, index)

    def _allowed(self, logits: torch.Tensor) -> torch.Tensor:
        """Never emit <pad> or <bos>: a <pad> in the prefix would be masked out of attention."""
        logits = logits.clone()
        logits[:, [self.config.pad_id, self.config.bos_id]] = float("-inf")
        return logits

    def _limit(self, max_length: int | None) -> int:
        return min(max_length or self.config.max_len - 1, self.config.max_len - 1)

    @torch.no_grad()
    def greedy_decode(
        self, src: torch.Tensor, max_length: int | None = None, cache: bool = True, alignment: bool = False
    ):
        """Batched greedy decoding: src (B, S) -> ids (B, <=max_length) without <bos>.

        Each row stops at its own <eos>; finished rows are padded with pad_id. ``cache=False``
        recomputes the whole prefix each step (the reference the cached decode is tested against).
        ``alignment=True`` also returns the last decoder layer's cross-attention for each produced
        token, averaged over heads: (B, T, S), each row a distribution over the source positions.
        """
        c = self.config
        limit = self._limit(max_length)
        memory, src_mask = self.encode(src)
        b = src.size(0)
        ys = torch.full((b, 1), c.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(b, dtype=torch.bool, device=src.device)
        state = self.start_cache(memory, src_mask) if cache or alignment else None
        if alignment:
            state["align"] = []
        for _ in range(limit):
            if state is not None:
                logits = self.decode_step(ys[:, -1], state)
            else:
                logits = self.decode(ys, memory, src_mask)[:, -1]  # (B, V)
            nxt = self._allowed(logits).argmax(-1)
            nxt = nxt.masked_fill(done, c.pad_id)
            ys = torch.cat([ys, nxt.unsqueeze(1)], dim=1)
            done |= nxt == c.eos_id
            if bool(done.all()):
                break
        if alignment:
            return ys[:, 1:], torch.stack(state["align"], dim=1)
        return ys[:, 1:]

    @torch.no_grad()
    def beam_decode(
        self, src: torch.Tensor, beam: int = 4, max_length: int | None = None, alpha: float = 0.6
    ) -> torch.Tensor:
        """Batched beam search with the key/value cache: src (B, S) -> ids (B, <=max_length).

        Each row keeps ``beam`` hypotheses; a finished hypothesis keeps its score, and the best by
        log-probability over a GNMT length penalty ((5 + len) / 6) ** alpha is returned. ``beam=1``
        is greedy decoding.
        """
        c = self.config
        limit = self._limit(max_length)
        b, k = src.size(0), beam
        memory, src_mask = self.encode(src)
        rows = torch.arange(b, device=src.device).repeat_interleave(k)  # (B*K,) source row of each hypothesis
        state = self.start_cache(memory, src_mask)
        self.reorder_cache(state, rows)
        ys = torch.full((b * k, 1), c.bos_id, dtype=torch.long, device=src.device)
        # Only the first hypothesis of each row is live at the start, so the K first picks differ.
        scores = torch.full((b, k), float("-inf"), device=src.device)
        scores[:, 0] = 0.0
        scores = scores.view(-1)
        done = torch.zeros(b * k, dtype=torch.bool, device=src.device)
        lengths = torch.zeros(b * k, device=src.device)
        for _ in range(limit):
            logp = torch.log_softmax(self._allowed(self.decode_step(ys[:, -1], state).float()), dim=-1)  # (B*K, V)
            v = logp.size(-1)
            # A finished hypothesis extends only with <pad>, at no cost.
            logp[done] = float("-inf")
            logp[done, c.pad_id] = 0.0
            total = (scores[:, None] + logp).view(b, k * v)
            top, idx = total.topk(k, dim=-1)  # (B, K)
            origin = (idx // v) + torch.arange(b, device=src.device)[:, None] * k
            origin, token = origin.view(-1), (idx % v).view(-1)
            self.reorder_cache(state, origin)
            ys = torch.cat([ys.index_select(0, origin), token[:, None]], dim=1)
            was_done = done.index_select(0, origin)
            lengths = lengths.index_select(0, origin) + (~was_done).float()
            done = was_done | (token == c.eos_id)
            scores = top.view(-1)
            if bool(done.all()):
                break
        penalty = ((5.0 + lengths) / 6.0) ** alpha
        best = (scores / penalty).view(b, k).argmax(-1) + torch.arange(b, device=src.device) * k
        return ys.index_select(0, best)[:, 1:]
