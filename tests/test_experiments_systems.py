"""Systems as structured specs (experiments/systems.py): short names are aliases of ``SystemSpec``s
and keep every committed cell id; a sweep file may give a mapping instead; the names come from
moe_lab's registry (a newly registered experts implementation is a system with no harness edit);
a name moe_lab does not know fails its cell with the reason; result keys come from the recorded
moe_lab Options (older records keep their environment-derived keys)."""
import json
import textwrap

import pytest

from experiments import cell, grid, report, systems

TINY = {"model": "tiny-qwen3-moe", "layers": 1, "seq": 16, "device": "cpu", "warmup": 1, "steps": 1,
        "dtype": "fp32", "optimizer": "adamw"}


def _preset_systems() -> list[str]:
    return sorted({s["system"] for p in grid.presets() for s in grid.expand(grid.load(p))})


# ---- names and mappings ------------------------------------------------------------------------
def test_every_preset_system_is_the_canonical_name_of_its_spec_and_of_its_mapping():
    names = _preset_systems()
    assert {"v5-ep", "ep2-deepep-triton-fsdp", "te-cutlass", "triton-fusedce-fusednorm-fusedrope-graphs-optstream",
            "v5-grouped_mm-optstream", "v5-fsdp2-grouped_mm"} <= set(names)
    for name in names:
        spec = systems.check_known(name)
        assert spec.name == name
        mapping = spec.as_mapping()
        assert systems.parse(mapping) == spec and systems.canonical_name(mapping) == name
        assert json.loads(json.dumps(mapping)) == mapping  # writable in a sweep file


@pytest.mark.parametrize("mapping,name", [
    ({"backend": "triton_gather", "options": {"fused_cross_entropy": True}, "optimizer_placement": "backward"},
     "triton_gather-fusedce-optbwd"),
    ({"backend": "te_cutlass"}, "te-cutlass"),
    ({"backend": "triton", "ep": 2, "dispatcher": "deepep", "fsdp": True, "options": {"fused_cross_entropy": True}},
     "ep2-deepep-triton-fusedce-fsdp"),
    ({"library": "v5", "experts_implementation": "grouped_mm", "optimizer_placement": "stream"}, "v5-grouped_mm-optstream"),
    ({"library": "v5", "v5_parallel": "fsdp2"}, "v5-fsdp2-grouped_mm"),
    ({"library": "v5", "v5_parallel": "ep"}, "v5-ep"),
    ({"backend": {"experts": "triton_gather", "router": "torch"}, "options": {"fused_norm": True},
      "optimizer_placement": "stream"}, "router=torch-experts=triton_gather-fusednorm-optstream"),
    ({"backend": "triton", "options": {"tma": True, "autotune": False, "fused_rope": True, "fused_norm": False}},
     "triton-fusedrope+no_autotune+tma"),
    ({"library": "v5", "loop": "trainer"}, "v5-trainer"),  # the unmodified Trainer script (trainer_script.py)
    ({"loop": "trainer"}, "trainer"),
    ({"loop": "trainer", "fastest": True}, "trainer-max"),
])
def test_a_mapping_and_its_short_name_are_one_system(mapping, name):
    spec = systems.check_known(mapping)
    assert spec.name == name and systems.parse(name) == spec
    via_mapping = cell.normalise({**TINY, "system": mapping})
    via_name = cell.normalise({**TINY, "system": name})
    assert via_mapping == via_name and via_mapping["system"] == name
    assert cell.cell_id(via_mapping) == cell.cell_id(via_name)


def test_spec_fields_say_what_the_harness_builds():
    s = systems.parse("router=torch-experts=triton_gather-fusednorm-optstream+tma")
    assert (s.library, s.kind, s.moe_backend, s.optimizer_placement) == (
        "moe_lab", "moe_lab", {"router": "torch", "experts": "triton_gather"}, "stream")
    assert dict(s.moe_lab_options) == {"fused_norm": True, "tma": True}
    assert s.optimizer_in_backward and s.optimizer_side_stream and not s.cuda_graphs
    ep = systems.parse({"backend": "triton", "ep": 2, "dispatcher": "all2all", "fsdp": True})
    assert (ep.kind, ep.ep, ep.dispatcher, ep.options) == ("moe_lab-ep", 2, "all2all", (("fsdp", True),))
    assert systems.parse("v5-ep").replicated_input and not systems.parse("ep2-all2all-torch").replicated_input
    assert systems.parse("te_cutlass").name == "te-cutlass"  # the backend word: an alias


