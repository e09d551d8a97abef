"""QuantLinear: an nn.Linear stored as packed int4/int8 codes with scales, run through integer GEMMs.

Buffers use the compressed-tensors names where they fit: weight_packed (uint8 [N, K / 2] for
int4, two codes per byte along K as quantvla_kernels.pack_int4 lays them out; int8 [N, K] for
int8), weight_scale (float32 [N] or [N, K / group_size]), weight_shape (int64 [N, K]), bias
(the original dtype), input_scale (float32 [K], static activation scales only) and the input
transform's steps as input_<step>: input_smooth, input_perm, and each rotation as Hadamard signs
(input_rotation1_signs, int8 [K / b, b]) or dense blocks (input_rotation1, float32 [K / b, b, b]),
and weight_sum (int32, shaped as weight_scale: the codes' sums per channel or group) when
activations are quantized with a zero point.

forward: x -> transform (float32) -> activation quantization -> integer GEMM -> x's dtype; on the
Triton path the transform (unless it has dense rotation blocks) and the quantization are one kernel.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantvla_kernels import code_sums, fuses_transform, pack_int4, quantized_matmul, unpack_int4
from quantvla_ros.quant.activations import ActivationQuantizer
from quantvla_ros.quant.transforms import InputTransform
from quantvla_ros.quant.weights import (
    DEFAULT_CLIP_GRID,
    QuantizedWeight,
    check_bits_and_group,
    dequantize_weight,
    quantize_weight,
)


class QuantLinear(nn.Module):
    """y = x @ Wᵀ + b with W held only as quantized codes; build with from_float or empty."""

    def __init__(
        self,
        weight_packed: torch.Tensor,
        weight_scale: torch.Tensor,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        w_bits: int,
        a_bits: int,
        group_size: int | None = None,
        transform: InputTransform | None = None,
        input_scale: torch.Tensor | None = None,
        weight_sum: torch.Tensor | None = None,
    ) -> None:
        """weight_sum: the codes' sums (code_sums) when activations carry a zero point, else None."""
        super().__init__()
        self.act = _check_config(
            "QuantLinear", in_features, w_bits, a_bits, group_size, transform, input_scale, weight_sum is not None
        )
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.group_size = w_bits, a_bits, group_size
        self.transform_kind = None if transform is None else transform.kind

        self.register_buffer("weight_packed", weight_packed)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        self.register_buffer("bias", bias)
        for name, t in ({} if transform is None else transform.state_tensors()).items():
            self.register_buffer(f"input_{name}", t)
        self.register_buffer("input_scale", input_scale)
        self.register_buffer("weight_sum", weight_sum)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        w_bits: int,
        a_bits: int,
        group_size: int | None = None,
        transform: InputTransform | None = None,
        input_scale: torch.Tensor | None = None,
        clip_grid: Sequence[float] = DEFAULT_CLIP_GRID,
        asymmetric: bool = False,
    ) -> QuantLinear:
        """Quantize linear's weight (folded through transform) and keep no float copy of it.

        input_scale [K] switches on static activation scales (activations.percentile_channel_scales
        of the *transformed* calibration inputs); it is folded into the weight columns here.
        asymmetric: quantize activations per token with a zero point (the codes' sums are kept).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_float: expected an nn.Linear, got {type(linear).__name__}.")
        _check_config(
            "QuantLinear.from_float", linear.in_features, w_bits, a_bits, group_size, transform, input_scale, asymmetric
        )
        device = linear.weight.device
        w = linear.weight.detach().float()
        if transform is not None:
            transform = InputTransform.from_tensors({n: t.to(device) for n, t in transform.state_tensors().items()})
            w = transform.fold(w)
        if input_scale is not None:
            input_scale = input_scale.detach().float().to(device)
            w = w * input_scale
        qw = quantize_weight(w, w_bits, group_size, clip_grid)
        return cls(
            weight_packed=pack_int4(qw.q) if w_bits == 4 else qw.q,
            weight_scale=qw.scale,
            in_features=linear.in_features,
            out_features=linear.out_features,
            bias=None if linear.bias is None else linear.bias.detach().clone(),
            w_bits=w_bits,
            a_bits=a_bits,
            group_size=group_size,
            transform=transform,
            input_scale=input_scale,
            weight_sum=code_sums(qw.q, group_size) if asymmetric else None,
        )

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: bool,
        w_bits: int,
        a_bits: int,
        group_size: int | None = None,
        transform_kind: str | None = None,
        block_size: int = 64,
        static_input: bool = False,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        asymmetric_activations: bool = False,
    ) -> QuantLinear:
        """A layer with zero buffers of the right shapes (any device, meta included) to load a state_dict into.

        transform_kind is the saved layer's InputTransform.kind; block_size its rotation block size.
        """
        input_scale = torch.zeros(in_features, dtype=torch.float32, device=device) if static_input else None
        _check_config(
            "QuantLinear.empty", in_features, w_bits, a_bits, group_size, None, input_scale, asymmetric_activations
        )
        packed = (out_features, in_features // 2) if w_bits == 4 else (out_features, in_features)
        scale_shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        weight_sum = torch.zeros(scale_shape, dtype=torch.int32, device=device) if asymmetric_activations else None
        transform = None
        if transform_kind is not None:
            transform = InputTransform.from_tensors(
                InputTransform.empty_tensors(transform_kind, in_features, block_size, device)
            )
        return cls(
            weight_packed=torch.zeros(packed, dtype=torch.uint8 if w_bits == 4 else torch.int8, device=device),
            weight_scale=torch.zeros(scale_shape, dtype=torch.float32, device=device),
            in_features=in_features,
            out_features=out_features,
            bias=torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None,
            w_bits=w_bits,
            a_bits=a_bits,
            group_size=group_size,
            transform=transform,
            input_scale=input_scale,
            weight_sum=weight_sum,
        )

    def spec(self) -> dict:
        """JSON-ready arguments of empty() that rebuild this layer's shapes (an artifact records one per layer)."""
        transform = self.transform
        block_size = None if transform is None else transform.block_size
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "group_size": self.group_size,
            "transform_kind": self.transform_kind,
            "block_size": 64 if block_size is None else block_size,
            "static_input": self.act.static,
            "bias_dtype": None if self.bias is None else str(self.bias.dtype).removeprefix("torch."),
            "asymmetric_activations": self.act.asymmetric,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], device: torch.device | str | None = None) -> QuantLinear:
        """An empty layer from spec(), ready for load_state_dict."""
        spec = dict(spec)
        unknown = set(spec) - set(inspect.signature(cls.empty).parameters)
        if unknown:
            raise ValueError(f"QuantLinear.from_spec: unknown keys {sorted(unknown)}; the spec must come from spec().")
        name = spec.pop("bias_dtype", None) or "float32"
        bias_dtype = getattr(torch, str(name), None)
        if not isinstance(bias_dtype, torch.dtype):
            raise ValueError(
                f"QuantLinear.from_spec: bias_dtype must name a torch dtype like 'bfloat16', got {name!r}."
            )
        return cls.empty(**spec, bias_dtype=bias_dtype, device=device)

    @property
    def transform(self) -> InputTransform | None:
        # Built around the buffers and kept while they are the same tensors; .to(device) and loading a
        # state dict with assign=True replace them, and then it is built again around the new ones.
        if self.transform_kind is None:
            return None
        tensors = {n: getattr(self, f"input_{n}") for n in self.transform_kind.split("+")}
        built = self.__dict__.get("_transform")
        if built is None or any(getattr(built, n) is not t for n, t in tensors.items()):
            built = self.__dict__["_transform"] = InputTransform.from_tensors(tensors)
        return built

    def weight_codes(self) -> torch.Tensor:
        """The int8 codes [N, K] (unpacked for int4)."""
        if self.w_bits == 4:
            return unpack_int4(self.weight_packed, self.in_features)
        return self.weight_packed

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [N, K] the layer multiplies transformed inputs by (for tests and reports)."""
        return dequantize_weight(QuantizedWeight(self.weight_codes(), self.weight_scale, self.w_bits, self.group_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: input must be [..., {self.in_features}], got shape {tuple(x.shape)}.")
        x2d = x.reshape(-1, self.in_features)
        if fuses_transform(x2d, self):
            # x as it comes, in its own dtype: the kernel reads it once and does all of the float32 math.
            y = quantized_matmul(x2d, self, x.dtype, fuse_transform=True)
        else:
            x2d = x2d.float()
            transform = self.transform
            if transform is not None:
                x2d = transform.apply(x2d)
            y = _quantized_matmul(x2d, self, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def scale_output_rows(self, factor: torch.Tensor) -> None:
        """Multiply output channel n by factor[n], exactly, through the scales and bias (folds ATM α / OHB β)."""
        factor = factor.detach().to(device=self.weight_scale.device, dtype=torch.float32)
        if factor.shape != (self.out_features,):
            raise ValueError(
                f"QuantLinear.scale_output_rows: factor must be [{self.out_features}], got {tuple(factor.shape)}."
            )
        self.weight_scale.mul_(factor if self.group_size is None else factor[:, None])
        if self.bias is not None:
            self.bias.copy_(self.bias.float() * factor)

    def weight_bytes(self) -> int:
        """Bytes of what replaces the float weight: codes, scales, code sums, transform and static input scales."""
        names = ["weight_packed", "weight_scale", "weight_sum", "input_scale"]
        names += [f"input_{n}" for n in (self.transform_kind or "").split("+") if n]
        return sum(t.numel() * t.element_size() for n in names if (t := getattr(self, n)) is not None)

    def _apply(self, fn: Callable, recurse: bool = True) -> QuantLinear:
        # model.to(torch.bfloat16) must not round the scales or the dense rotations: those stay float32
        # and only follow the device (int8 Hadamard signs are never cast). The bias follows the model's
        # dtype like any float tensor.
        keep = {n: getattr(self, n) for n in self._float32_buffers()}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    def _float32_buffers(self) -> list[str]:
        names = ["weight_scale", "input_smooth", "input_rotation1", "input_rotation2", "input_scale"]
        return [n for n in names if getattr(self, n, None) is not None]

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
            f"w_bits={self.w_bits}",
            f"a_bits={self.a_bits}",
            f"group_size={self.group_size}",
        ]
        if self.transform_kind is not None:
            parts.append(f"transform={self.transform_kind}")
        if self.act.static:
            parts.append("static_input=True")
        if self.act.asymmetric:
            parts.append("asymmetric_activations=True")
        return ", ".join(parts)


def _check_config(
    fn: str,
    in_features: int,
    w_bits: int,
    a_bits: int,
    group_size: int | None,
    transform: InputTransform | None,
    input_scale: torch.Tensor | None,
    asymmetric: bool = False,
) -> ActivationQuantizer:
    """Every check a layer's settings need, before any work is spent quantizing it."""
    check_bits_and_group(fn, w_bits, group_size, in_features)
    if w_bits == 4 and in_features % 2:
        raise ValueError(f"{fn}: int4 packs two codes per byte, so in_features must be even, got {in_features}.")
    if transform is not None and transform.in_features != in_features:
        raise ValueError(f"{fn}: the input transform has {transform.in_features} channels, the layer {in_features}.")
    if input_scale is not None and input_scale.shape != (in_features,):
        raise ValueError(f"{fn}: input_scale must be [K]=[{in_features}], got {tuple(input_scale.shape)}.")
    return ActivationQuantizer(a_bits, static=input_scale is not None, asymmetric=asymmetric)


def _quantized_matmul(x: torch.Tensor, layer: QuantLinear, out_dtype: torch.dtype) -> torch.Tensor:
    """Transformed float32 x [M, K] through layer's quantized weight -> y [M, N] in out_dtype.

    The one dispatch point for the GEMM: quantvla_kernels.quantized_matmul runs the Triton
    kernels on CUDA (quantization, packed int4 read in place) and the exact integer reference on
    the CPU, with identical results. Weight-only layers (16-bit activations) dequantize instead.
    """
    if layer.act.is_float:
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x, layer.dequantized_weight(), bias).to(out_dtype)
    return quantized_matmul(x, layer, out_dtype)
