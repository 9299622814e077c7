# Run from tests/ with TRITON_INTERPRET=1: python ../results/logs/cpu-gpt-oss-bf16-chaos.py (CPU; tiny GPT-OSS, bf16).
# Per seed and variant: rel. error vs the float32 v5 eager model of the logits and of three gradients
# (layer-0 router bias, router weight, q_proj). v5gmm/v5eager: v5 bf16; torch: moe_lab torch stages;
# tri-*: one stage (or all but the router) on Triton kernels under the interpreter.
import sys; sys.path.insert(0, '.')
import os
import torch, transformers, moe_lab, logging
logging.disable(logging.WARNING)
from tiny_models import tiny_config
from gpu_checks import rel_err
variants = {'v5gmm': None, 'v5eager': 'v5eager', 'torch': 'torch', 'tri-combine': {'combine': 'triton'},
            'tri-perm': {'permutation': 'triton'}, 'tri-experts': {'experts': 'triton'},
            'tri-all': {'router': 'torch', 'permutation': 'triton', 'experts': 'triton', 'combine': 'triton'}}
names = ['model.layers.0.mlp.router.bias', 'model.layers.0.mlp.router.weight', 'model.layers.0.self_attn.q_proj.weight']
for seed in range(3):
    config = tiny_config("gpt_oss", num_experts=8, top_k=2, hidden_size=128, intermediate_size=256)
    torch.manual_seed(seed)
    fp32 = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    bf = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in fp32.state_dict().items()}
    fp32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in bf.items()})
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(seed + 1))
    ex = fp32(ids, labels=ids); ex.loss.backward(); eg = {n: p.grad for n, p in fp32.named_parameters()}
    for label, backend in variants.items():
        config = tiny_config("gpt_oss", num_experts=8, top_k=2, hidden_size=128, intermediate_size=256)
        if backend is None or backend == 'v5eager':
            m = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm" if backend is None else "eager", dtype=torch.bfloat16)
        else:
            m = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend=backend, dtype=torch.bfloat16)
        m.load_state_dict(bf); o = m(ids, labels=ids); o.loss.backward(); g = dict(m.named_parameters())
        print(seed, f"{label:12s}", 'logits %.2e' % rel_err(o.logits.detach(), ex.logits.detach()),
              ' '.join('%s %.2e' % (n.split('.')[-2][:6] + n.split('.')[-1][:1], rel_err(g[n].grad, eg[n])) for n in names), flush=True)
