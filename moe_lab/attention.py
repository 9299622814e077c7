"""cuDNN attention as a Transformers v5 attention implementation: ``attn_implementation="moe_lab_cudnn"``.

v5's ``sdpa`` leaves the choice of kernel to PyTorch, which on Hopper picks FlashAttention-2 for a
causal, unmasked, grouped-query call. PyTorch's cuDNN attention backend is another kernel for the
same call; this module registers an attention function that asks for it first:

* the fast path (no mask tensor, query and key of one length, no dropout, no position bias) runs
  ``scaled_dot_product_attention`` under ``sdpa_kernel([CUDNN_ATTENTION])``, with grouped-query
  heads passed natively (``enable_gqa``) where cuDNN accepts that, else with the key/value heads
  repeated (``repeat_kv``: two [batch, heads, seq, head_dim] copies);
* anything else, or a device or shape cuDNN refuses (every CPU call), goes to v5's own
  ``sdpa_attention_forward`` unchanged.

``dispatch_counts`` counts which path each call took, so a benchmark can show what actually ran.
Importing ``moe_lab`` registers the name, for v5 models as well as moe_lab ones.
"""
from __future__ import annotations

import collections
import functools

import torch

ATTENTION_NAME = "moe_lab_cudnn"

# path -> number of calls: "cudnn" (native grouped-query heads), "cudnn-repeat-kv", "sdpa" (v5's function)
dispatch_counts: collections.Counter = collections.Counter()


@functools.lru_cache(maxsize=64)
def _cudnn_accepts(q_shape, k_shape, dtype, device, causal: bool, gqa: bool) -> bool:
    """Whether PyTorch's cuDNN backend takes this call (asked once per shape, with empty tensors)."""
    if device.type != "cuda":
        return False
    q = torch.empty(q_shape, dtype=dtype, device=device)
    k = torch.empty(k_shape, dtype=dtype, device=device)
    try:
        params = torch.backends.cuda.SDPAParams(q, k, k, None, 0.0, causal, gqa)
        return bool(torch.backends.cuda.can_use_cudnn_attention(params, False))
    except (AttributeError, TypeError, RuntimeError):  # a torch without this query
        return False


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, kv_heads, seq, dim] -> [batch, kv_heads * groups, seq, dim], each head repeated in place."""
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def cudnn_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """v5 attention-function signature. query [batch, heads, seq, dim]; key/value
    [batch, kv_heads, seq, dim]. Returns ([batch, seq, heads, dim], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    fast = (attention_mask is None and dropout == 0.0 and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions", False) and query.shape[2] == key.shape[2] and query.shape[2] > 1)
    if fast:
        groups = query.shape[1] // key.shape[1]
        if _cudnn_accepts(tuple(query.shape), tuple(key.shape), query.dtype, query.device, bool(causal), groups > 1):
            path, gqa = "cudnn", groups > 1
        elif groups > 1 and _cudnn_accepts(tuple(query.shape), tuple(query.shape), query.dtype, query.device,
                                           bool(causal), False):
            path, gqa = "cudnn-repeat-kv", False
            key, value = _repeat_heads(key, groups), _repeat_heads(value, groups)
        else:
            path = None
        if path is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            dispatch_counts[path] += 1
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                out = torch.nn.functional.scaled_dot_product_attention(
                    query, key, value, is_causal=bool(causal), scale=scaling, enable_gqa=gqa)
            return out.transpose(1, 2).contiguous(), None
    dispatch_counts["sdpa"] += 1
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register() -> None:
    """Register ``moe_lab_cudnn`` with v5's attention and mask interfaces (masks as for ``sdpa``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, cudnn_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
