"""``cuda_graphs=True``: every decoder layer's forward and backward replayed as CUDA graphs.

On the H200 moe_lab's forward is paced by the host: issuing one step's forward took 20.0 ms on the host
against 22.6 ms on the device (v5: 16.8 vs 34.4), so the GPU waits for Python and kernel launches.
A CUDA graph replays a layer's recorded kernels with one launch. This module captures all decoder
layers at the first training forward (``torch.cuda.make_graphed_callables``, one memory pool in layer
order) and replays them afterwards; each layer's forward and its backward become one autograd node.

What a graph can replay, and so what is required (checked; a call that does not qualify runs the
layers as usual, with a warning once per reason):
* static shapes: the graphs are for the [batch, seq] of the first forward; another shape recaptures
  (the old graphs are dropped first);
* training with gradients on CUDA, the layers' input needing a gradient, no attention-mask tensor
  (full sequences), no key/value cache (``config.use_cache`` is set to False), no gradient
  checkpointing, no other arguments to the layers (position ids are not passed: the rotary
  embedding reaches them as cos/sin);
* no host synchronisation inside a layer and kernels that read routing from device memory: moe_lab's
  Triton backends (``triton``, ``triton_gather``) qualify; the others do not (refused, except in a
  layer left eager by auto's choice, below); ``fused_norm``/``fused_rope`` are fine;
* no Python hooks inside the layers that must run every step (they run once, at capture), no router
  logits collected for an auxiliary loss (refused when the config asks for them);
* one forward, then its backward: a second forward before the backward runs eagerly (the graphs
  hold one step's activations).
Parameters are read in place, so optimizers that update in place (all of PyTorch's, moe_lab's)
work. A parameter's gradient arrives as the graph's own buffer (autograd keeps it as ``.grad``);
a gradient kept across steps (accumulation, ``zero_grad(set_to_none=False)``) is copied out at the
next graphed forward so that replays do not overwrite it. A capture that fails turns the graphs off
for the model, with a warning. Not to do after the capture: move or re-create parameters
(``model.to``, ``param.data = ...``): the graphs keep reading the old memory. Memory: the graphs'
pool keeps every captured layer's activations and parameter-gradient buffers for good, so
``OptimizerInBackward``'s gradient freeing saves nothing for the captured decoder layers.

Layers left eager by choice: under `moe_lab.fastest`, an "auto" MoE layer weighs its best graph-safe
stages replayed from a CUDA graph against its best stages of all run eagerly
(`LayerPlanner.choose_under_graphs`, `moe_lab.auto.choose_under_graphs`): on 8 big experts (Mixtral)
torch's grouped_mm run eagerly can beat the graph-safe Triton experts by more than a graph saves.
auto measures at a layer's first forward of a shape, so at the capture every such layer's forward
runs once, uncaptured, on its sample first; a decoder layer whose MoE chose eager is then left out of
the capture and runs its own forward every step, while the others are captured and replayed.
`LayerGraphs.summary` says which layers are captured and why (``model.moe_lab_fastest["cuda_graphs"]``
after the first step; each layer's ``model.moe_lab_plan[...]["auto"]``). Where replays cannot be timed
(off CUDA, Triton's interpreter, the CPU tests' emulated graphs: `why_replays_not_measured`) the
layers choose among graph-safe stages only and are all captured, as with ``cuda_graphs=True`` at load.

Under expert parallelism (``ep_size > 1``) graphs are refused (`EXPERT_PARALLEL_REASON`). What a
layer would need graphed there: the all-to-all's split sizes are this step's per-rank row counts,
which `all_to_all_single` takes as host integers (a device-to-host copy, then a collective whose
sizes differ step to step), so the dispatch and combine cannot be captured, and the experts' GEMMs
between them see a data-dependent number of rows. The parts with static shapes are the attention
block and the norms (and the router's logits) before the dispatch. Graphing those alone means
splitting every decoder layer's forward at the MoE block into graphed and eager pieces, each with
its own autograd node and static buffers, for every family's layer code (v5's decoder layers call
attention, norms and the MLP from one forward, with no seam to hook): not done here, and the whole
layer graphs above stay one-process. (A fixed-capacity dispatch, padding every rank's rows to a
static maximum, would make the sizes static at the cost of dropped or padded tokens; moe_lab keeps
dropless routing.)
"""
from __future__ import annotations

