"""LoRA on the experts (moe_lab.lora, triton_kernels.lora_gemm): PEFT's adapters on v5's 3D expert
weights run through moe_lab's stages, held to PEFT on vanilla v5.

- the Triton grouped GEMM with the low-rank update in its epilogue vs a per-expert loop (forward,
  and gradients of rows, A, B and bias; a frozen base gets none), hypothesis over shapes and ranks;
- the LoRA experts stage (torch grouped_mm, Triton) vs its reference loop, and the reference vs the
  base experts on the merged weight W + scale * A @ B (what PEFT computes);
- whole models: `peft.get_peft_model` on a moe_lab model (Qwen3-MoE, GPT-OSS) equals PEFT on vanilla
  v5 in logits and in every adapter gradient, hypothesis over shapes, ranks and backends; the frozen
  base gets no gradient; adapters saved from one load into the other; `merge_and_unload` is v5's
  model; disabled adapters, two active adapters, refusals;
- the harness systems v5-peft-lora and lora run a tiny cell each.
"""
import copy
import json

import pytest
import torch
from hypothesis import given, strategies as st

from hypothesis_profiles import examples
from tiny_models import tiny_config, v5_and_moe_lab

peft = pytest.importorskip("peft")

from moe_lab.lora import (  # noqa: E402
    ExpertsLoRA, LoRAFactors, UnsupportedAdapterError, lora_choice, lora_experts_grouped_mm, lora_experts_loop,
    lora_experts_triton,
)
from moe_lab.registry import StageRefusedError, resolve_backend  # noqa: E402
from moe_lab.stages.experts import ExpertsSpec, experts_loop  # noqa: E402
from triton_kernels.lora_gemm import grouped_lora_linear  # noqa: E402

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32: the same products in another order


def _offsets(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32)


# ---- the kernel --------------------------------------------------------------------------------
@st.composite
def kernel_cases(draw):
    E = draw(st.integers(1, 4))
    counts = draw(st.lists(st.integers(0, 9), min_size=E, max_size=E))
    if draw(st.booleans()):  # one expert takes everything
        hot = draw(st.integers(0, E - 1))
        counts = [sum(counts) + 1 if e == hot else 0 for e in range(E)]
    return dict(counts=counts, K=draw(st.integers(1, 40)), N=draw(st.integers(1, 40)), R=draw(st.integers(1, 20)),
                bias=draw(st.booleans()), train_w=draw(st.booleans()), transposed=draw(st.booleans()),
                scale=draw(st.sampled_from([0.5, 2.0, 16 / 4 ** 0.5])), seed=draw(st.integers(0, 2 ** 16)))


@examples(ci=6)
@given(kernel_cases())
def test_lora_gemm_matches_a_per_expert_loop(case):
    """y = x @ w[e] + scale * (x @ a[e]) @ b[e] (+ bias): forward and every gradient; a frozen w has none."""
    g = torch.Generator().manual_seed(case["seed"])
    counts, K, N, R = case["counts"], case["K"], case["N"], case["R"]
    E, S = len(counts), sum(counts)
    offsets = _offsets(counts)
    W = torch.randn(E, N, K, generator=g) if case["transposed"] else torch.randn(E, K, N, generator=g)
    W.requires_grad_(case["train_w"])
    x = torch.randn(S, K, generator=g, requires_grad=True)
    a = torch.randn(E, K, R, generator=g, requires_grad=True)
    b = torch.randn(E, R, N, generator=g, requires_grad=True)
    bias = torch.randn(E, N, generator=g, requires_grad=True) if case["bias"] else None
    leaves = [t for t in (x, a, b, W, bias) if t is not None and t.requires_grad]

    def w_view():
        return W.transpose(1, 2) if case["transposed"] else W

    def loop():
        pieces, start = [], 0
        for e, end in enumerate(offsets.tolist()):
            xe = x[start:end]
            ye = xe @ w_view()[e] + case["scale"] * (xe @ a[e]) @ b[e]
            pieces.append(ye if bias is None else ye + bias[e])
            start = end
        return torch.cat(pieces) if pieces else x.new_zeros(0, N)

    y = grouped_lora_linear(x, w_view(), offsets, a, b, case["scale"], bias)
    expected = loop()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    cotangent = torch.randn(S, N, generator=g)
    got = torch.autograd.grad(y, leaves, cotangent, allow_unused=True)
    want = torch.autograd.grad(expected, leaves, cotangent, allow_unused=True)
    for t, gg, ww in zip(leaves, got, want):
        if ww is None:  # S == 0: no row reached the weights
            assert gg is None or not gg.any()
            continue
        torch.testing.assert_close(gg, ww, rtol=1e-5, atol=1e-4)
    if case["train_w"]:
        assert next(gg for t, gg in zip(leaves, got) if t is W).shape == W.shape
    else:
        assert not W.requires_grad and W.grad is None


