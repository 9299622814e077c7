"""`moe_lab.training.fastest`: one line on a real `transformers.Trainer` (CPU, Triton's interpreter,
tiny models) trains like the same Trainer without it where the math is the same, records what it
applied and skipped and why, keeps clipping where the Trainer clips, and leaves alone what it must."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers

import moe_lab
from graph_emulation import emulated_cuda_graphs  # noqa: F401 (a fixture)
from markers import needs_interpreter
from moe_lab.training.fastest import fast_optimizer, fastest
from moe_lab.training.optim import TritonAdamW, TritonAdamWInBackward
from tiny_models import tiny_config

LR = 1e-2


class _Tokens(torch.utils.data.Dataset):
    """Fixed-length random sequences, labels = inputs, no attention mask (what CUDA graphs need)."""

    def __init__(self, vocab: int, n: int = 8, seq: int = 8):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(family: str = "qwen3_moe", backend: str = "torch", **options):
    torch.manual_seed(0)
    return moe_lab.AutoModelForCausalLM.from_config(tiny_config(family, layers=1), moe_backend=backend, **options)


def _trainer(model, tmp_path, **overrides) -> transformers.Trainer:
    """Two steps, batch 2, AdamW with weight decay (so the decay / no-decay split matters) and a linear
    schedule with one warmup step: lr 0 at the first update, LR at the second."""
    kwargs = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=LR,
                  weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=1, logging_steps=1, report_to=[],
                  save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    kwargs.update(overrides)
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**kwargs),
                                train_dataset=_Tokens(model.config.vocab_size))


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _assert_same_training(plain, fast, *, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(_losses(fast), _losses(plain), rtol=rtol, atol=atol)
    for (name, expected), got in zip(plain.model.named_parameters(), fast.model.parameters()):
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def updates_lr(monkeypatch):
    """Every learning rate a TritonAdamW update ran with."""
    seen = []
    update = TritonAdamW._update

    def recording(self, p, group):
        seen.append(float(group["lr"]))
        return update(self, p, group)

    monkeypatch.setattr(TritonAdamW, "_update", recording)
    return seen


@needs_interpreter
def test_fastest_trains_like_the_plain_trainer_with_the_optimizer_in_backward(tmp_path, updates_lr):
    """max_grad_norm=0: the fused loss, norm and rotary and TritonAdamW stepping inside backward give the
    plain Trainer's losses and parameters, with its decay groups, and the schedule's lr at each update
    (0 at the first: an update at the base lr would show in the parameters). The MoE stages are
    torch's in both runs (the CPU interpreter is slow; the graph test below runs Triton's)."""
    plain = _trainer(_model(), tmp_path / "plain", max_grad_norm=0.0)
    plain.train()
    model = _model()
    trainer = fastest(_trainer(model, tmp_path / "fast", max_grad_norm=0.0))
    record = model.moe_lab_fastest
    assert record["fused_cross_entropy"] == record["fused_norm"] == record["fused_rope"] == "on"
    assert "input_ids" in inspect.signature(model.forward).parameters, "the Trainer keeps the columns it names"
    assert record["cuda_graphs"].startswith("off: the model trains on cpu")
    assert record["optimizer"].startswith("on") and record["optimizer_in_backward"].startswith("on (inline")
    assert model.moe_lab_options == moe_lab.Options(fused_cross_entropy=True, fused_norm=True, fused_rope=True)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, TritonAdamWInBackward)
    assert ([(len(g["params"]), g["weight_decay"]) for g in trainer.optimizer.param_groups]
            == [(len(g["params"]), g["weight_decay"]) for g in plain.optimizer.param_groups])
    n_params = sum(p.requires_grad for p in model.parameters())
    assert updates_lr == [0.0] * n_params + [LR] * n_params
    assert all(p.grad is None for p in model.parameters()), "gradients are freed inside backward"
    _assert_same_training(plain, trainer)


@needs_interpreter
def test_the_default_max_grad_norm_keeps_clipping_and_steps_after_backward(tmp_path, updates_lr):
    """The Trainer's default max_grad_norm=1.0 clips (the tiny model's gradient norm is above 1): TritonAdamW
    steps after backward on the clipped gradients, as the plain Trainer's AdamW does."""
    plain = _trainer(_model(), tmp_path / "plain")
    plain.train()
    assert plain.args.max_grad_norm == 1.0
    assert all(h["grad_norm"] > 1.0 for h in plain.state.log_history if "grad_norm" in h), "no clipping to test"
    model = _model()
    trainer = fastest(_trainer(model, tmp_path / "fast"))
    assert model.moe_lab_fastest["optimizer"].startswith("on")
    assert model.moe_lab_fastest["optimizer_in_backward"].startswith("off: gradient clipping (max_grad_norm=1.0")
    trainer.train()
    assert type(trainer.optimizer.optimizer) is TritonAdamW
    grad_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    torch.testing.assert_close(grad_norms, [h["grad_norm"] for h in plain.state.log_history if "grad_norm" in h],
                               rtol=1e-4, atol=1e-6)
    assert sorted(set(updates_lr)) == [0.0, LR]
    _assert_same_training(plain, trainer)


