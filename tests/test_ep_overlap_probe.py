"""experiments/ep_overlap_probe.py runs end to end on gloo at a tiny geometry and writes its JSON."""
from __future__ import annotations

import json


def test_ep_overlap_probe_smoke(tmp_path):
    from experiments import ep_overlap_probe

    out = tmp_path / "probe.json"
    assert ep_overlap_probe.main(["--tokens", "24", "--hidden", "32", "--intermediate", "16", "--experts", "4",
                                  "--chunks", "3", "--warmup", "1", "--repeats", "1", "--inner", "1",
                                  "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["ms_median"]) == {"all2all", "all2all_overlap"} and record["world"] == 2
    assert record["geometry"]["chunks"] == 3 and record["speedup_overlap"] > 0
    assert ep_overlap_probe.main(["--experts", "3", "--out", str(out)]) == 2  # not divisible by the world
