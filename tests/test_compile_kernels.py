"""NVRTC compiles every kernel instantiation of every op for sm_80 and sm_90 without a GPU, with no register
spills (ptxas' report) but those an op keeps for one NVRTC (Kernel.known_spills: they must still spill there, at
most as much as declared). The suite's session fixture points the disk cache at an empty folder, so these are real
compilations, not cache hits. (A plan can only launch kernels its op lists: `Op` checks that on every plan.)"""

from __future__ import annotations

import pytest

from cupy_ops._runtime import compiler
from cupy_ops.ops import kernels, ops

INSTANTIATIONS = kernels()
ARCHS = [80, 90]  # A100 and H100/H200: the oldest and the newest arch the project targets


def test_every_op_lists_its_kernels():
    assert all(op.kernels for op in ops().values())


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize("kernel", INSTANTIATIONS, ids=[k.name_expression for k in INSTANTIATIONS])
def test_compiles_without_spills(kernel, arch):
    report = compiler.ptxas_report(kernel.source, kernel.name_expression, arch, root=kernel.root)
    assert kernel.spills_allowed(report), report.log  # none, but a spill the op keeps with this NVRTC
    known = kernel.spill_allowance(arch) > 0
    assert report.spill_stores > 0 or not known, "a known spill is gone: drop it from the op's known_spills"
    assert report.registers > 0, report.log  # the report was parsed from this kernel's block


def test_report_of_a_kernel_compiled_before(fresh_cache):
    """ptxas' report still comes when NVRTC compiled the kernel before in this process: NVRTC 12.9+ keeps a compile
    cache of its own where a CUDA driver is installed, and a hit there printed no report (the H200 machine, NVRTC
    13.0). Our caches are emptied in between, so the report's compile reaches NVRTC again. (Without a driver NVRTC
    caches nothing: on CPU-only machines this passes either way.)"""
    kernel = INSTANTIATIONS[0]
    compiler.compile_kernel(kernel.source, kernel.name_expression, 90, root=kernel.root)
    compiler.clear_memory_cache()
    for entry in fresh_cache.iterdir():
        entry.unlink()
    report = compiler.ptxas_report(kernel.source, kernel.name_expression, 90, root=kernel.root)
    assert report.registers > 0, report.log
