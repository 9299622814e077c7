"""moe_lab experiment harness: cells, sweeps, FLOP counting, routing regimes and reports.

Entry points: ``python -m experiments.sweep`` (run a preset grid) and
``python -m experiments.report`` (tables, figures and a summary.json from raw runs: your ``runs/`` by
default, the committed ``results/`` with ``--results``).
"""
