"""Programmatic dependent launch (PDL, CUDA sm_90+) for the Triton kernels of a forward.

Back-to-back kernels on a stream normally leave a gap: the next kernel is launched only once
the previous one has finished, then its programs start, compute their addresses and wait a
full DRAM round trip for their first loads. At batch-1 decode, where a layer is a chain of
~10 kernels of a few microseconds each, those gaps are a large share of the step.

With PDL (the launch attribute ``programmatic stream serialization``) a kernel may start
while its predecessor still runs, once every program of the predecessor has signalled
(``griddepcontrol.launch_dependents``) or exited. Every kernel here follows one protocol:

1. before `await_inputs`: only loads that no earlier kernel writes (packed or dense
   weights, scales and offsets), no stores;
2. `await_inputs`, unconditionally in every program: ``griddepcontrol.wait`` (returns once
   the predecessor has completed and its writes are visible), then the signal that lets the
   next kernel launch;
3. everything else.

So a GEMV's first weight loads and its launch overlap the previous kernel's tail, and at
most two kernels are in flight. Because every program waits before it can exit, a kernel's
completion implies its predecessor's, so a kernel may read what any earlier kernel wrote.
Kernels without PDL (torch's) start after full completion, as always; PDL launches are
captured into CUDA graphs as programmatic edges. `LEAPFROG_PDL=0` turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.switch import Switch

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # Triton < 3.4 (torch < 2.8 pins one): launches without PDL
    gdc_launch_dependents = gdc_wait = None

ENABLED = Switch(os.environ.get("LEAPFROG_PDL", "1") != "0")
"""Whether kernels launch with PDL where the device supports it (benchmarks toggle it)."""
disabled = ENABLED.off
"""Launch (and capture) without PDL inside the block, for side-by-side comparisons."""


@functools.cache
def _capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def use_pdl(device: torch.device) -> bool:
    """Launch with PDL on `device`: CUDA sm_90+, Triton 3.4+, not under TRITON_INTERPRET,
    `ENABLED`."""
    return (ENABLED.on and device.type == "cuda" and gdc_wait is not None
            and os.environ.get("TRITON_INTERPRET") != "1" and _capable(device))


def pdl_args(device: torch.device) -> dict[str, bool]:
    """Launch keywords: the kernels' ``PDL`` constexpr, and Triton's ``launch_pdl`` option
    when it is on (older Triton does not know the option)."""
    return {"PDL": True, "launch_pdl": True} if use_pdl(device) else {"PDL": False}


@triton.jit
def await_inputs(PDL: tl.constexpr):
    """Step 2 of the protocol (module docs); nothing without PDL."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