@pytest.mark.parametrize("system,match", [
    ({"backnd": "triton"}, "unknown key 'backnd' \\(did you mean 'backend'\\?\\)"),
    ({"backend": "triton", "options": {"fused_nrom": True}}, "no field 'fused_nrom' \\(did you mean 'fused_norm'\\?\\)"),
    ({"backend": "triton", "options": {"tma": 1}}, "must be true or false"),
    ({"backend": "triton", "options": {"autotune_pin": "x.json"}}, "MOE_LAB_TRITON_PIN"),
    ({"backend": "triton", "optimizer_placement": "later"}, "must be one of step, backward, stream"),
    ({"backend": "triton", "ep": 2}, "names its dispatcher"),
    ({"backend": "triton", "fsdp": True}, "expert-parallel"),
    ({"backend": "triton", "ep": 2, "dispatcher": "all2all", "optimizer_placement": "stream"}, "one-process only"),
    ({"backend": {"dispatch": "all2all"}}, "the dispatch stage is the system's expert parallelism"),
    ({"backend": {"expert": "triton"}}, "no stage 'expert'"),
    ({"library": "v5", "backend": "triton"}, "moe_lab's keys"),
    ({"library": "v5", "v5_parallel": "ep", "experts_implementation": "eager"}, "runs grouped_mm"),
    ({"options": {"fused_norm": True}}, "names its backend"),
    ("triton+tf32+host_checks", "write it as 'triton\\+host_checks\\+tf32'"),
    ("triton+fused_norm", "write it as 'triton-fusednorm'"),
    ("triton+autotune", "write it as 'triton'"),  # the default: one name per configuration
    ("experts=triton-router=torch", "'router=torch-experts=triton'"),
    ("triton-experts=torch", "stage>=<implementation> words first"),
    ({"loop": "trainer", "options": {"fused_norm": True}}, "takes library, loop and fastest only"),
    ({"backend": "torch", "fastest": True}, "moe_lab.fastest\\(trainer\\) line \\(loop: trainer\\)"),
])
def test_malformed_systems_are_refused_with_the_reason(system, match):
    with pytest.raises(ValueError, match=match):
        systems.parse(system)


def test_options_used_are_the_systems_under_the_documented_overrides():
    options = systems.moe_lab_options("triton-fusedce+no_autotune", environ={"MOE_LAB_TRITON_TMA": "1"})
    # fused_norm / fused_rope: the library decides them per model; a harness system without their words has them off
    assert options.changed() == {"fused_cross_entropy": True, "autotune": False, "tma": True,
                                 "fused_norm": False, "fused_rope": False}
    assert report.option_flags({"spec": {"system": "triton-fusedce+no_autotune"},
                                "options_changed": options.changed()}) == {"autotune": False, "tma": True}
    overridden = systems.moe_lab_options("triton+no_autotune", environ={"MOE_LAB_TRITON_AUTOTUNE": "1"})
    assert overridden.changed() == {"fused_norm": False, "fused_rope": False}  # the environment override wins
    assert systems.moe_lab_options("v5-grouped_mm", environ={"MOE_LAB_TRITON_TMA": "1"}) is None


# ---- the registry decides which names exist ----------------------------------------------------
SWEEP_WITH_A_NEW_IMPLEMENTATION = """\
name: new-impl
defaults: {model: tiny-qwen3-moe, layers: 1, seq: 16, dtype: fp32, optimizer: adamw, device: cpu, warmup: 1, steps: 1}
grid:
  system: [{backend: {experts: dummy_loop}}, experts=dummy_loop-fusedce, torch]
overrides:
  - match: {system: experts=dummy_loop}
    set: {steps: 2}
"""


