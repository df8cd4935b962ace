"""Vision Transformer backbone (Dosovitskiy et al., 2021) as MoCo v3 trains it: a patch-embedding conv,
a [CLS] token, fixed 2-D sine-cosine (or learned) position embeddings, pre-norm blocks, and the final
[CLS] feature as the output.

    x (B, 3, H, W) -> conv p x p, stride p -> (B, h*w, D) + pos -> [cls; tokens] -> L x Block -> LN -> cls

``frozen_patch_embed=True`` is MoCo v3's stability trick: the patch projection keeps its random
initialization and gets no gradient (``requires_grad=False``), so the optimizer never sees it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_pos_embed(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding of an h x w grid -> (h*w, dim) fp32; dim % 4 == 0.

    A quarter of the channels each for sin(y), cos(y), sin(x), cos(x) at geometric frequencies."""
    if dim % 4:
        raise ValueError(f"sine-cosine position embedding needs dim % 4 == 0, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    y, x = yy.reshape(-1, 1) * freqs, xx.reshape(-1, 1) * freqs
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1).float()


class Attention(nn.Module):
    """Multi-head self-attention on torch's fused ``scaled_dot_product_attention``. (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d_head)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT backbone. ``forward(x: (B, 3, H, W), any memory format) -> (B, feat_dim)``: the final [CLS] token.

    ``img_size`` sets the grid the position embedding is built for; other sizes (H, W multiples of
    ``patch_size``) get the sine-cosine table of their own grid, or the learned table resized bicubically.
    ``pos_embed``: ``"sincos"`` (fixed, MoCo v3) or ``"learned"``.
    """

    def __init__(self, patch_size: int = 16, embed_dim: int = 384, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, img_size: int = 224, pos_embed: str = "sincos",
                 frozen_patch_embed: bool = False):
        super().__init__()
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed={pos_embed!r}: choose sincos or learned")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size, self.feat_dim, self.grid = patch_size, embed_dim, img_size // patch_size
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        # 1-D, so the default parameter grouping leaves it out of weight decay, as it does for norms.
        self.cls_token = nn.Parameter(torch.zeros(embed_dim))
        table = sincos_pos_embed(self.grid, self.grid, embed_dim)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(table.clone())
        else:  # recomputed from the grid, so not part of checkpoints
            self.register_buffer("pos_embed", table, persistent=False)
        self.learned_pos = pos_embed == "learned"
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()
        if frozen_patch_embed:
            self.freeze_patch_embed()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The patch conv is a linear map of a flattened patch: Xavier-uniform over (3 p^2) -> D.
        fan_in = 3 * self.patch_size ** 2
        bound = math.sqrt(6.0 / (fan_in + self.feat_dim))
        nn.init.uniform_(self.patch_embed.weight, -bound, bound)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        if self.learned_pos:
            nn.init.normal_(self.pos_embed, std=0.02)

    def freeze_patch_embed(self) -> None:
        """Keep the patch projection at its random initialization: no gradient, no optimizer update."""
        self.patch_embed.requires_grad_(False)

    def _pos(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        if not self.learned_pos:
            return sincos_pos_embed(h, w, self.feat_dim).to(self.pos_embed.device)
        if torch.are_deterministic_algorithms_enabled():
            # Bicubic resizing is separable and linear: the same weights as matrices, (h, grid) and (w, grid),
            # give the same table, and a backward of matmuls; F.interpolate's bicubic backward has no
            # deterministic CUDA kernel and raises in this mode.
            table = self.pos_embed.reshape(self.grid, self.grid, -1)
            rows, cols = (_bicubic_weights(self.grid, n, table) for n in (h, w))
            return torch.einsum("hi,ijd,wj->hwd", rows, table, cols).reshape(h * w, -1)
        table = self.pos_embed.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(h * w, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, D, h, w), channels-last or not
        b, d, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2) + self._pos(h, w).to(x.dtype)
        cls = self.cls_token.to(tokens.dtype).expand(b, 1, d)
        x = self.blocks(torch.cat([cls, tokens], dim=1))
        return self.norm(x[:, 0])


def _bicubic_weights(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) matrix of ``F.interpolate(mode="bicubic", align_corners=False)`` along one axis: row i holds
    the weights output i takes from each input (taps clamped at the edges), read off by resizing the identity.
    No gradient flows through it; dtype and device of ``like``."""
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device).reshape(n_in, 1, n_in, 1)
    with torch.no_grad():
        return F.interpolate(eye, size=(n_out, 1), mode="bicubic", align_corners=False)[:, 0, :, 0].T


# name -> (patch, embed dim, depth, heads, image size). ViT-S has 12 heads, as in MoCo v3 (DeiT-S has 6).
# vit_tiny is ours, not DeiT-Ti: sized for CPU tests and 32 px Fashion-MNIST (8 x 8 patches of 4 px).
VITS: dict[str, tuple[int, int, int, int, int]] = {
    "vit_tiny": (4, 96, 4, 3, 32),
    "vit_small": (16, 384, 12, 12, 224),
    "vit_base": (16, 768, 12, 12, 224),
}


def build_vit(name: str, small_images: bool = False, **kwargs) -> VisionTransformer:
    """A ViT by name (``vit_tiny|vit_small|vit_base``). ``small_images`` turns the 16 px patches of
    ViT-S/B into 4 px patches on 32 px images; keyword arguments go to :class:`VisionTransformer`."""
    if name not in VITS:
        raise ValueError(f"unknown ViT {name!r}; choose one of {sorted(VITS)}")
    patch, dim, depth, heads, size = VITS[name]
    if small_images and patch != 4:
        patch, size = 4, 32
    return VisionTransformer(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, img_size=size,
                             **kwargs)
