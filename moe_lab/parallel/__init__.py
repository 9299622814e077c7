"""Expert parallelism, applied from outside the model: the mesh, expert sharding and automatic
gradient reduction (`expert_parallel`), gradient clipping by the whole model's norm (`clip_grad_norm_`),
the HF Trainer's and accelerate's saving and clipping (`trainer_support`), rank-local checkpoint
loading (`loading`) and DeepEP (`deepep`)."""
from .expert_parallel import clip_grad_norm_

__all__ = ["clip_grad_norm_"]
