"""Checks shared by the GPU tests (tests/test_gpu_parity.py, tests/test_te_gpu.py): a backend in
bf16 against Transformers v5 in bf16 and in float32, and a router against the reference router.

bf16 router logits tie exactly at the top-k boundary for a few tokens per layer (seen: 1-3 of 256
in the tiny softmax-routed models). moe_lab's Triton router breaks ties toward the lower expert
index; `torch.topk` on CUDA (the reference, and v5) promises no order. So model-level checks run
the reference router, and each fast router is checked on its own: same experts wherever the k-th
and (k+1)-th scores differ, the same scores where they tie, the same weights.
"""
from __future__ import annotations

import math

import torch
import transformers

import moe_lab
from moe_lab.layer import MoELayer
from moe_lab.stages.router import route_reference
from tiny_models import tiny_config


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))



def bf16_errors(family: str, moe_backend, seed: int = 0) -> dict[str, tuple[float, float]]:
    """bf16 moe_lab and bf16 v5 grouped_mm, both measured against v5 eager in float32 (same
    bf16-representable weights): {"logits" or parameter name: (moe_lab error, v5 error)}, relative
    norm errors. Checks the losses on the way."""
    config = tiny_config(family, num_experts=8, top_k=2, hidden_size=128, intermediate_size=256,
                         **({"moe_intermediate_size": 64} if family in ("qwen3_moe", "deepseek_v3") else {}))
    torch.manual_seed(seed)
    with torch.device("cuda"):
        fp32 = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
        reference = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm",
                                                                  dtype=torch.bfloat16)
        ours = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend=moe_backend, dtype=torch.bfloat16)
    bf16_state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in fp32.state_dict().items()}
    fp32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in bf16_state.items()})
    reference.load_state_dict(bf16_state)
    ours.load_state_dict(bf16_state)
    ids = torch.randint(0, config.vocab_size, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(seed + 1))
    exact, ref, got = (m(ids, labels=ids) for m in (fp32, reference, ours))
    for out in (exact, ref, got):
        out.loss.backward()
    assert abs(got.loss.item() - exact.loss.item()) < 2e-2
    assert abs(got.loss.item() - ref.loss.item()) < 5e-3

    errors = {"logits": (rel_err(got.logits.detach(), exact.logits.detach()),
                         rel_err(ref.logits.detach(), exact.logits.detach()))}
    v5_params, exact_params = dict(reference.named_parameters()), dict(fp32.named_parameters())
    for name, param in ours.named_parameters():
        expected = exact_params[name].grad
        if expected is None or expected.norm() == 0:
            continue
        assert param.grad is not None, name
        errors[name] = (rel_err(param.grad, expected), rel_err(v5_params[name].grad, expected))
    return errors


# Tiny random GPT-OSS models amplify bf16 rounding chaotically (its top-2 softmax router's gradient
# is a difference of two near-equal expert outputs, summed over tokens with cancellation). On the
# CPU, merely moving the combine to float32 doubled the router-bias gradient error for one seed and
# lowered it for the next; with all Triton stages (interpreter) seed 0 was 1.4-2.9x v5's error and
# seed 1 0.5-0.75x (results/logs/cpu-gpt-oss-bf16-chaos.log). A per-seed bound would be a coin toss,
# so GPT-OSS is judged over seeds: not systematically worse than v5 overall (geometric mean of the
# moe_lab/v5 error ratios over every seed and quantity), for no quantity over its seeds (its own
# geometric mean: a 3x regression confined to the expert gradients shows here, not in the pooled one),
# and never grossly worse for one seed.
GPT_OSS_SEEDS = (0, 1, 2, 3)
GPT_OSS_MAX_GEOMEAN_RATIO = 1.5
GPT_OSS_MAX_QUANTITY_GEOMEAN_RATIO = 2.5
GPT_OSS_MAX_RATIO = 10.0


