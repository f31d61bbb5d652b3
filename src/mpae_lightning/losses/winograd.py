"""Winograd F(2x2, 3x3): a 3x3 stride-1 "same" convolution with 2.25x fewer multiplications.

Why: on the CPU the frozen VGG-19's convolutions are a third of a float32 training step,
most of it in the wide layers (256 and 512 channels), and the direct kernels already run
near the cores' peak, so only less arithmetic makes them faster. Winograd's minimal filtering
computes each 2x2 block of outputs from a 4x4 block of inputs with 16 products per channel pair
instead of 36 (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
CVPR 2016). The same function in exact arithmetic: in float32 the transforms add a few
roundings, but each output sums 16 dot products of C terms instead of one of 9*C terms; on
VGG-19's wide layers the result is 4-5e-7 from float64 (relative), against 6e-7 to 1.2e-6
for oneDNN's direct channels-last kernel (benchmarks/RESULTS.md, change 12). The transforms
are sums and differences of inputs (and halves, for the weights), done with a few
whole-tensor passes; the 16 products are one batched GEMM. Public tensor operations only.

Used by :class:`~mpae_lightning.losses.vgg.VGGFeatures` only when its ``winograd_cpu`` switch is
on (off by default, since it changes the float32 rounding).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Filter transform G (4x3), input transform B^T (4x4), output transform A^T (2x4) of F(2, 3).
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_AT = ((1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, -1.0))


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) convolution weight -> (16, C_in, C_out) transformed weight ``G g G^T``.

    Computed in float64 and rounded once to the weight's dtype."""
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"Winograd F(2x2, 3x3) needs 3x3 kernels, got {tuple(weight.shape)}")
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ai,ocij,bj->abco", g, weight.detach().double(), g)
    return u.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


@functools.lru_cache(maxsize=None)
def _output_transform(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(4, 16): output (r, s) of a 2x2 block = sum over (a, b) of A^T[r, a] A^T[s, b] M[a, b].

    Made once per dtype and device (every Winograd layer uses it at every call)."""
    at = torch.tensor(_AT, dtype=dtype, device=device)
    return torch.einsum("ra,sb->rsab", at, at).reshape(4, 16)


#: Largest transformed input (V, 4x the input) one pass of :func:`winograd_conv3x3` makes; larger
#: batches are done in chunks of images, so its extra memory stays bounded (the direct kernel
#: needs none). The paper's CPU step (batch 4, 128-px restorations) is one pass per layer.
CHUNK_BYTES = 64 * 2**20


def winograd_conv3x3(
    x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False
) -> torch.Tensor:
    """``conv2d(x, w, bias, padding=1)`` (then ReLU if ``relu``) with ``u = winograd_weight(w)``.

    ``x`` is (B, C_in, H, W) with even H and W, in any memory layout; the result is
    (B, C_out, H, W) in channels-last layout.
    """
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Winograd F(2x2, 3x3) here needs an even height and width, got {h}x{w}")
    if u.shape[:2] != (16, c):
        raise ValueError(f"transformed weight {tuple(u.shape)} does not take {c} input channels")
    out = x.new_empty(b, h // 2, 2, w // 2, 2, u.shape[2])  # 2x2 output blocks, i.e. (B, H, W, C_out)
    per_image = 4 * h * w * max(c, u.shape[2]) * x.element_size()
    step = max(1, CHUNK_BYTES // per_image)
    for start in range(0, b, step):
        _winograd_chunk(x[start:start + step], u, bias, relu, out[start:start + step])
    return out.view(b, h, w, -1).permute(0, 3, 1, 2)


def _winograd_chunk(
    x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, relu: bool, out: torch.Tensor
) -> None:
    """One chunk of images: ``out`` is its (b, H/2, 2, W/2, 2, C_out) slice of the result."""
    b, c, h, w = x.shape
    c_out = u.shape[2]
    h2, w2 = h // 2, w // 2
    tiles = b * h2 * w2
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (B, H+2, W+2, C), contiguous
    # Input transform V = B^T d B on every 4x4 block d (blocks start at even rows and columns):
    # first along the rows (4 passes over every other row), then along the columns.
    rows = [padded[:, r:r + h:2] for r in range(4)]  # (B, H/2, W+2, C) views
    by_rows = x.new_empty(4, b, h2, w + 2, c)
    torch.sub(rows[0], rows[2], out=by_rows[0])
    torch.add(rows[1], rows[2], out=by_rows[1])
    torch.sub(rows[2], rows[1], out=by_rows[2])
    torch.sub(rows[1], rows[3], out=by_rows[3])
    cols = [by_rows[:, :, :, s:s + w:2] for s in range(4)]  # (4, B, H/2, W/2, C) views
    v = x.new_empty(4, 4, b, h2, w2, c)
    torch.sub(cols[0], cols[2], out=v[:, 0])
    torch.add(cols[1], cols[2], out=v[:, 1])
    torch.sub(cols[2], cols[1], out=v[:, 2])
    torch.sub(cols[1], cols[3], out=v[:, 3])
    # The 16 element-wise products over channels: one batched GEMM (16, tiles, C) @ (16, C, C_out).
    m = torch.bmm(v.view(16, tiles, c), u)
    if bias is not None:
        m[5].add_(bias)  # M[1, 1] enters every output of its block with coefficient 1
    # Output transform Y = A^T M A as one (4, 16) @ (16, tiles * C_out) product, then the 2x2 blocks
    # are interleaved into (B, H, W, C_out) (with the ReLU in the same pass).
    y4 = torch.mm(_output_transform(m.dtype, m.device), m.view(16, -1)).view(2, 2, b, h2, w2, c_out)
    blocks = y4.permute(2, 3, 0, 4, 1, 5)
    if relu:
        torch.clamp_min(blocks, 0, out=out)
    else:
        out.copy_(blocks)
