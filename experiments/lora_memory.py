"""What the LoRA systems save for backward, per decoder layer and per MoE stage (issue 25).

Builds ``lora`` and ``v5-peft-lora`` the way ``experiments/systems.py`` builds them (random init,
the geometry's attention), runs one training forward (``model(input_ids, labels=input_ids)``) under
``torch.autograd.graph.saved_tensors_hooks`` and records every distinct storage autograd keeps
(deduplicated by storage; the parameters' own storages not counted, a copy of one is): its bytes,
dtype, shape, the module that was running, the MoE stage (moe_lab: router, permutation, experts,
combine) and the autograd nodes that hold it. Per-layer figures are scaled to ``--scale-layers``::

    python -m experiments.lora_memory --layers 1 --tokens 4096 --out results/lora-memory/cpu.json

``--gpu-stages`` builds ``lora`` with the stages the H100 run planned (results/runs/h100x1-lora-1:
Triton router, permutation, ``triton_gather`` experts and combine); on the CPU that needs
``TRITON_INTERPRET=1`` and a small ``--tokens`` (the saved bytes scale with the tokens, but for the
factors' casts)::

    TRITON_INTERPRET=1 python -m experiments.lora_memory --gpu-stages --systems lora --tokens 256 \
        --out results/lora-memory/cpu-gpu-stages-256.json

The embedding's output is made to require grad (``--typical-layer``, default on), so layer 0 saves
what layers 1.. do (their input carries a gradient; layer 0's input norm would otherwise keep
nothing). On the CPU moe_lab's ``auto`` backend runs its torch stages; the GPU default runs the
Triton ones (see ``results/lora-memory/README.md`` for that difference).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import re
import time
from collections import defaultdict

import torch

from . import models, store, systems

GIB = 2 ** 30
SYSTEMS = ("v5-peft-lora", "lora")
# the stages the lora system ran on the H100 (results/runs/h100x1-lora-1, moe_lab_stages.plan)
GPU_STAGES = {"router": "triton", "permutation": "triton", "experts": "triton_gather", "combine": "triton"}


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class SavedTensors:
    """Records the storages autograd saves while active: storage key -> entry (first saver's context)."""

    def __init__(self, params):
        self.own = {_storage_key(p) for p in params}
        self.entries: dict[int, dict] = {}
        self.modules: list[str] = []
        self.stages: list[str] = []

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key in self.own or t.device.type == "meta":
            return t
        where = self.modules[-1] if self.modules else ""
        stage = self.stages[-1] if self.stages else ""
        entry = self.entries.get(key)
        if entry is None:
            self.entries[key] = dict(bytes=t.untyped_storage().nbytes(), dtype=str(t.dtype).replace("torch.", ""),
                                     shape=list(t.shape), module=where, stage=stage, saves=1, ops=[])
        else:
            entry["saves"] += 1
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def track_modules(self, model):
        """Forward hooks that keep the running module's qualified name on a stack."""
        handles = []
        for name, module in model.named_modules():
            def pre(_m, _a, name=name):
                self.modules.append(name)

            def post(_m, _a, _o):
                self.modules.pop()
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        return handles

    @contextlib.contextmanager
    def stage(self, name: str):
        self.stages.append(name)
        try:
            yield
        finally:
            self.stages.pop()

    def name_ops(self, root) -> None:
        """Walk the autograd graph from ``root`` and list, per storage, the nodes that saved it."""
        seen, todo = set(), [root]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for tensor in _node_saved(node):
                entry = self.entries.get(_storage_key(tensor))
                if entry is not None and node.name() not in entry["ops"]:
                    entry["ops"].append(node.name())
            todo.extend(n for n, _ in node.next_functions)


def _node_saved(node):
    """The tensors an autograd node holds: `_saved_*` attributes (built-in ops) or `saved_tensors`
    (Python Functions)."""
    out = []
    if hasattr(node, "saved_tensors"):
        with contextlib.suppress(RuntimeError):
            out.extend(t for t in node.saved_tensors if isinstance(t, torch.Tensor))
    for attr in dir(node):
        if not attr.startswith("_saved_"):
            continue
        with contextlib.suppress(RuntimeError):
            value = getattr(node, attr)
            values = value if isinstance(value, (tuple, list)) else (value,)
            out.extend(v for v in values if isinstance(v, torch.Tensor) and v.numel())
    return out


@contextlib.contextmanager
def _moe_lab_stages(rec: SavedTensors):
    """Label moe_lab's permutation / experts / combine stages (the router is its module, `mlp.gate`),
    and a fused permutation + experts pair."""
    from moe_lab import layer as moe_layer
    from moe_lab.registry import StageChoice

    def labelled(stage, fn):
        def run(*args, **kwargs):
            with rec.stage(stage):
                return fn(*args, **kwargs)
        return run

    saved = {s: StageChoice.__dict__[s] for s in ("permutation", "experts", "combine")}
    for stage in saved:
        setattr(StageChoice, stage, property(lambda self, s=stage: labelled(s, self.impls[s].fn)))
    fused_pair = moe_layer.fused_pair

    def labelled_pair(choice):  # permutation + experts (+ the combine, labelled by its own call)
        fn = fused_pair(choice)
        return None if fn is None else labelled("permutation+experts", fn)
    moe_layer.fused_pair = labelled_pair
    try:
        yield
    finally:
        moe_layer.fused_pair = fused_pair
        for stage, prop in saved.items():
            setattr(StageChoice, stage, prop)


def component(entry: dict) -> tuple[str, str]:
    """(scope, component): scope "layer" (per decoder layer) or "model" (once)."""
    module, stage = entry["module"], entry["stage"]
    m = re.search(r"layers\.\d+\.(.*)$", module)
    if m is None:
        if "embed_tokens" in module:
            return "model", "embedding"
        if module.endswith("model.norm") or module.endswith(".norm"):
            return "model", "final norm"
        if "lm_head" in module:
            return "model", "lm head"
        return "model", "loss (cross-entropy)"
    rest = m.group(1)
    if rest.startswith("self_attn"):
        if re.search(r"\.(q|k)_norm", rest):
            return "layer", "attention: q/k norm"
        if "lora" in rest:
            return "layer", "attention: LoRA A/B"
        if re.search(r"\.(q|k|v|o)_proj", rest):
            return "layer", "attention: projections"
        return "layer", "attention: rope + sdpa"
    if rest.startswith("input_layernorm"):
        return "layer", "input norm"
    if rest.startswith("post_attention_layernorm"):
        return "layer", "post-attention norm"
    if rest.startswith("mlp"):
        if stage:
            return "layer", f"moe: {stage}"
        if ".gate" in rest and "gate_up" not in rest:
            return "layer", "moe: router"
        if "experts" in rest:
            return "layer", "moe: experts"
        return "layer", "moe: block (router softmax/top-k, combine)"
    return "layer", rest or "decoder layer (residuals)"


def build(system: str, config, attn: str, moe_backend=None):
    """The model of ``system`` as the harness builds it; ``moe_backend`` (``lora`` only): moe_lab
    with those stages instead of its default, then the same PEFT config."""
    if moe_backend is None:
        return systems.build_model(system, config, dtype=torch.bfloat16, attn=attn, device=torch.device("cpu"), world=1)
    import moe_lab

    spec = systems.parse(system)
    if spec.library != "moe_lab":
        raise ValueError(f"{system}: stages are moe_lab's; {system} is not a moe_lab system")
    model = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend=moe_backend, dtype=torch.bfloat16,
                                                     attn_implementation=attn)
    return systems.with_adapter(model, spec)


