"""The experts stage with LoRA on v5's 3D expert weights: base grouped GEMM plus a low-rank update
per expert over the same expert-sorted rows.

For a targeted weight W (gate_up_proj / up_proj, down_proj) and a row x of expert e::

    x @ W_e (+ b_e) + scale * (x @ A_e) @ B_e        A [E, in, r], B [E, r, out] (GEMM orientation)

which is x @ (W_e + scale * A_e @ B_e), what PEFT computes by adding the delta to the weight; here
the per-expert delta weights [E, in, out] are never formed. Implementations, each
(x [S, H] rows in expert order, counts [E], offsets [E] int32, ExpertsLoRA, ExpertsSpec) -> y [S, H]:

- `lora_experts_loop`: one expert at a time (the reference, the definition of right);
- `lora_experts_grouped_mm`: torch's grouped_mm for the base and for each factor (x @ A, then @ B),
  as one autograd Function (`GroupedLoRAMLP`) for a frozen base: kept for backward are the rows,
  the gate_up output [S, 2I] and u = x @ A [S, r]; the activation is recomputed from gate_up, the
  factors are cast again (not kept in the weights' dtype);
- `gathered_lora_experts_grouped_mm`: with the eager, torch or triton permutation, permutation +
  experts + combine, the row gather inside `GroupedLoRAMLP`: the token rows [T, H] and the index
  are kept, not the permuted rows [S, H];
- `lora_experts_triton`: `triton_kernels.lora_gemm.grouped_lora_linear`: u = x @ A_e as one grouped
  GEMM, the update added in the base GEMM's epilogue (the [S, out] output written once); backward
  by grouped GEMMs (no weight gradient for a frozen base). The activation is the down projection's
  prologue, recomputed in backward: only the gate_up output [S, 2I] is kept between the GEMMs;
- `gathered_lora_experts_triton`: with the triton permutation, permutation + experts + combine,
  the row gather the gate_up projection's prologue: the token rows [T, H] are kept, not [S, H].

The activation between the two GEMMs is moe_lab's (`activation_fn`), so every family's expert MLP
(SwiGLU, GPT-OSS's clamped interleaved SwiGLU with biases, non-gated relu2) takes LoRA.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import StageImpl, StageChoice, StageRefusedError
from ..stages._requires import kernels
from ..stages.experts import (
    ExpertsSpec, _alignment_pad, _grouped_mm_layout_ok, _linear, activation_fn, first_bias, first_weight, grouped_mm,
    grouped_mm_supported, no_rows,
)
from ..stages.permute import plan_eager, plan_sorted, plan_triton


@dataclass
class LoRAFactors:
    """The low-rank update of one targeted expert weight, in GEMM orientation: a [E, in, r],
    b [E, r, out] (any strides; the update of expert e is scale * a[e] @ b[e], [in, out])."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[-1]


def first_weight_name(spec: ExpertsSpec) -> str:
    return "gate_up_proj" if spec.gated else "up_proj"


class ExpertsLoRA:
    """A v5 experts module seen with LoRA factors on some of its weights: reads every tensor of the
    module (`gate_up_proj`, `down_proj`, biases, `act_fn`) through to it, and holds
    `lora = {weight name: LoRAFactors}`. Experts stage implementations take it in place of the
    module; `no_rows` and `activation_fn` work on it unchanged."""

    def __init__(self, module: nn.Module, lora: dict):
        self.__dict__["module"] = module
        self.__dict__["lora"] = lora

    def __getattr__(self, name):
        return getattr(self.__dict__["module"], name)

    @property
    def requires_grad(self) -> bool:
        return any(f.a.requires_grad or f.b.requires_grad for f in self.lora.values())


def _factors_for(module: ExpertsLoRA, spec: ExpertsSpec, dtype: torch.dtype):
    """(first weight's factors or None, down_proj's factors or None), in the weights' dtype (b contiguous)."""
    def cast(f):
        if f is None:
            return f
        a, b = _cast_factors(f.a, f.b, dtype)
        return f if a is f.a and b is f.b else LoRAFactors(a, b, f.scale)
    return cast(module.lora.get(first_weight_name(spec))), cast(module.lora.get("down_proj"))


