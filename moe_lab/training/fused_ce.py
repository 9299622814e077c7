"""Chunked linear + cross-entropy: the LM-head loss without ever holding the full logits.

v5's causal-LM loss materialises logits [N, V] in the model dtype, upcasts them to float32 and keeps
them for backward (at 4096 tokens and Qwen3's 151,936-token vocabulary: 1.2 GB bf16 + 2.5 GB fp32).
Here forward runs the LM head in token chunks and keeps only the per-token log-sum-exp [N];
backward recomputes the logits in vocabulary slices (one extra LM-head GEMM in all) and turns each
slice into its part of the weight gradient (written once) and into the input gradient.

Numerics follow v5's `ForCausalLMLoss`: logits in float32 for the softmax, labels shifted left by one
(the last position ignored), `ignore_index` -100, mean over the counted tokens, or a sum divided by
`num_items_in_batch` when given. The input gradient is accumulated over slices in float32.
Shapes: N tokens, H hidden, V vocabulary.

On CUDA (and on the CPU under Triton's interpreter) the per-row work runs as two Triton kernels over
the logits in their own dtype (`triton_kernels.cross_entropy`: log-sum-exp + target logit in forward,
the softmax gradient in place in backward), so each logits chunk is written once by the GEMM and read
once; the plain PyTorch path (`impl="torch"`; `auto` picks it on the CPU without the interpreter)
goes through float32 copies.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .._checks import require_all

DEFAULT_CHUNK_BYTES = 256 * 2**20  # logits per chunk (float32 on the torch path, the model dtype with Triton)
IMPLS = ("auto", "torch", "triton")


def _chunk_len(other_dim: int, chunk_bytes: int, element_size: int = 4) -> int:
    """Length of one chunk of ``chunk_bytes`` of logits whose other dimension is ``other_dim``: token
    rows (other_dim = vocabulary) or vocabulary columns (other_dim = tokens); from 128 up a multiple
    of 128, below that of 8 where possible.

    The multiple matters: a vocabulary slice of odd width gives the slice's logits a row stride that
    is not 16-byte aligned, and cuBLAS then falls back to slow GEMM kernels (on the H200 the chunked
    loss at 6 x 4096 tokens, 5461-wide slices, cost ~280 ms a step more than at 4096 tokens, 32768-wide)."""
    length = max(1, chunk_bytes // (element_size * other_dim))
    if length >= 128:
        return length - length % 128
    return length - length % 8 if length >= 8 else length


def log_sum_exp(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise ``max + log(sum(exp(x - max)))`` of logits [N, V] (float32), as v5's loss computes it
    (``log_softmax``): NaN for a row with a NaN or +inf logit or with only -inf logits, where
    ``torch.logsumexp`` gives +inf / -inf (and the loss would be inf instead of v5's NaN)."""
    row_max = logits.amax(dim=-1, keepdim=True)  # NaN if any logit is NaN
    return (row_max + torch.log(torch.exp(logits - row_max).sum(dim=-1, keepdim=True))).squeeze(-1)


