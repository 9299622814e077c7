"""``cuda_graphs=True``: what is refused, that nothing changes off the GPU (CPU here), and on a GPU that
graph replays train exactly like the eager layers while Python runs no layer after the capture."""
from __future__ import annotations

import copy

import pytest
import torch

import moe_lab
from experiments import cell
from markers import needs_interpreter
from tiny_models import tiny_config


def test_stages_that_wait_on_the_host_are_refused():
    with pytest.raises(ValueError, match="only moe_lab's Triton stages"):
        moe_lab.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"), moe_backend="torch", cuda_graphs=True)


def test_router_logits_for_an_aux_loss_are_refused():
    config = tiny_config("qwen3_moe")
    config.output_router_logits = True
    from moe_lab.cuda_graphs import check_graphable

    model = torch.nn.Module()
    model.config = config
    with pytest.raises(ValueError, match="output_router_logits"):
        check_graphable(model, dict(router="triton", permutation="triton", experts="triton", combine="triton"))
    with pytest.raises(ValueError, match="one process only"):
        check_graphable(model, dict(router="triton", permutation="triton", experts="triton", combine="triton"), ep_size=2)


@needs_interpreter
def test_off_the_gpu_the_layers_run_as_usual_and_the_checkpoint_is_unchanged():
    config = tiny_config("qwen3_moe")
    torch.manual_seed(0)
    ours = moe_lab.AutoModelForCausalLM.from_config(copy.deepcopy(config), moe_backend="triton", cuda_graphs=True)
    ref = moe_lab.AutoModelForCausalLM.from_config(copy.deepcopy(config), moe_backend="triton")
    assert ours.state_dict().keys() == ref.state_dict().keys(), "no graph state in the checkpoint"
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 9))
    torch.testing.assert_close(ours(ids, labels=ids).loss, ref(ids, labels=ids).loss, rtol=0, atol=0)
    assert ours.moe_lab_cuda_graphs.captures == 0


def test_the_harness_refuses_graphs_with_hook_based_regimes():
    spec = cell.normalise({"model": "tiny-qwen3-moe", "layers": 1, "seq": 16, "system": "triton-graphs",
                           "routing": "balanced", "device": "cpu", "warmup": 1, "steps": 1, "dtype": "fp32"})
    with pytest.raises(ValueError, match="without their Python hooks"):
        cell.run(spec)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "triton_gather"])
def test_graph_replays_train_like_the_eager_layers_on_gpu(backend):
    """Three AdamW steps, bf16, Qwen3-MoE tiny: losses and parameters agree with the same model run
    eagerly, one capture, and no layer's Python forward runs after it."""
    config = tiny_config("qwen3_moe")
    torch.manual_seed(0)
    with torch.device("cuda"):
        eager = moe_lab.AutoModelForCausalLM.from_config(copy.deepcopy(config), moe_backend=backend,
                                                         fused_norm=True, fused_rope=True, dtype=torch.bfloat16)
        graphed = moe_lab.AutoModelForCausalLM.from_config(copy.deepcopy(config), moe_backend=backend, fused_norm=True,
                                                           fused_rope=True, cuda_graphs=True, dtype=torch.bfloat16)
    graphed.load_state_dict(eager.state_dict())
    calls = []
    for layer in graphed.model.layers:
        plain = layer._moe_lab_plain_forward
        layer._moe_lab_plain_forward = lambda *a, _plain=plain, **k: calls.append(1) or _plain(*a, **k)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, graphed)]
    for step in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 32), device="cuda")
        losses = []
        for m, opt in zip((eager, graphed), optimizers):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-3, msg=f"step {step}")
    assert graphed.moe_lab_cuda_graphs.captures == 1
    capture_calls = len(calls)
    assert capture_calls > 0  # warm-up and capture ran the layers' Python once
    ids = torch.randint(0, config.vocab_size, (2, 32), device="cuda")
    graphed(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == capture_calls, "a replay ran a layer's Python forward"
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3, msg=lambda m: f"{name}: {m}")
