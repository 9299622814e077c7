"""fastest()'s CUDA graphs on the "auto" backend: each MoE layer weighs its best graph-safe stages
replayed from a CUDA graph against its best stages of all run eagerly; a layer that chose eager is
left out of the capture (and runs its non-graph-safe stages), the others are captured, and the record
says which and why. Timings are injected (the choice is what is tested; the real figures come from
the GPU); graphs are emulated on the CPU (tests/graph_emulation.py), where replays cannot be timed
unless a test says they can."""
from __future__ import annotations

import copy
import functools
import importlib

import pytest
import torch
import transformers

import moe_lab
import moe_lab.layer as layer_module
import moe_lab.training.cuda_graphs as cuda_graphs
from graph_emulation import emulated_cuda_graphs  # noqa: F401 (a fixture)
from markers import needs_interpreter
from moe_lab import auto, auto_cache
from moe_lab.registry import LayerNeeds, resolve_backend
from moe_lab.training.fastest import GRAPH_CHOICE_NOTE, fastest
from tiny_models import assert_same_grads, tiny_config

fastest_module = importlib.import_module("moe_lab.training.fastest")  # the package exports the function by that name
QWEN3 = LayerNeeds("qwen3_moe", frozenset({"softmax", "renormalize"}), "glu:silu", "cuda", torch.bfloat16)
EAGER_WINS = "triton_routing+torch_experts"
EAGER_MS = {"triton_gather": 2.6, "triton": 2.5, EAGER_WINS: 1.92, "torch": 2.2}
REPLAY_LOSES = {"triton_gather": 2.4, "triton": 2.31}
REPLAY_WINS = {"triton_gather": 1.6, "triton": 1.5}


@pytest.fixture
def fresh_decisions():
    auto.forget_decisions()
    yield
    auto.forget_decisions()


def _label_of(choice) -> str:
    """The candidate label whose stages `choice` runs."""
    return next(label for label, backend in auto.CANDIDATES if resolve_backend(backend).names == choice.names)


