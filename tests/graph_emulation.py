"""CUDA graphs emulated on the CPU, to test ``moe_lab.training.cuda_graphs`` against PyTorch's real
``make_graphed_callables``: the CUDA calls it makes become no-ops, and a graph "replay" re-runs the
captured callable on the graph's static inputs and copies the results into its static output and
gradient buffers in place, without bumping version counters (what a replay does to that memory).
So PyTorch's own autograd Function, its input copies, its detached outputs and gradients and
AccumulateGrad run as they do on a GPU; the kernels themselves are the eager ones.

It reads make_graphed_callables' closures (torch 2.13's names); a torch whose internals differ
skips the tests that use it rather than pass them vacuously."""
from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
import torch.cuda.graphs as torch_graphs


class _FakeGraph:
    def __init__(self, *args, **kwargs):
        self.replay_fn = None
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.replay_fn()


class _FakeStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass


@contextlib.contextmanager
def _nothing(*args, **kwargs):
    yield


def _closure(fn) -> dict:
    return inspect.getclosurevars(fn).nonlocals


def _wire_replays(graphed_callable) -> None:
    """Give the fake forward and backward graphs of one graphed callable their replay functions."""
    try:
        outer = _closure(graphed_callable.forward)
        original, functionalized = outer["orig_fwd"], outer["graphed"]
        graphed_fn = _closure(functionalized)["Graphed"]
        fwd = _closure(graphed_fn.forward)
        bwd = _closure(inspect.unwrap(graphed_fn.backward))
        fwd_graph, bwd_graph = fwd["fwd_graph"], bwd["bwd_graph"]
        surface, static_outputs, n_user = fwd["static_input_surface"], fwd["static_outputs"], fwd["len_user_args"]
        static_grad_outputs, static_grad_inputs = bwd["static_grad_outputs"], bwd["static_grad_inputs"]
    except (KeyError, TypeError, ValueError) as exc:
        pytest.skip(f"this torch's make_graphed_callables differs from the emulated one ({exc!r})")
    state = {}

    def replay_forward():
        with torch.enable_grad():
            args = [t if t.requires_grad else t.clone() for t in surface[:n_user]]
            state["out"] = torch.utils._pytree.tree_leaves(original(*args))
        with torch.no_grad():
            for static, out in zip(static_outputs, state["out"]):
                static.data.copy_(out)

    def replay_backward():
        outs = [o for o in state["out"] if o.requires_grad]
        ins = [i for i in surface if i.requires_grad]
        grads = iter(torch.autograd.grad(outs, ins, [g for g in static_grad_outputs if g is not None],
                                         retain_graph=True))
        with torch.no_grad():
            for inp, static in zip(surface, static_grad_inputs):
                if inp.requires_grad:
                    static.data.copy_(next(grads))

    fwd_graph.replay_fn, bwd_graph.replay_fn = replay_forward, replay_backward


@pytest.fixture
def emulated_cuda_graphs(monkeypatch):
    """CPU tensors count as graph-capturable and ``torch.cuda.make_graphed_callables`` emulates graphs."""
    import moe_lab.training.cuda_graphs as cuda_graphs

    real = torch_graphs.make_graphed_callables

    def make_graphed_callables(callables, sample_args, **kwargs):
        out = real(callables, sample_args, **kwargs)
        for c in out if isinstance(out, tuple) else (out,):
            _wire_replays(c)
        return out

    for name, value in (("CUDAGraph", _FakeGraph), ("graph", _nothing), ("synchronize", lambda *a, **k: None),
                        ("Stream", _FakeStream), ("stream", _nothing), ("make_graphed_callables", make_graphed_callables)):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch_graphs, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(cuda_graphs, "_graph_device", lambda t: True)
    yield
