"""The CLIP ViT-L/14 text encoder as SD1.5 uses it, written out: token ids → one 768-d vector per token.

    prompt → CLIPTokenizer → ids [b, 77] (<start> words <end> padded with <end>, cut at 77)
    ids → token embedding + position embedding → [b, 77, 768]
        → 12 × (LayerNorm → causal self-attention (12 heads of 64) → +, LayerNorm → MLP 3072 quick-GELU → +)
        → final LayerNorm → [b, 77, 768]: the UNet's cross-attention context

Causal: token i only sees tokens ≤ i (CLIP was trained as a left-to-right text model), so the padding after
<end> cannot change the words before it. SD1.5 uses all 77 outputs, not just the pooled <end> vector.
Parameter names follow transformers' CLIPTextModel (the diffusers folder's text_encoder/), so its weights load as
they are; older files carry a `text_model.` prefix, which convert.py removes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408  # BPE vocabulary of the CLIP tokenizer
    width: int = 768  # hidden size (the UNet's context_dim)
    layers: int = 12  # transformer layers
    heads: int = 12  # attention heads (64 wide each)
    mlp_width: int = 3072  # 4 × width
    max_tokens: int = 77  # positions: every prompt is padded or truncated to this
    eps: float = 1e-5  # LayerNorm eps

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")


# ---------------------------------------------------------------- helpers

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU that OpenAI trained CLIP with; exact GELU gives (slightly) other outputs."""
    return x * torch.sigmoid(1.702 * x)


# ---------------------------------------------------------------- layers

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(proj(x), "b n (h d) -> b h n d", h=self.heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q kᵀ/√d + causal mask) v
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = CausalSelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_tokens, cfg.width)  # learned, one vector per slot

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)[None]


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.layers)])


# ---------------------------------------------------------------- text encoder

class CLIPTextEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [b, n ≤ 77] → hidden states [b, n, width] (the last layer, after the final LayerNorm)."""
        if ids.shape[1] > self.config.max_tokens:
            raise ValueError(f"{ids.shape[1]} tokens but CLIP has {self.config.max_tokens} positions; truncate first")
        x = self.embeddings(ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts → ids [b, 77]: padded with the tokenizer's pad token and truncated, exactly as the SD pipelines do."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
