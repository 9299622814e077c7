"""Gradient clipping under expert parallelism (issue 24, item 3), 2 gloo processes, EP=2, tiny Qwen3-MoE.

Each rank holds its own shard of the experts, so a norm over one rank's gradients differs per rank: the
Trainer's default clipping (``max_grad_norm``) used to give every rank its own clip factor, and the
replicated weights drifted apart. Now an unmodified Trainer script with a ``max_grad_norm`` that clips
at every step trains as one process on the combined batches with the same ``max_grad_norm``: the loss
and the logged ``grad_norm`` of every step and the trained weights (the replicated ones bit-equal on both
ranks). `moe_lab.parallel.clip_grad_norm_` does the same in a plain loop, and with ``fsdp=True`` (FSDP2
DTensors beside the expert shards) it, accelerate's ``Accelerator.clip_grad_norm_`` and the Trainer's
mixed-mesh norm give one process's norm and clipped gradients."""
from __future__ import annotations

import copy
import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TESTS_DIR = os.path.dirname(__file__)
sys.path.insert(0, TESTS_DIR)
from distributed_testing import free_port as _free_port  # noqa: E402
from test_ep_trainer import _copy_weights  # noqa: E402

WORLD = 2
STEPS = 3
LR = 0.1
MAX_NORM = 0.3  # below every step's gradient norm here (about 1.5 to 2): clipping acts at every step
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def _expected(name, param, full: dict):
    shard = getattr(param, "moe_lab_expert_shard", None)
    return full[name] if shard is None else full[name][shard[0] : shard[1]]


def _assert_close(ours, full: dict, what: str, rank: int, get, **tol):
    for name, param in ours.named_parameters():
        got = get(param)
        got = got.full_tensor() if hasattr(got, "full_tensor") else got
        torch.testing.assert_close(got, _expected(name, param, full), **tol, msg=lambda m: f"rank {rank} {what} {name}: {m}")


def _gather_inputs(seen: list) -> list:
    gathered = [torch.empty_like(torch.stack(seen)) for _ in range(WORLD)]
    dist.all_gather(gathered, torch.stack(seen))
    return gathered


def _trainer(rank, config, tmpdir):
    """An unmodified Trainer script with max_grad_norm=MAX_NORM = one process with the same clipping."""
    import transformers

    import moe_lab

    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config)
    ours = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="torch", ep_size=WORLD)
    _copy_weights(ours, reference)
    inputs_seen = []
    ours.register_forward_pre_hook(lambda m, a, kw: inputs_seen.append(kw["input_ids"].clone()), with_kwargs=True)
    rows = torch.randint(0, config.vocab_size, (16, 8), generator=torch.Generator().manual_seed(7))
    dataset = [{"input_ids": r, "labels": r} for r in rows]
    args = transformers.TrainingArguments(
        output_dir=tmpdir, use_cpu=True, per_device_train_batch_size=2, max_steps=STEPS, learning_rate=LR,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=MAX_NORM, logging_steps=1,
        report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = transformers.Trainer(model=ours, args=args, train_dataset=dataset)
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel), type(trainer.model_wrapped)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(inputs_seen) == STEPS and len(logged) == STEPS, (len(inputs_seen), logged)

    # the replicated weights stayed equal on both ranks (one clip factor everywhere)
    for name, param in ours.named_parameters():
        if not hasattr(param, "moe_lab_expert_shard"):
            other = [torch.empty_like(param) for _ in range(WORLD)]
            dist.all_gather(other, param.detach().contiguous())
            assert torch.equal(other[0], other[1]), f"rank {rank}: replicated {name} differs between the ranks"

    gathered = _gather_inputs(inputs_seen)
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    reference.train()
    for step in range(STEPS):
        optimizer.zero_grad()
        batch = torch.cat([g[step] for g in gathered])
        loss = reference(batch, labels=batch).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM).item()
        assert norm > 1.5 * MAX_NORM, (step, norm)  # clipping acts (by a factor well away from 1)
        assert logged[step]["loss"] == pytest.approx(loss.item(), rel=1e-4), (step, logged, loss.item())
        assert logged[step]["grad_norm"] == pytest.approx(norm, rel=1e-5), (rank, step, logged[step], norm)
        optimizer.step()
    _assert_close(ours, dict(reference.named_parameters()), "trained weight", rank, lambda p: p.detach(),
                  rtol=1e-4, atol=1e-6)


