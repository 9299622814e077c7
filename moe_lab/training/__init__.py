"""Whole-step training options around the MoE layers: the fused LM-head loss, fused RMSNorm and
rotary kernels, CUDA graphs per decoder layer, and optimizers (Triton AdamW, stepping in backward)."""

from .fastest import fast_optimizer, fastest

__all__ = ["fast_optimizer", "fastest"]