def _use_triton(impl: str, hidden: torch.Tensor) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"linear_cross_entropy: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        from triton_kernels._common import runs_on

        return runs_on(hidden.device)
    return impl == "triton"


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward in token chunks (per-token log-sum-exp); backward in vocabulary chunks: for a slice of
    the vocabulary every token's softmax gradient is known from the saved log-sum-exp, so that
    slice's weight gradient is one GEMM written once (as v5 writes it), and only the small input
    gradient [N, H] is accumulated (in float32) over slices."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, denominator, ignore_index, chunk_rows, vocab_chunk, triton):
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            stop = start + chunk_rows
            chunk_labels = labels[start:stop]
            if triton:
                from triton_kernels.cross_entropy import logsumexp_and_target

                chunk_lse, target = logsumexp_and_target(F.linear(hidden[start:stop], weight), chunk_labels)
                lse[start:stop] = chunk_lse
            else:
                logits = F.linear(hidden[start:stop], weight).float()  # [c, V]
                lse[start:stop] = log_sum_exp(logits)
                target = logits.gather(1, chunk_labels.clamp(min=0)[:, None]).squeeze(1)
            # where, not a product: an ignored row's non-finite lse must not reach the loss
            total += torch.where(chunk_labels != ignore_index, lse[start:stop] - target, 0.0).sum()
        ctx.save_for_backward(hidden, weight, labels, lse, denominator)
        ctx.ignore_index, ctx.vocab_chunk, ctx.triton = ignore_index, vocab_chunk, triton
        return total / denominator  # 0 / 0 = NaN when no token is labelled

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse, denominator = ctx.saved_tensors
        counted = labels != ctx.ignore_index
        # no labelled token: NaN loss but zero gradients, as v5's mean cross-entropy gives
        has_tokens = denominator > 0
        scale = torch.where(has_tokens, grad_loss.float() / torch.where(has_tokens, denominator, 1.0), 0.0)
        row_scale = (counted.float() * scale)[:, None]  # [N, 1]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, weight.shape[0], ctx.vocab_chunk):
            stop = min(start + ctx.vocab_chunk, weight.shape[0])
            w = weight[start:stop]
            if ctx.triton:
                from triton_kernels.cross_entropy import softmax_grad_

                grad_logits = softmax_grad_(F.linear(hidden, w), lse, labels, row_scale[:, 0].contiguous(), start)
            else:
                # softmax slice [N, v]; logits recomputed by another GEMM may exceed the saved lse by
                # rounding, which for huge logits (1e30) would make exp overflow: p <= 1 exactly
                probs = torch.exp((F.linear(hidden, w).float() - lse[:, None]).clamp(max=0.0))
                here = counted & (labels >= start) & (labels < stop)
                probs[here.nonzero().squeeze(1), labels[here] - start] -= 1.0
                grad_logits = (probs * row_scale).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight[start:stop] = grad_logits.t() @ hidden
            if grad_hidden is not None:
                grad_hidden += (grad_logits @ w).float()
        grad_hidden = None if grad_hidden is None else grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = -100, num_items_in_batch=None,
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES, impl: str = "auto") -> torch.Tensor:
    """hidden [N, H], weight [V, H], labels [N] (already aligned: label i is the target of row i) -> loss.
    ``impl``: "triton" (row kernels), "torch" (float32 copies) or "auto" (Triton on CUDA)."""
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"linear_cross_entropy: {hidden.shape[0]} rows but {labels.shape[0]} labels")
    # On a GPU nothing here waits for the device (unless Options(host_checks=True)): labels are checked
    # by a device-side assertion before any kernel reads them, and the token count stays a tensor.
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
    require_all(~bad, f"linear_cross_entropy: labels must be in [0, {weight.shape[0]}) or ignore_index={ignore_index}",
                lambda: f"found {labels[bad][:5].tolist()}")
    if num_items_in_batch is None:
        denominator = (labels != ignore_index).sum().float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    triton = _use_triton(impl, hidden)
    labels = labels.contiguous()
    element_size = hidden.element_size() if triton else 4
    chunk = _chunk_len(weight.shape[0], chunk_bytes, element_size)
    vocab_chunk = _chunk_len(hidden.shape[0], chunk_bytes, element_size)  # [N, v] slices of the same size
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, denominator.reshape(()), ignore_index, chunk,
                                            vocab_chunk, triton)


def causal_lm_loss(hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """v5's causal-LM loss from final hidden states [B, L, H] and labels [B, L] (shifted inside)."""
    ignore_index = kwargs.get("ignore_index", -100)
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return linear_cross_entropy(hidden_states.reshape(-1, hidden_states.shape[-1]), weight,
                                shifted.reshape(-1).to(hidden_states.device), **kwargs)


def _fused_forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
    """The model's forward with the loss from `causal_lm_loss`; `logits` come back empty [B, 0, V]."""
    if labels is None:
        return self._moe_lab_plain_forward(*args, **kwargs)
    kwargs.pop("logits_to_keep", None)  # the loss needs every position; no logits are returned
    captured = {}
    handle = self.get_decoder().register_forward_hook(
        lambda module, inputs, output: captured.__setitem__("hidden", output.last_hidden_state))
    try:
        empty = torch.empty(0, dtype=torch.long, device=self.lm_head.weight.device)
        out = self._moe_lab_plain_forward(*args, labels=None, logits_to_keep=empty, **kwargs)
    finally:
        handle.remove()
    loss = causal_lm_loss(captured["hidden"], self.lm_head.weight, labels, num_items_in_batch=num_items_in_batch,
                          chunk_bytes=self._moe_lab_ce_chunk_bytes)
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        loss = loss + getattr(self, "router_aux_loss_coef", 0.0) * aux.to(loss.device)
    out.loss = loss
    return out


def enable_fused_cross_entropy(model, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """Make `model(..., labels=...)` compute its loss with `causal_lm_loss` (outputs' logits empty).

    Without labels (inference, `generate()`) the model runs exactly as before.
    """
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None or getattr(lm_head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: fused cross-entropy needs a bias-free `lm_head`")
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(f"{type(model).__name__}: fused cross-entropy does not apply logit soft-capping")
    model._moe_lab_ce_chunk_bytes = chunk_bytes
    if not hasattr(model, "_moe_lab_plain_forward"):
        model._moe_lab_plain_forward = model.forward
    model.forward = _FusedForward(model)


class _FusedForward:
    """``model.forward`` with the fused loss (`_fused_forward`), with the plain forward's signature:
    the Trainer keeps only the batch columns that the model's forward names (``input_ids``, ...), read
    from ``inspect.signature(model.forward)``, which for ``_fused_forward`` itself would name none."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        return _fused_forward(self.model, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.model._moe_lab_plain_forward)