import functools
import gc
import logging
import types

import torch
from torch import nn

log = logging.getLogger(__name__)

# keyword arguments that reach the layers but not their computation (the loss's token count, output flags)
_IGNORED_KWARGS = ("num_items_in_batch", "output_attentions", "output_hidden_states", "return_dict")


class _LayerCall(nn.Module):
    """A decoder layer as a function of tensors only: (hidden, cos, sin) -> hidden."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, cos, sin):
        return self.layer._moe_lab_graphs_plain_forward(hidden, attention_mask=None, position_ids=None,
                                                        past_key_values=None, use_cache=False,
                                                        position_embeddings=(cos, sin))


class LayerGraphs:
    """The captured graphs of one model's decoder layers, for one input shape.

    ``use_now`` is decided at layer 0 of each forward and followed by the other layers; ``pending``
    is set by a replayed forward until its backward has gone through layer 0 (a second replay before
    that would overwrite the activations the first one's backward needs, so it runs eagerly)."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self.params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
        self.key = None
        self.graphed: list = []  # per layer: its graphed callable, or None for a layer left eager
        self.choices: dict[int, tuple[bool, str]] = {}  # layer index -> (captured, why) where auto chose
        self.on_capture = None  # called with this object after each capture (fastest() updates its record)
        self.captures = 0
        self.use_now = False
        self.pending = False
        self.disabled: str | None = None
        self._warned: set = set()

    def warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("cuda_graphs: decoder layers run without graphs: %s", reason)

    @property
    def eager(self) -> list[int]:
        """The layers left out of the capture (auto chose to run them eagerly)."""
        return [i for i, (captured, _) in sorted(self.choices.items()) if not captured]

    def summary(self) -> str:
        """How many layers are captured and, for those whose "auto" MoE chose, what and why, e.g.
        "31 of 32 layers captured; layers 0-4, 6-31 captured: graph-safe triton replayed 1.500 ms vs
        torch 1.920 ms eager; layer 5 eager: ..." (layers of one decision grouped)."""
        parts = [f"{len(self.layers) - len(self.eager)} of {len(self.layers)} layers captured"]
        groups: dict = {}
        for index, choice in sorted(self.choices.items()):
            groups.setdefault(choice, []).append(index)
        for (captured, why), indices in groups.items():
            parts.append(f"{_layer_span(indices)} {'captured' if captured else 'eager'}: {why}")
        return "; ".join(parts)

    def _choose(self, calls, samples) -> None:
        """Let every layer whose "auto" MoE chooses under graphs (`LayerPlanner.choose_under_graphs`)
        decide before the capture: its forward runs once, uncaptured, on its sample (auto measures at
        a layer's first forward of a shape). Fills `choices`: a layer is left eager where one of its
        MoE layers chose eager."""
        from ..layer import planners_in

        self.choices = {}
        for index, (call, sample) in enumerate(zip(calls, samples)):
            planners = [p for p in planners_in(self.layers[index]) if p.graph_choice]
            if not planners:
                continue
            with torch.enable_grad():
                call(*sample)
            decisions = [p.decision for p in planners if p.decision is not None and p.decision.graphed is not None]
            if not decisions:  # its MoE did not run: nothing chose
                self.choices[index] = (True, "its MoE layers made no choice at the first forward")
                continue
            eager = [d for d in decisions if not d.graphed]
            self.choices[index] = (False, eager[0].graphs_why) if eager else (True, decisions[0].graphs_why)

    def capture(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        if self.graphed:  # a new shape: drop the old graphs (and their pool) first
            old, self.graphed, self.key = self.graphed, [], None
            for call in old:  # each graphed forward's closure holds its module: break that cycle
                if call is not None:
                    call.__dict__.pop("forward", None)
            del old
            gc.collect()
            torch.cuda.empty_cache()
            self.warn_once("recapturing for a new input shape (graphs are per [batch, seq]; vary shapes rarely)")
        # samples are private copies: they become the graphs' static inputs, which each replay overwrites
        samples = tuple((torch.randn_like(hidden).requires_grad_(True), cos.clone(), sin.clone()) for _ in self.layers)
        calls = tuple(_LayerCall(layer) for layer in self.layers)
        self._choose(calls, samples)
        eager = set(self.eager)
        captured = [i for i in range(len(calls)) if i not in eager]
        graphed = [None] * len(calls)
        if captured:
            graph_context = torch.cuda.graph
            # "thread_local": other threads' CUDA calls (a DataLoader pinning memory) must not break the capture
            torch.cuda.graph = functools.partial(graph_context, capture_error_mode="thread_local")
            try:
                made = torch.cuda.make_graphed_callables(tuple(calls[i] for i in captured),
                                                         tuple(samples[i] for i in captured))
            finally:
                torch.cuda.graph = graph_context
            for i, call in zip(captured, made if isinstance(made, tuple) else (made,)):
                graphed[i] = call
        self.graphed = graphed
        # only the captured layers' gradients are the graphs' buffers (see _graphed_forward)
        self.params = [p for i in captured for p in self.layers[i].parameters() if p.requires_grad]
        self.captures += 1
        log.info("cuda_graphs: captured %d of %d decoder layers for hidden %s", len(captured), len(calls),
                 tuple(hidden.shape))
        if eager:
            log.warning("cuda_graphs: layers left eager by auto's measured choice: %s", self.summary())
        if self.on_capture is not None:
            self.on_capture(self)


def _layer_span(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "layers 0-2, 5"; [5] -> "layer 5"."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return ("layer " if len(indices) == 1 else "layers ") + text


def why_replays_not_measured(device: torch.device) -> str | None:
    """None where auto can time a trial replayed from a CUDA graph on `device` (CUDA, compiled Triton
    kernels), else why not: there `LayerPlanner.choose_under_graphs` keeps graph-safe stages only."""
    if device.type != "cuda":
        if _graph_device(torch.empty(0, device=device)):
            return f"CUDA graphs are emulated on {device.type} (the CPU tests' tests/graph_emulation.py)"
        return f"the layer runs on {device.type}, not CUDA"
    try:
        from triton_kernels._common import interpreting
    except ImportError:  # no Triton: no graph-safe candidate runs, so nothing is replayed anyway
        return None
    if interpreting():
        return "Triton's interpreter runs the kernels (TRITON_INTERPRET=1)"
    return None


def _key(hidden, cos):
    return (tuple(hidden.shape), hidden.dtype, hidden.device, tuple(cos.shape), cos.dtype)


def _graph_device(t: torch.Tensor) -> bool:
    """Whether graphs can be captured on ``t``'s device (CUDA; the CPU tests emulate graphs)."""
    return t.is_cuda


def _why_not_graphed(layer, hidden, attention_mask, past_key_values, use_cache, position_embeddings, kwargs):
    """None if a graph can replay this call, else why not."""
    if not (torch.is_grad_enabled() and layer.training):
        return "not training (eval or no_grad)"
    if not _graph_device(hidden):
        return "not on a CUDA device"
    if attention_mask is not None:
        return "an attention-mask tensor (padding) is passed"
    if past_key_values is not None or use_cache:
        return "a key/value cache is in use (pass use_cache=False)"
    if position_embeddings is None:
        return "no position embeddings are passed to the layers"
    if getattr(layer, "gradient_checkpointing", False):
        return "gradient checkpointing is on"
    if torch.is_autocast_enabled() and torch.is_autocast_cache_enabled():
        return "autocast with its cache on (use torch.autocast(..., cache_enabled=False))"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "a capture is already under way"
    if not hidden.requires_grad:
        return "the layers' input needs no gradient (frozen embeddings)"
    extra = [k for k, v in kwargs.items() if k not in _IGNORED_KWARGS and v is not None and v is not False]
    if extra:
        return f"the layers receive other arguments ({', '.join(sorted(extra))})"
    return None


def _plain(self, hidden_states, attention_mask, position_ids, past_key_values, use_cache, position_embeddings, kwargs):
    return self._moe_lab_graphs_plain_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                              past_key_values=past_key_values, use_cache=use_cache,
                                              position_embeddings=position_embeddings, **kwargs)


def _graphed_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                     use_cache=False, position_embeddings=None, **kwargs):
    graphs: LayerGraphs = self._moe_lab_graphs
    index = self._moe_lab_layer_index
    args = (hidden_states, attention_mask, position_ids, past_key_values, use_cache, position_embeddings, kwargs)
    if index == 0:
        graphs.use_now = False
        reason = graphs.disabled or _why_not_graphed(self, hidden_states, attention_mask, past_key_values, use_cache,
                                                     position_embeddings, kwargs)
        if reason is None and graphs.pending:
            reason = "a forward ran before the previous forward's backward (each graph holds one step's activations)"
        if reason is not None:
            if torch.is_grad_enabled() and self.training:
                graphs.warn_once(reason)
            return _plain(self, *args)
        cos, sin = position_embeddings
        if graphs.key != _key(hidden_states, cos):
            try:
                graphs.capture(hidden_states, cos, sin)
            except Exception as exc:  # noqa: BLE001 - recorded once; the layers go on without graphs
                graphs.disabled = f"capture failed ({type(exc).__name__}: {exc})"
                graphs.graphed = []
                graphs.warn_once(graphs.disabled)
                return _plain(self, *args)
            graphs.key = _key(hidden_states, cos)
        for p in graphs.params:  # a kept gradient must not be the graph's own buffer, which replays overwrite
            if p.grad is not None:
                p.grad = p.grad.clone()
        graphs.use_now = graphs.pending = True
        hidden_states.register_hook(lambda grad: setattr(graphs, "pending", False))
    if not graphs.use_now or graphs.graphed[index] is None:  # an eager step, or a layer left eager by auto
        return _plain(self, *args)
    cos, sin = position_embeddings
    return graphs.graphed[index](hidden_states, cos, sin)


EXPERT_PARALLEL_REASON = (
    "cuda_graphs: under expert parallelism the all-to-all's split sizes are this step's per-rank row counts, read "
    "on the host and different at every step, so a decoder layer (whose MoE block dispatches and combines) cannot "
    "be captured; graphs run in one process only (the attention and norm parts alone are not graphed: see "
    "moe_lab.training.cuda_graphs)")


def check_graphable(model, backend_names: dict, ep_size: int = 1) -> None:
    """ValueError, in the user's terms, for a model whose layers a CUDA graph cannot replay."""
    from ..registry import capabilities

    if ep_size > 1 or backend_names.get("dispatch", "local") != "local":
        raise ValueError(EXPERT_PARALLEL_REASON)
    unsafe = {s: n for s, n in backend_names.items() if not capabilities(s, n).graph_safe}
    if unsafe:
        raise ValueError(f"cuda_graphs: stages {unsafe} are not CUDA-graph safe (they wait for per-expert row counts "
                         "on the host); choose stages whose capabilities say graph_safe, e.g. moe_backend='triton'")
    config = model.config.get_text_config()
    if getattr(config, "output_router_logits", False):
        raise ValueError("cuda_graphs: config.output_router_logits=True collects router logits with hooks that a "
                         "graph would run once; turn it off or leave cuda_graphs off")
    if getattr(model, "is_gradient_checkpointing", False):
        raise ValueError("cuda_graphs: gradient checkpointing recomputes layers outside the graphs; turn one off")


def enable_cuda_graphs(model) -> int:
    """Route every decoder layer of ``model`` through CUDA graphs captured at the first eligible
    training forward; returns how many layers."""
    config = model.config.get_text_config()
    decoder = getattr(model, "model", None)
    layers = list(getattr(decoder, "layers", []) or [])[: config.num_hidden_layers]  # the layers v5 runs
    if not layers:
        raise ValueError(f"cuda_graphs: {type(model).__name__} has no model.layers of decoder layers")
    if getattr(config, "use_cache", False):  # a training forward would otherwise build a cache and skip the graphs
        log.info("cuda_graphs: config.use_cache set to False (pass use_cache=True to generate)")
        config.use_cache = False
    graphs = LayerGraphs(layers)
    for index, layer in enumerate(layers):
        if not hasattr(layer, "_moe_lab_graphs_plain_forward"):
            layer._moe_lab_graphs_plain_forward = layer.forward
        layer.__dict__["_moe_lab_graphs"] = graphs  # a plain attribute: not a submodule, not in state_dict
        layer._moe_lab_layer_index = index
        layer.forward = types.MethodType(_graphed_forward, layer)
    model.__dict__["moe_lab_cuda_graphs"] = graphs
    return len(layers)
