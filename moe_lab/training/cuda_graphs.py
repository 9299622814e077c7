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
  Triton backends (``triton``, ``triton_gather``) qualify; the others do not (refused);
  ``fused_norm``/``fused_rope`` are fine;
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
pool keeps every layer's activations and parameter-gradient buffers for good, so
``OptimizerInBackward``'s gradient freeing saves nothing for the decoder layers.

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
        self.graphed: list = []
        self.captures = 0
        self.use_now = False
        self.pending = False
        self.disabled: str | None = None
        self._warned: set = set()

    def warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("cuda_graphs: decoder layers run without graphs: %s", reason)

    def capture(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        if self.graphed:  # a new shape: drop the old graphs (and their pool) first
            old, self.graphed, self.key = self.graphed, [], None
            for call in old:  # each graphed forward's closure holds its module: break that cycle
                call.__dict__.pop("forward", None)
            del old
            gc.collect()
            torch.cuda.empty_cache()
            self.warn_once("recapturing for a new input shape (graphs are per [batch, seq]; vary shapes rarely)")
        # samples are private copies: they become the graphs' static inputs, which each replay overwrites
        samples = tuple((torch.randn_like(hidden).requires_grad_(True), cos.clone(), sin.clone()) for _ in self.layers)
        calls = tuple(_LayerCall(layer) for layer in self.layers)
        graph_context = torch.cuda.graph
        # "thread_local": other threads' CUDA calls (a DataLoader pinning memory) must not break the capture
        torch.cuda.graph = functools.partial(graph_context, capture_error_mode="thread_local")
        try:
            self.graphed = list(torch.cuda.make_graphed_callables(calls, samples))
        finally:
            torch.cuda.graph = graph_context
        self.captures += 1
        log.info("cuda_graphs: captured %d decoder layers for hidden %s", len(calls), tuple(hidden.shape))


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
    if not graphs.use_now:
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
