"""The `all2all_overlap` dispatcher (chunks of tokens pipelined: one chunk's all-to-all beside another
chunk's experts) on gloo with several processes: the same loss and gradients as one process, with
skewed routing (ranks and chunks without rows) and more chunks than a rank has tokens."""
from __future__ import annotations

import copy
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TESTS_DIR = os.path.dirname(__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _only_experts_0_and_1(module, inputs, output):
    logits, weights, ids = output
    forced = torch.tensor([0, 1], device=ids.device).expand_as(ids).clone()
    probs = torch.softmax(logits.float(), dim=-1).gather(1, forced)
    return logits, (probs / probs.sum(-1, keepdim=True)).to(weights.dtype), forced


def _worker(rank, world, family, chunks, skew, port, results):
    sys.path.insert(0, TESTS_DIR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import transformers

        import moe_lab
        from moe_lab.stages import dispatch
        from tiny_models import tiny_config

        config = tiny_config(family, num_experts=8, top_k=2)
        torch.manual_seed(0)
        reference = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
        ours = moe_lab.patch_model(copy.deepcopy(reference), {"dispatch": "all2all_overlap"}, ep_size=world)
        layers = [layer.mlp for layer in ours.model.layers if hasattr(layer.mlp, "dispatcher")]
        assert layers and all(m.dispatcher.name == "all2all_overlap" for m in layers)
        for m in layers:
            m.dispatcher.chunks = chunks
        sent = []
        real = dispatch.OverlappedAllToAllDispatcher.run_pipelined
        dispatch.OverlappedAllToAllDispatcher.run_pipelined = lambda self, *a: sent.append(self.chunks) or real(self, *a)
        if skew:
            for model in (reference, ours):
                for layer in model.model.layers:
                    layer.mlp.gate.register_forward_hook(_only_experts_0_and_1)

        batch = torch.randint(0, config.vocab_size, (world * 2, 5), generator=torch.Generator().manual_seed(3))
        ref = reference(batch, labels=batch)
        ref.loss.backward()
        mine = batch[rank * 2 : (rank + 1) * 2]
        out = ours(mine, labels=mine)
        out.loss.backward()
        assert sent == [chunks] * len(layers), sent
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        torch.testing.assert_close(loss / world, ref.loss.detach(), rtol=1e-5, atol=1e-6)
        ref_grads = dict(reference.named_parameters())
        for name, param in ours.named_parameters():
            expected = ref_grads[name].grad
            shard = getattr(param, "moe_lab_expert_shard", None)
            if shard is not None:
                expected = expected[shard[0] : shard[1]]
            got = param.grad if param.grad is not None else torch.zeros_like(param)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {rank} {name}: {m}")
        results[rank] = ("ok", [m.dispatcher.last_local_rows for m in layers])
    except Exception:
        import traceback

        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _run(world, family, chunks, skew):
    results = mp.Manager().dict()
    try:
        mp.spawn(_worker, args=(world, family, chunks, skew, _free_port(), results), nprocs=world)
    except Exception:
        errors = [v[1] for v in results.values() if v[0] == "error"]
        pytest.fail(errors[0] if errors else "a worker died")
    return dict(results)


@pytest.mark.parametrize("family,world,chunks,skew", [
    ("qwen3_moe", 2, 16, True),  # 10 tokens per rank in 16 chunks: empty chunks; rank 1's experts get no row
    ("deepseek_v3", 2, 3, False),  # shared experts, group-limited routing; uneven chunks
])
def test_overlapped_dispatch_matches_one_process(family, world, chunks, skew):
    results = _run(world, family, chunks, skew)
    assert all(status == "ok" for status, _ in results.values())
    if skew:
        assert all(rows == [0] * len(rows) for rank, (_, rows) in results.items() if rank > 0), results
