"""The L2 prefetch of the next weights (`kernels.l2_prefetch`): which bytes it asks for,
that it is off where it cannot run, and that the kernels issuing it (attention, the norms,
the SwiGLU) compile for sm_90 with the bulk prefetch in their PTX (no GPU needed: Triton
ships ptxas; in a subprocess, since the other kernel tests set TRITON_INTERPRET, under
which nothing compiles). On a device, `tests/gpu/test_gpu_decode_steps.py` checks that
decode steps give the same logits with it and without."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

# (not importorskip: triton must not be imported before the kernel tests set TRITON_INTERPRET)
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)


def test_regions_take_leading_bytes_within_the_budget():
    from kernels.l2_prefetch import SLOTS, regions

    codes = torch.empty(1000, dtype=torch.int32)  # 4,000 bytes
    scales = torch.empty(100, dtype=torch.float16)  # 200
    offsets = torch.empty(100, dtype=torch.float16)
    more = torch.empty(10_000, dtype=torch.bfloat16)
    picked = regions([codes, scales, offsets, more], 4_500)
    # whole tensors in order, each rounded down to 16 bytes, the last cut at the budget
    assert [(t is s, n) for (t, n), s in zip(picked, [codes, scales, offsets, more],
                                              strict=True)] \
        == [(True, 4_000), (True, 192), (True, 192), (True, 112)]
    whole = regions([codes, scales, offsets, more, codes], 10**9)
    assert len(whole) == SLOTS and whole[-1] == (more, 20_000)
    assert regions([codes], 0) == []
    assert regions([codes], 15) == []  # (less than one 16-byte unit)
    # a view whose bytes from its start are not its own, or that starts off 16 bytes
    wide = torch.empty(64, 64, dtype=torch.bfloat16)
    assert regions([codes, wide.t(), scales], 10**9) == [(codes, 4_000)]
    assert regions([wide.view(-1)[4:]], 10**9) == []


def test_prefetch_args_off_on_the_cpu_and_filled_with_the_stand_in():
    from kernels.l2_prefetch import SLOTS, prefetch_args

    like = torch.empty(4)
    args = prefetch_args(like, [torch.empty(64)])
    assert args["PREFETCH"] is False
    assert all(args[f"pf{i}"] is like and args[f"pn{i}"] == 0 for i in range(SLOTS))


_CHECK = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.triton_attention import _paged_attention_kernel
from kernels.triton_fused import _add_norm_deferred_kernel, _add_rms_norm_kernel, _silu_mul_kernel

KERNELS = {
    "attention": (_paged_attention_kernel, dict(
        GROUP=4, GROUP_PAD=4, BLOCK_Q=4, BLOCK_KV=64, BLOCK_D=128, HAS_WINDOW=False,
        MAX_SPLITS=16, UPCAST=False, DECODE=True, PDL=True, SOFTCAP=True), 4),
    "add_rms_norm": (_add_rms_norm_kernel, dict(HAS_RESIDUAL=True, BLOCK=4096, SS_BLOCK=16,
                                                PDL=True), 8),
    "add_norm_deferred": (_add_norm_deferred_kernel, dict(HAS_RESIDUAL=True, BLOCK=256,
                                                          PDL=True), 2),
    "silu_mul": (_silu_mul_kernel, dict(BLOCK=256, SS_BLOCK=16, PDL=True), 2),
}
FLOATS = ("eps", "qk_scale", "cap", "inv_width", "ss_eps")
out = {}
for name, (kernel, consts, warps) in KERNELS.items():
    for prefetch in (False, True):
        every = consts | dict(PREFETCH=prefetch, PF_LANES=32 * warps)
        types = {}
        for arg in kernel.arg_names:
            if arg in every:
                types[arg] = "constexpr"
            elif arg in ("pf0", "pf3", "bt_ptr", "seq_lens_ptr", "qsl_ptr", "cnt_ptr"):
                types[arg] = "*i32"
            elif arg in ("pf1", "pf2"):
                types[arg] = "*fp16"
            elif arg in ("ws_acc_ptr", "ws_ml_ptr", "ss_ptr"):
                types[arg] = "*fp32"
            elif arg.endswith("_ptr"):
                types[arg] = "*bf16"
            elif arg in FLOATS:
                types[arg] = "fp32"
            else:
                types[arg] = "i64" if arg.startswith("pn") else "i32"
        compiled = triton.compile(ASTSource(kernel, types, every, {}),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=warps, num_stages=1))
        ptx = compiled.asm["ptx"]
        out[f"{name} {prefetch}"] = ptx.count("cp.async.bulk.prefetch.L2.global")
print(json.dumps(out))
"""


def test_kernels_compile_their_prefetch_for_sm90():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", _CHECK], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    # one bulk prefetch instruction per slot with the option, none without
    assert counts == {f"{name} {on}": 4 if on else 0 for name in
                      ("attention", "add_rms_norm", "add_norm_deferred", "silu_mul")
                      for on in (False, True)}
