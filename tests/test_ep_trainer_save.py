"""An unmodified `transformers.Trainer` script saves an expert-parallel model (2 gloo processes, EP=2):
periodic checkpoints (save_strategy="steps") and `trainer.save_model()` at the end, with no save call
of moe_lab's. The Trainer calls `save_pretrained` on its writing process only, and the expert shards
live on every rank: before the fix, the first checkpoint waited forever for the other rank's shards.
Each checkpoint is a standard one: vanilla transformers loads it (no missing, unexpected or resized
key) with the weights of one process trained on the combined batches to that step, and the losses
match that process. A hang fails the test (a timeout on the processes and on gloo's collectives)."""
from __future__ import annotations

import datetime
import os
import sys
import time

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
SAVE_STEPS = 2  # a checkpoint at step 2; the Trainer adds one at the last step
LR = 0.1
HANG_S = 150  # the whole run normally takes about 15 s on 2 cores
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def _worker(rank, port, tmpdir, results):
    sys.path.insert(0, TESTS_DIR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    try:
        import transformers

        import moe_lab
        from moe_lab.parallel.expert_parallel import full_state_dict
        from tiny_models import tiny_config

        config = tiny_config("qwen3_moe", num_experts=8, top_k=2)
        torch.manual_seed(0)
        reference = transformers.AutoModelForCausalLM.from_config(config)
        ours = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="torch", ep_size=WORLD)
        _copy_weights(ours, reference)
        inputs_seen = []
        ours.register_forward_pre_hook(lambda m, a, kw: inputs_seen.append(kw["input_ids"].clone()), with_kwargs=True)

        rows = torch.randint(0, config.vocab_size, (16, 8), generator=torch.Generator().manual_seed(7))
        dataset = [{"input_ids": r, "labels": r} for r in rows]
        run_dir = os.path.join(tmpdir, "run")
        # the script as it would be without expert parallelism (max_grad_norm=0: the Trainer's clipping
        # uses one rank's norm under EP, see moe_lab.parallel.expert_parallel.clip_grad_norm_callback)
        args = transformers.TrainingArguments(
            output_dir=run_dir, use_cpu=True, per_device_train_batch_size=2, max_steps=STEPS, learning_rate=LR,
            optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
            report_to=[], save_strategy="steps", save_steps=SAVE_STEPS, disable_tqdm=True, dataloader_num_workers=0,
            seed=0)
        trainer = transformers.Trainer(model=ours, args=args, train_dataset=dataset)
        trainer.train()
        final_dir = os.path.join(tmpdir, "final")
        trainer.save_model(final_dir)

        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(inputs_seen) == STEPS and len(losses) == STEPS, (len(inputs_seen), losses)
        gathered_inputs = [torch.empty_like(torch.stack(inputs_seen)) for _ in range(WORLD)]
        dist.all_gather(gathered_inputs, torch.stack(inputs_seen))
        trained = full_state_dict(ours, ours.moe_lab_ep)  # every rank joins the gather
        if rank == 0:
            checkpoints = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint-"))
            assert checkpoints == [f"checkpoint-{SAVE_STEPS}", f"checkpoint-{STEPS}"], checkpoints
            # one process, the same steps on the combined batches
            optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
            reference.train()
            expected = {}
            for step in range(STEPS):
                optimizer.zero_grad()
                batch = torch.cat([g[step] for g in gathered_inputs])
                loss = reference(batch, labels=batch).loss
                loss.backward()
                assert losses[step] == pytest.approx(loss.item(), rel=1e-4), (step, losses, loss.item())
                optimizer.step()
                expected[step + 1] = {n: t.detach().clone() for n, t in reference.state_dict().items()}
            for name, tensor in trained.items():  # the EP model's weights, gathered
                torch.testing.assert_close(tensor, expected[STEPS][name], rtol=1e-4, atol=1e-6,
                                           msg=lambda m, name=name: f"trained {name}: {m}")
            for directory, step in [(os.path.join(run_dir, f"checkpoint-{SAVE_STEPS}"), SAVE_STEPS),
                                    (os.path.join(run_dir, f"checkpoint-{STEPS}"), STEPS), (final_dir, STEPS)]:
                loaded, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
                problems = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
                assert not problems, (directory, problems)
                state = loaded.state_dict()
                assert state.keys() == expected[step].keys()
                for name, tensor in state.items():
                    torch.testing.assert_close(tensor, expected[step][name], rtol=1e-4, atol=1e-6,
                                               msg=lambda m, name=name, d=directory: f"{d} {name}: {m}")
        dist.barrier()
        results[rank] = ("ok", None)
    except Exception:
        import traceback

        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def test_unmodified_trainer_saves_checkpoints_and_model_under_expert_parallelism(tmp_path):
    results = mp.Manager().dict()
    context = mp.spawn(_worker, args=(_free_port(), str(tmp_path), results), nprocs=WORLD, join=False)
    deadline = time.monotonic() + HANG_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                pytest.fail(f"the Trainer run did not finish in {HANG_S} s (a save waiting for the other rank?)")
    except mp.ProcessException:
        errors = [v[1] for v in results.values() if v[0] == "error"]
        pytest.fail(errors[0] if errors else "a worker failed")
    assert sorted(results.keys()) == list(range(WORLD)) and all(s == "ok" for s, _ in results.values()), dict(results)
