"""Expert parallelism, applied from outside the model: the mesh, expert sharding and automatic
gradient reduction (`expert_parallel`), rank-local checkpoint loading (`loading`) and DeepEP (`deepep`)."""
