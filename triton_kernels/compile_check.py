"""Compile the GEMM kernels (and the rotary kernel's forms) for a Hopper GPU on any machine, without
one, and report what each autotune candidate costs: shared memory, registers, spilled bytes,
software-pipelined loads.

    python -m triton_kernels.compile_check                 # every candidate of every GEMM kernel
    python -m triton_kernels.compile_check --only down_bwd  # kernels whose case name contains it
    python -m triton_kernels.compile_check --json out.json

Why: a candidate that spills registers or cannot pipeline its loads loses on the GPU, and a
constexpr branch the interpreter accepts may not compile at all; both show here in seconds, on the
CPU, before device time is spent. The argument specialisation is the one Triton's JIT would derive
at the Qwen3-30B-A3B layer geometry (bf16, H=2048, I=768, E=128, 32768 routed rows): integer
arguments equal to 1 become constants, multiples of 16 and pointers get 16-divisibility. The rotary
kernel (no autotuner, no K loop to pipeline) is compiled with the one tile its launch picks, at the
q and k of Qwen3-30B-A3B, GPT-OSS-20B and Moonlight-16B-A3B (4096 tokens), one case per form and
direction.
Registers and spills come from ``ptxas -v`` (the one bundled with Triton); shared memory from the
compiled kernel; pipelined loads count ``cp.async`` and TMA copies in the TritonGPU IR.

Needs compiled Triton (not ``TRITON_INTERPRET=1``: interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from triton_kernels._common import interpreting

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)

# The layer geometry (bf16) and the argument values each kernel sees there.
H, I, E, S = 2048, 768, 128, 32768
BF16 = "*bf16"


@dataclasses.dataclass
class Case:
    """One kernel launch as the model makes it: argument values (ints), pointer dtypes and flags."""
    name: str
    module: str
    kernel: str
    args: dict  # name -> int value, "*bf16"/"*i32" pointer, or float for fp32 scalars
    flags: dict  # constexpr flags besides the tile sizes of the config
    configs: list | None = None  # the launch's configs where the kernel has no autotuner
    options: dict = dataclasses.field(default_factory=dict)  # compile options of the launch
    pipelined: bool = True  # whether the kernel loops over K, so its loads should be pipelined


def _gemm_args(kind: str, K: int, N: int, stride_w: tuple) -> dict:
    """Arguments of ``_grouped_mm_kernel`` (kind "pointer") or ``_grouped_mm_tma_kernel`` ("tma")
    for y [S, N] = x [S, K] @ w[e] [K, N] with weight strides ``(stride_we, stride_wk, stride_wn)``."""
    args = dict(x_ptr=BF16, w_ptr=BF16, y_ptr=BF16, b_ptr=BF16, offsets_ptr="*i32", N=N, K=K, E=E, S_BUCKET=S,
                stride_xs=K, stride_we=stride_w[0], stride_ys=N, stride_be=0, stride_bn=0)
    if kind == "pointer":
        args.update(stride_xk=1, stride_wk=stride_w[1], stride_wn=stride_w[2], stride_yn=1)
    else:
        args.update(stride_w_outer=max(stride_w[1], stride_w[2]))
    return args


def _dw_args(kind: str, K: int, N: int) -> dict:
    """``dw [E, K, N]`` in the layout of an HF weight ``[E, N, K]`` (K contiguous)."""
    args = dict(x_ptr=BF16, dy_ptr=BF16, dw_ptr=BF16, db_ptr=BF16, offsets_ptr="*i32", K=K, N=N, S_BUCKET=S,
                stride_xs=K, stride_ds=N, stride_we=K * N, stride_wk=1, stride_wn=K, stride_be=0, stride_bn=0)
    if kind == "pointer":
        args.update(src_ptr="*i64", stride_xk=1, stride_dn=1)  # src_rows: int64 token rows
    return args


def _gate_up_args(gated: bool = True, pairs: bool = False) -> dict:
    # w_gu [E, H, 2I] is the transpose view of the HF [E, 2I, H]: K (= H) contiguous; non-gated
    # (relu2): the up projection [E, H, I], the view of the HF up_proj [E, I, H], and h [S, I].
    # pairs (GPT-OSS): the HF [E, H, 2I] itself, gate/up columns interleaved and contiguous, biases [E, 2I]
    width = 2 * I if gated else I
    if pairs:
        w_strides = dict(stride_we=width * H, stride_wk=width, stride_wn=1, stride_w_outer=width,
                         stride_be=width, stride_bn=1)
    else:
        w_strides = dict(stride_we=width * H, stride_wk=1, stride_wn=H, stride_w_outer=H, stride_be=0, stride_bn=0)
    return dict(x_ptr=BF16, wg_ptr=BF16, wu_ptr=BF16, bg_ptr=BF16, bu_ptr=BF16, a_ptr=BF16, hg_ptr=BF16,
                hu_ptr=BF16, offsets_ptr="*i32", src_ptr="*i64", N=I, K=H, E=E, S_BUCKET=S, alpha=1.0, limit=7.0,
                stride_xs=H, stride_xk=1, **w_strides, stride_as=I, stride_an=1, stride_hs=width, stride_hn=1)


def _down_bwd_args(gated: bool = True) -> dict:
    # w = the HF down weight [E, H, I] itself (I contiguous); dy [S, H]; h [S, 2I] ([S, I] non-gated)
    return dict(dy_ptr=BF16, w_ptr=BF16, hg_ptr=BF16, hu_ptr=BF16, dhg_ptr=BF16, dhu_ptr=BF16, a_ptr=BF16,
                offsets_ptr="*i32", N=I, K=H, E=E, S_BUCKET=S, alpha=1.0, limit=7.0,
                stride_ds=H, stride_dk=1, stride_we=H * I, stride_wk=I, stride_wn=1, stride_w_outer=I,
                stride_hs=2 * I if gated else I, stride_hn=1, stride_as=I, stride_an=1)


GEMM_FLAGS = dict(HAS_BIAS=False, UPCAST=False, BLOCK_E=E)
CASES = [
    Case("grouped_mm down fwd", "grouped_gemm", "_grouped_mm_kernel",
         _gemm_args("pointer", I, H, (H * I, 1, I)), dict(GEMM_FLAGS, IEEE=False)),
    Case("grouped_mm gate_up dx", "grouped_gemm", "_grouped_mm_kernel",
         _gemm_args("pointer", 2 * I, H, (2 * I * H, H, 1)), dict(GEMM_FLAGS, IEEE=False)),
    Case("grouped_mm down fwd tma", "grouped_gemm_tma", "_grouped_mm_tma_kernel",
         _gemm_args("tma", I, H, (H * I, 1, I)), dict(GEMM_FLAGS, W_KMAJOR=True)),
    Case("grouped_mm gate_up dx tma", "grouped_gemm_tma", "_grouped_mm_tma_kernel",
         _gemm_args("tma", 2 * I, H, (2 * I * H, H, 1)), dict(GEMM_FLAGS, W_KMAJOR=False)),
    Case("dw gate_up", "grouped_gemm", "_grouped_mm_dw_kernel", _dw_args("pointer", H, 2 * I),
         dict(HAS_DBIAS=False, GATHER=False, IEEE=False, UPCAST=False)),
    Case("dw gate_up gather", "grouped_gemm", "_grouped_mm_dw_kernel", _dw_args("pointer", H, 2 * I),
         dict(HAS_DBIAS=False, GATHER=True, IEEE=False, UPCAST=False)),
    Case("dw down", "grouped_gemm", "_grouped_mm_dw_kernel", _dw_args("pointer", I, H),
         dict(HAS_DBIAS=False, GATHER=False, IEEE=False, UPCAST=False)),
    Case("dw gate_up tma", "grouped_gemm_tma", "_grouped_mm_dw_tma_kernel", _dw_args("tma", H, 2 * I),
         dict(HAS_DBIAS=False, UPCAST=False)),
    Case("gate_up_act", "expert_mlp", "_gate_up_act_kernel", _gate_up_args(),
         dict(ACT=0, HAS_BIAS=False, STORE_H=True, GATHER=False, USE_TMA=False, W_KMAJOR=True, PAIRS=False,
              IEEE=False, UPCAST=False, BLOCK_E=E)),
    Case("gate_up_act gather", "expert_mlp", "_gate_up_act_kernel", _gate_up_args(),
         dict(ACT=0, HAS_BIAS=False, STORE_H=True, GATHER=True, USE_TMA=False, W_KMAJOR=True, PAIRS=False,
              IEEE=False, UPCAST=False, BLOCK_E=E)),
    Case("gate_up_act tma", "expert_mlp", "_gate_up_act_kernel", _gate_up_args(),
         dict(ACT=0, HAS_BIAS=False, STORE_H=True, GATHER=False, USE_TMA=True, W_KMAJOR=True, PAIRS=False,
              IEEE=False, UPCAST=False, BLOCK_E=E)),
    Case("down_bwd", "expert_mlp", "_down_bwd_act_kernel", _down_bwd_args(),
         dict(ACT=0, USE_TMA=False, W_KMAJOR=False, PAIRS=False, IEEE=False, UPCAST=False, BLOCK_E=E)),
    Case("down_bwd tma", "expert_mlp", "_down_bwd_act_kernel", _down_bwd_args(),
         dict(ACT=0, USE_TMA=True, W_KMAJOR=False, PAIRS=False, IEEE=False, UPCAST=False, BLOCK_E=E)),
    # non-gated relu2 experts (Nemotron-H): one up projection, ACT=2
    Case("gate_up_act relu2", "expert_mlp", "_gate_up_act_kernel", _gate_up_args(gated=False),
         dict(ACT=2, HAS_BIAS=False, STORE_H=True, GATHER=False, USE_TMA=False, W_KMAJOR=True, PAIRS=False,
              IEEE=False, UPCAST=False, BLOCK_E=E)),
    Case("gate_up_act relu2 gather", "expert_mlp", "_gate_up_act_kernel", _gate_up_args(gated=False),
         dict(ACT=2, HAS_BIAS=False, STORE_H=True, GATHER=True, USE_TMA=False, W_KMAJOR=True, PAIRS=False,
              IEEE=False, UPCAST=False, BLOCK_E=E)),
    Case("gate_up_act relu2 tma", "expert_mlp", "_gate_up_act_kernel", _gate_up_args(gated=False),
         dict(ACT=2, HAS_BIAS=False, STORE_H=True, GATHER=False, USE_TMA=True, W_KMAJOR=True, PAIRS=False,
              IEEE=False, UPCAST=False, BLOCK_E=E)),
    Case("down_bwd relu2", "expert_mlp", "_down_bwd_act_kernel", _down_bwd_args(gated=False),
         dict(ACT=2, USE_TMA=False, W_KMAJOR=False, PAIRS=False, IEEE=False, UPCAST=False, BLOCK_E=E)),
    Case("down_bwd relu2 tma", "expert_mlp", "_down_bwd_act_kernel", _down_bwd_args(gated=False),
         dict(ACT=2, USE_TMA=True, W_KMAJOR=False, PAIRS=False, IEEE=False, UPCAST=False, BLOCK_E=E)),
    # GPT-OSS: interleaved gate/up columns read as one tile (PAIRS), its clamped SwiGLU (ACT=1), biases
    Case("gate_up_act pairs", "expert_mlp", "_gate_up_act_kernel", _gate_up_args(pairs=True),
         dict(ACT=1, HAS_BIAS=True, STORE_H=True, GATHER=False, USE_TMA=False, W_KMAJOR=False, PAIRS=True,
              IEEE=False, UPCAST=False, BLOCK_E=E)),
    Case("gate_up_act pairs gather", "expert_mlp", "_gate_up_act_kernel", _gate_up_args(pairs=True),
         dict(ACT=1, HAS_BIAS=True, STORE_H=True, GATHER=True, USE_TMA=False, W_KMAJOR=False, PAIRS=True,
              IEEE=False, UPCAST=False, BLOCK_E=E)),
    Case("down_bwd pairs", "expert_mlp", "_down_bwd_act_kernel", _down_bwd_args(),
         dict(ACT=1, USE_TMA=False, W_KMAJOR=False, PAIRS=True, IEEE=False, UPCAST=False, BLOCK_E=E)),
]


@dataclasses.dataclass
class Report:
    case: str
    config: str
    shared_bytes: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None  # spill stores + spill loads
    pipelined_loads: int | None = None  # cp.async + TMA copies in the IR
    error: str | None = None
    expects_pipelining: bool = True  # False for a loop-free (elementwise) kernel

    @property
    def verdict(self) -> str:
        if self.error:
            return "does not compile"
        if self.shared_bytes > SHARED_LIMIT:
            return "too much shared memory"
        if self.spill_bytes:
            return "spills"
        if self.expects_pipelining and not self.pipelined_loads:
            return "loads not pipelined"
        return "ok"


def _rope_case(model: str, which: str, heads: int, head_dim: int, form: str, backward: bool,
               x_strides: tuple, out_strides: tuple) -> Case:
    """The rotary kernel on one of q/k [1, heads, S, head_dim] of ``model``, as ``rope._launch`` calls it."""
    from triton_kernels.rope import block_sizes, launch_flags, trig_width

    width = trig_width(head_dim, form)
    args = dict(x_ptr=BF16, cos_ptr=BF16, sin_ptr=BF16, out_ptr=BF16, R=heads * S_ROPE, H=heads, S=S_ROPE,
                sxb=x_strides[0], sxh=x_strides[1], sxs=x_strides[2], sob=out_strides[0], soh=out_strides[1],
                sos=out_strides[2], scb=0, scs=width, scd=1)
    name = f"rope {form} {model} {which} {'bwd' if backward else 'fwd'}"
    return Case(name, "rope", "_rope_kernel", args,
                dict(BACKWARD=backward, HALF=head_dim // 2, **launch_flags(form)),
                configs=[triton.Config(block_sizes(head_dim), num_warps=4, num_stages=3)],
                options=dict(enable_fp_fusion=False), pipelined=False)


def _rope_cases() -> list:
    """q as v5 passes it: a transposed view of the projection [1, S, heads, D] (dense: the output
    keeps its strides); Moonlight's q_rot the last 64 of each 192-wide head (not dense: the output
    and, backward, the gradient of the rotated part are contiguous); its k_rot a single head."""
    def dense(heads, d):  # [1, S, heads, d] transposed
        return (S_ROPE * heads * d, d, heads * d)

    def contiguous(heads, d):
        return (heads * S_ROPE * d, S_ROPE * d, d)

    cases = []
    for backward in (False, True):
        cases.append(_rope_case("qwen3-30b-a3b", "q", 32, 128, "rotate_half", backward, dense(32, 128), dense(32, 128)))
        cases.append(_rope_case("gpt-oss-20b", "q", 64, 64, "half_width", backward, dense(64, 64), dense(64, 64)))
        cases.append(_rope_case("gpt-oss-20b", "k", 8, 64, "half_width", backward, dense(8, 64), dense(8, 64)))
    mla = (S_ROPE * 16 * 192, 192, 16 * 192)  # q_rot: a slice of [1, S, 16, 192] transposed
    cases.append(_rope_case("moonlight-16b-a3b", "q", 16, 64, "interleaved", False, mla, contiguous(16, 64)))
    cases.append(_rope_case("moonlight-16b-a3b", "q", 16, 64, "interleaved", True, contiguous(16, 192),
                            contiguous(16, 64)))
    cases.append(_rope_case("moonlight-16b-a3b", "k", 1, 64, "interleaved", False, (S_ROPE * 576, S_ROPE * 576, 576),
                            contiguous(1, 64)))  # k_rot: the last 64 of kv_a_proj's 576 per token
    cases.append(_rope_case("moonlight-16b-a3b", "k", 1, 64, "interleaved", True, contiguous(1, 64),
                            contiguous(1, 64)))
    return cases


S_ROPE = 4096  # tokens of the rotary cases
CASES += _rope_cases()


def _jit_function(module: str, kernel: str):
    if interpreting():
        raise SystemExit("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    fn = getattr(importlib.import_module(f"triton_kernels.{module}"), kernel)
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # through the autotuner
    return fn


def _source(fn, case: Case, tiles: dict) -> ASTSource:
    """The JIT's specialisation of ``case`` with the tile sizes ``tiles``."""
    constexprs, signature, attrs = {}, {}, {}
    fixed = {**case.flags, **tiles}
    for index, name in enumerate(fn.arg_names):
        if name in fixed:
            signature[name] = "constexpr"
            constexprs[(index,)] = fixed[name]
            continue
        value = case.args[name]
        if isinstance(value, str):  # a pointer
            signature[name] = value
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[(index,)] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers, spilled bytes) from ``ptxas -v`` on ``ptx``."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    used = re.search(r"Used (\d+) registers", out)
    if used is None:
        raise RuntimeError(f"ptxas -v printed no register count: {out[-300:]}")
    registers = int(used.group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return registers, spills


def _reason(e: BaseException) -> str:
    """The innermost cause of a compile error (a failure inside a called ``@jit`` function is
    reported as source context, its reason chained as ``__cause__``), on one line."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and ln.strip() != "^"]
    return f"{type(e).__name__}: " + " | ".join(lines[-2:])[:400]


def check(case: Case, config: triton.Config) -> Report:
    """Compile ``case`` with ``config`` for sm_90 and measure it; a failure (the compiler's or
    ptxas') becomes the report's ``error``."""
    report = Report(case.name, str(config), expects_pipelining=case.pipelined)
    fn = _jit_function(case.module, case.kernel)
    try:
        compiled = triton.compile(_source(fn, case, config.kwargs), target=HOPPER,
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages,
                                               **case.options))
        ir = compiled.asm["ttgir"]
        report.shared_bytes = compiled.metadata.shared
        report.pipelined_loads = ir.count("async_copy_global_to_local") + ir.count("async_tma_copy_global_to_local")
        report.registers, report.spill_bytes = _ptxas_usage(compiled.asm["ptx"])
    except Exception as e:  # noqa: BLE001 - a candidate that does not compile is the finding
        report.error = _reason(e)
    return report


def candidates(case: Case) -> list:
    """The autotune candidates of the case's kernel (the launch's configs where it has no autotuner)."""
    if case.configs is not None:
        return list(case.configs)
    tuner = getattr(importlib.import_module(f"triton_kernels.{case.module}"), case.kernel)
    return list(tuner.configs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma list: keep cases whose name contains one of these")
    p.add_argument("--json", default="", help="also write the reports here")
    args = p.parse_args(argv)
    wanted = [w for w in args.only.split(",") if w]
    cases = [c for c in CASES if not wanted or any(w in c.name for w in wanted)]
    if not cases:
        raise SystemExit(f"compile_check: no case matches {args.only!r} (cases: {', '.join(c.name for c in CASES)})")
    reports = []
    for case in cases:
        print(f"{case.name}  ({case.module}.{case.kernel})", flush=True)
        for config in candidates(case):
            r = check(case, config)
            reports.append(r)
            numbers = ("" if r.error else
                       f"smem {r.shared_bytes / 1024:6.1f} KiB  regs {r.registers:3d}  spill {r.spill_bytes:5d} B  "
                       f"pipelined loads {r.pipelined_loads:2d}")
            print(f"  {r.verdict:22s} {numbers}  {r.config}" + (f"\n      {r.error}" if r.error else ""), flush=True)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump([dataclasses.asdict(r) | {"verdict": r.verdict} for r in reports], f, indent=1)
        os.replace(tmp, args.json)
    return 1 if any(r.error for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
