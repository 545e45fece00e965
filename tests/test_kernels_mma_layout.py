"""The tensor-core GEMV's PTX (`kernels.triton_mma_step`) is written for tensors laid out 4
consecutive elements a thread, 32 threads a warp. Triton picks layouts itself, from how
the loads vectorize, and the CPU interpreter (which emulates the step) cannot see them:
int8 weights whose N was not a multiple of 16, and warp rows along K, once compiled to
1 element a thread and gave wrong sums on the device (docs/benchmarks/gpu.md, run 44).
This compiles the kernel for sm_90 (no GPU needed: Triton ships ptxas) in those
specializations and checks the layout of every mma step. It runs in a subprocess:
the other kernel tests set TRITON_INTERPRET, under which nothing compiles.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# (not importorskip: triton must not be imported here before the kernel tests set
# TRITON_INTERPRET, or they fail when this file is collected first)
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

_CHECK = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.triton_mma_gemv import _mma_gemv_kernel

ARGS = ["x_ptr", "w_ptr", "s_ptr", "o_ptr", "out_ptr", "part_ptr", "cnt_ptr", "M", "N", "K",
        "stride_xm", "stride_om", "split_k", "max_split", "M_KEY"]
for case in json.loads(sys.argv[1]):
    out = "*i64" if case["sums"] else "*bf16"  # (SUMS: both are the int64 GemvSums)
    types = ["*bf16", "*i32", "*fp16", "*fp16", out, "*i64" if case["sums"] else "*fp32",
             "*i32"] + ["i32"] * 8
    consts = dict(GROUP=case["group"], BLOCK_N=case["block_n"], WARPS_K=case["warps_k"],
                  CHUNK=case["chunk"], REDUCE=case["reduce"],
                  GROUPED=case["warps_k"] > 1 or case["rows"] > 4,
                  INT8=case["int8"], EMULATE=False, PDL=True, SUMS=case["sums"],
                  ROWS=case["rows"])
    signature = dict(zip(ARGS, types)) | {name: "constexpr" for name in consts}
    # what the launcher proves of aligned tensors and of integers divisible by 16
    aligned = ARGS[:7] + case["divisible"]
    attrs = {(ARGS.index(a),): [["tt.divisibility", 16]] for a in aligned}
    compiled = triton.compile(ASTSource(_mma_gemv_kernel, signature, consts, attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=case["warps"], num_stages=1))
    ttgir = compiled.asm["ttgir"]
    per_thread = {m[1]: [m[2], m[3]] for m in re.finditer(
        r"^(#\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], "
        r"threadsPerWarp = \[([\d, ]+)\]", ttgir, re.M)}
    steps = [line for line in ttgir.splitlines() if "mma.sync" in line]
    layouts = sorted({tuple(per_thread[name]) for line in steps
                      for name in re.findall(r"tensor<\d+xf32, (#\w+)>", line)})
    print(json.dumps(dict(case=case, steps=len(steps), layouts=layouts)))
"""

# int4 groups of 128/64/32 (chunks of 4/2/1 steps), int8 per channel and in groups of 32
# (chunks of 2 steps); one warp row (with and without split-K) or several along K; N and
# the output stride divisible by 16 or not (N = 1000); the sums handed on (GemvSums, one
# warp row), whose int64 atomics must not change the steps' layout; and int4 steps over 8
# rows (`mma_step8`) and over 16 (two of them a step; one rep a warp, as the tuner keeps)
_CASES = [dict(int8=int8, group=group, chunk=chunk, block_n=32 * reps, warps_k=warps_k,
               warps=warps_k, reduce=reduce, divisible=divisible, sums=sums, rows=rows)
          for int8, group, chunk in ((False, 128, 4), (False, 64, 2), (False, 32, 1),
                                     (True, 576, 4), (True, 4096, 4), (True, 32, 2))
          for rows in ((4,) if int8 else (4, 8, 16))
          for warps_k, reps, reduce, sums in ((1, 1, True, False), (1, 2, False, False),
                                              (8, 1, False, False), (1, 1, True, True))
          if not (sums and rows > 4 or rows == 16 and reps == 2)
          for divisible in (["K", "stride_xm"], ["K", "stride_xm", "stride_om", "N"])]


def test_mma_steps_compile_to_four_elements_a_thread():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(_CASES)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(results) == len(_CASES)
    for r in results:
        assert r["steps"] > 0, r  # the PTX is there to check
        assert r["layouts"] == [["4", "32"]], r
