"""The "auto" backend: which candidates a layer gets, how a measured decision is made and shared,
and that measuring leaves the model's outputs and gradients exactly as the chosen backend's.

On the CPU the Triton kernels run under the interpreter (conftest), so measuring is exercised here
by letting auto measure on the CPU (`auto.MEASURED_DEVICES`); the figures come from the GPU."""
from __future__ import annotations

import pytest
import torch

import moe_lab
from moe_lab import auto
from moe_lab.registry import LayerNeeds
from tiny_models import tiny_config

QWEN3 = LayerNeeds("qwen3_moe", frozenset({"softmax", "renormalize"}), "glu:silu", "cuda", torch.bfloat16)


@pytest.fixture
def measured_on_cpu(monkeypatch):
    monkeypatch.setattr(auto, "MEASURED_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(auto, "WARMUP", 0)
    monkeypatch.setattr(auto, "REPEATS", 1)
    auto.forget_decisions()
    yield
    auto.forget_decisions()


def _labels(candidate_set):
    return [c.label for c in candidate_set.candidates]


def test_default_backend_is_auto_and_the_cpu_runs_the_torch_floor():
    config = tiny_config("qwen3_moe")
    model = moe_lab.AutoModelForCausalLM.from_config(config)
    assert model.moe_lab_backend == "auto"
    assert all(p["auto"].startswith("not decided yet") for p in model.moe_lab_plan.values())
    model(torch.randint(0, config.vocab_size, (1, 6)))
    for stages in model.moe_lab_plan.values():
        assert stages["experts"] == "torch" and stages["auto"] == "torch (rule: cpu is not measured)"


def test_candidates_follow_capabilities():
    every = _labels(auto.candidates_for(QWEN3, None, graph_safe_only=False))
    assert every == [label for label, _ in auto.CANDIDATES]  # the interpreter runs Triton here
    graph_safe = auto.candidates_for(QWEN3, None, graph_safe_only=True)
    assert _labels(graph_safe) == ["triton_gather", "triton"]
    assert "not CUDA-graph safe" in graph_safe.excluded["torch"]
    relu2 = LayerNeeds("nemotron_h", frozenset({"sigmoid"}), "plain:relu2", "cuda", torch.bfloat16)
    assert _labels(auto.candidates_for(relu2, None, graph_safe_only=False)) == [label for label, _ in auto.CANDIDATES]
    gelu = LayerNeeds("olmoe", frozenset({"softmax"}), "plain:gelu", "cuda", torch.bfloat16)
    plain = auto.candidates_for(gelu, None, graph_safe_only=False)
    assert _labels(plain) == ["triton_routing+torch_experts", "torch"]
    assert "computes activations" in plain.excluded["triton"]
    fp64 = LayerNeeds("qwen3_moe", frozenset({"softmax"}), "glu:silu", "cuda", torch.float64)
    float64 = auto.candidates_for(fp64, None, graph_safe_only=False)
    assert "torch" not in _labels(float64) and "takes bfloat16, float16 weights" in float64.excluded["torch"]
    assert float64.floor.choice.names["experts"] == "eager"  # the floor runs the reference where torch cannot


def test_decision_prefers_earlier_candidates_within_the_margin_and_is_cached(monkeypatch):
    auto.forget_decisions()
    candidate_set = auto.candidates_for(QWEN3, None, graph_safe_only=False)
    times = {"triton_gather": 1.00, "triton": 0.99, "triton_routing+torch_experts": 0.90, "torch": 2.0}
    calls = []

    def fake_measure(step, device):
        label = step()
        calls.append(label)
        return times[label]

    monkeypatch.setattr(auto, "measure", fake_measure)
    monkeypatch.setattr(auto, "_gpu_name", lambda device: "fake GPU")
    labels = {id(c.choice): c.label for c in candidate_set.candidates}
    run = lambda choice: (lambda: labels[id(choice)])  # noqa: E731
    first = auto.decide(candidate_set, ("g",), torch.device("cuda"), torch.bfloat16, 4000, True, run)
    # triton (0.99) is within 2% of triton_gather: the earlier one stays; 0.90 is 10% faster: it wins
    assert first.chosen.label == "triton_routing+torch_experts" and first.how == "measured"
    assert "forward+backward of 4000 tokens" in first.describe()
    again = auto.decide(candidate_set, ("g",), torch.device("cuda"), torch.bfloat16, 4096, True, run)
    assert again is first and len(calls) == 4  # the same token bucket: not measured again
    forward_only = auto.decide(candidate_set, ("g",), torch.device("cuda"), torch.bfloat16, 4096, False, run)
    assert forward_only is not first and len(calls) == 8
    times["triton_routing+torch_experts"] = 0.985
    auto.forget_decisions()
    assert auto.decide(candidate_set, ("g",), torch.device("cuda"), torch.bfloat16, 64, True, run).chosen.label == "triton_gather"
    auto.forget_decisions()


def test_a_measured_decision_is_reused_by_the_next_process_from_disk(monkeypatch, tmp_path):
    from moe_lab import auto_cache

    candidate_set = auto.candidates_for(QWEN3, None, graph_safe_only=False)
    times = {"triton_gather": 1.0, "triton": 1.0, "triton_routing+torch_experts": 0.5, "torch": 2.0}
    calls = []
    monkeypatch.setattr(auto, "measure", lambda step, device: calls.append(step()) or times[calls[-1]])
    monkeypatch.setattr(auto, "_gpu_name", lambda device: "fake GPU")
    labels = {id(c.choice): c.label for c in candidate_set.candidates}
    run = lambda choice: (lambda: labels[id(choice)])  # noqa: E731
    geometry = ("qwen3_moe", "spec", frozenset({"softmax", "renormalize"}), (8, 32, 16))
    auto.forget_decisions()
    first = auto.decide(candidate_set, geometry, torch.device("cuda"), torch.bfloat16, 4096, True, run)
    assert first.how == "measured" and len(calls) == 4 and auto_cache.path().is_file()  # the test's own file (conftest)
    auto.forget_decisions()  # a new process: nothing in memory
    times["triton_routing+torch_experts"] = 9.0  # would lose if measured again
    cached = auto.decide(candidate_set, geometry, torch.device("cuda"), torch.bfloat16, 4096, True, run)
    assert len(calls) == 4 and cached.chosen.label == "triton_routing+torch_experts"
    assert cached.how.startswith("measured, cached") and cached.times_ms["torch"] == 2.0
    # another GPU, another shape bucket, other code: measured again
    monkeypatch.setattr(auto, "_gpu_name", lambda device: "other GPU")
    assert auto.decide(candidate_set, geometry, torch.device("cuda"), torch.bfloat16, 4096, True, run).how == "measured"
    assert len(calls) == 8
    auto.forget_decisions()
    monkeypatch.setattr(auto_cache, "fingerprint", lambda: "changed kernels")
    monkeypatch.setattr(auto, "_gpu_name", lambda device: "fake GPU")
    assert auto.decide(candidate_set, geometry, torch.device("cuda"), torch.bfloat16, 4096, True, run).how == "measured"
    auto.forget_decisions()
    from moe_lab import options

    monkeypatch.setattr(options, "_applied", moe_lab.Options(auto_cache=False).process_settings())  # off
    assert auto_cache.path() is None
    assert auto.decide(candidate_set, geometry, torch.device("cuda"), torch.bfloat16, 4096, True, run).how == "measured"
    assert moe_lab.Options.from_environment(environ={"MOE_LAB_AUTO_CACHE": "0", "MOE_LAB_CACHE_DIR": "/x"}) == \
        moe_lab.Options(auto_cache=False, auto_cache_dir="/x")
    auto.forget_decisions()


def test_token_bucket():
    assert [auto.token_bucket(t) for t in (1, 2, 3, 4096, 4097)] == [1, 2, 4, 4096, 8192]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_measured_auto_trains_like_the_backend_it_chose(measured_on_cpu, family):
    """The trials run on detached copies: the step's loss and every gradient equal a model built with
    the chosen backend; all layers of one shape share one decision."""
    config = tiny_config(family)
    torch.manual_seed(0)
    model = moe_lab.AutoModelForCausalLM.from_config(config)
    tokens = torch.randint(0, config.vocab_size, (2, 5))
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    plans = list(model.moe_lab_plan.values())
    assert all(p["auto"].startswith(plans[0]["auto"].split(" ")[0]) and "(measured, forward+backward of 10 tokens" in p["auto"]
               for p in plans), plans
    chosen = plans[0]["auto"].split(" ")[0]
    backend = dict(auto.CANDIDATES)[chosen]
    torch.manual_seed(0)
    reference = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend=backend)
    ref_loss = reference(tokens, labels=tokens).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_generic_experts_and_v5_registry_path_measure_too(measured_on_cpu):
    """A model moe_lab has no family for keeps v5's router; auto still measures its experts."""
    import transformers

    config = tiny_config("qwen2_moe")
    model = moe_lab.patch_model(transformers.AutoModelForCausalLM.from_config(config))
    tokens = torch.randint(0, config.vocab_size, (1, 7))
    model(tokens, labels=tokens).loss.backward()
    assert all("measured" in p["auto"] for p in model.moe_lab_plan.values())