def account(system: str, model_name: str, layers: int, tokens: int, seed: int, typical_layer: bool,
            moe_backend=None) -> dict:
    """One forward of ``system``: every saved storage with its context, and the totals by component."""
    config = models.build_config(model_name, layers)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = build(system, config, models.attn_implementation(model_name), moe_backend)
    model.train()
    build_s = time.perf_counter() - t0
    rec = SavedTensors(list(model.parameters()) + list(model.buffers()))
    handles = rec.track_modules(model)
    embed = model.get_input_embeddings()
    if typical_layer:
        handles.append(embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    plan = None
    t0 = time.perf_counter()
    with _moe_lab_stages(rec), rec.hooks():
        out = model(input_ids=ids, labels=ids, use_cache=False)
    forward_s = time.perf_counter() - t0
    rec.name_ops(out.loss.grad_fn)
    if hasattr(model, "moe_lab_plan"):
        with contextlib.suppress(Exception):
            plan = {k: v for k, v in dict(model.moe_lab_plan).items() if k.endswith("layers.0.mlp")}
    for h in handles:
        h.remove()
    entries = sorted(rec.entries.values(), key=lambda e: (-e["bytes"], e["module"]))
    by_component: dict = defaultdict(lambda: defaultdict(int))
    for e in entries:
        scope, comp = component(e)
        e["scope"], e["component"] = scope, comp
        by_component[scope][comp] += e["bytes"]
    result = dict(system=system, moe_backend=moe_backend, model=model_name, layers=layers, tokens=tokens,
                  dtype="bfloat16", typical_layer=typical_layer, plan=plan, build_s=round(build_s, 1), forward_s=round(forward_s, 1),
                  logits=dict(shape=list(out.logits.shape), dtype=str(out.logits.dtype).replace("torch.", ""),
                              bytes=out.logits.untyped_storage().nbytes()),
                  saved=entries, by_component={s: dict(c) for s, c in by_component.items()},
                  trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  trainable_dtypes=sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}))
    del out, model, rec
    gc.collect()
    return result


