"""The native CPU kernels' tests skip where the kernels do not run, so a broken build would
skip them all and pass: where a C compiler and a CPU variant exist, it fails here."""

from __future__ import annotations

import os
import shutil

import pytest

from kernels import cpu_native


def test_the_native_cpu_kernels_build_where_they_can():
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not cpu_native.runnable():
        pytest.skip("no C compiler, or a CPU none of the variants runs on")
    assert cpu_native.available()
