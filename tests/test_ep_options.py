"""The whole-step options under expert parallelism (issue 24, items 1 and 3), on gloo with several CPU
processes and Triton's interpreter: the fused loss, norms and rotary, TritonAdamW over FSDP2's
sharded parameters and the expert shards, and the optimizer inside backward (each update after its
gradient's reduction: FSDP2's reduce-scatter, moe_lab's all-reduce, DDP's under the Trainer).
EP=2 and EP=4 with every option on match one process: the loss, every gradient, the optimizer's
moments and the trained weights, and the saved checkpoint loads into a vanilla one-process model."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from markers import needs_interpreter
from distributed_testing import free_port

TESTS_DIR = os.path.dirname(__file__)
LR, BETAS, WD = 1e-2, (0.9, 0.95), 0.1
# epsilon well above the rounding of a near-zero gradient (about 1e-9 here), which Adam would otherwise
# turn into a visible step: the comparisons with one process then hold to 1e-5, while a wrong gradient
# moves a weight by about LR
EPS = 1e-5
KERNELS = (("triton_kernels.rmsnorm", "rms_norm"), ("triton_kernels.rope", "rope"),
           ("triton_kernels.cross_entropy", "logsumexp_and_target"), ("triton_kernels.adamw", "adamw_step_"))

pytestmark = needs_interpreter


def _entry(rank, world, port, scenario, args, results):
    sys.path.insert(0, TESTS_DIR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = ("ok", globals()[scenario](rank, world, *args))
    except Exception:
        import traceback

        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _spawn(world, scenario, *args) -> dict:
    results = mp.Manager().dict()
    try:
        mp.spawn(_entry, args=(world, free_port(), scenario, args, results), nprocs=world)
    except Exception:
        errors = [v[1] for v in results.values() if v[0] == "error"]
        pytest.fail(errors[0] if errors else "a worker died")
    assert sorted(results) == list(range(world)) and all(v[0] == "ok" for v in results.values()), dict(results)
    return {rank: value for rank, (_, value) in results.items()}


def _count_kernel_calls() -> dict:
    """Wrap the Triton entry points each option runs; returns name -> number of calls so far."""
    import importlib

    calls = {}
    for module_name, name in KERNELS:
        module = importlib.import_module(module_name)
        kernel = getattr(module, name)
        calls[name] = 0

        def counting(*a, _kernel=kernel, _name=name, **k):
            calls[_name] += 1
            return _kernel(*a, **k)

        setattr(module, name, counting)
    return calls


def _config(family):
    from tiny_models import tiny_config

    overrides = {"n_group": 2, "topk_group": 1} if family == "deepseek_v3" else {}
    return tiny_config(family, num_experts=8, top_k=2, **overrides)


def _local(tensor):
    """A DTensor's local shard (FSDP2), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _expected(name, param, full: dict):
    """The one-process tensor `full[name]` cut as `param` is held on this rank (an expert shard's slice;
    an FSDP2 shard is compared whole, through full_tensor)."""
    shard = getattr(param, "moe_lab_expert_shard", None)
    return full[name] if shard is None else full[name][shard[0] : shard[1]]


def _assert_all_close(ours, full: dict, what: str, rank: int, get, **tol):
    for name, param in ours.named_parameters():
        got = get(param)
        assert got is not None, f"rank {rank} {what} {name}: missing"
        torch.testing.assert_close(_full(got), _expected(name, param, full), **tol,
                                   msg=lambda m: f"rank {rank} {what} {name}: {m}")


# ---- 1. TritonAdamW on FSDP2 shards and expert shards = torch's AdamW on the same sharded model --------------
def sharded_adamw(rank, world, ep_size):
    import moe_lab
    from moe_lab.training.optim import TritonAdamW, TritonAdamWInBackward
    from torch.distributed.tensor import DTensor

    config = _config("qwen3_moe")

    def build():
        torch.manual_seed(0)
        return moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="torch", ep_size=ep_size, fsdp=True)

    models = [build() for _ in range(3)]
    dtensors = [n for n, p in models[0].named_parameters() if isinstance(p, DTensor)]
    shards = [n for n, p in models[0].named_parameters() if hasattr(p, "moe_lab_expert_shard")]
    assert dtensors and shards, (dtensors, shards)
    kw = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    plain = torch.optim.AdamW(models[0].parameters(), foreach=False, **kw)
    triton = TritonAdamW(models[1].parameters(), **kw)
    in_backward = TritonAdamWInBackward(models[2].parameters(), **kw)
    calls = _count_kernel_calls()
    for step in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(10 * step + rank))
        for model, optimizer in zip(models, (plain, triton, in_backward)):
            model(ids, labels=ids).loss.backward()
            if optimizer is in_backward:
                assert all(p.grad is None for p in model.parameters()), "updated (and freed) inside backward"
            optimizer.step()
            optimizer.zero_grad()
        if step == 1:  # the state dicts load into each other (DTensor moments, as torch keeps them)
            triton.load_state_dict(plain.state_dict())
            plain.load_state_dict(copy.deepcopy(triton.state_dict()))
    assert calls["adamw_step_"] == 3 * 2 * len(list(models[0].parameters())), calls
    reference = dict(models[0].named_parameters())
    for model, optimizer in zip(models[1:], (triton, in_backward)):
        for name, param in model.named_parameters():
            ref = reference[name]
            assert type(param) is type(ref)
            # (float32 rounding apart: the kernel's formula order is not torch's; a wrong update is about LR off)
            torch.testing.assert_close(_local(param), _local(ref), rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"rank {rank} {name}: {m}")
            state, ref_state = optimizer.state[param], plain.state[ref]
            assert int(state["step"]) == int(ref_state["step"]) == 3
            for key in ("exp_avg", "exp_avg_sq"):
                assert isinstance(state[key], DTensor) == isinstance(param, DTensor), (name, key)
                torch.testing.assert_close(_local(state[key]), _local(ref_state[key]), rtol=1e-4, atol=1e-7,
                                           msg=lambda m: f"rank {rank} {name} {key}: {m}")
    return len(dtensors)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.once)])  # EP=4: moe_lab's sharding only
