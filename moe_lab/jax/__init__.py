"""JAX interop: the readable, differentiable JAX reference of the MoE layer (`reference`) and the
torch <-> JAX bridge over DLPack (`dlpack`). Needs the `jax` extra."""
