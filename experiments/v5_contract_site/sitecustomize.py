"""Started by every Python process of a v5-contract run (`python -m experiments.v5_contract` puts this
directory first on PYTHONPATH): pytest, its xdist workers and the ranks that distributed tests spawn
all get the run's mode (vanilla or moe_lab in place) before they import a test module. Does nothing
unless MOE_LAB_CONTRACT_MODE is set."""
import os

if os.environ.get("MOE_LAB_CONTRACT_MODE"):
    from experiments.v5_contract_plugin import activate_from_environment

    activate_from_environment()