def test_triton_adamw_on_fsdp2_and_expert_shards_equals_torch_adamw(world):
    """EP=world with fsdp=True: every non-expert parameter an FSDP2 DTensor shard (some empty at 4 ranks),
    the experts plain shards. TritonAdamW stepped after backward, and TritonAdamWInBackward (FSDP2's
    shards updated in its post-reduce-scatter hooks, the expert shards after moe_lab's reduction),
    equal torch's AdamW on the same sharded model: parameters, moments and step over three steps,
    with the state dicts exchanged between torch's and Triton's optimizers after the second."""
    assert all(count > 0 for count in _spawn(world, "sharded_adamw", world).values())


# ---- 2. every option under EP = one process ---------------------------------------------------------------
def every_option(rank, world, ep_size, fsdp, family, tmpdir):
    import transformers

    import moe_lab
    from moe_lab.training.optim import TritonAdamWInBackward

    config = _config(family)
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    ours = moe_lab.patch_model(copy.deepcopy(reference), "torch", ep_size=ep_size, fsdp=fsdp, fused_norm=True,
                               fused_rope=True, fused_cross_entropy=True)
    assert ours.moe_lab_options.fused_norm and ours.moe_lab_options.fused_rope
    calls = _count_kernel_calls()
    batches = torch.randint(0, config.vocab_size, (3, world * 2, 7), generator=torch.Generator().manual_seed(5))
    mine = lambda batch: batch[rank * 2 : (rank + 1) * 2]  # noqa: E731

    def mean_loss(loss):
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        return loss / world

    # a backward without an optimizer: the loss and every gradient (FSDP2 shards, expert shards, the rest)
    out = ours(mine(batches[0]), labels=mine(batches[0]))
    assert out.logits.shape[1] == 0, "the fused loss returns no logits"
    out.loss.backward()
    ref_loss = reference(batches[0], labels=batches[0]).loss
    ref_loss.backward()
    torch.testing.assert_close(mean_loss(out.loss), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    full = {n: p.grad for n, p in reference.named_parameters()}
    _assert_all_close(ours, full, "gradient", rank, lambda p: p.grad, rtol=1e-4, atol=1e-6)
    assert calls["rms_norm"] and calls["rope"] and calls["logsumexp_and_target"], calls
    ours.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)

    # two steps with TritonAdamW inside backward against torch's AdamW after backward, in one process
    kw = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    plain = torch.optim.AdamW(reference.parameters(), foreach=False, **kw)
    fast = TritonAdamWInBackward(ours.parameters(), **kw)
    for batch in batches[1:]:
        loss = ours(mine(batch), labels=mine(batch)).loss
        loss.backward()
        assert all(p.grad is None for p in ours.parameters()), "every parameter updated inside backward"
        fast.step()
        ref_loss = reference(batch, labels=batch).loss
        ref_loss.backward()
        plain.step()
        plain.zero_grad()
        torch.testing.assert_close(mean_loss(loss), ref_loss.detach(), rtol=1e-5, atol=1e-6)
        # the first moment holds every step's reduced gradient: compared for every parameter
        states = {n: plain.state[p]["exp_avg"] for n, p in reference.named_parameters()}
        _assert_all_close(ours, states, "exp_avg", rank, lambda p: fast.state[p]["exp_avg"], rtol=1e-4, atol=5e-7)
        # (Adam's update of a near-zero gradient turns rounding into up to a few 1e-6 here; a wrong
        # gradient moves a weight by about LR)
        _assert_all_close(ours, dict(reference.named_parameters()), "weight", rank, lambda p: p.detach(),
                          rtol=1e-4, atol=1e-5)
    assert calls["adamw_step_"] == 2 * len(list(ours.parameters())), calls

    if not fsdp:  # a plain parameter whose reduction moe_lab does not run (DDP alone, say) is refused
        stray = torch.nn.Linear(3, 1)
        TritonAdamWInBackward(stray.parameters())
        with pytest.raises(RuntimeError, match="its gradient is reduced across them .DDP. only after this hook"):
            stray(torch.ones(2, 3)).sum().backward()

    # the checkpoint: one standard file that a vanilla one-process model loads
    ours.save_pretrained(os.path.join(tmpdir, "ckpt"))
    if rank == 0:
        saved = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmpdir, "ckpt"))
        got = saved.state_dict()
        for name, tensor in reference.state_dict().items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"loaded {name}: {m}")
    return dict(calls)