def test_cuda_graphs_restricts_auto_to_graph_safe_stages():
    config = tiny_config("qwen3_moe")
    model = moe_lab.AutoModelForCausalLM.from_config(config, cuda_graphs=True)
    layer = next(m for m in model.modules() if isinstance(m, moe_lab.MoELayer))
    assert layer.planner.asked.auto.graph_safe_only


def test_restricting_to_graph_safe_stages_is_refused_once_a_layer_chose():
    config = tiny_config("qwen3_moe")
    model = moe_lab.AutoModelForCausalLM.from_config(config)
    layers = [m for m in model.modules() if isinstance(m, moe_lab.MoELayer)]
    layers[0].planner.restrict_to_graph_safe()
    assert layers[0].planner.asked.auto.graph_safe_only
    model(torch.randint(0, config.vocab_size, (1, 4)))
    with pytest.raises(ValueError, match="already chose"):
        layers[1].planner.restrict_to_graph_safe()


def test_the_cache_fingerprint_covers_every_source_that_decides_or_runs_a_candidate():
    from moe_lab import auto_cache

    names = {p.relative_to(p.parents[1]).as_posix() for p in auto_cache.fingerprinted_sources()}
    assert {"moe_lab/auto.py", "lora/experts.py", "stages/experts.py", "triton_kernels/lora_gemm.py"} <= names