@pytest.fixture
def dummy_experts(monkeypatch):
    """An experts implementation registered the way a new backend would be (register_stage), in a
    copy of the registry's experts table that the test's end restores."""
    import moe_lab
    from moe_lab import registry

    monkeypatch.setitem(registry._IMPLS, "experts", dict(registry._IMPLS["experts"]))
    loop = moe_lab.resolve_backend("eager").experts
    moe_lab.register_stage("experts", "dummy_loop", loop, description="a test's copy of the per-expert loop",
                           caps=registry.capabilities("experts", "eager"))
    return "dummy_loop"


def test_without_registration_the_new_name_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP_WITH_A_NEW_IMPLEMENTATION)
    with pytest.raises(grid.SweepFileError) as e:
        grid.load(path=str(path))
    assert "moe_lab's experts stage has no implementation 'dummy_loop'" in str(e.value)


def test_a_registered_experts_implementation_is_a_system_with_no_harness_edit(dummy_experts, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP_WITH_A_NEW_IMPLEMENTATION)
    specs = grid.expand(grid.load(path=str(path)))
    assert [(s["system"], s["steps"]) for s in specs] == [
        ("experts=dummy_loop", 2), ("experts=dummy_loop-fusedce", 1), ("torch", 1)]
    spec = systems.check_known({"backend": {"experts": dummy_experts}})
    assert spec.moe_backend == {"experts": "dummy_loop"}
    record = cell.run(specs[0])  # and it trains: the model runs the new implementation
    assert record["status"] == "ok" and record["metrics"]["loss_finite"]
    assert "experts=dummy_loop" in record["moe_lab_stages"]["backend"]
    assert record["system_spec"]["backend"] == {"experts": "dummy_loop"}
    assert record["system_spec"]["name"] == "experts=dummy_loop"


def test_sweep_files_refuse_unknown_names_with_their_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent("""\
        name: s
        defaults: {model: tiny-qwen3-moe, layers: 1, seq: 16, device: cpu}
        grid:
          system:
            - torch
            - {backend: {experts: trition}}
            - {backend: triton, options: {fused_nrom: true}}
            - experts=trition
        """))
    with pytest.raises(grid.SweepFileError) as e:
        grid.load(path=str(path))
    problems = {(line, where): msg for line, where, msg in e.value.problems}
    assert "experts stage has no implementation 'trition'" in problems[(6, "grid.system[1]")]
    assert "no field 'fused_nrom'" in problems[(7, "grid.system[2]")]
    assert "experts stage has no implementation 'trition'" in problems[(8, "grid.system[3]")]


@pytest.mark.parametrize("system,reason", [
    ("trition", "moe_lab has no backend 'trition'; known: "),
    ("experts=trition", "moe_lab's experts stage has no implementation 'trition'"),
    ({"backend": {"router": "torch", "experts": "triton_gahter"}}, "no implementation 'triton_gahter'"),
])
def test_a_name_moe_lab_does_not_know_is_a_failed_cell_with_the_reason(system, reason, tmp_path):
    out = tmp_path / "c.json"
    assert cell.main(["--spec", json.dumps({**TINY, "system": system}), "--out", str(out)]) == 3
    record = json.loads(out.read_text())
    assert record["status"] == "failed" and reason in record["error"]
    assert record["system_spec"]["name"] == record["spec"]["system"]


def test_not_implemented_is_kept_for_what_the_library_cannot_build(monkeypatch):
    import moe_lab

    from experiments import models

    monkeypatch.delattr(moe_lab, "AutoModelForCausalLM")
    with pytest.raises(systems.NotImplementedYet) as e:
        systems.build_model("torch", models.build_config("tiny-qwen3-moe", 1), dtype=None, attn="sdpa",
                            device="cpu", world=1)
    assert cell.classify(e.value) == "not_implemented"