# ---- the experts stage -------------------------------------------------------------------------
def _experts_module(spec: ExpertsSpec, E: int, H: int, I: int, g) -> torch.nn.Module:
    m = torch.nn.Module()
    two_i = 2 * I if spec.gated else I
    shapes = ((E, H, two_i), (E, I, H)) if spec.transposed else ((E, two_i, H), (E, H, I))
    m.gate_up_proj = torch.nn.Parameter(torch.randn(*shapes[0], generator=g) * 0.3, requires_grad=False)
    m.down_proj = torch.nn.Parameter(torch.randn(*shapes[1], generator=g) * 0.3, requires_grad=False)
    if spec.has_bias:
        m.gate_up_proj_bias = torch.nn.Parameter(torch.randn(E, two_i, generator=g) * 0.1, requires_grad=False)
        m.down_proj_bias = torch.nn.Parameter(torch.randn(E, H, generator=g) * 0.1, requires_grad=False)
    m.act_fn = torch.nn.SiLU()
    return m


SPECS = {"swiglu": lambda E: ExpertsSpec(E),
         "gpt_oss": lambda E: ExpertsSpec(E, transposed=True, interleaved=True, has_bias=True, activation="gpt_oss")}


@examples(ci=6)
@given(kind=st.sampled_from(sorted(SPECS)), E=st.integers(1, 5), H=st.integers(2, 20), I=st.integers(1, 12),
       R=st.integers(1, 9), targets=st.sampled_from([("gate_up_proj",), ("down_proj",), ("gate_up_proj", "down_proj")]),
       seed=st.integers(0, 2 ** 16), data=st.data())
def test_lora_experts_stage_equals_the_merged_weights(kind, E, H, I, R, targets, seed, data):
    """The reference loop equals the base experts on W + scale * A @ B (PEFT's meaning); torch grouped_mm
    and the Triton path equal the reference in output and in the gradients of x, A and B."""
    g = torch.Generator().manual_seed(seed)
    spec = SPECS[kind](E)
    module = _experts_module(spec, E, H, I, g)
    counts = data.draw(st.lists(st.integers(0, 7), min_size=E, max_size=E), label="counts")
    offsets, S = _offsets(counts), sum(counts)
    x = torch.randn(S, H, generator=g, requires_grad=True)
    lora = {}
    for name in targets:
        w = getattr(module, name)
        in_f, out_f = (w.shape[1], w.shape[2]) if spec.transposed else (w.shape[2], w.shape[1])
        lora[name] = LoRAFactors((torch.randn(E, in_f, R, generator=g) * 0.5).requires_grad_(),
                                 (torch.randn(E, R, out_f, generator=g) * 0.5).requires_grad_(), 1.5)
    view = ExpertsLoRA(module, lora)
    counts_t = torch.tensor(counts)
    reference = lora_experts_loop(x, counts_t, offsets, view, spec)

    merged = copy.deepcopy(module)
    with torch.no_grad():
        for name, f in lora.items():
            delta = f.scale * f.a @ f.b  # [E, in, out]
            getattr(merged, name).add_(delta if spec.transposed else delta.transpose(1, 2))
    torch.testing.assert_close(reference, experts_loop(x, counts_t, offsets, merged, spec), **TOL)

    leaves = [x] + [t for f in lora.values() for t in (f.a, f.b)]
    cotangent = torch.randn(S, H, generator=g)
    want = torch.autograd.grad(reference, leaves, cotangent, allow_unused=True)
    for fn in (lora_experts_grouped_mm, lora_experts_triton):
        out = fn(x, counts_t, offsets, view, spec)
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5, msg=lambda m: f"{fn.__name__}: {m}")
        got = torch.autograd.grad(out, leaves, cotangent, allow_unused=True)
        for gg, ww in zip(got, want):
            if ww is None:
                assert gg is None or not gg.any()
            else:
                torch.testing.assert_close(gg, ww, rtol=1e-4, atol=1e-4, msg=lambda m: f"{fn.__name__}: {m}")
    assert module.gate_up_proj.grad is None and module.down_proj.grad is None


# ---- whole models against PEFT on vanilla v5 ---------------------------------------------------
def _lora_config(r=4, alpha=8, rslora=False, targets=EXPERT_TARGETS):
    return peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["q_proj", "v_proj"],
                           target_parameters=list(targets))


