# Run from tests/: python ../results/logs/cpu-gpt-oss-bf16-noise.py  (CPU, torch stages; see tests/gpu_checks.py)
# Columns per seed: v5 grouped_mm bf16 | moe_lab torch bf16 | moe_lab torch with the fp32 eager combine;
# each vs the fp32 v5 eager model: logits rel. error, layer-0 q_proj gradient rel. error, max over all gradients.
import sys; sys.path.insert(0, '.')
import torch, transformers, moe_lab, logging
logging.disable(logging.WARNING)
from tiny_models import tiny_config
from gpu_checks import rel_err
config = tiny_config('gpt_oss', num_experts=8, top_k=2, hidden_size=128, intermediate_size=256)
for seed in range(5):
    config = tiny_config("gpt_oss", num_experts=8, top_k=2, hidden_size=128, intermediate_size=256)
    torch.manual_seed(seed)
    fp32 = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    bf = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in fp32.state_dict().items()}
    fp32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in bf.items()})
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(seed + 1))
    ex = fp32(ids, labels=ids); ex.loss.backward(); eg = {n: p.grad for n, p in fp32.named_parameters()}
    row = []
    for backend in (None, 'torch', {'combine': 'eager'}):
        config = tiny_config("gpt_oss", num_experts=8, top_k=2, hidden_size=128, intermediate_size=256)
        m = (moe_lab.AutoModelForCausalLM.from_config(config, moe_backend=backend, dtype=torch.bfloat16) if backend
             else transformers.AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm", dtype=torch.bfloat16))
        m.load_state_dict(bf); o = m(ids, labels=ids); o.loss.backward(); g = dict(m.named_parameters())
        errs = [rel_err(p.grad, eg[n]) for n, p in g.items() if eg[n] is not None and eg[n].norm() > 0]
        row.append('logits %.2e q %.2e maxgrad %.2e' % (rel_err(o.logits.detach(), ex.logits.detach()), rel_err(g['model.layers.0.self_attn.q_proj.weight'].grad, eg['model.layers.0.self_attn.q_proj.weight']), max(errs)))
    print(seed, ' | '.join(row))
