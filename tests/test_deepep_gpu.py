"""On two CUDA GPUs with DeepEP: EP=2 with the `deepep` dispatcher gives the loss and gradients of
EP=2 with the `all2all` dispatcher (itself held to one process on gloo), bf16, for real and for
skewed routing (every token to experts 0 and 1, so rank 1 receives nothing).

Run on the GPU machine: `python -m pytest -q -m gpu tests/test_deepep_gpu.py`.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_lab.parallel.deepep import why_deepep_unavailable

TESTS_DIR = os.path.dirname(__file__)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(why_deepep_unavailable() is not None, reason=str(why_deepep_unavailable())),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]


def _worker(rank, world, family, backend, skew, port, results):
    sys.path.insert(0, TESTS_DIR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    try:
        import transformers
        from test_expert_parallel import _skew_router

        import moe_lab
        from moe_lab.parallel.expert_parallel import reduce_gradients
        from tiny_models import tiny_config

        overrides = {"n_group": 2, "topk_group": 1} if family == "deepseek_v3" else {}
        # One MoE layer: both dispatchers then route every token identically (with two, the second
        # layer's bf16 inputs differ slightly, near-tied tokens change experts and whole rows of the
        # tiny gradients move: seen on the H200, 11% on layer 1's gate_up_proj with torch experts).
        config = tiny_config(family, num_experts=8, top_k=2, layers=1, hidden_size=128, **overrides)
        torch.manual_seed(0)
        with torch.device("cuda"):
            base = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        models = {d: moe_lab.patch_model(copy.deepcopy(base), {**moe_lab.resolve_backend(backend).names, "dispatch": d},
                                         ep_size=world) for d in ("all2all", "deepep")}
        batch = torch.randint(0, config.vocab_size, (world * 2, 33), generator=torch.Generator().manual_seed(5)).cuda()
        mine = batch[rank * 2 : (rank + 1) * 2]
        losses, grads = {}, {}
        for d, model in models.items():
            if skew:
                _skew_router(model)
            out = model(mine, labels=mine)
            out.loss.backward()
            reduce_gradients(model, model.moe_lab_ep)
            losses[d] = out.loss.item()
            grads[d] = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).float() for n, p in model.named_parameters()}
        assert abs(losses["deepep"] - losses["all2all"]) < 1e-2, losses
        for name, ref in grads["all2all"].items():
            got = grads["deepep"][name]
            err = float((got - ref).norm() / ref.norm().clamp_min(1e-6))
            assert err < 3e-2 or (got - ref).abs().max() < 1e-3, f"rank {rank} {name}: rel err {err:.3e}"
        received = [layer.mlp.dispatcher.last_local_rows for layer in models["deepep"].model.layers
                    if hasattr(layer.mlp, "dispatcher")]  # DeepSeek-V3's leading layers are dense
        results[rank] = ("ok", received)
    except Exception:
        import traceback

        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family,skew", [("qwen3_moe", False), ("qwen3_moe", True), ("deepseek_v3", False)])
def test_deepep_matches_all2all_on_two_gpus(family, skew, backend):
    from distributed_testing import free_port as _free_port

    manager = mp.Manager()
    results = manager.dict()
    try:
        mp.spawn(_worker, args=(2, family, backend, skew, _free_port(), results), nprocs=2)
    except Exception:
        pytest.fail("\n".join(str(v[1]) for v in results.values() if v[0] == "error") or "a worker failed")
    if skew:
        assert all(n == 0 for n in results[1][1]), f"rank 1 should receive nothing under skew, got {results[1][1]}"