@needs_interpreter
def test_emulated_cuda_graphs_through_fastest(tmp_path, emulated_cuda_graphs):
    """Where graphs can be captured (emulated on the CPU: tests/graph_emulation.py) and the stages are
    graph-safe (Triton's), fastest turns them on too: one capture, and one step (a replay) trains as
    the plain Trainer with the torch stages does."""
    steps = dict(max_grad_norm=0.0, max_steps=1, warmup_steps=0)
    plain = _trainer(_model(), tmp_path / "plain", **steps)
    plain.train()
    model = _model(backend="triton")
    trainer = fastest(_trainer(model, tmp_path / "fast", **steps))
    assert model.moe_lab_fastest["cuda_graphs"] == "on"
    assert model.moe_lab_options.cuda_graphs and model.config.use_cache is False
    trainer.train()
    assert model.moe_lab_cuda_graphs.captures == 1
    # one AdamW step at lr 0.01 moves each weight by about lr * sign(grad): a gradient within rounding
    # of zero (Triton's stages against torch's) can move its weight by a fraction of lr, so the weights'
    # tolerance is 1% of one step
    _assert_same_training(plain, trainer, atol=1e-4)


def _rotates_backwards(q, k, cos, sin, unsqueeze_dim=1):
    """A rotary function of none of the fused kernel's forms (rotate-half by the negated angles)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import rotate_half

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos - rotate_half(q) * sin, k * cos - rotate_half(k) * sin


@needs_interpreter
def test_what_cannot_apply_is_skipped_with_the_reason(tmp_path, caplog, monkeypatch):
    """A modeling file whose rotary is none of the fused kernel's forms: skipped, warned, recorded, and
    left off in the options; the rest applies. The torch backend cannot be graphed: recorded with why."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    monkeypatch.setattr(modeling_qwen3_moe, "apply_rotary_pos_emb", _rotates_backwards)
    model = _model()
    fastest(_trainer(model, tmp_path, max_grad_norm=0.0))
    record = model.moe_lab_fastest
    assert record["fused_rope"].startswith("off: fused_rope: ")
    assert "fused_rope skipped" in caplog.text
    assert record["fused_norm"] == record["fused_cross_entropy"] == "on"
    assert record["moe_backend"] == "torch"
    assert not model.moe_lab_options.fused_rope and model.moe_lab_options.fused_norm


@needs_interpreter
@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_gpt_oss_and_deepseek_get_the_fused_rotary(tmp_path, family):
    """GPT-OSS's half-width rotary and DeepSeek-V3's interleaved pairs are forms of the fused kernel:
    fastest switches it on for them as for the rotate-half families."""
    model = _model(family)
    fastest(_trainer(model, tmp_path, max_grad_norm=0.0))
    assert model.moe_lab_fastest["fused_rope"] == "on" and model.moe_lab_options.fused_rope


def test_cuda_graph_refusals_are_recorded(tmp_path, emulated_cuda_graphs):
    """Stages that wait on the host (the torch backend) and gradient checkpointing keep graphs off."""
    model = _model()
    fastest(_trainer(model, tmp_path, max_grad_norm=0.0, gradient_checkpointing=True))
    assert model.moe_lab_fastest["cuda_graphs"].startswith("off: gradient checkpointing")
    assert model.moe_lab_fastest["optimizer_in_backward"].startswith("off: gradient checkpointing")
    model = _model()
    fastest(_trainer(model, tmp_path, max_grad_norm=0.0))
    assert "not CUDA-graph safe" in model.moe_lab_fastest["cuda_graphs"]
    assert not model.moe_lab_options.cuda_graphs


@needs_interpreter
def test_graphs_under_the_trainers_mixed_precision_turn_the_autocast_cache_off(tmp_path, emulated_cuda_graphs):
    """bf16=True: accelerate's autocast around the forward must keep no weight cache for a capture."""
    model = _model(backend="triton")
    trainer = fastest(_trainer(model, tmp_path, max_grad_norm=0.0, bf16=True))
    assert model.moe_lab_fastest["cuda_graphs"].startswith("on (the Trainer's mixed-precision autocast")
    assert trainer.accelerator.autocast_handler.cache_enabled is False