@pytest.fixture
def injected_timings(monkeypatch, fresh_decisions):
    """auto measures on the CPU with injected times: a trial only says which candidate it ran, `measure`
    returns that candidate's eager time and `measure_replayed` its replayed time (both set by the test);
    `calls` lists what was timed."""
    timings = {"eager": dict(EAGER_MS), "replayed": dict(REPLAY_LOSES), "calls": []}

    def measure(step, device):
        timings["calls"].append(("eager", step()))
        return timings["eager"][timings["calls"][-1][1]]

    def measure_replayed(step, device):
        timings["calls"].append(("replayed", step()))
        return timings["replayed"][timings["calls"][-1][1]]

    monkeypatch.setattr(auto, "MEASURED_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(auto, "measure", measure)
    monkeypatch.setattr(auto, "measure_replayed", measure_replayed)
    monkeypatch.setattr(auto, "_gpu_name", lambda device: "fake GPU")
    monkeypatch.setattr(layer_module, "auto_trial", lambda *a, **k: lambda choice: (lambda: _label_of(choice)))
    return timings


# ---- the choice itself -----------------------------------------------------------------------------------
def test_the_choice_weighs_the_best_replayed_against_the_best_eager():
    candidates = auto.candidates_for(QWEN3, None, graph_safe_only=False).candidates
    chosen, graphed, why = auto.choose_under_graphs(candidates, EAGER_MS, REPLAY_LOSES)
    assert (chosen.label, graphed) == (EAGER_WINS, False) and not chosen.choice.graph_safe
    assert why == f"{EAGER_WINS} 1.920 ms vs graph-safe triton replayed 2.310 ms"
    # replays faster: the best graph-safe candidate by its replayed time, captured
    chosen, graphed, why = auto.choose_under_graphs(candidates, EAGER_MS, REPLAY_WINS)
    assert (chosen.label, graphed) == ("triton", True) and chosen.choice.graph_safe
    assert why == f"graph-safe triton replayed 1.500 ms vs {EAGER_WINS} 1.920 ms eager"
    # within MARGIN the earlier graph-safe candidate stays
    assert auto.choose_under_graphs(candidates, EAGER_MS, {"triton_gather": 1.5, "triton": 1.49})[0].label == \
        "triton_gather"
    # eager must win by more than MARGIN: 1.92 against 1.95 keeps the graph, against 1.97 does not
    assert auto.choose_under_graphs(candidates, EAGER_MS, {"triton": 1.95})[1] is True
    assert auto.choose_under_graphs(candidates, EAGER_MS, {"triton": 1.97})[1] is False
    # nothing replayed (every graph-safe capture failed): eager, said so
    chosen, graphed, why = auto.choose_under_graphs(candidates, EAGER_MS, {})
    assert (chosen.label, graphed) == (EAGER_WINS, False) and "no graph-safe candidate was replayed" in why


def test_decide_under_graphs_times_replays_records_both_and_is_kept_apart(injected_timings):
    candidate_set = auto.candidates_for(QWEN3, None, graph_safe_only=False)
    run = lambda choice: (lambda: _label_of(choice))  # noqa: E731
    args = (candidate_set, ("g",), torch.device("cuda"), torch.bfloat16, 4096, True, run)
    decision = auto.decide(*args, graphs=True)
    calls = injected_timings["calls"]
    assert sorted(calls) == sorted([("eager", c) for c in EAGER_MS] + [("replayed", c) for c in REPLAY_LOSES])
    assert (decision.chosen.label, decision.graphed, decision.how) == (EAGER_WINS, False, "measured")
    assert decision.replayed_ms == REPLAY_LOSES and decision.times_ms == EAGER_MS
    described = decision.describe()
    assert "replayed from a CUDA graph: triton 2.310 ms, triton_gather 2.400 ms" in described
    assert (f"CUDA graphs: eager, not captured ({EAGER_WINS} 1.920 ms vs graph-safe triton replayed 2.310 ms)"
            in described)
    # the plain decision for the same layer shape is another one: measured again, no replays, no graph verdict
    plain = auto.decide(*args)
    assert plain.graphed is None and not plain.replayed_ms and "CUDA graphs" not in plain.describe()
    assert len(calls) == 6 + 4 and all(kind == "eager" for kind, _ in calls[6:])
    # a new process: each comes back from its own disk entry
    auto.forget_decisions()
    injected_timings["replayed"] = dict(REPLAY_WINS)  # would be captured if measured again
    cached = auto.decide(*args, graphs=True)
    assert cached.how.startswith("measured, cached") and len(calls) == 10
    assert (cached.chosen.label, cached.graphed, cached.replayed_ms) == (EAGER_WINS, False, REPLAY_LOSES)
    assert auto.decide(*args).graphed is None and len(calls) == 10


def test_the_cache_keys_of_graph_and_plain_decisions_differ():
    key = ("fake GPU", ("g",), torch.bfloat16, 4096, True, ["triton", "torch"])
    plain, graphs = auto_cache.key_of(*key), auto_cache.key_of(*key, graphs=auto.GRAPHS_REPLAYED)
    assert plain != graphs and '"graphs"' not in plain and auto.GRAPHS_REPLAYED in graphs
    assert auto_cache.key_of(*key, graphs=None) == plain


# ---- through fastest() and the layer graphs (emulated on the CPU) -------------------------------------------
class _Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int):
        self.ids = torch.randint(0, vocab, (4, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _fastest_model(tmp_path, config, monkeypatch):
    """A moe_lab model on the default "auto" backend after fastest() (the Trainer only sets it up). To
    spare interpreter time: its fused norm, rotary and loss are left off (not tested here) and the
    emulated capture runs no warm-up iterations (the emulated graphs re-run the layers anyway)."""
    for name in ("fused_norm", "fused_rope", "fused_cross_entropy"):
        monkeypatch.setitem(fastest_module._WHY_NOT, name, lambda *args: "not under test")
    monkeypatch.setattr(torch.cuda, "make_graphed_callables",
                        functools.partial(torch.cuda.make_graphed_callables, num_warmup_iters=0))
    torch.manual_seed(0)
    model = moe_lab.AutoModelForCausalLM.from_config(copy.deepcopy(config))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                                          max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True)
    fastest(transformers.Trainer(model=model, args=args, train_dataset=_Tokens(config.vocab_size)))
    return model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


@needs_interpreter
@pytest.mark.parametrize("replay_wins", [False, True], ids=["eager-wins", "replay-wins"])
def test_a_layer_that_chose_eager_is_not_captured_and_the_record_says_why(
        tmp_path, emulated_cuda_graphs, injected_timings, monkeypatch, replay_wins):
    """Layers 0 and 2 are dense (nothing to choose: captured), layer 1 is MoE. Where the eager best wins,
    it runs uncaptured, between two captured layers, with the non-graph-safe stages it chose; where
    the replayed graph-safe best wins, it is captured. The step (capture, then replays) trains like a
    model built with the chosen stages, and the fastest record and the plan say which and why."""
    monkeypatch.setattr(cuda_graphs, "why_replays_not_measured", lambda device: None)  # as on a GPU
    injected_timings["replayed"] = dict(REPLAY_WINS if replay_wins else REPLAY_LOSES)
    config = tiny_config("qwen3_moe", layers=3, mlp_only_layers=[0, 2])
    model = _fastest_model(tmp_path, config, monkeypatch)
    assert model.moe_lab_fastest["cuda_graphs"] == f"on ({GRAPH_CHOICE_NOTE})"
    chosen = "triton" if replay_wins else EAGER_WINS
    reference = moe_lab.AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                         moe_backend=dict(auto.CANDIDATES)[chosen])
    reference.load_state_dict(model.state_dict())
    plain_layers = []
    plain = cuda_graphs._plain
    monkeypatch.setattr(cuda_graphs, "_plain", lambda layer, *a: plain_layers.append(layer._moe_lab_layer_index)
                        or plain(layer, *a))
    ids = torch.randint(0, config.vocab_size, (2, 8))
    # one step: the capture, then each captured layer replayed (emulated) and the eager one run
    torch.testing.assert_close(_step(model, ids), _step(reference, ids), rtol=1e-5, atol=1e-6)
    assert_same_grads(model, reference, rtol=1e-4, atol=1e-6)
    graphs = model.moe_lab_cuda_graphs
    assert graphs.captures == 1 and graphs.graphed[0] is not None and graphs.graphed[2] is not None
    moe = model.model.layers[1].mlp
    assert moe.choice.names == resolve_backend(dict(auto.CANDIDATES)[chosen]).names
    if replay_wins:
        why = f"graph-safe triton replayed 1.500 ms vs {EAGER_WINS} 1.920 ms eager"
        assert graphs.eager == [] and graphs.graphed[1] is not None and plain_layers == []  # all replayed
        assert model.moe_lab_fastest["cuda_graphs"] == f"on (3 of 3 layers captured; layer 1 captured: {why})"
        assert moe.choice.graph_safe
    else:
        why = f"{EAGER_WINS} 1.920 ms vs graph-safe triton replayed 2.310 ms"
        assert graphs.eager == [1] and graphs.graphed[1] is None
        assert plain_layers == [1], "the eager layer runs its own forward, layers 0 and 2 are replayed"
        assert model.moe_lab_fastest["cuda_graphs"] == f"on (2 of 3 layers captured; layer 1 eager: {why})"
        assert not moe.choice.graph_safe
    plan = model.moe_lab_plan["model.layers.1.mlp"]["auto"]
    assert plan.startswith(f"{chosen} (measured, forward+backward of 16 tokens: ")
    assert "replayed from a CUDA graph: " in plan and why in plan
    # a forward without gradients is never replayed: it runs the best eager stages, decided without graphs
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert moe.planner.decision.graphed is None and moe.planner.decision.chosen.label == EAGER_WINS


