"""Model geometries as data files (``experiments/models/*.yaml``) -> Transformers v5 configs.

A geometry file holds the public config fields of one model (random initialisation: no weights
are downloaded) plus ``full_layers``; the cell truncates it to a given layer count, which is part
of the model name in results: ``<name>-L<layers>`` (e.g. ``qwen3-30b-a3b-L8``).
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

MODELS_DIR = Path(__file__).resolve().parent / "models"

# NemotronH block-pattern letters -> v5 ``layers_block_type`` names.
_NEMOTRON_BLOCKS = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}


def available() -> list[str]:
    """Names of the geometry files shipped with the harness."""
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def load_geometry(name: str) -> dict:
    """The parsed geometry file ``experiments/models/<name>.yaml``."""
    path = MODELS_DIR / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"unknown model geometry {name!r}; known: {', '.join(available())}")
    with open(path) as f:
        geo = yaml.safe_load(f)
    if geo.get("name") != name:
        raise ValueError(f"{path}: name field {geo.get('name')!r} does not match the file name")
    return geo


def model_label(name: str, layers: int | None) -> str:
    """The model name used in result keys: ``<name>-L<layers>``."""
    return f"{name}-L{layers if layers is not None else load_geometry(name)['full_layers']}"


def config_kwargs(name: str, layers: int | None = None) -> tuple[str, dict]:
    """(model_type, config kwargs) for ``name`` truncated to ``layers`` decoder layers."""
    geo = load_geometry(name)
    full = int(geo["full_layers"])
    n = full if layers is None else int(layers)
    if not 1 <= n <= full:
        raise ValueError(f"{name}: layers must be in [1, {full}], got {n}")
    kw = copy.deepcopy(geo["config"])
    mtype = geo["model_type"]
    kw["num_hidden_layers"] = n
    if mtype == "gpt_oss":
        kw["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    elif mtype == "nemotron_h":
        pattern = geo["layer_pattern"]
        if len(pattern) != full:
            raise ValueError(f"{name}: layer_pattern has {len(pattern)} entries, full_layers is {full}")
        from transformers import NemotronHConfig

        legacy = "".join(pattern[:n])
        kw["layers_block_type"] = NemotronHConfig._pattern_to_list(legacy) if hasattr(
            NemotronHConfig, "_pattern_to_list") else [_NEMOTRON_BLOCKS[c] for c in legacy]
    return mtype, kw


def build_config(name: str, layers: int | None = None):
    """A v5 ``PretrainedConfig`` for the geometry, truncated to ``layers``."""
    from transformers import AutoConfig

    mtype, kw = config_kwargs(name, layers)
    return AutoConfig.for_model(mtype, **kw)


def attn_implementation(name: str, requested: str | None = None) -> str:
    """The attention implementation for a cell: the cell's request, else the geometry's, else sdpa."""
    return requested or load_geometry(name).get("attn_implementation") or "sdpa"
