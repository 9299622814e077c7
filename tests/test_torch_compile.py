"""torch.compile on moe_lab models (issue 22): a full graph (no host reads, no data-dependent
shapes in the traced MoE path) whose logits, loss and every gradient equal the eager model's, on the
CPU, for each family on the default backend (on a CPU: the torch stages)."""
from __future__ import annotations

import pytest
import torch

from tiny_models import FAMILIES, NEMOTRON_H, assert_same_grads, family_config, v5_and_moe_lab


@pytest.mark.parametrize("family", FAMILIES + [NEMOTRON_H])
def test_fullgraph_compile_equals_eager(family):
    torch._dynamo.reset()
    config = family_config(family, layers=1) if family != NEMOTRON_H else family_config(family)
    _, ours = v5_and_moe_lab(config)
    compiled_twin = v5_and_moe_lab(config)[1]
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    eager = ours(ids, labels=ids)
    eager.loss.backward()
    compiled = torch.compile(compiled_twin, fullgraph=True)(ids, labels=ids)  # a graph break raises here
    compiled.loss.backward()
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(compiled_twin, ours, rtol=1e-4, atol=1e-5, where=f"{family}: ")


def test_bad_expert_ids_still_refused_when_compiled():
    """Under compile the id check is a graph assertion instead of a host read: still an error."""
    from moe_lab.stages.permute import plan_sorted

    torch._dynamo.reset()
    plan = torch.compile(lambda ids: plan_sorted(ids, 4).counts, fullgraph=True)
    assert plan(torch.tensor([[0, 3], [1, 2]])).tolist() == [1, 1, 1, 1]
    with pytest.raises(RuntimeError, match=r"expert ids must lie in \[0, 4\)"):
        plan(torch.tensor([[0, 4], [1, 2]]))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "olmoe"])
@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_equals_eager(family, strict):
    """torch.export (strict: through dynamo; non-strict: the Python runs, tensors are traced) of a
    moe_lab model: no data-dependent guard in the MoE path, and the exported program's logits are the
    eager model's (a MoELayer family, GPT-OSS's biases and clamped experts, the generic path)."""
    from tiny_models import tiny_config

    torch._dynamo.reset()
    _, ours = v5_and_moe_lab(tiny_config(family, num_experts=4, layers=1))
    ours.eval()
    ids = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(2))
    program = torch.export.export(ours, (ids,), {"use_cache": False}, strict=strict)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids, use_cache=False).logits, ours(ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-6)


def test_untraceable_stages_refused_in_a_full_graph_and_eager_otherwise():
    """The Triton stages are not traced (no custom ops yet): a full graph is refused with the reason,
    and a plain torch.compile breaks the graph there and runs the layer eagerly (the same logits)."""
    from tiny_models import tiny_config

    torch._dynamo.reset()
    _, ours = v5_and_moe_lab(tiny_config("qwen3_moe", num_experts=4, layers=1), moe_backend="triton")
    ids = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(4))
    eager = ours(ids).logits
    with pytest.raises(Exception, match=r"cannot trace the router 'triton'.*moe_backend='torch'"):
        torch.compile(ours, fullgraph=True)(ids)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(ours)(ids).logits, eager, rtol=1e-5, atol=1e-6)


def test_auto_takes_a_traceable_candidate_when_traced():
    """Under torch.compile, auto's rule skips the candidates with untraceable stages (nothing is
    measured in a traced forward)."""
    from moe_lab import auto
    from moe_lab.registry import LayerNeeds, plan_layer, resolve_backend

    needs = LayerNeeds("qwen3_moe", frozenset({"softmax", "renormalize"}), "glu:silu", "cpu", torch.float32, False)
    candidates = []
    for label in ("triton", "torch"):
        planned, choice = plan_layer(resolve_backend(label), needs, substitute=False)
        candidates.append(auto.Candidate(label, planned, choice))
    floor = candidates[1]
    decision = auto.traced_decision(auto.CandidateSet(candidates, {}, floor))
    assert decision.chosen.label == "torch" and "traced by torch.compile" in decision.describe()
    assert candidates[0].choice.untraceable and not candidates[1].choice.untraceable
    assert auto.traced_decision(auto.CandidateSet(candidates[:1], {}, floor)).chosen is floor


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_default_model_compiles_on_the_gpu(family):
    """On a GPU the default (auto) decides eagerly among Triton candidates; a full-graph compile of the
    same model then runs the torch stages and equals the eager forward (bf16 tolerance)."""
    from tiny_models import tiny_config

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch._dynamo.reset()
    _, ours = v5_and_moe_lab(tiny_config(family, num_experts=8, layers=2))
    ours = ours.to("cuda", torch.bfloat16)
    ids = torch.randint(0, 50, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    eager = ours(ids, labels=ids)
    compiled = torch.compile(ours, fullgraph=True)(ids, labels=ids)
    compiled.loss.backward()
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=2e-2, atol=2e-2)
    layer = next(iter(ours.moe_lab_plan))
    assert "traced by torch.compile" in ours.moe_lab_plan[layer]["auto"]
