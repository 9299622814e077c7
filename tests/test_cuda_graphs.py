"""``cuda_graphs=True``: what is refused, that nothing changes off the GPU (CPU here), and on a GPU that
graph replays train exactly like the eager layers while Python runs no layer after the capture."""
from __future__ import annotations

import copy

import pytest
import torch

import moe_lab
from experiments import cell
from graph_emulation import emulated_cuda_graphs  # noqa: F401 (a fixture)
from markers import needs_interpreter
from tiny_models import assert_same_grads, tiny_config


def test_stages_that_wait_on_the_host_are_refused():
    with pytest.raises(ValueError, match="not CUDA-graph safe"):
        moe_lab.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"), moe_backend="torch", cuda_graphs=True)


def test_router_logits_for_an_aux_loss_are_refused():
    config = tiny_config("qwen3_moe")
    config.output_router_logits = True
    from moe_lab.training.cuda_graphs import check_graphable

    model = torch.nn.Module()
    model.config = config
    with pytest.raises(ValueError, match="output_router_logits"):
        check_graphable(model, dict(router="triton", permutation="triton", dispatch="local", experts="triton",
                                    combine="triton"))
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
        plain = layer._moe_lab_graphs_plain_forward
        layer._moe_lab_graphs_plain_forward = lambda *a, _plain=plain, **k: calls.append(1) or _plain(*a, **k)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, graphed)]
    for step in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 32), device="cuda")
        losses = []
        for m in (eager, graphed):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-3, msg=f"step {step}")
        # the gradients themselves (AdamW would hide a scale error)
        assert_same_grads(graphed, eager, rtol=2e-2, atol=1e-3, where=f"step {step} ")
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert graphed.moe_lab_cuda_graphs.captures == 1
    capture_calls = len(calls)
    assert capture_calls > 0  # warm-up and capture ran the layers' Python once
    ids = torch.randint(0, config.vocab_size, (2, 32), device="cuda")
    graphed(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == capture_calls, "a replay ran a layer's Python forward"
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3, msg=lambda m: f"{name}: {m}")


# ---- emulated graphs on the CPU (tests/graph_emulation.py): PyTorch's real graphed autograd -------------
def _pair(**overrides):
    from moe_lab.training.cuda_graphs import enable_cuda_graphs

    config = tiny_config("qwen3_moe", **overrides)
    torch.manual_seed(0)
    eager = moe_lab.AutoModelForCausalLM.from_config(copy.deepcopy(config), moe_backend="torch")
    graphed = moe_lab.AutoModelForCausalLM.from_config(copy.deepcopy(config), moe_backend="torch")
    graphed.load_state_dict(eager.state_dict())
    enable_cuda_graphs(graphed)  # the torch backend is refused by from_config; the emulation does not mind
    return config, eager, graphed


def _assert_same_grads(eager, graphed):
    assert_same_grads(graphed, eager, rtol=1e-5, atol=1e-7)


def test_emulated_graphs_train_like_eager(emulated_cuda_graphs, monkeypatch):
    """Losses bit-equal, gradients equal, one capture, and every layer call after it went to the
    graphs (no eager fallback; the GPU test checks that replays run no Python)."""
    import moe_lab.training.cuda_graphs as cuda_graphs

    config, eager, graphed = _pair()
    fallbacks = []
    plain = cuda_graphs._plain
    monkeypatch.setattr(cuda_graphs, "_plain", lambda *a: fallbacks.append(1) or plain(*a))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, graphed)]
    for step in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 9))
        losses = [m(input_ids=ids, labels=ids).loss for m in (eager, graphed)]
        for loss in losses:
            loss.backward()
        torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
        _assert_same_grads(eager, graphed)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert graphed.moe_lab_cuda_graphs.captures == 1 and not fallbacks


@pytest.mark.parametrize("set_to_none", [True, False])
def test_emulated_graphs_accumulate_gradients_over_micro_batches(emulated_cuda_graphs, set_to_none):
    """Without the copy at the next graphed forward, .grad (the graph's own buffer) came out 2 x g2
    instead of g1 + g2 (seen by the review with this emulation)."""
    config, eager, graphed = _pair()
    for step in range(2):
        for m in (eager, graphed):
            m.zero_grad(set_to_none=set_to_none)
            for micro in range(2):
                ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(10 * step + micro))
                m(input_ids=ids, labels=ids).loss.backward()
        _assert_same_grads(eager, graphed)


def test_emulated_second_forward_before_backward_runs_eagerly(emulated_cuda_graphs, caplog):
    config, eager, graphed = _pair()
    ids = [torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for m in (eager, graphed):
        sum(m(input_ids=i, labels=i).loss for i in ids).backward()
    assert "before the previous forward's backward" in caplog.text
    _assert_same_grads(eager, graphed)
    for m in (eager, graphed):  # and the next step is graphed again
        m.zero_grad(set_to_none=True)
        m(input_ids=ids[0], labels=ids[0]).loss.backward()
    _assert_same_grads(eager, graphed)


def test_emulated_new_shape_recaptures_and_frozen_inputs_run_eagerly(emulated_cuda_graphs, caplog):
    config, eager, graphed = _pair()
    for seq in (9, 13):
        ids = torch.randint(0, config.vocab_size, (2, seq))
        for m in (eager, graphed):
            m.zero_grad(set_to_none=True)
            m(input_ids=ids, labels=ids).loss.backward()
        _assert_same_grads(eager, graphed)
    assert graphed.moe_lab_cuda_graphs.captures == 2
    for m in (eager, graphed):
        m.model.embed_tokens.weight.requires_grad_(False)
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=ids).loss.backward()
    assert "frozen embeddings" in caplog.text
    _assert_same_grads(eager, graphed)  # the frozen embedding has no gradient in either
