"""TinyViT image encoder as used by MobileSAM and LiteMedSAM.

A compact re-implementation whose parameter names match the official checkpoints, so that
``mobile_sam.pt`` and ``lite_medsam.pth`` load with ``strict=True``. The two official variants
differ only in the patch embedding stride (MobileSAM: 4, two 3x3 stride-2 convs; LiteMedSAM: 1,
two 1x1 convs) and in the input size (1024 vs 256); both give a 256 x 64 x 64 embedding.
``tests/test_tiny_vit_reference.py`` proves equality with the reference code on real images.

Shapes: input ``(B, 3, S, S)`` float32 (already normalised), output ``(B, C_out, S/16, S/16)``
for MobileSAM (``S/4`` for LiteMedSAM); tokens inside stages are ``(B, H*W, C)``.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d


class Conv2dBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (checkpoint names ``c`` and ``bn``)."""

    def __init__(self, cin: int, cout: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, ks, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class PatchEmbed(nn.Module):
    """Stem: ``(B, 3, S, S) -> (B, C0, S/stride, S/stride)``; stride is 4 (MobileSAM) or 1 (LiteMedSAM)."""

    def __init__(self, in_chans: int, dim: int, stride: int):
        super().__init__()
        if stride == 4:
            ks, st, pad = 3, 2, 1
        elif stride == 1:
            ks, st, pad = 1, 1, 0
        else:
            raise ValueError(f"patch stride must be 4 or 1, got {stride}")
        self.seq = nn.Sequential(Conv2dBN(in_chans, dim // 2, ks, st, pad), nn.GELU(),
                                 Conv2dBN(dim // 2, dim, ks, st, pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block on ``(B, C, H, W)``."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, ks=3, pad=1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, dim)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """``(B, C, H, W)`` or ``(B, H*W, C)`` tokens -> ``(B, H'*W', C_out)`` with H' = H / stride."""

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int, stride: int):
        super().__init__()
        self.resolution = resolution
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.conv3(self.act(self.conv2(x)))
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


def relative_offset_index(window: int) -> tuple[torch.Tensor, int]:
    """Index ``(N, N)`` into the table of distinct |dy|,|dx| offsets of a ``window x window`` grid."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            key = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            idxs.append(offsets.setdefault(key, len(offsets)))
    n = len(points)
    return torch.tensor(idxs, dtype=torch.long).view(n, n), len(offsets)


class Attention(nn.Module):
    """Window self-attention with a learned bias per head and relative offset, on ``(B', N, C)``."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.scale = self.key_dim ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        idx, n_offsets = relative_offset_index(window)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, n_offsets))
        self.register_buffer("attention_bias_idxs", idx, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.key_dim)
        q, k, v = qkv.split(self.key_dim, dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class TinyViTBlock(nn.Module):
    """Windowed attention + depthwise local conv + MLP, on ``(B, H*W, C)`` tokens."""

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, mlp_ratio: float):
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, ks=3, pad=1, groups=dim)

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, n, c = x.shape
        ws = self.window
        if h == ws and w == ws:
            return self.attn(x)
        x = x.view(b, h, w, c)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        return x[:, :h, :w].reshape(b, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, n, c = x.shape
        x = x + self.window_attention(x)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class Stage(nn.Module):
    """A list of ``blocks`` followed by an optional ``downsample`` (PatchMerging)."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT encoder with SAM's neck.

    Args:
        img_size: square input side S.
        patch_stride: 4 (MobileSAM) or 1 (LiteMedSAM).
        embed_dims, depths, num_heads, window_sizes: per stage; stage 0 is convolutional (MBConv).
        out_chans: channels of the output embedding (256 for SAM's decoder).
        classifier_classes: MobileSAM's checkpoint keeps TinyViT's unused ImageNet head
            (``norm_head``, ``head``); set to 1000 to load it strictly, 0 to omit it.
    The last PatchMerging has stride 1, as in MobileSAM, so the output side is
    ``S / patch_stride / 2**(len(depths) - 2)``.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_stride: int = 4,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        out_chans: int = 256,
        in_chans: int = 3,
        classifier_classes: int = 0,
    ):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], patch_stride)
        res = img_size // patch_stride
        n = len(depths)
        self.layers = nn.ModuleList()
        for i in range(n):
            dim = embed_dims[i]
            last = i == n - 1
            stride = 1 if i == n - 2 else 2
            down = None if last else PatchMerging((res, res), dim, embed_dims[i + 1], stride)
            if i == 0:
                blocks = [MBConv(dim, mbconv_expand_ratio) for _ in range(depths[i])]
            else:
                blocks = [TinyViTBlock(dim, (res, res), num_heads[i], window_sizes[i], mlp_ratio)
                          for _ in range(depths[i])]
            self.layers.append(Stage(blocks, down))
            if not last:
                res = res // stride
        self.out_resolution = res
        if classifier_classes:  # present in the official MobileSAM weights, never used for SAM
            self.norm_head = nn.LayerNorm(embed_dims[-1])
            self.head = nn.Linear(embed_dims[-1], classifier_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised float -> ``(B, out_chans, R, R)`` embedding."""
        x = self.patch_embed(x)
        x = self.layers[0](x)
        for layer in self.layers[1:]:
            x = layer(x)
        b, _, c = x.shape
        r = self.out_resolution
        x = x.view(b, r, r, c).permute(0, 3, 1, 2)
        return self.neck(x)
