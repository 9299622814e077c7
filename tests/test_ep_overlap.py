"""The `all2all_overlap` dispatcher (chunks of tokens pipelined: one chunk's all-to-all beside another
chunk's experts) on gloo with several processes: the same loss and gradients as one process, with
skewed routing (ranks and chunks without rows) and more chunks than a rank has tokens, on every family."""
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


FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "nemotron_h")


def _check_family(rank, world, family, chunks, skew):
    """One family's EP model with all2all_overlap against one process of vanilla v5; rows received per layer."""
    import transformers

    import moe_lab
    from moe_lab.stages import dispatch
    from tiny_models import family_config

    config = family_config(family, num_experts=8, top_k=2)
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    ours = moe_lab.patch_model(copy.deepcopy(reference), {"dispatch": "all2all_overlap"}, ep_size=world)
    layers = [m for m in ours.modules() if getattr(getattr(m, "dispatcher", None), "name", None) == "all2all_overlap"]
    assert layers, f"{family}: no layer runs all2all_overlap"
    for m in layers:
        m.dispatcher.chunks = chunks
    sent = []
    real = dispatch.OverlappedAllToAllDispatcher.run_pipelined
    dispatch.OverlappedAllToAllDispatcher.run_pipelined = lambda self, *a: sent.append(self.chunks) or real(self, *a)
    try:
        if skew:
            for model in (reference, ours):
                for layer in model.model.layers:
                    layer.mlp.gate.register_forward_hook(force_routing_to_experts_0_and_1)
        batch = torch.randint(0, config.vocab_size, (world * 2, 5), generator=torch.Generator().manual_seed(3))
        ref = reference(batch, labels=batch)
        ref.loss.backward()
        mine = batch[rank * 2 : (rank + 1) * 2]
        out = ours(mine, labels=mine)
        out.loss.backward()
    finally:
        dispatch.OverlappedAllToAllDispatcher.run_pipelined = real
    assert sent == [chunks] * len(layers), (family, sent)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    torch.testing.assert_close(loss / world, ref.loss.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{family}: {m}")
    assert_grads_match_one_process(ours, reference, f"rank {rank} {family}")
    return [m.dispatcher.last_local_rows for m in layers]


def _worker(rank, world, cases, port, results):
    sys.path.insert(0, TESTS_DIR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = ("ok", {f"{family}/{chunks}/{skew}": _check_family(rank, world, family, chunks, skew)
                                for family, chunks, skew in cases})
    except Exception:
        import traceback

        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def test_overlapped_dispatch_matches_one_process_on_every_family():
    """Qwen3-MoE with skewed routing in 16 chunks (10 tokens a rank: empty chunks; rank 1's experts
    get no row), then every family in 3 uneven chunks (biases and clamped SwiGLU, shared experts,
    group-limited routing, relu2), two processes, one spawn."""
    cases = [("qwen3_moe", 16, True)] + [(family, 3, False) for family in FAMILIES]
    results = mp.Manager().dict()
    try:
        mp.spawn(_worker, args=(2, cases, free_port(), results), nprocs=2)
    except Exception:
        errors = [v[1] for v in results.values() if v[0] == "error"]
        pytest.fail(errors[0] if errors else "a worker died")
    assert all(status == "ok" for status, _ in results.values())
    skewed = results[1][1]["qwen3_moe/16/True"]
    assert skewed == [0] * len(skewed), skewed