@pytest.mark.parametrize("world,ep_size,fsdp,family", [(2, 2, False, "qwen3_moe"),
                                                          pytest.param(4, 4, True, "deepseek_v3", marks=pytest.mark.once)],
                         ids=["ep2-qwen3", "ep4-fsdp2-deepseek"])
def test_every_option_under_expert_parallelism_matches_one_process(world, ep_size, fsdp, family, tmp_path):
    """EP=2 (replicated non-experts, moe_lab's all-reduce) and EP=4 with FSDP2 (reduce-scatter), with the
    fused loss, norms and rotary (their kernels counted) and TritonAdamW inside backward, against v5's
    eager model and torch's AdamW in one process on the ranks' batches together: the loss, every
    gradient, the first moments and the weights after each step, and the saved checkpoint loaded by
    transformers in one process."""
    _spawn(world, "every_option", ep_size, fsdp, family, str(tmp_path))


# ---- 3. the same under transformers.Trainer with moe_lab.fastest ----------------------------------------------
def trainer_fastest(rank, world, tmpdir):
    import transformers

    import moe_lab
    from moe_lab.training.fastest import fastest
    from moe_lab.training.optim import TritonAdamWInBackward

    config = _config("qwen3_moe")
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    ours = moe_lab.patch_model(copy.deepcopy(reference), "torch", ep_size=world)
    inputs_seen = []
    ours.register_forward_pre_hook(lambda m, a, kw: inputs_seen.append(kw["input_ids"].clone()), with_kwargs=True)
    rows = torch.randint(0, config.vocab_size, (8, 8), generator=torch.Generator().manual_seed(7))
    dataset = [{"input_ids": r, "labels": r} for r in rows]
    steps = 2
    args = transformers.TrainingArguments(
        output_dir=tmpdir, use_cpu=True, per_device_train_batch_size=2, max_steps=steps, learning_rate=LR,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=0.0, lr_scheduler_type="constant",
        max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0)  # max_grad_norm=0: the optimizer inside backward refuses clipping
    trainer = fastest(transformers.Trainer(model=ours, args=args, train_dataset=dataset))
    record = ours.moe_lab_fastest
    assert all(record[k] == "on" for k in ("fused_cross_entropy", "fused_norm", "fused_rope")), record
    assert record["optimizer_in_backward"].startswith("on (inline"), record
    assert record["cuda_graphs"].startswith("off: cuda_graphs: under expert parallelism"), record
    calls = _count_kernel_calls()
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    fast = trainer.optimizer.optimizer
    assert isinstance(fast, TritonAdamWInBackward)
    assert calls["adamw_step_"] == steps * len(list(ours.parameters())), calls
    assert calls["rms_norm"] and calls["rope"] and calls["logsumexp_and_target"], calls
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    # one process, the ranks' batches of each step together, torch's AdamW
    gathered = [torch.empty_like(torch.stack(inputs_seen)) for _ in range(world)]
    dist.all_gather(gathered, torch.stack(inputs_seen))
    plain = torch.optim.AdamW(reference.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, foreach=False)
    for step in range(steps):
        batch = torch.cat([g[step] for g in gathered])
        loss = reference(batch, labels=batch).loss
        loss.backward()
        plain.step()
        plain.zero_grad()
        assert losses[step] == pytest.approx(loss.item(), rel=1e-4), (step, losses)
    states = {n: plain.state[p]["exp_avg"] for n, p in reference.named_parameters()}
    _assert_all_close(ours, states, "exp_avg", rank, lambda p: fast.state[p]["exp_avg"], rtol=1e-4, atol=5e-7)
    _assert_all_close(ours, dict(reference.named_parameters()), "weight", rank, lambda p: p.detach(),
                      rtol=1e-4, atol=1e-5)
    # save_pretrained on every rank (it gathers the expert shards); the Trainer's save_model does the same
    # (moe_lab wraps it for expert-parallel models, tests/test_ep_trainer_save.py)
    ours.save_pretrained(os.path.join(tmpdir, "ckpt"))
    if rank == 0:
        saved = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmpdir, "ckpt"))
        got = saved.state_dict()
        for name, tensor in reference.state_dict().items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"loaded {name}: {m}")
    return losses


def test_fastest_under_the_trainer_with_expert_parallelism(tmp_path):
    """EP=2 under transformers.Trainer (accelerate wraps the model in DDP): fastest() turns on the fused
    loss, norms and rotary and TritonAdamW inside backward (non-expert updates after DDP's averaging,
    expert shards after moe_lab's reduction), refuses CUDA graphs with the reason; two steps equal
    torch's AdamW in one process (losses, moments, weights), and the saved model loads into v5."""
    losses = _spawn(2, "trainer_fastest", str(tmp_path))
    assert losses[0] == losses[1]