def check_bf16_against_fp32_v5(family: str, moe_backend) -> None:
    """moe_lab's bf16 error (vs the float32 v5 model) in logits and every gradient is no worse than
    v5's own bf16 error: x2 + a small floor per quantity (two bf16 programs round differently: the
    Triton kernels keep fp32 where v5 rounds to bf16 and vice versa); GPT-OSS over several seeds
    (see GPT_OSS_SEEDS)."""
    if family != "gpt_oss":
        for name, (ours_err, v5_err) in bf16_errors(family, moe_backend).items():
            assert ours_err <= 2.0 * v5_err + 5e-3, f"{name}: moe_lab bf16 error {ours_err:.2e} vs v5 bf16 {v5_err:.2e}"
        return
    ratios: dict[str, list[float]] = {}  # quantity -> one ratio per seed
    for seed in GPT_OSS_SEEDS:
        for name, (ours_err, v5_err) in bf16_errors(family, moe_backend, seed).items():
            ratios.setdefault(name, []).append((ours_err + 1e-3) / (v5_err + 1e-3))

    def geomean(values):
        return math.exp(sum(math.log(v) for v in values) / len(values))

    worst = max(ratios, key=lambda name: max(ratios[name]))
    assert max(ratios[worst]) <= GPT_OSS_MAX_RATIO, f"{worst}: moe_lab bf16 error {max(ratios[worst]):.1f}x v5's"
    per_quantity = {name: geomean(r) for name, r in ratios.items()}
    worst = max(per_quantity, key=per_quantity.get)
    assert per_quantity[worst] <= GPT_OSS_MAX_QUANTITY_GEOMEAN_RATIO, (
        f"{worst}: moe_lab bf16 error {per_quantity[worst]:.2f}x v5's (geometric mean over {len(GPT_OSS_SEEDS)} seeds)")
    overall = geomean([r for rs in ratios.values() for r in rs])
    assert overall <= GPT_OSS_MAX_GEOMEAN_RATIO, (
        f"moe_lab's bf16 errors are {overall:.2f}x v5's (geometric mean over seeds x quantities)")


def check_router_matches_reference_up_to_ties(family: str, backend: str, route_fn) -> None:
    """Each family's own router on 8192 bf16 tokens: the Triton router picks the reference's experts
    except where scores tie exactly at the k-th place (then the picked scores are equal), and gives
    the same weights where the picks agree."""

    config = tiny_config(family, num_experts=16, top_k=4, hidden_size=128, intermediate_size=256,
                         **({"moe_intermediate_size": 64} if family in ("qwen3_moe", "deepseek_v3") else {}))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend=backend, dtype=torch.bfloat16)
    layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    router, spec = layer.router_module, layer.routing
    if spec.has_correction_bias:
        router.e_score_correction_bias.copy_(torch.rand_like(router.e_score_correction_bias) * 0.1)
    args = (router.weight, getattr(router, "bias", None), getattr(router, "e_score_correction_bias", None), spec)
    hidden = torch.randn(8192, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = route_fn(hidden, *args)
        ref = route_reference(hidden, *args)
    torch.testing.assert_close(got.logits, ref.logits)
    scores = ref.logits.float()
    if spec.score == "sigmoid":
        scores = scores.sigmoid() + args[2].float()
    elif not spec.topk_before_softmax:
        scores = scores.softmax(-1)
    same = (got.ids.sort(-1).values == ref.ids.sort(-1).values).all(-1)
    for t in (~same).nonzero().flatten().tolist():
        picked, expected = scores[t, got.ids[t]].sort().values, scores[t, ref.ids[t]].sort().values
        assert torch.equal(picked, expected), f"token {t}: {got.ids[t].tolist()} vs {ref.ids[t].tolist()}, no tie"
    print(f"{family}: {int((~same).sum())} of 8192 tokens differ, all at exact ties")
    assert same.float().mean() > 0.97
    agree = same.nonzero().flatten()
    got_w = got.weights[agree].float().gather(1, got.ids[agree].argsort(-1))
    ref_w = ref.weights[agree].float().gather(1, ref.ids[agree].argsort(-1))
    torch.testing.assert_close(got_w, ref_w, rtol=1e-2, atol=1e-3)
