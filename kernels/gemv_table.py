"""Per-device tables of GEMV configurations, written by `python3 -m kernels.tune_gpu`.

The autotuner (`kernels.triton_gemv.autotuned`) times each candidate once, briefly, with
L2 emptied by a write, in the process that first meets a shape. Its picks differ from
process to process, and are often not the configuration that runs fastest in a model step:
on an H200, int4 batch-1 decode of the 8B shape ranged 401-497 tok/s over the same code
(docs/benchmarks/gpu.md, runs 38-77). A table holds, per tuner key, the configuration
that graph replays over weight copies ranked fastest on that device, as vLLM ships tuned
configurations per device. Where the table has the key, `kernels.triton_mma_gemv.launch`
and `kernels.triton_dense_gemv.dense_gemv` launch that configuration; elsewhere they autotune.

A table is JSON: {"device": torch.cuda.get_device_name(), "runs": [how the entries were
made], "entries": [{"kernel": "mma_gemv" | "mma_gemv_sums" | "dense_gemv", "key": {the tuner's
key arguments by name}, "config": {the kernel's config argument}, "us": time}, ...]}. The
device's table is `kernels/tables/<device name>.json` (non-alphanumerics as "_");
LEAPFROG_GEMV_TABLE names another file, or "off" for none.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch

from kernels.switch import Switch

TABLE_DIR = Path(__file__).with_name("tables")
KERNELS = ("mma_gemv", "mma_gemv_sums", "dense_gemv")
_enabled = Switch(True)


def table_path(device_name: str) -> Path:
    """Where the table of the device called `device_name` lives in the package."""
    return TABLE_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


def _key(kernel: str, key: dict[str, int | bool]) -> tuple:
    return kernel, *sorted((name, int(value)) for name, value in key.items())


def read_table(path: Path) -> dict[tuple, dict]:
    """{(kernel, *sorted key items): config} of the table at `path`; a malformed file
    raises ValueError naming it."""
    try:
        data = json.loads(path.read_text())
        table = {}
        for entry in data["entries"]:
            if entry["kernel"] not in KERNELS:
                raise ValueError(f"unknown kernel {entry['kernel']!r}")
            table[_key(entry["kernel"], entry["key"])] = dict(entry["config"])
        return table
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"GEMV table {path} is malformed: {exc!r}") from exc


@functools.cache
def _device_table(device: torch.device) -> dict[tuple, dict]:
    setting = os.environ.get("LEAPFROG_GEMV_TABLE", "")
    if setting == "off":
        return {}
    if setting and not Path(setting).is_file():
        raise ValueError(f"LEAPFROG_GEMV_TABLE names {setting}, which is not a file (give a "
                         "table written by kernels.tune_gpu, or 'off')")
    path = Path(setting) if setting else table_path(torch.cuda.get_device_name(device))
    return read_table(path) if path.is_file() else {}


def lookup(kernel: str, device: torch.device, **key: int | bool) -> dict | None:
    """The tabled configuration of `kernel` for the tuner key `key` on `device` (a copy),
    or None: not on CUDA, no table, no such entry, or inside `disabled()`."""
    if not _enabled.on or device.type != "cuda":
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    config = _device_table(device).get(_key(kernel, key))
    return None if config is None else dict(config)


disabled = _enabled.off
"""Every lookup misses while inside: the kernels autotune (for side-by-side timing)."""


def write_table(path: Path, device_name: str, run: dict | None, entries: list[dict]) -> None:
    """Write `entries` ({"kernel", "key", "config", ...}) as the table of `device_name`,
    replacing those of the same kernel and key already in the file at `path`, and add
    `run` (how they were made; None: already added) to its runs."""
    old = json.loads(path.read_text()) if path.is_file() else {"runs": [], "entries": []}
    merged = {_key(e["kernel"], e["key"]): e for e in old["entries"] + entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device_name, "runs": old["runs"] + ([run] if run else []),
                                "entries": [merged[k] for k in sorted(merged)]}, indent=1)
                    + "\n")