def _randomize_adapters(model, seed: int) -> None:
    """PEFT starts B at zero; random A and B make the update (and every gradient) visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _peft_pair(family, config_overrides=None, seed=0, lora=None, **moe_lab_options):
    """(PEFT on vanilla v5, PEFT on moe_lab) of one tiny config, the same base and adapter weights."""
    cfg = tiny_config(family, layers=1, **(config_overrides or {}))
    reference, ours = v5_and_moe_lab(cfg, seed=seed, **moe_lab_options)
    lora = lora or _lora_config()
    reference = peft.get_peft_model(reference, copy.deepcopy(lora))
    ours = peft.get_peft_model(ours, copy.deepcopy(lora))
    _randomize_adapters(reference, seed)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _assert_same_step(reference, ours, ids, rtol=1e-4, atol=1e-5):
    out_ref = reference(input_ids=ids, labels=ids)
    out = ours(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=rtol, atol=atol)
    out_ref.loss.backward()
    out.loss.backward()
    grads = dict(reference.named_parameters())
    adapters = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert "lora_" in name, name  # PEFT froze everything else
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
            adapters += ".experts." in name
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    return adapters


@examples(ci=6)
@given(family=st.sampled_from(["qwen3_moe", "gpt_oss"]), backend=st.sampled_from(["eager", "torch"]),
       num_experts=st.integers(1, 6), data=st.data(), r=st.integers(1, 8), alpha=st.sampled_from([1, 8, 16]),
       rslora=st.booleans(), tokens=st.integers(1, 9), seed=st.integers(0, 2 ** 16))
def test_peft_lora_on_moe_lab_equals_peft_on_v5(family, backend, num_experts, data, r, alpha, rslora, tokens, seed):
    if family == "gpt_oss":  # PEFT's own path breaks on one transposed expert (its 2D delta does not broadcast)
        num_experts = max(num_experts, 2)
    top_k = data.draw(st.integers(1, num_experts), label="top_k")
    reference, ours = _peft_pair(family, dict(num_experts=num_experts, top_k=top_k) if family == "qwen3_moe" else
                                 dict(num_local_experts=num_experts, num_experts_per_tok=top_k), seed=seed,
                                 lora=_lora_config(r, alpha, rslora), moe_backend=backend)
    ids = torch.randint(0, 61, (2, tokens), generator=torch.Generator().manual_seed(seed))
    assert _assert_same_step(reference, ours, ids) == 4  # lora_A and lora_B of gate_up_proj and down_proj
    (plan,) = ours.base_model.model.moe_lab_plan.values()
    assert plan["lora"].startswith(f"{backend}+lora")


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_peft_lora_through_the_triton_experts(family):
    reference, ours = _peft_pair(family, seed=3, lora=_lora_config(r=5, alpha=10), moe_backend="triton")
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(3))
    assert _assert_same_step(reference, ours, ids) == 4
    (plan,) = ours.base_model.model.moe_lab_plan.values()
    assert plan["lora"].startswith("triton+lora") and "epilogue" in plan["lora"]


def test_one_target_and_the_default_backend():
    """Only down_proj adapted, moe_lab's default backend (auto; the torch floor on the CPU)."""
    reference, ours = _peft_pair("qwen3_moe", seed=1, lora=_lora_config(targets=["mlp.experts.down_proj"]))
    ids = torch.randint(0, 61, (1, 8), generator=torch.Generator().manual_seed(1))
    assert _assert_same_step(reference, ours, ids) == 2


def test_disabled_and_two_active_adapters():
    reference, ours = _peft_pair("qwen3_moe", seed=2, moe_backend="torch")
    for model in (reference, ours):
        model.add_adapter("second", _lora_config(r=3, alpha=6))
    _randomize_adapters(reference, 5)
    ours.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(2))
    for model in (reference, ours):
        model.base_model.set_adapter(["default", "second"])
    torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    base = ours.base_model.model
    with ours.disable_adapter():
        plain = ours(input_ids=ids).logits
        assert all("lora" not in stages for stages in base.moe_lab_plan.values())
    with reference.disable_adapter():
        torch.testing.assert_close(plain, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


# ---- adapters across the two, and the merged model ---------------------------------------------
def test_adapters_load_across_moe_lab_and_v5(tmp_path):
    """Saved by PEFT from moe_lab -> loaded into vanilla v5 + PEFT: same logits; and the reverse."""
    import transformers

    import moe_lab

    reference, ours = _peft_pair("gpt_oss", seed=4, moe_backend="torch")
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(4))
    cfg = reference.base_model.model.config
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        for source, into_moe_lab in ((ours, False), (reference, True)):
            path = tmp_path / ("from_v5" if into_moe_lab else "from_moe_lab")
            source.save_pretrained(path)
            base = transformers.AutoModelForCausalLM.from_config(cfg)
            base.load_state_dict(_base_state(reference))
            if into_moe_lab:
                base = moe_lab.patch_model(base, moe_backend="torch")
            loaded = peft.PeftModel.from_pretrained(base, path)
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
            if into_moe_lab:
                (plan,) = base.moe_lab_plan.values()
                assert plan["lora"].startswith("torch+lora")