def _lora_no_rows(x: torch.Tensor, module: ExpertsLoRA, spec: ExpertsSpec) -> torch.Tensor:
    """`no_rows`, also connected to every LoRA factor (zero gradients, as PEFT's merged weight gives)."""
    out = no_rows(x, module, spec)
    if torch.is_grad_enabled() and module.requires_grad:
        out = out + sum(f.a.sum() + f.b.sum() for f in module.lora.values()) * 0
    return out


def _io(weight: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """A weight as [E, in, out] (a transpose view of v5's [E, out, in] standard layout)."""
    return weight if spec.transposed else weight.transpose(1, 2)


# ---- the reference ---------------------------------------------------------------------------
def lora_experts_loop(x, counts, offsets, module: ExpertsLoRA, spec: ExpertsSpec) -> torch.Tensor:
    """Reference: x [S, H] rows in expert order, counts [E] -> y [S, H], one expert at a time,
    each projection x @ W_e (+ b_e) + scale * (x @ A_e) @ B_e."""
    act = activation_fn(module, spec)
    w1, b1 = first_weight(module, spec), first_bias(module, spec)
    w2, b2 = module.down_proj, (module.down_proj_bias if spec.has_bias else None)
    l1, l2 = _factors_for(module, spec, w1.dtype)

    def project(rows, weight, bias, factors, e):
        out = _linear(rows, weight[e], None if bias is None else bias[e], spec.transposed)
        if factors is not None:
            out = out + ((rows @ factors.a[e]) @ factors.b[e]) * factors.scale
        return out

    pieces, start = [], 0
    for expert, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        rows = x[start : start + count].to(w1.dtype)
        hidden = act(project(rows, w1, b1, l1, expert))
        pieces.append(project(hidden, w2, b2, l2, expert))
        start += count
    if not pieces:
        return _lora_no_rows(x, module, spec)
    return torch.cat(pieces)


# ---- torch grouped_mm ------------------------------------------------------------------------
def _grouped_lora(x, weight_io, bias, factors, offsets, expert_of_row):
    out = grouped_mm(x, weight_io, offsets)
    if factors is not None:
        out = out + grouped_mm(grouped_mm(x, factors.a, offsets), factors.b, offsets) * factors.scale
    return out if bias is None else out + bias[expert_of_row]


def _composed_lora_mlp(x, offsets, module: ExpertsLoRA, spec: ExpertsSpec, expert_of_row):
    """The LoRA expert MLP as plain autograd ops (x [S, H] rows in expert order -> [S, H]): what
    `GroupedLoRAMLP` computes, kept for backward by autograd op by op (the rows, the factors' casts,
    the activation's output and intermediates). Runs where that Function does not: a base weight or
    bias that trains, or a forward torch.compile traces."""
    w1, b1 = first_weight(module, spec), first_bias(module, spec)
    w2, b2 = module.down_proj, (module.down_proj_bias if spec.has_bias else None)
    l1, l2 = _factors_for(module, spec, w1.dtype)
    hidden = activation_fn(module, spec)(_grouped_lora(x, _io(w1, spec), b1, l1, offsets, expert_of_row))
    return _grouped_lora(hidden.to(w2.dtype), _io(w2, spec), b2, l2, offsets, expert_of_row)  # autocast: see grouped_mm


def _col_major(t: torch.Tensor) -> bool:
    """aten's test in `_grouped_mm_mat{1,2}_backward`: the last two dims stored column-major."""
    return t.stride(-2) == 1 and t.stride(-1) == t.shape[-2]


def _grouped_mm_grads(grad, x, weight, offsets, need_x: bool, need_w: bool):
    """(d x, d weight) of `grouped_mm(x, weight, offsets)` (x [S, K], weight [E, K, N], grad [S, N]),
    formed as autograd forms them through that wrapper: its zero padding of misaligned K / N (the
    slice's and the pad's backward) and aten's `_grouped_mm_mat1_backward` / `_mat2_backward` (a
    column-major operand gets its gradient computed transposed). Same ops, so the same bits."""
    K, N = x.shape[1], weight.shape[2]
    pad_k, pad_n = _alignment_pad(K, x.dtype), _alignment_pad(N, x.dtype)
    if pad_k or pad_n or not (_grouped_mm_layout_ok(x) and _grouped_mm_layout_ok(weight)):
        x, weight, grad = F.pad(x, (0, pad_k)), F.pad(weight, (0, pad_n, 0, pad_k)), F.pad(grad, (0, pad_n))
    grad_x = grad_w = None
    if need_x:
        if _col_major(x):
            grad_x = F.grouped_mm(weight, grad.transpose(-2, -1), offs=offsets).transpose(-2, -1)
        else:
            grad_x = F.grouped_mm(grad, weight.transpose(-2, -1), offs=offsets)
        grad_x = grad_x[:, :K]
    if need_w:
        if _col_major(weight):
            grad_w = F.grouped_mm(grad.transpose(-2, -1), x, offs=offsets).transpose(-2, -1)
        else:
            grad_w = F.grouped_mm(x.transpose(-2, -1), grad, offs=offsets)
        grad_w = grad_w[:, :K, :N]
    return grad_x, grad_w


def _cast_factors(a, b, dtype):
    """LoRA factors in the weights' dtype: a as it is laid out, b contiguous (grouped_mm's layout)."""
    if a is None:
        return None, None
    return a.to(dtype), b.to(dtype, memory_format=torch.contiguous_format).contiguous()  # to(): a no-op in b's dtype


def _lora_projection(x, weight_io, bias, a, b, scale, offsets, expert_of_row):
    """(out [S, N], u [S, r] or None): x @ W_e (+ scale * (x @ A_e) @ B_e) (+ b_e), the ops and
    order of `_grouped_lora`, with the low-rank intermediate u = x @ A_e returned."""
    out = grouped_mm(x, weight_io, offsets)
    u = None
    if a is not None:
        u = grouped_mm(x, a, offsets)
        out = out + grouped_mm(u, b, offsets) * scale
    return (out if bias is None else out + bias[expert_of_row]), u


def _lora_projection_grads(grad, x, weight_io, a, b, u, scale, offsets, need_x: bool, need_ab: bool):
    """(d x [S, K] or None, d a, d b) of `_lora_projection` for grad [S, N]; the base weight is frozen."""
    grad_x, _ = _grouped_mm_grads(grad, x, weight_io, offsets, need_x, False)
    if a is None:
        return grad_x, None, None
    grad_v = grad * scale  # [S, N], the low-rank branch's gradient (the scalar product's backward)
    grad_u, grad_b = _grouped_mm_grads(grad_v, u, b, offsets, need_x or need_ab, need_ab)
    grad_x_lora, grad_a = _grouped_mm_grads(grad_u, x, a, offsets, need_x, need_ab)
    return (None if grad_x is None else grad_x + grad_x_lora), grad_a, grad_b


class GroupedLoRAMLP(torch.autograd.Function):
    """The LoRA expert MLP over torch's grouped_mm with a frozen base, keeping little for backward.

    forward(z, a1, b1, a2, b2, index, mlp) -> y [S, H], where the expert-sorted rows are
    x = mlp.gather(z, *index) [S, H] (z: the token rows [T, H] and the permutation's index tensors),
    or z itself ([S, H], no gather)::

        gate_up = x @ W1_e (+ bias1_e) + s1 * (x @ A1_e) @ B1_e        [S, 2I]  (u1 = x @ A1_e [S, r])
        h       = act(gate_up)                                           [S, I]
        y       = h @ W2_e (+ bias2_e) + s2 * (h @ A2_e) @ B2_e         [S, H]   (u2 = h @ A2_e [S, r])

    a1 [E, H, r], b1 [E, r, 2I], a2 [E, I, r], b2 [E, r, H] (any dtype and strides; None for a weight
    without an adapter) are cast to the weights' dtype here and again in backward.

    Saved: z ([T, H] with a gather, k times smaller than x) and the index, gate_up [S, 2I], u1 and
    u2 [S, r], the factors as given (views of PEFT's parameters: no new memory), the weights and
    offsets. Not saved: x (gathered again), the activation's output and intermediates (recomputed
    from gate_up), the factors' casts. Backward forms the products autograd forms for the composed
    ops (`_composed_lora_mlp`: `_grouped_mm_grads`; the gather's and the activation's own backward
    by autograd on their recomputation), so values and gradients are the same bits.
    """

    @staticmethod
    def forward(ctx, z, a1, b1, a2, b2, index, mlp):
        x = z if mlp.gather is None else mlp.gather(z, *index)
        a1c, b1c = _cast_factors(a1, b1, mlp.w1.dtype)
        a2c, b2c = _cast_factors(a2, b2, mlp.w2.dtype)
        gate_up, u1 = _lora_projection(x, mlp.w1, mlp.bias1, a1c, b1c, mlp.scale1, mlp.offsets, mlp.expert_of_row)
        h = mlp.act(gate_up).to(mlp.w2.dtype)
        y, u2 = _lora_projection(h, mlp.w2, mlp.bias2, a2c, b2c, mlp.scale2, mlp.offsets, mlp.expert_of_row)
        ctx.mlp = replace(mlp, expert_of_row=None)  # backward needs no bias
        ctx.autocast = _autocast_state(z.device.type)
        ctx.save_for_backward(z, gate_up, u1, u2, a1, b1, a2, b2, mlp.w1, mlp.w2, mlp.offsets, *index)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, gate_up, u1, u2, a1, b1, a2, b2, w1, w2, offsets, *index = ctx.saved_tensors
        mlp = ctx.mlp
        needs = ctx.needs_input_grad
        need_z, need_1, need_2 = needs[0], needs[1] or needs[2], needs[3] or needs[4]
        a1c, b1c = _cast_factors(a1, b1, w1.dtype)
        a2c, b2c = _cast_factors(a2, b2, w2.dtype)
        with torch.enable_grad(), torch.autocast(z.device.type, **ctx.autocast):
            gate_up = gate_up.detach().requires_grad_()
            h = mlp.act(gate_up).to(w2.dtype)
        grad_h, grad_a2, grad_b2 = _lora_projection_grads(grad_y, h.detach(), w2, a2c, b2c, u2, mlp.scale2, offsets,
                                                          need_x=need_z or need_1, need_ab=need_2)
        grad_z = grad_a1 = grad_b1 = None
        if need_z or need_1:
            (grad_gate_up,) = torch.autograd.grad(h, gate_up, grad_h)
            del h, gate_up
            with torch.enable_grad():
                zz = z.detach().requires_grad_(need_z) if mlp.gather is not None else z.detach()
                x = zz if mlp.gather is None else mlp.gather(zz, *index)
            grad_x, grad_a1, grad_b1 = _lora_projection_grads(grad_gate_up, x.detach(), w1, a1c, b1c, u1, mlp.scale1,
                                                              offsets, need_x=need_z, need_ab=need_1)
            if need_z and mlp.gather is not None:
                (grad_z,) = torch.autograd.grad(x, zz, grad_x)
            else:
                grad_z = grad_x
        return (grad_z, _cast_like(grad_a1, a1), _cast_like(grad_b1, b1), _cast_like(grad_a2, a2),
                _cast_like(grad_b2, b2), None, None)


def _autocast_state(device_type: str) -> dict:
    """torch.autocast(device_type, **state) re-enters forward's autocast (for the activation's recomputation)."""
    return dict(enabled=torch.is_autocast_enabled(device_type), dtype=torch.get_autocast_dtype(device_type))


def _cast_like(grad, factor):
    """A factor's gradient in the factor's dtype (the backward of its cast to the weights' dtype)."""
    return None if grad is None else grad.to(factor.dtype)


@dataclass
class _MLP:
    """What `GroupedLoRAMLP` computes besides its differentiable inputs (weights as [E, in, out])."""

    w1: torch.Tensor
    w2: torch.Tensor
    bias1: torch.Tensor | None
    bias2: torch.Tensor | None
    scale1: float | None
    scale2: float | None
    offsets: torch.Tensor
    expert_of_row: torch.Tensor | None
    act: object
    gather: object = None  # (z [T, H], *index) -> x [S, H] in the weights' dtype, or None: z is x


def _lean_backward_applies(module: ExpertsLoRA, spec: ExpertsSpec) -> bool:
    """Whether `GroupedLoRAMLP` computes this forward: frozen base weights and biases, eager (not traced)."""
    frozen = [first_weight(module, spec), module.down_proj]
    if spec.has_bias:
        frozen += [first_bias(module, spec), module.down_proj_bias]
    return not torch.compiler.is_compiling() and not any(t.requires_grad for t in frozen)


def _lora_mlp_grouped_mm(z, offsets, counts, module: ExpertsLoRA, spec: ExpertsSpec, gather=None, index=()):
    """The expert MLP with LoRA through grouped_mm: rows x = gather(z, *index) (or z) [S, H] -> [S, H]."""
    w1, w2 = first_weight(module, spec), module.down_proj
    expert_of_row = None
    if spec.has_bias:
        experts = torch.arange(counts.numel(), device=z.device)
        num_rows = index[0].numel() if gather is not None else z.shape[0]
        expert_of_row = torch.repeat_interleave(experts, counts, output_size=num_rows)
    if not _lean_backward_applies(module, spec):
        x = z if gather is None else gather(z, *index)
        return _composed_lora_mlp(x, offsets, module, spec, expert_of_row)
    l1, l2 = module.lora.get(first_weight_name(spec)), module.lora.get("down_proj")
    mlp = _MLP(_io(w1, spec), _io(w2, spec), first_bias(module, spec), module.down_proj_bias if spec.has_bias else None,
               None if l1 is None else l1.scale, None if l2 is None else l2.scale, offsets, expert_of_row,
               activation_fn(module, spec), gather)
    return GroupedLoRAMLP.apply(z, *(_ab(l1)), *(_ab(l2)), tuple(index), mlp)


def _ab(factors):
    return (None, None) if factors is None else (factors.a, factors.b)


def lora_experts_grouped_mm(x, counts, offsets, module: ExpertsLoRA, spec: ExpertsSpec) -> torch.Tensor:
    """x [S, H] rows in expert order -> y [S, H]: `torch.nn.functional.grouped_mm` for the base and
    for each factor over the same rows (x @ A_e [S, r], then @ B_e); same math as the reference.
    With a frozen base, `GroupedLoRAMLP`: kept for backward are the rows, gate_up and u, not the
    activation's output and intermediates nor the factors' casts."""
    x = x.to(first_weight(module, spec).dtype)
    if x.shape[0] == 0:
        return _lora_no_rows(x, module, spec)
    if not grouped_mm_supported(x):
        raise TypeError(f"torch LoRA experts: torch.nn.functional.grouped_mm has no {x.dtype} kernel on {x.device}; "
                        "use the eager experts (moe_backend={'experts': 'eager'}) or another dtype")
    return _lora_mlp_grouped_mm(x, offsets, counts, module, spec)


def _gather_triton(tokens, slot_of_row, inverse, *, top_k, dtype):
    return kernels().permute(tokens, slot_of_row, top_k, inverse).to(dtype)


def _gather_torch(tokens, token_of_row, *, dtype):
    return tokens[token_of_row].to(dtype)


# the permutations whose row gather the torch LoRA experts take over: name -> (plan, (perm -> index), gather)
_GATHERS = {
    "triton": (plan_triton, lambda perm: (perm.slot_of_row, perm.inverse), _gather_triton),
    "torch": (plan_sorted, lambda perm: (perm.token_of_row,), _gather_torch),
    "eager": (plan_eager, lambda perm: (perm.token_of_row,), _gather_torch),
}


def gathered_lora_experts_grouped_mm(hidden, ids, weights, module: ExpertsLoRA, spec: ExpertsSpec, choice):
    """Permutation, LoRA experts (grouped_mm) and combine: hidden [T, H] -> out [T, H].

    The choice's permutation plan and row gather (`_GATHERS`, the ops of its permutation stage), then
    `GroupedLoRAMLP` with the gather inside: the token rows [T, H] and the index are kept for
    backward, not the permuted rows [S, H] (k times larger), which backward gathers again; then the
    choice's combine. Same values and gradients as the stages one by one."""
    w1 = first_weight(module, spec)
    name = choice.names["permutation"]
    plan, index_of, gather = _GATHERS[name]
    if hidden.shape[0] == 0 or not grouped_mm_supported(hidden.new_empty(0, dtype=w1.dtype)):
        rows, perm = choice.permutation(hidden, ids, spec.num_experts)
        return choice.combine(lora_experts_grouped_mm(rows, perm.counts, perm.offsets, module, spec), perm, weights,
                              hidden.dtype)
    perm = plan(ids, spec.num_experts)
    keywords = dict(dtype=w1.dtype) | (dict(top_k=perm.top_k) if name == "triton" else {})
    out_rows = _lora_mlp_grouped_mm(hidden, perm.offsets, perm.counts, module, spec,
                                    gather=functools.partial(gather, **keywords), index=index_of(perm))
    return choice.combine(out_rows, perm, weights, hidden.dtype)


# ---- Triton ------------------------------------------------------------------------------------
def _triton_projection(x, weight_io, bias, factors, offsets, prologue=None):
    """[S, N] = rows @ W_e (+ b_e) (+ the LoRA update), rows = prologue(x) (x itself without one).
    With factors the prologue is recomputed in backward, so its output [S, K] is not kept."""
    k = kernels()
    if factors is None:
        return k.grouped_mm(x if prologue is None else prologue(x), weight_io, offsets, bias)
    from triton_kernels.lora_gemm import grouped_lora_linear

    return grouped_lora_linear(x, weight_io, offsets, factors.a, factors.b, factors.scale, bias, prologue)


def _lora_mlp_triton(x, offsets, module: ExpertsLoRA, spec: ExpertsSpec, rows=None) -> torch.Tensor:
    """The expert MLP over expert-sorted rows (rows(x) [S, H], or x itself) -> [S, H].

    Kept for backward: x (not the gathered rows) and the gate_up output [S, 2I] (not the
    activation's [S, I] output nor its intermediate): the down projection takes the activation as
    its prologue and recomputes it in backward."""
    w1, b1 = first_weight(module, spec), first_bias(module, spec)
    w2, b2 = module.down_proj, (module.down_proj_bias if spec.has_bias else None)
    l1, l2 = _factors_for(module, spec, w1.dtype)
    act = activation_fn(module, spec)

    def activation(gate_up):  # [S, 2I] -> [S, I] in the down weight's dtype (autocast: see grouped_mm)
        return act(gate_up).to(w2.dtype)
    gate_up = _triton_projection(x, _io(w1, spec), b1, l1, offsets, rows)
    return _triton_projection(gate_up, _io(w2, spec), b2, l2, offsets, activation)


def lora_experts_triton(x, counts, offsets, module: ExpertsLoRA, spec: ExpertsSpec) -> torch.Tensor:
    """x [S, H] rows in expert order -> y [S, H]: Triton grouped GEMMs with the LoRA update added in
    the base GEMM's epilogue (`triton_kernels.lora_gemm`), the activation between them in PyTorch
    (recomputed in backward, see `_lora_mlp_triton`)."""
    x = x.to(first_weight(module, spec).dtype)
    if x.shape[0] == 0:
        return _lora_no_rows(x, module, spec)
    return _lora_mlp_triton(x, offsets, module, spec)


def gathered_lora_experts_triton(hidden, ids, weights, module: ExpertsLoRA, spec: ExpertsSpec, choice):
    """Permutation, LoRA experts and combine for the triton permutation: hidden [T, H] -> out [T, H].

    The same kernels as the stages one by one (Triton counting sort and row gather,
    `lora_experts_triton`, the choice's combine), but the gather is the gate_up projection's
    prologue: the permuted rows [S, H] are not kept for backward, the token rows [T, H] are (k
    times smaller), and backward gathers again."""
    w1 = first_weight(module, spec)
    if hidden.shape[0] == 0:
        rows, perm = choice.permutation(hidden, ids, spec.num_experts)
        return choice.combine(lora_experts_triton(rows, perm.counts, perm.offsets, module, spec), perm, weights,
                              hidden.dtype)
    perm = plan_triton(ids, spec.num_experts)
    gather = functools.partial(_gather_triton, slot_of_row=perm.slot_of_row, inverse=perm.inverse, top_k=perm.top_k,
                               dtype=w1.dtype)  # [T, H] -> [S, H] in expert order, in the weights' dtype
    out_rows = _lora_mlp_triton(hidden, perm.offsets, module, spec, rows=gather)
    return choice.combine(out_rows, perm, weights, hidden.dtype)


# ---- which LoRA experts run for a planned experts stage ----------------------------------------
# the experts implementation a layer planned -> (its LoRA counterpart, what it computes)
LORA_EXPERTS = {
    "eager": (lora_experts_loop, "per-expert loop: x @ W_e + scale * (x @ A_e) @ B_e"),
    "torch": (lora_experts_grouped_mm, "grouped_mm for the base and for x @ A_e, then @ B_e; the activation "
                                       "recomputed in backward from gate_up (with the eager, torch or triton "
                                       "permutation also the row gather: the token rows kept, not the permuted copy)"),
    "triton": (lora_experts_triton, "Triton grouped GEMM, the LoRA update x @ A_e @ B_e in its epilogue"),
    "triton_gather": (lora_experts_triton, "Triton grouped GEMM, the LoRA update x @ A_e @ B_e in its epilogue "
                                           "(with the triton permutation: the token rows kept for backward, "
                                           "not the permuted copy)"),
}

_CHOICES: dict = {}  # id(planned StageChoice) -> (that choice, substitute?, the LoRA StageChoice, its plan note)


def lora_choice(choice: StageChoice, spec: ExpertsSpec, substitute: bool, expert_parallel: bool,
                weight: torch.Tensor, model_type: str = "?") -> tuple[StageChoice, str]:
    """(the StageChoice to run with LoRA factors on the experts, the note `model.moe_lab_plan` shows).

    The experts stage becomes its LoRA counterpart (`LORA_EXPERTS`); the other stages are kept.
    Experts without one (TransformerEngine's) are refused, or with `substitute` run the torch LoRA
    experts (the eager reference where grouped_mm has no kernel for the weights), said in the note.
    """
    key = (id(choice), substitute, weight.device.type, weight.dtype)
    cached = _CHOICES.get(key)
    if cached is not None and cached[0] is choice:
        return cached[1], cached[2]
    if expert_parallel:
        raise StageRefusedError(f"moe_lab: LoRA on {model_type}'s experts is not supported under expert parallelism "
                                "(ep_size > 1): train LoRA with ep_size=1, or target attention only")
    asked = choice.names["experts"]
    why = None
    if asked in LORA_EXPERTS:
        runs = asked
    elif not substitute:
        raise StageRefusedError(
            f"moe_lab: the {asked!r} experts of {model_type}'s MoE layer have no LoRA path (LoRA runs on the "
            f"experts {', '.join(sorted(LORA_EXPERTS))}); choose one (moe_backend={{'experts': 'triton'}}), or pass "
            "substitute=True to run the torch LoRA experts (recorded in model.moe_lab_plan)")
    else:
        probe = torch.empty(0, dtype=weight.dtype, device=weight.device)
        runs = "torch" if grouped_mm_supported(probe) else "eager"
        why = f"{asked!r} has no LoRA path"
    fn, description = LORA_EXPERTS[runs]
    caps, fused = replace(choice.impls["experts"].caps, fuses_with=None), None
    if runs == "triton_gather":  # with the triton permutation: gather in the prologue (gathered_lora_experts_triton)
        caps, fused = replace(caps, fuses_with="triton"), gathered_lora_experts_triton
    elif runs == "torch" and choice.names["permutation"] in _GATHERS:  # the gather inside GroupedLoRAMLP
        caps, fused = replace(caps, fuses_with=choice.names["permutation"]), gathered_lora_experts_grouped_mm
    name = f"{runs}+lora"
    impl = StageImpl("experts", name, fn, description=description, caps=caps, fused=fused)
    out = StageChoice({**choice.names, "experts": name}, {**choice.impls, "experts": impl},
                      requested=choice.requested, auto=choice.auto)
    note = f"{name}: {description}" + (f" (asked {asked}: {why})" if why else "")
    _CHOICES[key] = (choice, out, note)
    return out, note
