"""bench/sass.py on the CPU without nvdisasm: a listing's instructions keep their operands and lose their addresses
and comments; two dumps compare kernel by kernel (identical, NOP-only, different, missing); line information
attributes each instruction to the source line above it."""

from __future__ import annotations

import pytest
from helpers import bench_script

LISTING = """\
        .text.kernel:
	//## File "/x/cuda_kernels/common/topk.cuh", line 40
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R0                  (*"SpillRefill"*);
.L_x_1:
	//## File "/x/cuda_kernels/common/topk.cuh", line 41
        /*0020*/              @!P0 BRA `(.L_x_1) ;
        /*0030*/                   NOP;
"""


@pytest.fixture(scope="module")
def sass():
    return bench_script("sass")


def test_instructions_drop_addresses_and_comments(sass):
    assert sass.instructions(LISTING) == ["LDC R1, c[0x0][0x28]", "STL [R1], R0", "@!P0 BRA `(.L_x_1)", "NOP"]


def test_compare_kernel_by_kernel(sass):
    a = {"same": ["IADD3 R1, R2, R3"], "padded": ["MOV R1, R2", "EXIT"], "changed": ["MOV R1, R2"], "gone": ["EXIT"]}
    b = {"same": ["IADD3 R1, R2, R3"], "padded": ["MOV R1, R2", "NOP", "EXIT"], "changed": ["MOV R1, R3"],
         "new": ["EXIT"]}
    assert sass.compare(a, b) == {"same": "identical", "padded": "nop-only", "changed": "different",
                                  "gone": "missing", "new": "missing"}


def test_source_lines_count_instructions_under_their_line(sass):
    assert sass.source_lines(LISTING) == {("topk.cuh", 40): 2, ("topk.cuh", 41): 2}