def scale(result: dict, to_layers: int) -> dict:
    """Totals at ``to_layers`` decoder layers: per-layer components x layers (the measured layers'
    mean) plus the once-per-model ones."""
    per_layer = {k: v / result["layers"] for k, v in result["by_component"].get("layer", {}).items()}
    once = result["by_component"].get("model", {})
    total = sum(per_layer.values()) * to_layers + sum(once.values())
    return dict(layers=to_layers, per_layer_gib=sum(per_layer.values()) / GIB, once_gib=sum(once.values()) / GIB,
                saved_gib=total / GIB, with_logits_gib=(total + result["logits"]["bytes"]) / GIB)


def table(results: list[dict], to_layers: int) -> str:
    """A text table: per-layer MiB by component (one column per system), then the totals."""
    comps = []
    for scope in ("layer", "model"):
        for r in results:
            for c in r["by_component"].get(scope, {}):
                if (scope, c) not in comps:
                    comps.append((scope, c))
    names = [r["system"] for r in results]
    lines = [f"{'component':<46}" + "".join(f"{n:>16}" for n in names), "-" * (46 + 16 * len(names))]
    for scope, c in comps:
        cells = []
        for r in results:
            v = r["by_component"].get(scope, {}).get(c, 0) / (r["layers"] if scope == "layer" else 1)
            cells.append(f"{v / 2 ** 20:>12.1f} MiB")
        lines.append(f"{('per layer  ' if scope == 'layer' else 'once       ') + c:<46}" + "".join(cells))
    lines.append("-" * (46 + 16 * len(names)))
    totals = (("per_layer_gib", "per layer"), ("once_gib", "once"), ("saved_gib", f"saved, {to_layers} layers"),
              ("with_logits_gib", f"+ logits, {to_layers} layers"))
    for key, label in totals:
        lines.append(f"{label:<46}" + "".join(f"{scale(r, to_layers)[key]:>12.3f} GiB" for r in results))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen3-30b-a3b", help="a geometry of experiments/models/")
    p.add_argument("--layers", type=int, default=1, help="decoder layers built (each is measured)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the one sequence")
    p.add_argument("--scale-layers", type=int, default=8, help="the layer count the totals are scaled to")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-typical-layer", dest="typical_layer", action="store_false",
                   help="leave the embedding's output without grad (layer 0 as it is, not as layers 1..)")
    p.add_argument("--gpu-stages", action="store_true",
                   help="lora with the H100 run's stages (GPU_STAGES; on the CPU under TRITON_INTERPRET=1)")
    p.add_argument("--out", help="JSON file to write (atomically)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(True)
    results = [account(s, args.model, args.layers, args.tokens, args.seed, args.typical_layer,
                       GPU_STAGES if args.gpu_stages and s == "lora" else None) for s in args.systems]
    for r in results:
        r["scaled"] = scale(r, args.scale_layers)
    text = table(results, args.scale_layers)
    print(text)
    if args.out:
        store.write_json(args.out, dict(args=vars(args), torch=torch.__version__, results=results, table=text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
