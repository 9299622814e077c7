"""moe_lab: fast Mixture-of-Experts fine-tuning research on top of Hugging Face Transformers v5.

    import moe_lab
    model = moe_lab.AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-30B-A3B")   # moe_backend="auto"
    trainer = transformers.Trainer(model=model, ...)
    moe_lab.fastest(trainer)   # optional: the fastest mode and its training-loop contract
"""
from . import stages as _stages  # noqa: F401  (registers every stage implementation and the backend words)
from .stages.experts import ExpertsSpec
from .parallel.expert_parallel import apply_expert_parallel
from .families import FAMILIES, UnsupportedModelError
from .hf import AutoModelForCausalLM, experts_implementation_name, patch_model, register_v5_experts_functions
from .layer import MoELayer
from .options import Options
from .registry import STAGES, available_backends, register_backend, register_stage, resolve_backend
from .stages.router import RoutingSpec, route_reference
from .analysis import stats  # noqa: F401  (NumPy only)
from .analysis.trace import RoutingTrace, load_trace, trace_routing
from .training.fastest import fastest

__version__ = "0.1.0"

register_v5_experts_functions()

__all__ = [
    "AutoModelForCausalLM",
    "ExpertsSpec",
    "FAMILIES",
    "MoELayer",
    "Options",
    "RoutingSpec",
    "RoutingTrace",
    "STAGES",
    "UnsupportedModelError",
    "apply_expert_parallel",
    "available_backends",
    "load_trace",
    "trace_routing",
    "experts_implementation_name",
    "fastest",
    "patch_model",
    "register_backend",
    "register_stage",
    "resolve_backend",
    "route_reference",
]