@needs_interpreter
def test_emulated_graphs_keep_graph_safe_stages_and_say_replays_were_not_measured(
        tmp_path, emulated_cuda_graphs, injected_timings, monkeypatch):
    """Where replays cannot be timed (the emulated graphs here) auto chooses among graph-safe stages only,
    every layer is captured, nothing is replayed, and the plan and the record say why."""
    config = tiny_config("qwen3_moe", layers=1)
    injected_timings["eager"]["torch"] = 0.1  # would win, were it a candidate
    model = _fastest_model(tmp_path, config, monkeypatch)
    ids = torch.randint(0, config.vocab_size, (2, 8))
    _step(model, ids)
    assert all(kind == "eager" for kind, _ in injected_timings["calls"]), "no replay was timed"
    assert sorted({label for _, label in injected_timings["calls"]}) == ["triton", "triton_gather"]
    graphs = model.moe_lab_cuda_graphs
    assert graphs.captures == 1 and graphs.eager == [] and all(g is not None for g in graphs.graphed)
    why = ("replays not measured (CUDA graphs are emulated on cpu (the CPU tests' tests/graph_emulation.py)): "
           "restricted to graph-safe candidates and captured, as with cuda_graphs=True at load")
    assert model.moe_lab_fastest["cuda_graphs"] == f"on (1 of 1 layers captured; layer 0 captured: {why})"
    for stages in model.moe_lab_plan.values():
        assert stages["auto"].startswith("triton (measured") and f"CUDA graphs: captured ({why})" in stages["auto"]
        assert "torch: not CUDA-graph safe" in stages["auto"]


