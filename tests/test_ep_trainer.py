"""Expert parallelism under `transformers.Trainer` (2 gloo processes, EP=2): no manual gradient reduction,
and two training steps match one process on the combined batches: the loss of each step, the gradients
the optimizer steps on, and the trained weights. The Trainer wraps the model in DistributedDataParallel
(through accelerate), which averages the non-expert gradients; moe_lab's hooks reduce the expert shards."""
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
STEPS = 2
LR = 0.1
CLIP = 0.5  # below the gradient norms of these steps (about 1.8): clipping acts


def _copy_weights(ours, reference) -> None:
    """ours (expert-parallel) <- reference (one process): expert shards get their slice."""
    full = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            shard = getattr(param, "moe_lab_expert_shard", None)
            param.copy_(full[name] if shard is None else full[name][shard[0] : shard[1]])


def _assert_matches(ours, expected: dict, what: str, rank: int, **tol) -> None:
    for name, tensor in ours.items():
        want = expected[name]
        torch.testing.assert_close(tensor, want, **tol, msg=lambda m: f"rank {rank} {what} {name}: {m}")


def _worker(rank, port, tmpdir, results, accumulate, disable_reduction):
    sys.path.insert(0, TESTS_DIR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import transformers

        import moe_lab
        from moe_lab.parallel.expert_parallel import clip_grad_norm_callback
        from tiny_models import tiny_config

        config = tiny_config("qwen3_moe", num_experts=8, top_k=2)
        torch.manual_seed(0)
        reference = transformers.AutoModelForCausalLM.from_config(config)
        ours = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="torch", ep_size=WORLD)
        _copy_weights(ours, reference)
        if disable_reduction:  # only to show the test fails without the automatic reduction
            ours.moe_lab_grad_reducer.enabled = False

        inputs_seen = []  # every micro-batch this rank's model got, in order
        ours.register_forward_pre_hook(lambda m, a, kw: inputs_seen.append(kw["input_ids"].clone()), with_kwargs=True)

        grads_seen = []

        class CaptureGradients(transformers.TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                grads_seen.append({n: p.grad.detach().clone() for n, p in ours.named_parameters()})

        rows = torch.randint(0, config.vocab_size, (16, 8), generator=torch.Generator().manual_seed(7))
        dataset = [{"input_ids": r, "labels": r} for r in rows]
        per_device, accumulation = (1, 2) if accumulate else (2, 1)
        args = transformers.TrainingArguments(
            output_dir=tmpdir, use_cpu=True, per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation, max_steps=STEPS, learning_rate=LR, optim="sgd",
            lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, report_to=[],
            save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
        callbacks = [CaptureGradients()]
        if accumulate:  # and clip by the whole model's norm (the Trainer's max_grad_norm would use one rank's)
            callbacks.insert(0, clip_grad_norm_callback(CLIP))
        trainer = transformers.Trainer(model=ours, args=args, train_dataset=dataset, callbacks=callbacks)
        trainer.train()
        shards = sum(1 for p in ours.parameters() if hasattr(p, "moe_lab_expert_shard"))
        assert ours.moe_lab_grad_reducer.last_reduced == shards  # DDP averaged the rest, and only DDP
        assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel), type(trainer.model_wrapped)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(inputs_seen) == STEPS * accumulation and len(grads_seen) == STEPS and len(losses) == STEPS

        # one process, the same steps: micro-batch m of a step is every rank's micro-batch m
        gathered = [torch.empty_like(torch.stack(inputs_seen)) for _ in range(WORLD)]
        dist.all_gather(gathered, torch.stack(inputs_seen))
        optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
        reference.train()
        for step in range(STEPS):
            optimizer.zero_grad()
            step_loss = 0.0
            for micro in range(accumulation):
                batch = torch.cat([g[step * accumulation + micro] for g in gathered])
                loss = reference(batch, labels=batch).loss / accumulation
                loss.backward()
                step_loss += loss.item()
            if accumulate:
                torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
            full = {n: p.grad for n, p in reference.named_parameters()}
            expected = {}
            for name, param in ours.named_parameters():
                shard = getattr(param, "moe_lab_expert_shard", None)
                expected[name] = full[name] if shard is None else full[name][shard[0] : shard[1]]
            _assert_matches(grads_seen[step], expected, f"step {step} gradient", rank, rtol=1e-4, atol=1e-6)
            assert losses[step] == pytest.approx(step_loss, rel=1e-4), (step, losses, step_loss)
            optimizer.step()
        full = dict(reference.named_parameters())
        trained = {n: p.detach() for n, p in ours.named_parameters()}
        expected = {}
        for name, param in ours.named_parameters():
            shard = getattr(param, "moe_lab_expert_shard", None)
            expected[name] = full[name].detach() if shard is None else full[name].detach()[shard[0] : shard[1]]
        _assert_matches(trained, expected, "trained weight", rank, rtol=1e-4, atol=1e-6)
        results[rank] = ("ok", None)
    except Exception:
        import traceback

        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _train(tmp_path, accumulate, disable_reduction=False):
    results = mp.Manager().dict()
    try:
        mp.spawn(_worker, args=(free_port(), str(tmp_path), results, accumulate, disable_reduction), nprocs=WORLD)
    except Exception:
        errors = [v[1] for v in results.values() if v[0] == "error"]
        pytest.fail(errors[0] if errors else "a worker died")
    assert sorted(results.keys()) == list(range(WORLD)) and all(s == "ok" for s, _ in results.values())


@pytest.mark.parametrize("accumulate", [False, True], ids=["one-batch-per-step", "two-micro-batches-clipped"])
def test_trainer_matches_one_process(accumulate, tmp_path):
    """EP=2 through the Trainer (DDP from accelerate) = one process; the second case accumulates two
    micro-batches per step (DDP's no_sync on the first) and clips with `clip_grad_norm_callback`."""
    _train(tmp_path, accumulate)
