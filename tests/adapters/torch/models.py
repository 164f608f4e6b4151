"""Small in-repo versions of the architectures users train, for the torch adapter's tests.

Each keeps what matters to a checkpoint of the real one, at a size that trains in milliseconds:
its parameter and buffer names, tied weights, BatchNorm running statistics and counters,
non-persistent buffers, depthwise convolutions and dropout. Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class Attention(nn.Module):
    """GPT-2's causal self-attention: one ``c_attn`` projection to queries, keys and values."""

    def __init__(self, width: int, heads: int, context: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        # Not in the state dict, as in GPT-2: it is rebuilt from the config.
        mask = torch.tril(torch.ones(context, context, dtype=torch.bool))
        self.register_buffer("bias", mask.view(1, 1, context, context), persistent=False)

    def forward(self, x: Any) -> Any:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / (k.shape[-1] ** 0.5)
        scores = scores.masked_fill(~self.bias[:, :, :t, :t], float("-inf"))
        y = self.attn_dropout(scores.softmax(dim=-1)) @ v
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    """A GPT-2 transformer block: pre-norm attention and MLP, each added to the residual."""

    def __init__(self, width: int, heads: int, context: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, context, dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.ModuleDict(
            {"c_fc": nn.Linear(width, 4 * width), "c_proj": nn.Linear(4 * width, width)}
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Any) -> Any:
        x = x + self.attn(self.ln_1(x))
        hidden = F.gelu(self.mlp["c_fc"](self.ln_2(x)), approximate="tanh")
        return x + self.dropout(self.mlp["c_proj"](hidden))


class TinyGPT(nn.Module):
    """GPT-2's layout and names, with ``lm_head.weight`` tied to ``transformer.wte.weight``."""

    def __init__(
        self,
        vocab: int = 32,
        context: int = 8,
        width: int = 16,
        heads: int = 2,
        layers: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, width),
                "wpe": nn.Embedding(context, width),
                "drop": nn.Dropout(dropout),
                "h": nn.ModuleList([Block(width, heads, context, dropout) for _ in range(layers)]),
                "ln_f": nn.LayerNorm(width),
            }
        )
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.transformer["wte"].weight
        for module in self.modules():  # GPT-2's initialisation
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: Any) -> Any:
        t = self.transformer
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = t["drop"](t["wte"](tokens) + t["wpe"](positions))
        for block in t["h"]:
            x = block(x)
        return self.lm_head(t["ln_f"](x))


def lm_loss(model: nn.Module, tokens: Any) -> Any:
    """Next-token cross-entropy of a language model on a batch of token rows."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


class BatchNormCNN(nn.Module):
    """A small image classifier with BatchNorm after each convolution (running stats, counters)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, classes))

    def forward(self, x: Any) -> Any:
        return self.classifier(self.features(x))


class SqueezeExcite(nn.Module):
    """MobileNetV3's channel attention: pool, squeeze, excite, scale (hard sigmoid)."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: Any) -> Any:
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV3's block: expand, depthwise convolution, squeeze-excite, project."""

    def __init__(self, inp: int, expanded: int, out: int, stride: int) -> None:
        super().__init__()
        self.use_residual = stride == 1 and inp == out
        self.block = nn.Sequential(
            nn.Conv2d(inp, expanded, 1, bias=False),
            nn.BatchNorm2d(expanded),
            nn.Hardswish(),
            nn.Conv2d(expanded, expanded, 3, stride, 1, groups=expanded, bias=False),
            nn.BatchNorm2d(expanded),
            nn.Hardswish(),
            SqueezeExcite(expanded, max(8, expanded // 4)),
            nn.Conv2d(expanded, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )

    def forward(self, x: Any) -> Any:
        y = self.block(x)
        return x + y if self.use_residual else y


class TinyMobileNetV3(nn.Module):
    """MobileNetV3-Small's structure at a few thousand parameters, for 3x16x16 images."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish()),
            InvertedResidual(8, 16, 8, 1),
            InvertedResidual(8, 24, 12, 2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(12, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, classes)
        )

    def forward(self, x: Any) -> Any:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))
