"""transformers' own expert parallelism (`DistributedConfig(enable_expert_parallel=True)`) with moe_lab's
MoE layers in place: 2 gloo processes load one checkpoint with transformers' EP plan through
`moe_lab.AutoModelForCausalLM`, and each rank's logits, loss and gradients equal those of one
process running vanilla v5 without parallelism (the plan shards the experts, transformers moves the
tokens, moe_lab's stages compute this rank's experts). One family through `MoELayer` (Qwen3-MoE),
one through the generic path (OLMoE: v5's block and router, moe_lab's experts)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_testing import free_port

TESTS_DIR = os.path.dirname(__file__)
WORLD = 2


def _full_grad(param):
    """A parameter's gradient as this rank holds it: the local shard of a DTensor, or the tensor."""
    grad = param.grad
    return grad.to_local() if hasattr(grad, "to_local") else grad


def _worker(rank, port, path, results):
    sys.path.insert(0, TESTS_DIR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import transformers
        from transformers.distributed import DistributedConfig

        import moe_lab

        ours = moe_lab.AutoModelForCausalLM.from_pretrained(
            path, distributed_config=DistributedConfig(tp_size=WORLD, enable_expert_parallel=True))
        reference = transformers.AutoModelForCausalLM.from_pretrained(path)
        torch.manual_seed(1)
        vocab = reference.config.vocab_size
        input_ids, labels = torch.randint(0, vocab, (2, 24)), torch.randint(0, vocab, (2, 24))

        ours.eval(), reference.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids).logits, reference(input_ids).logits, rtol=1e-5, atol=1e-5)

        ours.train(), reference.train()
        loss, loss_ref = ours(input_ids, labels=labels).loss, reference(input_ids, labels=labels).loss
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        loss.backward(), loss_ref.backward()
        ref_params = dict(reference.named_parameters())
        checked = sharded = 0
        for name, param in ours.named_parameters():
            grad, want = _full_grad(param), ref_params[name].grad
            if hasattr(param, "to_local"):  # an expert weight: this rank's slice of the experts
                local = param.to_local().shape[0]
                want = want[rank * local:(rank + 1) * local]
                sharded += 1
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {rank} {name}: {m}")
            checked += 1
        plan = next(iter(ours.moe_lab_plan.values()))
        results[rank] = (checked, sharded, plan["dispatch"])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_transformers_expert_parallel_plan_runs_moe_lab_stages(family, tmp_path):
    pytest.importorskip("transformers.distributed")  # DistributedConfig
    sys.path.insert(0, TESTS_DIR)
    import transformers
    from tiny_models import tiny_config

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(tiny_config(family, num_experts=4, top_k=2)).save_pretrained(tmp_path)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(free_port(), str(tmp_path), results), nprocs=WORLD)
        results = dict(results)
    assert sorted(results) == list(range(WORLD))
    for checked, sharded, dispatch in results.values():
        assert sharded >= 2 * 2 and checked > sharded  # both layers' expert weights, and the rest
        assert "transformers' expert-parallel plan" in dispatch
