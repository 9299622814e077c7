"""The optimizer inside backward: the same parameters as an ordinary AdamW step after each backward,
no gradient left behind, and the harness variant that uses it."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import moe_lab
from moe_lab.training.optim import OptimizerInBackward, TritonAdamW
from markers import needs_interpreter
from tiny_models import tiny_config


@pytest.mark.parametrize("fused", [False, True])
def test_same_parameters_as_a_plain_adamw(fused):
    config = tiny_config("qwen3_moe")
    torch.manual_seed(0)
    reference = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="torch")
    ours = copy.deepcopy(reference)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, foreach=False, fused=fused)
    in_backward = OptimizerInBackward(ours.parameters(), lr=1e-2, weight_decay=0.1, foreach=False, fused=fused)
    for step in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(step))
        reference(ids, labels=ids).loss.backward()
        plain.step()
        plain.zero_grad(set_to_none=True)
        ours(ids, labels=ids).loss.backward()
        assert all(p.grad is None for p in ours.parameters()), "gradients must be freed in backward"
        in_backward.step()
        in_backward.zero_grad()
    for (name, expected), got in zip(reference.named_parameters(), ours.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert len(in_backward.state) == len(list(ours.parameters()))
    in_backward.remove()


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_adamw_equals_torch_adamw(dtype):
    """Three steps on parameters of odd sizes (one larger than a kernel block, one empty, one without
    a gradient): the same parameters and moments as PyTorch's AdamW, which computes bf16 parameters
    in float32 on its fused path; here its single-tensor path runs on float32 copies."""
    torch.manual_seed(0)
    shapes = [(4099,), (3, 7), (0,), (5,)]
    ours = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in ours]
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt, plain = TritonAdamW(ours, **kw), torch.optim.AdamW(ref, foreach=False, **kw)
    for step in range(3):
        for i, (a, b) in enumerate(zip(ours, ref)):
            if i == 3:
                continue  # never gets a gradient
            g = torch.randn(a.shape)
            a.grad, b.grad = g.to(dtype), g.to(dtype).float()
        opt.step()
        plain.step()
        if dtype == torch.bfloat16:  # the reference's state is float32: round it as ours stores it
            with torch.no_grad():
                for a, b in zip(ours, ref):
                    b.copy_(b.to(dtype).float())
                    for key in ("exp_avg", "exp_avg_sq"):
                        if b in plain.state:
                            plain.state[b][key].copy_(plain.state[b][key].to(dtype).float())
    # fp32 pins the formula; bf16 the storage (the interpreter truncates casts to bf16 where the GPU
    # rounds, so over three steps a few bf16 ulps apart)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=3e-2, atol=1e-2)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach().float(), b.detach(), **tol)
        if b in plain.state:
            assert opt.state[a]["step"] == 3
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[a][key].float(), plain.state[b][key], **tol)
    assert not opt.state[ours[3]], "a parameter without gradient has no state"


@needs_interpreter
def test_triton_adamw_continues_from_a_torch_adamw_state():
    """A checkpoint of torch's AdamW (its step is a tensor) loads into TritonAdamW and steps on."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(300))]
    ref = [torch.nn.Parameter(ours[0].detach().clone())]
    plain = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for _ in range(2):
        ref[0].grad = torch.randn(300)
        plain.step()
    with torch.no_grad():
        ours[0].copy_(ref[0])
    opt = TritonAdamW(ours, lr=torch.tensor(1e-2))
    opt.load_state_dict(copy.deepcopy(plain.state_dict()))  # (load_state_dict would share the moment tensors)
    g = torch.randn(300)
    ours[0].grad, ref[0].grad = g, g.clone()
    opt.step()
    plain.step()
    assert opt.state[ours[0]]["step"] == 3
    torch.testing.assert_close(ours[0].detach(), ref[0].detach(), rtol=1e-5, atol=1e-6)


def test_triton_adamw_refuses_bad_hyperparameters_and_cpu_without_interpreter(monkeypatch):
    with pytest.raises(ValueError, match="betas"):
        TritonAdamW([torch.nn.Parameter(torch.ones(2))], betas=(0.9, 1.0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on CUDA"):
        TritonAdamW([torch.nn.Parameter(torch.ones(2))])


def test_refuses_a_model_with_nothing_to_train():
    layer = torch.nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires a gradient"):
        OptimizerInBackward(layer.parameters())


def test_harness_variant(tmp_path):
    from experiments import cell, systems

    assert systems.parse("triton-optbwd").optimizer_in_backward
    spec = cell.normalise({"model": "tiny-qwen3-moe", "layers": 1, "seq": 16, "system": "torch-optbwd",
                           "device": "cpu", "warmup": 1, "steps": 2, "dtype": "fp32", "optimizer": "adamw"})
    record = cell.run(spec)
    assert record["status"] == "ok" and record["metrics"]["loss_finite"]
    assert record["metrics"]["static_gib"]["optimizer"] > 0
    with pytest.raises(ValueError, match="one process"):
        cell._optimizer({**spec, "nproc": 2}, torch.nn.Linear(2, 2), torch.device("cpu"), in_backward=True)


def test_side_stream_needs_cuda_parameters():
    with pytest.raises(ValueError, match="needs CUDA parameters"):
        OptimizerInBackward([torch.nn.Parameter(torch.ones(2))], side_stream=True)


class _LaggingAdamW(torch.optim.AdamW):
    """AdamW whose every step first keeps its stream busy (~tens of ms), so a missing wait or a
    gradient block reused too early shows up as a wrong parameter."""

    def step(self, closure=None):
        torch.cuda._sleep(20_000_000)
        return super().step(closure)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, TritonAdamW, _LaggingAdamW])
def test_side_stream_updates_equal_inline_updates_on_gpu(optimizer_class):
    """Each parameter's update reads only its own gradient and state, so the side stream changes
    when it runs, never what it computes: parameters bit-equal after three steps. With the lagging
    optimizer the training stream reuses freed memory (a scratch fill) while updates are still
    queued: only record_stream and step()'s wait keep the result right."""
    import moe_lab
    from tiny_models import tiny_config

    config = tiny_config("qwen3_moe")
    torch.manual_seed(0)
    models = [moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="torch").cuda().to(torch.bfloat16)
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    reference_class = torch.optim.AdamW if optimizer_class is _LaggingAdamW else optimizer_class
    optimizers = [OptimizerInBackward(models[0].parameters(), reference_class, lr=1e-2),
                  OptimizerInBackward(models[1].parameters(), optimizer_class, lr=1e-2, side_stream=True)]
    for _ in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 16), device="cuda")
        for m, opt in zip(models, optimizers):
            m(input_ids=ids, labels=ids).loss.backward()
            scratch = [torch.full((4096,), float("nan"), device="cuda") for _ in range(64)]  # reuse freed blocks
            del scratch
            opt.step()
    assert optimizers[1]._streams, "the side stream was used"
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name


def test_a_failing_constructor_leaves_no_hook_behind():
    """An optimizer class that refuses the second parameter: the first must not be stepped later."""
    class RefusesSecond(torch.optim.SGD):
        seen = 0

        def __init__(self, params, **kw):
            RefusesSecond.seen += 1
            if RefusesSecond.seen == 2:
                raise ValueError("no")
            super().__init__(params, **kw)

    layer = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    with pytest.raises(ValueError, match="no"):
        OptimizerInBackward(layer.parameters(), RefusesSecond, lr=1.0)
    layer(torch.ones(1, 2)).sum().backward()
    assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before))
