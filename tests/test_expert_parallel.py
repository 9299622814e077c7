"""Expert parallelism on gloo with several processes: same loss, gradients and checkpoint as one process,
with the gradients reduced inside backward (no reduce_gradients call)."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_testing import assert_grads_match_one_process, force_routing_to_experts_0_and_1, free_port

TESTS_DIR = os.path.dirname(__file__)


def _skew_router(model):
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            gate.register_forward_hook(force_routing_to_experts_0_and_1)


def _worker(rank, world, ep_size, family, skew, port, tmpdir, results, fsdp=False, fused_norm=False):
    sys.path.insert(0, TESTS_DIR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import transformers

        import moe_lab
        from moe_lab.parallel.expert_parallel import reduce_gradients
        from tiny_models import tiny_config

        overrides = {"n_group": 2, "topk_group": 1} if family == "deepseek_v3" else {}
        config = tiny_config(family, num_experts=8, top_k=2, **overrides)
        torch.manual_seed(0)
        reference = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
        base = copy.deepcopy(reference)
        kernel_calls = []
        if fused_norm:  # in from_config/from_pretrained's order: the norms first, then EP and FSDP2
            import triton_kernels.rmsnorm as rmsnorm
            from moe_lab.training.fused_norm import enable_fused_norm

            kernel = rmsnorm.rms_norm
            rmsnorm.rms_norm = lambda *a, **k: kernel_calls.append(1) or kernel(*a, **k)
            enable_fused_norm(base)
        ours = moe_lab.patch_model(base, "torch", ep_size=ep_size, fsdp=fsdp)
        if fsdp:
            from torch.distributed.tensor import DTensor

            sharded = [n for n, p in ours.named_parameters() if isinstance(p, DTensor)]
            assert sharded and not any(".experts." in n for n in sharded), sharded
        if skew:
            _skew_router(reference)
            _skew_router(ours)

        batch = torch.randint(0, config.vocab_size, (world * 2, 7), generator=torch.Generator().manual_seed(5))
        ref_out = reference(batch, labels=batch)
        ref_out.loss.backward()

        mine = batch[rank * 2 : (rank + 1) * 2]
        out = ours(mine, labels=mine)
        out.loss.backward()
        assert bool(kernel_calls) == fused_norm, "the fused norms must run the kernel (and only when asked)"
        reduce_gradients(ours, ours.moe_lab_ep)  # reduced inside backward already: must do nothing
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        torch.testing.assert_close(loss / world, ref_out.loss.detach(), rtol=1e-5, atol=1e-6)

        assert_grads_match_one_process(ours, reference, f"rank {rank}")

        received = [int(layer.mlp.dispatcher.last_local_rows) for layer in ours.model.layers
                    if hasattr(layer.mlp, "dispatcher")]
        ours.save_pretrained(os.path.join(tmpdir, "ckpt"))
        # load it back with ep_size: only this rank's experts are read (the meta-device path)
        loaded = moe_lab.AutoModelForCausalLM.from_pretrained(os.path.join(tmpdir, "ckpt"), ep_size=ep_size, fsdp=fsdp)
        assert getattr(loaded, "moe_lab_loaded_local_experts", False), "the local-expert loader must take this checkpoint"
        full_state = ours.state_dict()
        for name, tensor in loaded.state_dict().items():
            expected = full_state[name]
            if hasattr(expected, "full_tensor"):
                expected, tensor = expected.full_tensor(), tensor.full_tensor()
            torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=lambda m: f"rank {rank} loaded {name}: {m}")
        if not skew:  # (the skewed run's routing comes from hooks the loaded model does not have)
            loaded.train()
            torch.testing.assert_close(loaded(mine, labels=mine).loss, out.loss.detach(), rtol=1e-5, atol=1e-6)
        if rank == 0:
            saved = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmpdir, "ckpt"))
            for name, tensor in reference.state_dict().items():
                torch.testing.assert_close(saved.state_dict()[name], tensor, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        results[rank] = ("ok", received)
    except Exception as error:  # report to the parent, then fail
        import traceback

        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _run(world, ep_size, family, skew, tmp_path, fsdp=False, fused_norm=False):
    manager = mp.Manager()
    results = manager.dict()
    try:
        mp.spawn(_worker, args=(world, ep_size, family, skew, free_port(), str(tmp_path), results, fsdp, fused_norm),
                 nprocs=world)
    except Exception:
        errors = [v[1] for v in results.values() if v[0] == "error"]
        pytest.fail(errors[0] if errors else "a worker died")
    return dict(results)


@pytest.mark.parametrize("family,world,ep_size", [("qwen3_moe", 2, 2), pytest.param("deepseek_v3", 4, 4, marks=pytest.mark.once)])
def test_expert_parallel_matches_one_process(family, world, ep_size, tmp_path):
    results = _run(world, ep_size, family, skew=False, tmp_path=tmp_path)
    assert all(status == "ok" for status, _ in results.values())


def test_skewed_routing_leaves_ranks_without_rows(tmp_path):
    results = _run(4, 4, "qwen3_moe", skew=True, tmp_path=tmp_path)
    received = {rank: rows for rank, (status, rows) in results.items()}
    assert all(rows == [0, 0] for rank, rows in received.items() if rank > 0), f"ranks 1-3 must get no row: {received}"
    assert received[0] == [8 * 7 * 2, 8 * 7 * 2], received  # all 4 ranks x 2 sequences x 7 tokens x k=2


def test_experts_replicated_over_two_groups(tmp_path):
    """world 4, ep 2: two copies of each expert shard (EP x DP)."""
    results = _run(4, 2, "qwen3_moe", skew=False, tmp_path=tmp_path)
    assert all(status == "ok" for status, _ in results.values())


def _single_process_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)


def test_fsdp2_for_the_rest_of_the_model(tmp_path):
    """world 4, ep 2, the non-expert parameters sharded with FSDP2 over all four ranks; every RMSNorm
    on the fused Triton kernel (interpreter), so its weights are FSDP2 shards too."""
    results = _run(4, 2, "deepseek_v3", skew=False, tmp_path=tmp_path, fsdp=True, fused_norm=True)
    assert all(status == "ok" for status, _ in results.values())


def _replica_worker(rank, world, port, results):
    """EP=2 x 2 replicas; ranks 0 and 1 route every token to experts 0 and 1 (shard 0), ranks 2 and
    3 to experts 4 and 5 (shard 1): each shard gets rows on one replica and none on the other."""
    sys.path.insert(0, TESTS_DIR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import transformers

        import moe_lab
        from moe_lab.parallel.expert_parallel import reduce_gradients
        from tiny_models import tiny_config

        config = tiny_config("qwen3_moe", num_experts=8, top_k=2)
        torch.manual_seed(0)
        model = moe_lab.patch_model(transformers.AutoModelForCausalLM.from_config(config), "torch", ep_size=2)
        first = 0 if rank < 2 else 4

        def force(module, inputs, output):
            logits, weights, ids = output
            forced = torch.tensor([first, first + 1]).expand_as(ids).clone()
            return logits, torch.softmax(logits.float(), -1).gather(1, forced).to(weights.dtype), forced

        for layer in model.model.layers:
            layer.mlp.gate.register_forward_hook(force)
        ids = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(rank))
        model(ids, labels=ids).loss.backward()  # reduced inside backward: must not hang
        reduce_gradients(model, model.moe_lab_ep)  # and this does nothing
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        gathered = [torch.empty_like(grads) for _ in range(world)]
        dist.all_gather(gathered, grads)
        # replicas hold the same expert shard: after the reduction their gradients are equal
        replica = rank + 2 if rank < 2 else rank - 2
        torch.testing.assert_close(gathered[replica], grads)
        results[rank] = ("ok", None)
    except Exception:
        import traceback

        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def test_replicas_agree_when_one_gets_no_rows():
    manager = mp.Manager()
    results = manager.dict()
    try:
        mp.spawn(_replica_worker, args=(4, free_port(), results), nprocs=4)
    except Exception:
        errors = [v[1] for v in results.values() if v[0] == "error"]
        pytest.fail(errors[0] if errors else "a worker died")
    assert all(status == "ok" for status, _ in results.values())


def test_mesh_the_model_cannot_use_is_refused():
    from moe_lab.parallel.expert_parallel import make_context

    with pytest.raises(ValueError, match="'qwen3_moe' has 6 experts per layer, not divisible by ep_size=4"):
        make_context(4, 6, "qwen3_moe")
    _single_process_group()
    try:
        with pytest.raises(ValueError, match="ep_size=2 must divide the world size 1"):
            make_context(2, 8)
    finally:
        dist.destroy_process_group()


def _own_mesh_worker(rank, world, port, results):
    """torchtitan's form: a moe_lab model patched on one process, then `apply_expert_parallel` with a
    mesh the user built; two micro-batches accumulated (two backwards, no zero_grad between) give the
    gradients of one process over both; `clip_grad_norm_` clips by the whole model's norm."""
    sys.path.insert(0, TESTS_DIR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import transformers
        from torch.distributed.device_mesh import init_device_mesh

        import moe_lab
        from moe_lab.parallel.expert_parallel import clip_grad_norm_
        from tiny_models import tiny_config

        config = tiny_config("qwen3_moe", num_experts=8, top_k=2)
        torch.manual_seed(0)
        reference = transformers.AutoModelForCausalLM.from_config(config)
        ours = moe_lab.patch_model(copy.deepcopy(reference), "torch")
        assert ours.model.layers[0].mlp.dispatcher.name == "local"
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        assert moe_lab.apply_expert_parallel(ours, mesh) is ours
        assert all(layer.mlp.dispatcher.name == "all2all" for layer in ours.model.layers)
        assert ours.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 8 // world

        batches = torch.randint(0, config.vocab_size, (2, world * 2, 7), generator=torch.Generator().manual_seed(3))
        for batch in batches:  # two micro-batches, gradients accumulated
            reference(batch, labels=batch).loss.backward()
            mine = batch[rank * 2 : (rank + 1) * 2]
            ours(mine, labels=mine).loss.backward()
        ref_grads = {name: p.grad for name, p in reference.named_parameters()}
        for name, param in ours.named_parameters():
            shard = getattr(param, "moe_lab_expert_shard", None)
            expected = ref_grads[name] if shard is None else ref_grads[name][shard[0] : shard[1]]
            torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {rank} {name}: {m}")

        assert ours.moe_lab_grad_reducer.last_reduced == len(list(ours.parameters()))  # no DDP here: all of them

        norm = clip_grad_norm_(ours, 0.05)
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-6)
        for name, param in ours.named_parameters():
            shard = getattr(param, "moe_lab_expert_shard", None)
            expected = ref_grads[name] if shard is None else ref_grads[name][shard[0] : shard[1]]
            torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-7, msg=lambda m: f"clipped {name}: {m}")

        class Wrapper(torch.nn.Module):  # DDP reads its ignore list from the module it wraps, not from ours
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, ids):
                return self.inner(ids, labels=ids).loss

        wrapped = torch.nn.parallel.DistributedDataParallel(Wrapper(ours))
        with pytest.raises(RuntimeError, match="DistributedDataParallel would average expert shards"):
            wrapped(mine)
        results[rank] = ("ok", None)
    except Exception:
        import traceback

        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def test_own_mesh_accumulation_and_clipping():
    manager = mp.Manager()
    results = manager.dict()
    try:
        mp.spawn(_own_mesh_worker, args=(2, free_port(), results), nprocs=2)
    except Exception:
        errors = [v[1] for v in results.values() if v[0] == "error"]
        pytest.fail(errors[0] if errors else "a worker died")
    assert all(status == "ok" for status, _ in results.values())
