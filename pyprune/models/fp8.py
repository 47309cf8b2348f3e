"""Quantized checkpoints. pyprune prunes float weights; a checkpoint whose config carries a ``quantization_config``
is one of:

* **FP8** (``quant_method: "fp8"``, transformers' fine-grained FP8, the format of DeepSeek-V3/R1 and of many
  70B-scale MoE releases): each linear weight stored as ``float8_e4m3fn`` with ``<name>_scale_inv``, one float per
  ``weight_block_size`` block (or one per tensor), the weight being ``w8 * scale_inv``. pyprune prunes it streamed:
  every block's FP8 weights are dequantized when the block is read, pruned in float, and quantized back with fresh
  block scales (amax / 448) when it is written, so the output keeps the checkpoint's format, size and config (pruned
  weights are exact zeros in FP8 too).
* anything else (GPTQ, AWQ, bitsandbytes, compressed-tensors, ...): refused before any weight is read, naming the
  method; pyprune needs the float checkpoint.
"""
from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
SCALE_SUFFIX = "_scale_inv"


class Fp8Format:
    """A checkpoint's FP8 layout: ``block`` = (rows, cols) of one scale, or None (one scale per tensor)."""

    def __init__(self, block: tuple[int, int] | None):
        self.block = block

    def describe(self) -> str:
        scales = f"{self.block[0]} x {self.block[1]} block scales" if self.block else "one scale per tensor"
        return f"fp8 (float8_e4m3fn weights, {scales})"

    def _expand(self, scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if self.block is None or scale.numel() == 1:
            return scale.reshape([1] * len(shape))
        bo, bi = self.block
        o, i = shape[-2], shape[-1]
        return scale.repeat_interleave(bo, -2)[..., :o, :].repeat_interleave(bi, -1)[..., :i]

    def dequantize(self, w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``w8 * scale_inv`` per block, in ``dtype``."""
        return (w8.float() * self._expand(scale.float(), tuple(w8.shape))).to(dtype)

    def quantize(self, w: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w8, scale_inv) with scale_inv = amax / 448 per block (the scales' shape and dtype as ``like``); zeros stay
        zeros."""
        wf = w.float()
        if self.block is None or like.numel() == 1:
            amax = wf.abs().amax().reshape(like.shape)
        else:
            bo, bi = self.block
            o, i = wf.shape[-2], wf.shape[-1]
            pad = torch.nn.functional.pad(wf.abs(), (0, math.ceil(i / bi) * bi - i, 0, math.ceil(o / bo) * bo - o))
            lead = pad.shape[:-2]
            amax = pad.reshape(*lead, pad.shape[-2] // bo, bo, pad.shape[-1] // bi, bi).amax(dim=(-3, -1))
        scale = (amax.clamp_min(torch.finfo(torch.float32).tiny) / FP8_MAX)
        scale = scale.to(like.dtype)
        w8 = (wf / self._expand(scale.float(), tuple(wf.shape))).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return w8, scale


def weight_format(config, where: str) -> Fp8Format | None:
    """None for a float checkpoint, an ``Fp8Format`` for transformers' FP8; any other ``quantization_config`` raises
    ``UnsupportedModelError`` naming ``where`` and the method."""
    from .discover import UnsupportedModelError
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else (q.to_dict() if hasattr(q, "to_dict") else vars(q))
    method = q.get("quant_method")
    if method == "fp8" and q.get("fmt", "e4m3") == "e4m3":
        block = q.get("weight_block_size")
        return Fp8Format(tuple(int(b) for b in block) if block else None)
    raise UnsupportedModelError(
        f"{where}: the checkpoint is quantized ({method!r} in its config's quantization_config); pyprune prunes "
        "float weights (and FP8 checkpoints): give it the float checkpoint (bf16/fp16) the quantized one was made "
        "from, or dequantize it first")


def dequantize_tensors(tensors: dict[str, torch.Tensor], fmt: Fp8Format,
                       dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A block's checkpoint tensors with every FP8 weight that has its ``_scale_inv`` dequantized (into ``dtype``)
    and the scales taken out; returns (tensors, {weight key: its old scale}) for ``requantize``."""
    out, scales = {}, {}
    for k, v in tensors.items():
        s = tensors.get(k + SCALE_SUFFIX)
        if v.dtype == FP8 and s is not None:
            out[k] = fmt.dequantize(v, s, dtype)
            scales[k] = s
        elif not (k.endswith(SCALE_SUFFIX) and k[:-len(SCALE_SUFFIX)] in tensors
                  and tensors[k[:-len(SCALE_SUFFIX)]].dtype == FP8):
            out[k] = v
    return out, scales


def requantize_tensors(tensors: dict[str, torch.Tensor], fmt: Fp8Format,
                       scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of ``dequantize_tensors`` for the weights it dequantized: FP8 again, with fresh scales."""
    out = dict(tensors)
    for k, s in scales.items():
        out[k], out[k + SCALE_SUFFIX] = fmt.quantize(tensors[k], s)
    return out