# ---- records and result keys -------------------------------------------------------------------
def test_a_cell_records_its_spec_and_the_options_it_used(monkeypatch):
    import moe_lab.options

    monkeypatch.setattr(moe_lab.options, "_applied", moe_lab.options._applied)  # process settings restored after
    monkeypatch.setenv("MOE_LAB_HOST_CHECKS", "1")  # the CPU checks on the host anyway: nothing else changes
    spec = cell.normalise({**TINY, "system": {"backend": "torch", "options": {"fused_cross_entropy": True}}})
    record = dict(cell.run(spec), spec=spec)  # (cell.main adds the spec)
    assert record["status"] == "ok" and spec["system"] == "torch-fusedce"
    assert record["system_spec"]["moe_lab_options"] == {"fused_cross_entropy": True}
    assert record["options_changed"] == {"fused_cross_entropy": True, "host_checks": True,
                                         "fused_norm": False, "fused_rope": False}  # words absent: off
    assert record["options"]["host_checks"] is True and record["options"]["autotune"] is True
    row = report.to_row(record, "r")
    assert row["key"] == "cpux1/tiny-qwen3-moe-L1/torch-fusedce+host_checks" and row["flags"] == {"host_checks": True}


def _record(system, options_changed=..., env=None):
    rec = {"spec": {"system": system, "routing": "real", "nproc": 1, "batch": 1}, "metrics": {}, "status": "ok",
           "model_label": "m-L1", "hardware": {"gpu": "h200"}}
    if options_changed is not ...:
        rec["options_changed"] = options_changed
    if env is not None:
        rec["env"] = env
    return rec


def test_result_keys_come_from_the_recorded_options():
    def key(rec):
        return report.to_row(rec, "r", report.record_flags(rec, {"MOE_LAB_TRITON_TMA": "1"}))["key"]

    tma = {"MOE_LAB_TRITON_TMA": "1"}
    # Options recorded: the key names what ran, whether the system or the environment asked for it
    assert key(_record("triton", {"tma": True}, env=tma)) == "h200x1/m-L1/triton+tma"
    assert key(_record("triton+tma", {"tma": True})) == "h200x1/m-L1/triton+tma"
    assert key(_record("triton+no_autotune+tma", {"autotune": False, "tma": True})) == "h200x1/m-L1/triton+no_autotune+tma"
    assert key(_record("triton+no_autotune", {})) == "h200x1/m-L1/triton"  # overridden back to the default
    assert key(_record("triton-fusedce-optstream", {"fused_cross_entropy": True})) == "h200x1/m-L1/triton-fusedce-optstream"
    assert key(_record("v5-grouped_mm", None, env=tma)) == "h200x1/m-L1/v5-grouped_mm"  # v5 builds no moe_lab model
    # records from before: their own environment, else the run's, exactly as their keys were
    assert key(_record("triton", env=tma)) == "h200x1/m-L1/triton+MOE_LAB_TRITON_TMA=1"
    assert key(_record("triton", env={})) == "h200x1/m-L1/triton"
    assert key(_record("v5-grouped_mm")) == "h200x1/m-L1/v5-grouped_mm+MOE_LAB_TRITON_TMA=1"


def test_variant_words_are_read_before_the_option_part():
    assert report._has_variant("triton-fusedce-graphs+tma", "graphs")
    assert not report._has_variant("triton+tma", "graphs")


def test_trainer_systems_keep_the_harness_names_and_keys_apart():
    """v5-trainer, trainer, trainer-max are names of their own (not a backend word "trainer"), one
    process, and their records' keys are <gpu>x1/<model>/<name>."""
    assert [systems.parse(n).kind for n in ("v5-trainer", "trainer", "trainer-max")] == [
        "v5-trainer", "moe_lab-trainer", "moe_lab-trainer"]
    assert systems.parse("v5-grouped_mm") == systems.SystemSpec(library="v5", experts_implementation="grouped_mm")
    with pytest.raises(ValueError, match="nproc=2"):
        systems.check_world("trainer-max", 2)
    assert report.to_row(_record("trainer-max", {}), "r")["key"] == "h200x1/m-L1/trainer-max"
    assert report.to_row(_record("v5-trainer", None), "r")["key"] == "h200x1/m-L1/v5-trainer"
