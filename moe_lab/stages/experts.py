"""The experts stage: rows sorted by expert -> gate_up GEMM -> activation -> down GEMM.

Weights stay in Transformers v5's 3D layouts, read straight from the v5 experts module:
- standard: gate_up_proj [E, 2I, H] (gate rows first, then up rows), down_proj [E, H, I];
- GPT-OSS ("transposed"): gate_up_proj [E, H, 2I] with gate/up interleaved in columns,
  gate_up_proj_bias [E, 2I], down_proj [E, I, H], down_proj_bias [E, H];
- non-gated experts (has_gate False): up_proj [E, I, H] instead of gate_up_proj.

`experts_loop` (one expert at a time) is the reference; `experts_grouped_mm` is the same function
through `torch.nn.functional.grouped_mm`; then the fused Triton expert MLP (activation in the GEMM
epilogue: SwiGLU, GPT-OSS's clamped SwiGLU, or non-gated squared ReLU; `triton_gather` also gathers
token rows in its prologue) and TE's GroupedLinear.

Every experts implementation: (x [S, H] rows in expert order, counts [E], offsets [E] int32,
experts_module, ExpertsSpec) -> y [S, H]. Shapes: S rows, H hidden, I expert width, E experts (the
local ones under expert parallelism).
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import Capabilities, register_stage
from ._requires import FLOATS, TE, TRITON, kernels, te, why_te_unavailable, why_triton_unavailable
from .permute import plan_triton


@dataclass(frozen=True)
class ExpertsSpec:
    """What the expert MLP computes, read off a v5 experts module.

    gated: weights are gate_up_proj (GLU) rather than up_proj.
    transposed: weights are stored [E, in, out] (GPT-OSS) rather than [E, out, in].
    interleaved: gate and up alternate in the gate_up output (GPT-OSS) rather than two halves.
    has_bias: gate_up_proj_bias / down_proj_bias exist.
    activation: "glu" (act_fn(gate) * up), "gpt_oss" (clamped (up + 1) * gate * sigmoid(alpha * gate)),
        or "plain" (act_fn(up), non-gated).
    act_name: the config's hidden_act ("silu", ...), for kernels that fuse it.
    """

    num_experts: int  # all experts of the layer (the routing space), also under expert parallelism
    gated: bool = True
    transposed: bool = False
    interleaved: bool = False
    has_bias: bool = False
    activation: str = "glu"
    act_name: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    @property
    def activation_key(self) -> str:
        """What the expert MLP computes, as experts implementations declare it: "glu:<act>",
        "plain:<act>" (non-gated) or "gpt_oss" (clamped interleaved SwiGLU)."""
        return "gpt_oss" if self.activation == "gpt_oss" else f"{self.activation}:{self.act_name}"


def activation_fn(module: nn.Module, spec: ExpertsSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation of the expert MLP: gate_up [S, 2I] -> [S, I] (or up [S, I] -> [S, I] if not gated)."""
    if spec.activation == "gpt_oss":
        def gpt_oss_glu(gate_up):
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            gate = gate.clamp(max=spec.limit)
            up = up.clamp(min=-spec.limit, max=spec.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * spec.alpha))
        return gpt_oss_glu
    act = module.act_fn
    if spec.activation == "plain":
        return act
    if spec.interleaved:
        return lambda gate_up: act(gate_up[..., ::2]) * gate_up[..., 1::2]

    def glu(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return act(gate) * up
    return glu


def first_weight(module: nn.Module, spec: ExpertsSpec) -> torch.Tensor:
    return module.gate_up_proj if spec.gated else module.up_proj


def first_bias(module: nn.Module, spec: ExpertsSpec) -> torch.Tensor | None:
    if not spec.has_bias:
        return None
    return module.gate_up_proj_bias if spec.gated else module.up_proj_bias


def no_rows(x: torch.Tensor, module: nn.Module, spec: ExpertsSpec) -> torch.Tensor:
    """y [0, H] for experts that got no row, connected to every expert weight (zero gradients), so
    backward reaches the weights on every rank alike (expert parallelism: one rank's experts may get
    nothing while the others' gradient hooks and collectives run)."""
    w1, w2 = first_weight(module, spec), module.down_proj
    out = x.new_zeros(0, w2.shape[-1] if spec.transposed else w2.shape[1], dtype=w1.dtype)
    return out + (w1.sum() + w2.sum()) * 0 if torch.is_grad_enabled() and w1.requires_grad else out


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """x [n, in] with one expert's weight ([out, in], or [in, out] if transposed) -> [n, out]."""
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def experts_loop(x: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor, module: nn.Module, spec: ExpertsSpec) -> torch.Tensor:
    """Reference: x [S, H] rows in expert order, counts [E] -> y [S, H], one expert at a time."""
    act = activation_fn(module, spec)
    w1, b1 = first_weight(module, spec), first_bias(module, spec)
    w2, b2 = module.down_proj, (module.down_proj_bias if spec.has_bias else None)
    pieces, start = [], 0
    for expert, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        rows = x[start : start + count].to(w1.dtype)
        hidden = act(_linear(rows, w1[expert], None if b1 is None else b1[expert], spec.transposed))
        pieces.append(_linear(hidden, w2[expert], None if b2 is None else b2[expert], spec.transposed))
        start += count
    if not pieces:
        return no_rows(x, module, spec)
    return torch.cat(pieces)


def _alignment_pad(size: int, dtype: torch.dtype) -> int:
    """Elements to add so a row of `size` elements spans a multiple of 16 bytes (grouped_mm needs it)."""
    per16 = 16 // torch.empty((), dtype=dtype).element_size()
    return (-size) % per16


def _grouped_mm_layout_ok(t: torch.Tensor) -> bool:
    """grouped_mm reads a matrix with one unit stride and the other a multiple of 16 bytes; a
    transpose view of v5's [E, out, in] weights qualifies and must not be copied."""
    row, col = t.stride(-2), t.stride(-1)
    size = t.element_size()
    return (col == 1 and row * size % 16 == 0) or (row == 1 and col * size % 16 == 0)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [S, K] rows in expert order, weight [E, K, N] (any strides), offsets [E] int32 -> [S, N].

    `torch.nn.functional.grouped_mm` wants 16-byte aligned strides; odd K or N are zero-padded
    (exact: padded columns contribute zeros) so any shape works. Aligned shapes, transposed views
    included, go straight through: the weights are never copied. Under autocast an activation may
    arrive in float32 (its op is autocast's float32 list, e.g. relu2's square); it is cast to the
    weights' dtype, as v5's grouped_mm experts do (grouped_mm is not autocast-aware).
    """
    x = x.to(weight.dtype)
    pad_k, pad_n = _alignment_pad(x.shape[1], x.dtype), _alignment_pad(weight.shape[2], x.dtype)
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[2])
    # torch.compile's fake grouped_mm takes bf16 only; other dtypes (float32 on the CPU, which eager
    # runs) go through an opaque op of the same math when traced
    mm = _grouped_mm_op if torch.compiler.is_compiling() and x.dtype != torch.bfloat16 else _grouped_mm_eager
    if pad_k or pad_n or not (_grouped_mm_layout_ok(x) and _grouped_mm_layout_ok(weight)):
        xp = F.pad(x, (0, pad_k))
        wp = F.pad(weight, (0, pad_n, 0, pad_k))
        return mm(xp, wp, offsets)[:, : weight.shape[2]]
    return mm(x, weight, offsets)


def _grouped_mm_eager(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x, weight, offs=offsets)


@torch.library.custom_op("moe_lab::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`F.grouped_mm` as an op torch.compile does not look into: x [S, K], weight [E, K, N] -> [S, N]."""
    return F.grouped_mm(x, weight, offs=offsets)


@torch.library.custom_op("moe_lab::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad_op(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per expert x_e^T @ grad_e: x [S, K], grad [S, N] -> [E, K, N]."""
    return F.grouped_mm(x.t(), grad, offs=offsets)


@_grouped_mm_op.register_fake
def _(x, weight, offsets):
    return x.new_empty(x.shape[0], weight.shape[2])


@_grouped_mm_weight_grad_op.register_fake
def _(x, grad, offsets):
    return x.new_empty(offsets.shape[0], x.shape[1], grad.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    x, weight, offsets = inputs
    ctx.save_for_backward(x, weight, offsets)


def _grouped_mm_backward(ctx, grad):
    x, weight, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = _grouped_mm_op(grad, weight.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    grad_w = _grouped_mm_weight_grad_op(x, grad, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether torch's grouped_mm runs this dtype on this device (CUDA kernels want bf16/fp16, sm80+)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cuda":
        return x.dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def experts_grouped_mm(x: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor, module: nn.Module, spec: ExpertsSpec) -> torch.Tensor:
    """x [S, H] rows in expert order -> y [S, H] with two grouped GEMMs; same math as `experts_loop`."""
    w1, b1 = first_weight(module, spec), first_bias(module, spec)
    w2, b2 = module.down_proj, (module.down_proj_bias if spec.has_bias else None)
    x = x.to(w1.dtype)
    if x.shape[0] == 0:
        return no_rows(x, module, spec)
    if not grouped_mm_supported(x):  # the registry's plan sends such layers to the eager experts
        raise TypeError(f"torch experts: torch.nn.functional.grouped_mm has no {x.dtype} kernel on {x.device}; "
                        "use the eager experts (moe_backend={'experts': 'eager'}) or another dtype")
    # grouped_mm takes [E, in, out]; v5's standard layout is [E, out, in].
    w1_io = w1 if spec.transposed else w1.transpose(1, 2)
    w2_io = w2 if spec.transposed else w2.transpose(1, 2)
    expert_of_row = None
    if spec.has_bias:
        experts = torch.arange(counts.numel(), device=x.device)  # local experts under expert parallelism
        expert_of_row = torch.repeat_interleave(experts, counts, output_size=x.shape[0])
    hidden = grouped_mm(x, w1_io, offsets)
    if b1 is not None:
        hidden = hidden + b1[expert_of_row]
    hidden = activation_fn(module, spec)(hidden)
    out = grouped_mm(hidden, w2_io, offsets)
    if b2 is not None:
        out = out + b2[expert_of_row]
    return out


# ---- Triton: the fused expert MLP ------------------------------------------------------------
# ExpertsSpec.activation_key -> the fused kernels' activation; the registry declares these keys.
# "plain:relu2": non-gated experts (Nemotron-H), whose up_proj goes where gate_up_proj would
# (first_weight / first_bias), squared ReLU in the epilogue.
_KERNEL_ACTIVATION = {"glu:silu": "swiglu", "glu:swish": "swiglu", "gpt_oss": "gpt_oss", "plain:relu2": "relu2"}
TRITON_ACTIVATIONS = tuple(_KERNEL_ACTIVATION)


def _fused_activation(spec: ExpertsSpec) -> str:
    """The kernels' activation for this layer; the registry's plan never sends another one here."""
    try:
        return _KERNEL_ACTIVATION[spec.activation_key]
    except KeyError:
        raise ValueError(f"triton experts: no fused kernel for activation {spec.activation_key!r}; "
                         f"they compute {', '.join(TRITON_ACTIVATIONS)}") from None


def _mlp_weights(module, spec: ExpertsSpec, activation: str) -> dict:
    """The keyword arguments of triton_kernels' expert MLPs for a v5 experts module, besides the
    weights (``first_weight``: gate_up_proj, or up_proj for non-gated experts; down_proj)."""
    return dict(
        activation=activation,
        gate_up_bias=first_bias(module, spec),
        down_bias=module.down_proj_bias if spec.has_bias else None,
        transposed=spec.transposed,
        concatenated=not spec.interleaved,
        alpha=spec.alpha,
        limit=spec.limit,
    )


def experts_triton(x, counts, offsets, module, spec: ExpertsSpec):
    """x [S, H] rows in expert order -> y [S, H] through the fused Triton expert MLP."""
    activation = _fused_activation(spec)
    w1 = first_weight(module, spec)
    return kernels().expert_mlp(x.to(w1.dtype), w1, module.down_proj, offsets, **_mlp_weights(module, spec, activation))


def gathered_experts_triton(hidden, ids, weights, module, spec: ExpertsSpec, choice):
    """Permutation, experts and combine with the gather in the gate_up GEMM's prologue: the permuted
    copy of the rows [S, H] is neither written nor kept for backward. hidden [T, H] -> out [T, H]."""
    activation = _fused_activation(spec)
    perm = plan_triton(ids, spec.num_experts)
    w1 = first_weight(module, spec)
    out_rows = kernels().expert_mlp_gathered(
        hidden.to(w1.dtype), perm.slot_of_row, perm.inverse, perm.top_k, w1, module.down_proj, perm.offsets,
        **_mlp_weights(module, spec, activation))
    return choice.combine(out_rows, perm, weights, hidden.dtype)


# ---- TransformerEngine: GroupedLinear over views of v5's 3D weights --------------------------
class GroupedProjection:
    """A TE GroupedLinear (built on the meta device, so it owns no weights) that computes
    y_e = x_e @ W_e^T (+ b_e) with W_e the views of one [E, out, in] tensor given at each call."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, has_bias: bool, dtype: torch.dtype):
        te_pytorch = te()
        self.num_experts = num_experts
        self.has_bias = has_bias
        self.linear = te_pytorch.GroupedLinear(num_experts, in_features, out_features, bias=has_bias,
                                       params_dtype=dtype, device="meta")
        for i in range(num_experts):
            self.linear._parameters.pop(f"weight{i}", None)
            self.linear._parameters.pop(f"bias{i}", None)
        self._no_bias = {}

    def __call__(self, x: torch.Tensor, m_splits: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """x [S, in] in expert order, m_splits [E] int64 (CPU), weight [E, out, in], bias [E, out] -> [S, out]."""
        weights = weight.unbind(0)  # views; autograd stacks their grads into weight.grad once
        if bias is not None:
            biases = bias.unbind(0)
        else:
            key = (x.device, weight.dtype)
            if key not in self._no_bias:
                self._no_bias[key] = torch.empty(0, device=x.device, dtype=weight.dtype)
            biases = [self._no_bias[key]] * self.num_experts
        for i in range(self.num_experts):
            self.linear.__dict__[f"weight{i}"] = weights[i]
            self.linear.__dict__[f"bias{i}"] = biases[i]
        try:
            return self.linear(x, m_splits)
        finally:
            for i in range(self.num_experts):  # keep no reference to this step's graph
                self.linear.__dict__[f"weight{i}"] = None
                self.linear.__dict__[f"bias{i}"] = None


_PROJECTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _projections(module, spec: ExpertsSpec, w1: torch.Tensor, w2: torch.Tensor):
    """(gate_up, down) GroupedProjections for a v5 experts module, built once (not submodules, so
    the module's state_dict is v5's)."""
    cached = _PROJECTIONS.get(module)
    E = w1.shape[0]
    if cached is None or cached[0].num_experts != E:
        if spec.transposed:  # [E, in, out]
            (_, in1, out1), (_, in2, out2) = w1.shape, w2.shape
        else:  # [E, out, in]
            (_, out1, in1), (_, out2, in2) = w1.shape, w2.shape
        cached = (GroupedProjection(E, in1, out1, spec.has_bias, w1.dtype),
                  GroupedProjection(E, in2, out2, spec.has_bias, w2.dtype))
        _PROJECTIONS[module] = cached
    return cached


def _out_in(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """[E, out, in] for GroupedLinear; v5's transposed layout [E, in, out] is copied (see module doc)."""
    return weight.transpose(1, 2).contiguous() if transposed else weight


def _select_grouped_gemm(cutlass: bool) -> None:
    """TE picks its grouped GEMM from NVTE_USE_CUTLASS_GROUPED_GEMM at each call: set it for this call."""
    os.environ["NVTE_USE_CUTLASS_GROUPED_GEMM"] = "1" if cutlass else "0"


def experts_te(x, counts, offsets, module, spec: ExpertsSpec, cutlass: bool = False):
    """x [S, H] rows in expert order, counts [E] -> y [S, H]: TE GroupedLinear, activation, GroupedLinear."""
    _select_grouped_gemm(cutlass)
    w1, b1 = first_weight(module, spec), first_bias(module, spec)
    w2, b2 = module.down_proj, (module.down_proj_bias if spec.has_bias else None)
    x = x.to(w1.dtype)
    if x.shape[0] == 0:  # no row reached these experts: GroupedLinear needs at least one
        return no_rows(x, module, spec)
    gate_up, down = _projections(module, spec, w1, w2)
    m_splits = counts.to("cpu", torch.int64)
    hidden = gate_up(x.contiguous(), m_splits, _out_in(w1, spec.transposed), b1)
    hidden = activation_fn(module, spec)(hidden).to(w2.dtype)  # autocast: see grouped_mm
    return down(hidden.contiguous(), m_splits, _out_in(w2, spec.transposed), b2)


def experts_te_cutlass(x, counts, offsets, module, spec: ExpertsSpec):
    """`experts_te` with TE's CUTLASS grouped GEMM."""
    return experts_te(x, counts, offsets, module, spec, cutlass=True)


# ---- registrations ---------------------------------------------------------------------------
def _no_grouped_mm():
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm; install torch>=2.10"
    return None


# torch.nn.functional.grouped_mm: bf16/fp16 on CUDA (sm80+), any float on the CPU
GROUPED_MM = Capabilities(dtypes={"cuda": frozenset({torch.bfloat16, torch.float16}), "cpu": FLOATS})
TRITON_EXPERTS = replace(TRITON, activations=frozenset(TRITON_ACTIVATIONS))

register_stage("experts", "eager", experts_loop, description="per-expert loop of F.linear")
register_stage("experts", "torch", experts_grouped_mm, _no_grouped_mm, description="torch.nn.functional.grouped_mm",
               caps=GROUPED_MM)
register_stage("experts", "triton", experts_triton, why_triton_unavailable,
               description="fused grouped GEMM MLP (activation in epilogue)", caps=TRITON_EXPERTS)
register_stage("experts", "triton_gather", experts_triton, why_triton_unavailable,
               description="fused expert MLP; with the triton permutation, the gather runs in the GEMM prologue",
               caps=replace(TRITON_EXPERTS, fuses_with="triton"), fused=gathered_experts_triton)
register_stage("experts", "te", experts_te, why_te_unavailable,
               description="TransformerEngine GroupedLinear over views of v5's 3D weights", caps=TE)
register_stage("experts", "te_cutlass", experts_te_cutlass, why_te_unavailable,
               description="as te, with NVTE_USE_CUTLASS_GROUPED_GEMM=1 (process-wide)", caps=TE)