def test_off_cuda_and_under_the_interpreter_replays_are_not_measured(monkeypatch):
    assert "not CUDA" in cuda_graphs.why_replays_not_measured(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "interpreter" in cuda_graphs.why_replays_not_measured(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cuda_graphs.why_replays_not_measured(torch.device("cuda")) is None


# ---- on a GPU: real replays ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_choice_times_real_replays(tmp_path, fresh_decisions):
    """A replayed trial is timed, the layers decide from real replays (whichever way), the record and
    the plan carry both timings, and training runs."""
    step_ran = []
    x = torch.randn(64, 64, device="cuda")
    assert auto.measure_replayed(lambda: step_ran.append(1) or x @ x, torch.device("cuda")) > 0
    assert len(step_ran) == max(1, auto.WARMUP) + 1  # warm-up, then one capture; replays run no Python
    config = tiny_config("qwen3_moe")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = moe_lab.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          max_grad_norm=0.0, report_to=[], save_strategy="no")
    trainer = fastest(transformers.Trainer(model=model, args=args, train_dataset=_Tokens(config.vocab_size)))
    trainer.train()
    record = model.moe_lab_fastest["cuda_graphs"]
    assert record.startswith("on (") and "replayed" in record and "layers captured" in record
    for stages in model.moe_lab_plan.values():
        assert "replayed from a CUDA graph: " in stages["auto"] and "CUDA graphs: " in stages["auto"]


def test_a_graph_safe_only_layer_never_reuses_a_decision_made_among_all_candidates(injected_timings, monkeypatch):
    """Decisions are kept per candidate set: a plain layer's choice of non-graph-safe stages, made first
    in the process, does not reach a layer of the same shape that may choose graph-safe stages only."""
    monkeypatch.setattr(auto_cache, "load", lambda key: None)
    monkeypatch.setattr(auto_cache, "store", lambda key, entry: None)
    every = auto.candidates_for(QWEN3, None, graph_safe_only=False)
    only_safe = auto.candidates_for(QWEN3, None, graph_safe_only=True)
    trial = lambda choice: (lambda: _label_of(choice))  # noqa: E731
    plain = auto.decide(every, ("g",), torch.device("cpu"), torch.bfloat16, 4096, True, trial)
    assert plain.chosen.label == EAGER_WINS and not plain.chosen.choice.graph_safe
    safe = auto.decide(only_safe, ("g",), torch.device("cpu"), torch.bfloat16, 4096, True, trial)
    assert safe.chosen.choice.graph_safe, safe.describe()


def test_a_failed_replay_is_recorded_and_not_kept_on_disk(injected_timings, monkeypatch):
    """A replay that fails (out of memory at the first step, say) is said in the decision, the candidate
    is not captured, and the decision is not cached on disk, so the next process measures again."""
    stored = []
    monkeypatch.setattr(auto_cache, "load", lambda key: None)
    monkeypatch.setattr(auto_cache, "store", lambda key, entry: stored.append(entry))

    def replay_or_fail(step, device):
        label = step()
        if label == "triton":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return REPLAY_WINS[label]

    monkeypatch.setattr(auto, "measure_replayed", replay_or_fail)
    every = auto.candidates_for(QWEN3, None, graph_safe_only=False)
    trial = lambda choice: (lambda: _label_of(choice))  # noqa: E731
    decision = auto.decide(every, ("g",), torch.device("cpu"), torch.bfloat16, 4096, True, trial, graphs=True)
    assert decision.chosen.label == "triton_gather" and decision.graphed
    assert "not replayable: triton (OutOfMemoryError" in decision.graphs_why and stored == []
    auto.forget_decisions()
    monkeypatch.setattr(auto, "measure_replayed", lambda step, device: REPLAY_WINS[step()])
    auto.decide(every, ("g",), torch.device("cpu"), torch.bfloat16, 4096, True, trial, graphs=True)
    assert len(stored) == 1 and stored[0]["replayed_ms"] == REPLAY_WINS