def _plain_loop(rank, config):
    """moe_lab.parallel.clip_grad_norm_ in a torch loop = torch's clip_grad_norm_ in one process."""
    import transformers

    import moe_lab
    from moe_lab.parallel import clip_grad_norm_

    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config)
    ours = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="torch", ep_size=WORLD)
    _copy_weights(ours, reference)
    opt, ref_opt = torch.optim.SGD(ours.parameters(), lr=LR), torch.optim.SGD(reference.parameters(), lr=LR)
    for step in range(2):
        batch = torch.randint(0, config.vocab_size, (WORLD * 2, 7), generator=torch.Generator().manual_seed(20 + step))
        mine = batch[rank * 2 : (rank + 1) * 2]
        ours(mine, labels=mine).loss.backward()
        reference(batch, labels=batch).loss.backward()
        norm = clip_grad_norm_(ours, MAX_NORM)
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
        assert ref_norm > 1.5 * MAX_NORM, ref_norm
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        _assert_close(ours, {n: p.grad for n, p in reference.named_parameters()}, f"step {step} clipped gradient",
                      rank, lambda p: p.grad, rtol=1e-4, atol=1e-7)
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    _assert_close(ours, dict(reference.named_parameters()), "trained weight", rank, lambda p: p.detach(),
                  rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="no expert shard"):
        clip_grad_norm_(reference, MAX_NORM)


def _fsdp2(rank, config):
    """fsdp=True (FSDP2 DTensors beside plain expert shards): moe_lab's clip_grad_norm_, accelerate's
    Accelerator.clip_grad_norm_ and the Trainer's mixed-mesh norm give one process's norm, and the
    clipped gradients are one process's."""
    import transformers
    from accelerate import Accelerator
    from torch.distributed.tensor import DTensor

    import moe_lab
    from moe_lab.parallel import clip_grad_norm_

    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config)
    ours = moe_lab.patch_model(copy.deepcopy(reference), "torch", ep_size=WORLD, fsdp=True)
    assert any(isinstance(p, DTensor) for p in ours.parameters())
    batch = torch.randint(0, config.vocab_size, (WORLD * 2, 7), generator=torch.Generator().manual_seed(30))
    mine = batch[rank * 2 : (rank + 1) * 2]
    ours(mine, labels=mine).loss.backward()
    reference(batch, labels=batch).loss.backward()
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
    accelerator = Accelerator(cpu=True)  # an accelerate script's own call, the model not prepared
    torch.testing.assert_close(accelerator.clip_grad_norm_(ours.parameters(), float("inf")), ref_norm, rtol=1e-5, atol=0)
    # the Trainer's path where DTensors and plain tensors mix (the Trainer itself cannot prepare an
    # fsdp=True model yet: its DDP wrapping refuses the DTensors); the wrap does not read the Trainer
    mixed = transformers.Trainer._mixed_mesh_grad_norm(None, ours, float("inf"))
    torch.testing.assert_close(mixed, ref_norm, rtol=1e-5, atol=0)
    norm = clip_grad_norm_(ours, MAX_NORM)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM), rtol=1e-5, atol=0)
    _assert_close(ours, {n: p.grad for n, p in reference.named_parameters()}, "clipped gradient (fsdp)", rank,
                  lambda p: p.grad, rtol=1e-4, atol=1e-7)


def _worker(rank, port, tmpdir, results):
    sys.path.insert(0, TESTS_DIR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    try:
        from tiny_models import tiny_config

        config = tiny_config("qwen3_moe", num_experts=8, top_k=2)
        _trainer(rank, config, tmpdir)
        _plain_loop(rank, config)
        _fsdp2(rank, config)
        results[rank] = ("ok", None)
    except Exception:
        import traceback

        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def test_trainer_max_grad_norm_and_clip_grad_norm_match_one_process_under_expert_parallelism(tmp_path):
    results = mp.Manager().dict()
    try:
        mp.spawn(_worker, args=(_free_port(), str(tmp_path), results), nprocs=WORLD)
    except Exception:
        errors = [v[1] for v in results.values() if v[0] == "error"]
        pytest.fail(errors[0] if errors else "a worker died")
    assert sorted(results.keys()) == list(range(WORLD)) and all(s == "ok" for s, _ in results.values()), dict(results)
