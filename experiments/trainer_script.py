"""An unmodified Hugging Face ``transformers.Trainer`` script: the benchmark of moe_lab's promise.

The promise is that changing one import line of a training script makes it faster::

    from transformers import AutoModelForCausalLM      # vanilla Transformers v5   (system v5-trainer)
    from moe_lab import AutoModelForCausalLM           # the one changed line      (system trainer)

and that one more documented line, ``moe_lab.fastest(trainer)`` right after the ``Trainer(...)`` is
built, turns on moe_lab's fastest mode (system ``trainer-max``). ``train`` below is that script: a
model from a config (random initialisation, no weights downloaded), a dataset of random tokens, the
Trainer with its default optimizer, schedule and gradient clipping, and ``trainer.train()``. The only
things a plain script would not have are ``StepTimer``, a ``TrainerCallback`` that times each step,
and the arguments that let the benchmark harness (``experiments/trainer_cell.py``) choose the
model, the shape and the import. Run it on its own::

    python -m experiments.trainer_script --model tiny-qwen3-moe --device cpu --dtype fp32 --library v5
    python -m experiments.trainer_script --model qwen3-30b-a3b --layers 8 --seq 4096            # moe_lab, one GPU
    python -m experiments.trainer_script --model qwen3-30b-a3b --layers 8 --seq 4096 --fastest  # + moe_lab.fastest

What a step is: ``StepTimer`` synchronises the device at ``on_step_begin`` and ``on_step_end`` and
times what lies between: forward and backward (under the Trainer's autocast when ``bf16``), the
gradient-norm clipping (``max_grad_norm`` 1.0), the optimizer step, the learning-rate scheduler and
``zero_grad``. Fetching the next batch and the Trainer's bookkeeping between two steps fall outside
(``gap_ms``: from one step's end to the next one's beginning).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments


class RandomTokens(torch.utils.data.Dataset):
    """``num_samples`` sequences of ``seq_len`` random token ids, drawn once from ``seed``; each
    sample's labels are its inputs (the model shifts them)."""

    def __init__(self, vocab_size: int, seq_len: int, num_samples: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StepTimer(TrainerCallback):
    """Times every optimizer step of ``trainer.train()`` between a device synchronisation at its
    beginning and one at its end, keeps the loss the model returned in it, and the peak device
    memory of training (``torch.cuda.max_memory_allocated`` since training began).

    ``steps``: one dict per step, ``{"step", "warmup", "step_ms", "gap_ms", "loss"}``; the first
    ``warmup`` steps are marked and left out of ``measured_ms``. The loss is read by a forward hook
    on the model (the script logs nothing), as a detached tensor, and turned into a number after the
    step's closing synchronisation."""

    def __init__(self, warmup: int = 0):
        self.warmup = warmup
        self.steps: list[dict] = []
        self.peak_bytes = self.peak_reserved_bytes = None
        self._device = None
        self._hook = None
        self._losses: list[torch.Tensor] = []
        self._began = self._ended = None

    def _sync(self) -> None:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _keep_loss(self, module, inputs, output) -> None:
        loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._device = args.device
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        if model is not None:
            self._hook = model.register_forward_hook(self._keep_loss)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._began = time.perf_counter()
        self._losses = []

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        ended = time.perf_counter()
        gap = (self._began - self._ended) * 1e3 if self._ended is not None else None
        losses = [float(x.float()) for x in self._losses]  # (already computed: the device is synchronised)
        self.steps.append({"step": len(self.steps), "warmup": len(self.steps) < self.warmup,
                           "step_ms": (ended - self._began) * 1e3, "gap_ms": gap,
                           "loss": statistics.fmean(losses) if losses else None})
        self._ended = ended

    def on_train_end(self, args, state, control, **kwargs):
        if self._device is not None and self._device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self._device)
            self.peak_reserved_bytes = torch.cuda.max_memory_reserved(self._device)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def measured_ms(self) -> list[float]:
        """Step times after warm-up, in milliseconds."""
        return [s["step_ms"] for s in self.steps if not s["warmup"]]


def train(auto_model, config, *, fastest: bool = False, batch: int = 1, seq: int = 4096, warmup: int = 3,
          steps: int = 10, seed: int = 0, bf16: bool = True, attn_implementation: str = "sdpa",
          device: str = "cuda", gradient_checkpointing: bool = False, callbacks=()):
    """The script: build ``auto_model.from_config(config)`` on ``device`` (random weights from
    ``seed``; bf16 parameters when ``bf16``, else fp32), train it with an unmodified ``Trainer`` for
    ``warmup + steps`` steps of ``batch`` x ``seq`` random tokens, calling ``moe_lab.fastest(trainer)``
    right after the Trainer is built when ``fastest``. Returns ``(trainer, timer, train_output)``:
    the Trainer after training, its ``StepTimer`` and what ``trainer.train()`` returned.

    ``auto_model`` is the one changed import: ``transformers.AutoModelForCausalLM`` or
    ``moe_lab.AutoModelForCausalLM``. ``callbacks`` are added after the timer."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = auto_model.from_config(config, dtype=torch.bfloat16 if bf16 else torch.float32,
                                       attn_implementation=attn_implementation)
    dataset = RandomTokens(config.vocab_size, seq, (warmup + steps) * batch, seed)
    timer = StepTimer(warmup=warmup)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            bf16=bf16,
            per_device_train_batch_size=batch,
            max_steps=warmup + steps,
            report_to=[],
            logging_strategy="no",
            save_strategy="no",
            seed=seed,
            use_cpu=device == "cpu",
            **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
               if gradient_checkpointing else {}),
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer, *callbacks])
        if fastest:
            import moe_lab

            moe_lab.fastest(trainer)
        output = trainer.train()
    return trainer, timer, output


def main(argv: list[str] | None = None) -> int:
    from experiments.models import attn_implementation, build_config

    ap = argparse.ArgumentParser(description="An unmodified transformers.Trainer script on a model geometry of "
                                             "experiments/models (random weights), timing its steps.")
    ap.add_argument("--model", default="tiny-qwen3-moe", help="a geometry of experiments/models")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's own)")
    ap.add_argument("--library", choices=("moe_lab", "v5"), default="moe_lab",
                    help="which AutoModelForCausalLM the script imports")
    ap.add_argument("--fastest", action="store_true", help="call moe_lab.fastest(trainer) after building the Trainer")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    if args.library == "moe_lab":
        from moe_lab import AutoModelForCausalLM
    else:
        from transformers import AutoModelForCausalLM
    config = build_config(args.model, args.layers)
    _, timer, _ = train(AutoModelForCausalLM, config, fastest=args.fastest, batch=args.batch, seq=args.seq,
                        warmup=args.warmup, steps=args.steps, seed=args.seed, bf16=args.dtype == "bf16",
                        attn_implementation=attn_implementation(args.model), device=args.device)
    step_ms = statistics.median(timer.measured_ms())
    print(f"{args.library}{' + moe_lab.fastest' if args.fastest else ''}, transformers {transformers.__version__}: "
          f"median step {step_ms:.1f} ms over {len(timer.measured_ms())} steps, "
          f"{args.batch * args.seq / (step_ms / 1e3):.0f} tokens/s, "
          f"losses {[round(s['loss'], 4) for s in timer.steps if s['loss'] is not None]}"
          + (f", peak {timer.peak_bytes / 2**30:.2f} GiB" if timer.peak_bytes is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
