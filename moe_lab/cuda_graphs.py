"""``cuda_graphs=True``: every decoder layer's forward and backward replayed as CUDA graphs.

On the H200 moe_lab's forward is paced by the host: issuing one step's forward took 20.0 ms on the host
against 22.6 ms on the device (v5: 16.8 vs 34.4), so the GPU waits for Python and kernel launches.
A CUDA graph replays a layer's recorded kernels with one launch. This module captures all decoder
layers at the first training forward (``torch.cuda.make_graphed_callables``, one memory pool in layer
order) and replays them afterwards; each layer's forward and its backward become one autograd node.

What a graph can replay, and so what is required (checked, else the layer runs as usual):
* static shapes: the graphs are for the [batch, seq] of the first forward; another shape recaptures;
* training with gradients, on CUDA, no attention-mask tensor (full sequences), no cache, no
  gradient checkpointing, nothing else passed to the layers but their position ids;
* no host synchronisation inside a layer and kernels that read routing from device memory: moe_lab's
  Triton backends (``triton``, ``triton_gather``) qualify; ``torch``/``eager`` and v5's experts do not
  (refused); ``fused_norm``/``fused_rope`` are fine;
* no Python hooks inside the layers that must run every step (they run once, at capture), no router
  logits collected for an auxiliary loss (refused when the config asks for them).
Parameters are read in place, so optimizers that update in place (all of PyTorch's, moe_lab's) work.
Gradients leave the graph in its static buffers; autograd copies them into ``.grad`` (the buffers stay
referenced by the graph). Tested so far: one micro-batch per step, on the CPU only the fallback.
"""
from __future__ import annotations

import logging
import types

import torch
from torch import nn

log = logging.getLogger(__name__)

GRAPHABLE_BACKENDS = ("triton", "triton_gather")


class _LayerCall(nn.Module):
    """A decoder layer as a function of tensors only: (hidden, cos, sin[, position_ids]) -> hidden."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, cos, sin, *position_ids):
        return self.layer._moe_lab_plain_forward(
            hidden, attention_mask=None, position_ids=position_ids[0] if position_ids else None,
            past_key_values=None, use_cache=False, position_embeddings=(cos, sin))


class LayerGraphs:
    """The captured graphs of one model's decoder layers, for one input shape."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self.key = None
        self.graphed: list = []
        self.captures = 0

    def capture(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids) -> None:
        extra = (position_ids,) if position_ids is not None else ()
        samples = tuple((torch.randn_like(hidden).requires_grad_(hidden.requires_grad), cos, sin, *extra)
                        for _ in self.layers)
        calls = tuple(_LayerCall(layer) for layer in self.layers)
        self.graphed = list(torch.cuda.make_graphed_callables(calls, samples))
        self.captures += 1
        log.info("cuda_graphs: captured %d decoder layers for hidden %s", len(calls), tuple(hidden.shape))


def _key(hidden, cos, position_ids):
    return (tuple(hidden.shape), hidden.dtype, hidden.device, hidden.requires_grad, tuple(cos.shape), cos.dtype,
            None if position_ids is None else tuple(position_ids.shape))


def _graphable_call(layer, hidden, attention_mask, past_key_values, use_cache, position_embeddings, kwargs) -> bool:
    return (torch.is_grad_enabled() and layer.training and hidden.is_cuda and attention_mask is None
            and past_key_values is None and not use_cache and position_embeddings is not None
            and not getattr(layer, "gradient_checkpointing", False)
            and not torch.cuda.is_current_stream_capturing()
            and all(v is None or v is False for v in kwargs.values()))


def _graphed_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                     use_cache=False, position_embeddings=None, **kwargs):
    graphs: LayerGraphs = self._moe_lab_graphs
    index = self._moe_lab_layer_index
    if not _graphable_call(self, hidden_states, attention_mask, past_key_values, use_cache, position_embeddings, kwargs):
        return self._moe_lab_plain_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                           past_key_values=past_key_values, use_cache=use_cache,
                                           position_embeddings=position_embeddings, **kwargs)
    cos, sin = position_embeddings
    key = _key(hidden_states, cos, position_ids)
    if graphs.key != key:
        if index != 0:  # capture starts at the first layer of a forward
            return self._moe_lab_plain_forward(hidden_states, attention_mask=None, position_ids=position_ids,
                                               position_embeddings=position_embeddings, **kwargs)
        graphs.capture(hidden_states, cos, sin, position_ids)
        graphs.key = key
    extra = (position_ids,) if position_ids is not None else ()
    return graphs.graphed[index](hidden_states, cos, sin, *extra)


def check_graphable(model, backend_names: dict, ep_size: int = 1) -> None:
    """ValueError, in the user's terms, for a model whose layers a CUDA graph cannot replay."""
    stages = {s: backend_names.get(s) for s in ("router", "permutation", "experts", "combine")}
    if ep_size > 1 or backend_names.get("dispatch", "local") != "local":
        raise ValueError("cuda_graphs: expert parallelism sends row counts through the host; one process only")
    if any(name not in GRAPHABLE_BACKENDS for name in stages.values()):
        raise ValueError(f"cuda_graphs: stages {stages}: only moe_lab's Triton stages keep routing on the device "
                         f"(the others wait for per-expert row counts on the host); use moe_backend in "
                         f"{GRAPHABLE_BACKENDS}")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "output_router_logits", False):
        raise ValueError("cuda_graphs: config.output_router_logits=True collects router logits with hooks that a "
                         "graph would run once; turn it off or leave cuda_graphs off")
    if getattr(model, "is_gradient_checkpointing", False):
        raise ValueError("cuda_graphs: gradient checkpointing recomputes layers outside the graphs; turn one off")


def enable_cuda_graphs(model) -> int:
    """Route every decoder layer of ``model`` through CUDA graphs captured at the first eligible
    training forward; returns how many layers."""
    decoder = getattr(model, "model", None)
    layers = list(getattr(decoder, "layers", []) or [])
    if not layers:
        raise ValueError(f"cuda_graphs: {type(model).__name__} has no model.layers of decoder layers")
    graphs = LayerGraphs(layers)
    for index, layer in enumerate(layers):
        if not hasattr(layer, "_moe_lab_plain_forward"):
            layer._moe_lab_plain_forward = layer.forward
        layer.__dict__["_moe_lab_graphs"] = graphs  # a plain attribute: not a submodule, not in state_dict
        layer._moe_lab_layer_index = index
        layer.forward = types.MethodType(_graphed_forward, layer)
    model.__dict__["moe_lab_cuda_graphs"] = graphs
    return len(layers)