def test_on_the_cpu_without_the_interpreter_the_trainers_adamw_runs(tmp_path, monkeypatch):
    """No Triton device: the kernels are skipped with the reason, the loss is chunked in PyTorch, and
    the Trainer keeps its own AdamW (recorded), which trains."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _model()
    trainer = fastest(_trainer(model, tmp_path, max_grad_norm=0.0))
    record = model.moe_lab_fastest
    for name in ("fused_norm", "fused_rope"):
        assert record[name].startswith("off: Triton does not run on cpu here")
    assert record["fused_cross_entropy"].startswith("on (its row kernels in PyTorch")
    assert record["optimizer"].startswith("off: Triton does not run on cpu here")
    assert trainer.optimizer_cls_and_kwargs is None
    trainer.train()
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW
    assert all(torch.isfinite(torch.tensor(_losses(trainer))))


def test_an_optimizer_the_user_chose_is_left_alone(tmp_path):
    model = _model()
    fastest(_trainer(model, tmp_path, optim="sgd"))
    assert model.moe_lab_fastest["optimizer"].startswith("off: args.optim='sgd' is not torch's AdamW")
    model = _model()
    own = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True), train_dataset=_Tokens(61), optimizers=(own, None))
    fastest(trainer)
    assert model.moe_lab_fastest["optimizer"].startswith("off: trainer.optimizer is already set")
    assert trainer.optimizer is own and trainer.optimizer_cls_and_kwargs is None


def test_refuses_what_it_cannot_change(tmp_path):
    plain = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe", layers=1))
    with pytest.raises(TypeError, match="not loaded with moe_lab.AutoModelForCausalLM"):
        fastest(_trainer(plain, tmp_path))
    trainer = transformers.Trainer(model_init=lambda: _model(), args=transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True), train_dataset=_Tokens(61))
    with pytest.raises(ValueError, match="model_init"):
        fastest(trainer)


@needs_interpreter
def test_fast_optimizer_in_a_loop_of_ones_own():
    """fast_optimizer in backward, with a scheduler and a state_dict round trip (which replaces the param
    group dicts), equals torch's AdamW stepped after backward."""
    config = tiny_config("qwen3_moe", layers=1)
    torch.manual_seed(0)
    reference = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="torch")
    ours = copy.deepcopy(reference)
    groups = lambda m: [{"params": [p for n, p in m.named_parameters() if "norm" not in n]},  # noqa: E731
                        {"params": [p for n, p in m.named_parameters() if "norm" in n], "weight_decay": 0.0}]
    plain = torch.optim.AdamW(groups(reference), lr=LR, weight_decay=0.1, foreach=False)
    fast = fast_optimizer(groups(ours), lr=LR, weight_decay=0.1)
    assert isinstance(fast, TritonAdamWInBackward) and not fast.side_stream
    fast.load_state_dict(fast.state_dict())
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: [0.5, 1.0, 0.25, 0.0][step]) for o in (plain, fast)]
    for step in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(step))
        for model, optimizer, schedule in zip((reference, ours), (plain, fast), schedules):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    for (name, expected), got in zip(reference.named_parameters(), ours.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert type(fast_optimizer(ours, in_backward=False)) is TritonAdamW


def test_in_backward_side_stream_needs_cuda_parameters():
    with pytest.raises(ValueError, match="needs CUDA parameters"):
        TritonAdamWInBackward([torch.nn.Parameter(torch.ones(2))], side_stream=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_everything_is_on_and_trains_like_the_plain_trainer(tmp_path):
    """The fastest recorded step's configuration on a real Trainer: Triton stages, the fused loss, norm
    and rotary, CUDA graphs and TritonAdamW inside backward on a second stream; three float32 steps (a
    capture, then replays) agree with the plain Trainer on the torch stages."""
    steps = dict(max_grad_norm=0.0, max_steps=3, use_cpu=False)
    plain = _trainer(_model(), tmp_path / "plain", **steps)
    plain.train()
    model = _model(backend="triton")
    trainer = fastest(_trainer(model, tmp_path / "fast", **steps))
    record = model.moe_lab_fastest
    assert all(record[name] == "on" for name in ("fused_cross_entropy", "fused_norm", "fused_rope", "cuda_graphs"))
    assert record["optimizer_in_backward"] == "on (on a second CUDA stream)"
    trainer.train()
    assert model.moe_lab_cuda_graphs.captures == 1
    assert trainer.optimizer.optimizer._streams, "the updates ran on the side stream"
    _assert_same_training(plain, trainer, rtol=1e-3, atol=1e-4)
