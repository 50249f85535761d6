"""A small built-in text encoder: UTF-8 bytes -> token embeddings -> a little transformer.

Transcripts (MER-MULTI's `{key}.txt`) can be used without downloading a tokenizer or a
pretrained language model: every byte is a token (ids 1..256, 0 is padding), so any language
and any script works, and nothing is fetched at run time.

    ids = encode_text("I am fine", max_len=256)          # LongTensor [L], no padding
    tokens, lengths = pad_tokens([ids, ...])             # [B, Lmax] (0 = pad), [B]
    enc = TextEncoder(dim=128)
    seq, pad_mask = enc.sequence(tokens, lengths)        # [B, 1 + Lmax, dim], [B, 1 + Lmax]
    vec = enc(tokens)                                    # [B, dim] (pooled; for AVModel)

A learned [CLS] token is always prepended, so an empty transcript still has one position to
attend to and to pool (no NaN from an all-masked row).
"""

from __future__ import annotations

import torch
from torch import nn

PAD = 0
VOCAB = 257  # 256 byte values shifted by one, plus padding
MAX_LEN = 256  # default byte budget per transcript (MER sentences are short)


def encode_text(text: str, max_len: int = MAX_LEN) -> torch.Tensor:
    """UTF-8 bytes of `text` + 1, cut to `max_len` bytes (at a byte, not a character, edge:
    the model sees bytes anyway)."""
    data = (text or "").encode("utf-8", errors="replace")[:max_len]
    if not data:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + 1


def pad_tokens(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id sequences with 0: ([B, Lmax] long, lengths [B] long); Lmax >= 1."""
    lengths = torch.tensor([int(s.numel()) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), max(1, int(lengths.max()) if len(seqs) else 1)), PAD,
                     dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :s.numel()] = s
    return out, lengths


def padding_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """[B, size] bool, True where a position is padding (PyTorch's key_padding_mask)."""
    positions = torch.arange(size, device=lengths.device)
    return positions.unsqueeze(0) >= lengths.to(positions.device).unsqueeze(1)


def masked_mean(x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the time axis of [B, T, D] ignoring padded positions."""
    keep = (~pad_mask).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


class TextEncoder(nn.Module):
    """Byte embedding, a width-3 convolution (byte trigrams; also the kernel OGM's default
    `conv` rule scales), learned positions, `layers` transformer layers (pre-norm)."""

    def __init__(self, dim: int = 128, layers: int = 2, heads: int = 4,
                 max_len: int = MAX_LEN, dropout: float = 0.1):
        super().__init__()
        self.out_dim = dim
        self.max_len = max_len
        self.embed = nn.Embedding(VOCAB, dim, padding_idx=PAD)
        self.ngram = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, max_len + 1, dim))
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.cls, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def sequence(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, L] (0 = pad) -> ([B, 1 + L, dim], padding mask [B, 1 + L]); position 0
        is [CLS] and never masked."""
        tokens = tokens[:, :self.max_len].long()
        if lengths is None:
            lengths = (tokens != PAD).sum(dim=1)
        lengths = lengths.clamp(max=tokens.shape[1])
        mask = padding_mask(lengths, tokens.shape[1])
        tokens = tokens.masked_fill(mask, PAD)  # whatever sits in padding is ignored
        x = self.embed(tokens)  # padding embeds to zeros, so the conv sees only real bytes
        x = x + self.ngram(x.transpose(1, 2)).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos[:, :x.shape[1]]
        mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1)
        x = self.norm(self.layers(x, src_key_padding_mask=mask))
        return x, mask

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = self.sequence(tokens, lengths)
        return masked_mean(x, mask)


def build_text_encoder(size: str = "tiny") -> TextEncoder:
    """`tiny` for CPU tests and demos; anything else (e.g. resnet18 runs) gets the larger one."""
    if size == "tiny":
        return TextEncoder(dim=64, layers=1, heads=4)
    return TextEncoder(dim=256, layers=4, heads=8)
