"""NVRTC compiles every merge_attn_states instantiation for sm_80 and sm_90 without a GPU, with no register
spills (ptxas' report). The suite's session fixture points the disk cache at an empty folder, so these are real
compilations, not cache hits."""

from __future__ import annotations

import pytest

from cupy_ops._runtime import compiler
from cupy_ops.ops import op_module

INSTANTIATIONS = op_module("merge_attn_states").instantiations()
ARCHS = [80, 90]  # A100 and H100: the oldest and the newest arch the project targets


def test_instantiations_cover_every_launchable_kernel():
    """Per input dtype: its own output and fp8 output, each vector width from 16 bytes down to one element,
    32- and 64-bit offsets; all from merge_attn_states.cu."""
    widths = {"float": (4, 2, 1), "__half": (8, 4, 2, 1), "__nv_bfloat16": (8, 4, 2, 1)}
    expected = {
        f"cupy_ops::merge_attn_states_kernel<{scalar}, {out}, {vec}, {wide}>"
        for scalar, vecs in widths.items()
        for out in (scalar, "cupy_ops::fp8_e4m3")
        for vec in vecs
        for wide in ("false", "true")
    }
    assert {source for source, _ in INSTANTIATIONS} == {"merge_attn_states.cu"}
    assert sorted(name for _, name in INSTANTIATIONS) == sorted(expected)


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize("source, name", INSTANTIATIONS, ids=[name for _, name in INSTANTIATIONS])
def test_compiles_without_spills(source, name, arch):
    report = compiler.ptxas_report(source, name, arch)
    assert report.spill_stores == 0 and report.spill_loads == 0, report.log
    assert report.registers > 0, report.log  # the report was parsed from this kernel's block
