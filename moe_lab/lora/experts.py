"""The experts stage with LoRA on v5's 3D expert weights: base grouped GEMM plus a low-rank update
per expert over the same expert-sorted rows.

For a targeted weight W (gate_up_proj / up_proj, down_proj) and a row x of expert e::

    x @ W_e (+ b_e) + scale * (x @ A_e) @ B_e        A [E, in, r], B [E, r, out] (GEMM orientation)

which is x @ (W_e + scale * A_e @ B_e), what PEFT computes by adding the delta to the weight; here
the per-expert delta weights [E, in, out] are never formed. Implementations, each
(x [S, H] rows in expert order, counts [E], offsets [E] int32, ExpertsLoRA, ExpertsSpec) -> y [S, H]:

- `lora_experts_loop`: one expert at a time (the reference, the definition of right);
- `lora_experts_grouped_mm`: torch's grouped_mm for the base and for each factor (x @ A, then @ B);
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

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from ..registry import StageImpl, StageChoice, StageRefusedError
from ..stages._requires import kernels
from ..stages.experts import (
    ExpertsSpec, _linear, activation_fn, first_bias, first_weight, grouped_mm, grouped_mm_supported, no_rows,
)
from ..stages.permute import plan_triton


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
    """(first weight's factors or None, down_proj's factors or None), in the weights' dtype."""
    def cast(f):
        if f is None or f.a.dtype == dtype and f.b.dtype == dtype:
            return f
        return LoRAFactors(f.a.to(dtype), f.b.to(dtype), f.scale)
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


# ---- torch grouped_mm --------------------------------------------------------------------------
def _grouped_lora(x, weight_io, bias, factors, offsets, expert_of_row):
    out = grouped_mm(x, weight_io, offsets)
    if factors is not None:
        out = out + grouped_mm(grouped_mm(x, factors.a, offsets), factors.b, offsets) * factors.scale
    return out if bias is None else out + bias[expert_of_row]


def lora_experts_grouped_mm(x, counts, offsets, module: ExpertsLoRA, spec: ExpertsSpec) -> torch.Tensor:
    """x [S, H] rows in expert order -> y [S, H]: `torch.nn.functional.grouped_mm` for the base and
    for each factor over the same rows (x @ A_e [S, r], then @ B_e); same math as the reference."""
    w1, b1 = first_weight(module, spec), first_bias(module, spec)
    w2, b2 = module.down_proj, (module.down_proj_bias if spec.has_bias else None)
    x = x.to(w1.dtype)
    if x.shape[0] == 0:
        return _lora_no_rows(x, module, spec)
    if not grouped_mm_supported(x):
        raise TypeError(f"torch LoRA experts: torch.nn.functional.grouped_mm has no {x.dtype} kernel on {x.device}; "
                        "use the eager experts (moe_backend={'experts': 'eager'}) or another dtype")
    l1, l2 = _factors_for(module, spec, w1.dtype)
    expert_of_row = None
    if spec.has_bias:
        experts = torch.arange(counts.numel(), device=x.device)
        expert_of_row = torch.repeat_interleave(experts, counts, output_size=x.shape[0])
    hidden = activation_fn(module, spec)(_grouped_lora(x, _io(w1, spec), b1, l1, offsets, expert_of_row))
    return _grouped_lora(hidden.to(w2.dtype), _io(w2, spec), b2, l2, offsets, expert_of_row)  # autocast: see grouped_mm


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
    permute = kernels().permute

    def gather(tokens):  # [T, H] -> [S, H] in expert order, in the weights' dtype
        return permute(tokens, perm.slot_of_row, perm.top_k, perm.inverse).to(w1.dtype)
    out_rows = _lora_mlp_triton(hidden, perm.offsets, module, spec, rows=gather)
    return choice.combine(out_rows, perm, weights, hidden.dtype)


# ---- which LoRA experts run for a planned experts stage ----------------------------------------
# the experts implementation a layer planned -> (its LoRA counterpart, what it computes)
LORA_EXPERTS = {
    "eager": (lora_experts_loop, "per-expert loop: x @ W_e + scale * (x @ A_e) @ B_e"),
    "torch": (lora_experts_grouped_mm, "grouped_mm for the base and for x @ A_e, then @ B_e"),
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
    name = f"{runs}+lora"
    impl = StageImpl("experts", name, fn, description=description, caps=caps, fused=fused)
    out = StageChoice({**choice.names, "experts": name}, {**choice.impls, "experts": impl},
                      requested=choice.requested, auto=choice.auto)
    note = f"{name}: {description}" + (f" (asked {asked}: {why})" if why else "")
    _CHOICES[key] = (choice, out, note)
    return out, note