def _base_state(peft_model) -> dict:
    """The base model's weights under their v5 names (PEFT's wrappers' prefixes taken out)."""
    out = {}
    for name, t in peft_model.base_model.model.state_dict().items():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer", "")] = t
    return out


def test_merge_and_unload_is_a_standard_checkpoint(tmp_path):
    import safetensors.torch
    import transformers

    reference, ours = _peft_pair("qwen3_moe", seed=6, moe_backend="torch")
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = ours(input_ids=ids).logits
        merged, merged_ref = ours.merge_and_unload(), reference.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=1e-4, atol=1e-5)
    state, state_ref = merged.state_dict(), merged_ref.state_dict()
    assert list(state) == list(state_ref)  # v5's names: no base_layer, no lora_
    for name in state:
        torch.testing.assert_close(state[name], state_ref[name], rtol=1e-5, atol=1e-6)
    merged.save_pretrained(tmp_path / "merged")
    saved = safetensors.torch.load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in saved)
    vanilla = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(vanilla(input_ids=ids).logits, before, rtol=1e-4, atol=1e-5)


# ---- refusals in the user's terms --------------------------------------------------------------
def test_what_the_lora_path_cannot_run_is_refused():
    weight = torch.empty(2, 4, 3)
    spec = ExpertsSpec(2)
    torch_choice = resolve_backend("torch")
    te_like = torch_choice.__class__({**torch_choice.names, "experts": "te"}, torch_choice.impls, requested="te")
    with pytest.raises(StageRefusedError, match="'te' experts .* no LoRA path"):
        lora_choice(te_like, spec, substitute=False, expert_parallel=False, weight=weight)
    choice, note = lora_choice(te_like, spec, substitute=True, expert_parallel=False, weight=weight)
    assert choice.names["experts"] == "torch+lora" and "asked te" in note
    with pytest.raises(StageRefusedError, match="expert parallelism"):
        lora_choice(torch_choice, spec, substitute=True, expert_parallel=True, weight=weight)
    cfg = tiny_config("gpt_oss", layers=1)
    _, ours = v5_and_moe_lab(cfg, moe_backend="torch")
    ours = peft.get_peft_model(ours, peft.LoraConfig(r=2, target_modules=[],
                                                     target_parameters=["mlp.experts.gate_up_proj_bias"]))
    with pytest.raises(UnsupportedAdapterError, match="gate_up_proj_bias"):
        ours(input_ids=torch.zeros(1, 3, dtype=torch.long))


# ---- the harness systems -----------------------------------------------------------------------
TINY = {"model": "tiny-qwen3-moe", "layers": 1, "seq": 16, "device": "cpu", "dtype": "fp32", "warmup": 1, "steps": 2}


def test_the_lora_systems_run_a_tiny_cell(tmp_path):
    from experiments import cell, systems

    records = {}
    for system in ("v5-peft-lora", "lora"):
        out = tmp_path / f"{system}.json"
        assert cell.main(["--spec", json.dumps({**TINY, "system": system}), "--out", str(out)]) == 0
        records[system] = json.loads(out.read_text())
    v5, ours = records["v5-peft-lora"], records["lora"]
    for rec in (v5, ours):
        assert rec["status"] == "ok" and rec["metrics"]["step_ms"] > 0
        assert 0 < rec["trainable_params"] < rec["params_approx"]
    assert v5["trainable_params"] == ours["trainable_params"]
    assert v5["system_spec"]["adapter"] == ours["system_spec"]["adapter"] == "lora"
    for a, b in zip(v5["samples"], ours["samples"]):  # same weights, adapters and batches
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    (plan,) = ours["moe_lab_stages"]["plan"].values()
    assert plan["lora"].startswith("torch+lora")
    for name in ("v5-peft-lora", "lora"):
        spec = systems.parse(name)
        assert spec.name == name and systems.parse(spec.as_mapping()) == spec


def test_a_generic_layer_runs_peft_own_path_and_says_so():
    """OLMoE keeps v5's block (moe_lab's generic path): PEFT's parametrization adapts the weights, equal
    to vanilla v5 + PEFT, and the plan says that this path, not the grouped LoRA one, ran."""
    cfg = tiny_config("olmoe", layers=1)
    reference, ours = v5_and_moe_lab(cfg, moe_backend="torch")
    lora = peft.LoraConfig(r=2, target_modules=[], target_parameters=EXPERT_TARGETS)
    reference, ours = peft.get_peft_model(reference, copy.deepcopy(lora)), peft.get_peft_model(ours, copy.deepcopy(lora))
    _randomize_adapters(reference, 7)
    ours.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    (plan,) = ours.base_model.model.moe_lab_plan.values()
    assert plan["lora"].startswith("PEFT's own path")
