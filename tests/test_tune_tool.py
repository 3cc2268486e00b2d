"""bench/tune.py's variants on the CPU: a variant sets module constants (evaluated in the module's namespace), the
ops forget their layouts and list the kernels a variant brings, a tree variant compiles every kernel from another
cuda_kernels/ folder, and everything is restored afterwards."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import bench_script

from cupy_ops._runtime import compiler
from cupy_ops.ops import kernels as every_kernel
from cupy_ops.ops import ops
from cupy_ops.ops import selective_scan_fwd as S
from cupy_ops.ops import topk_rows as R


@pytest.fixture(scope="module")
def tune():
    return bench_script("tune")


def test_a_variant_sets_constants_and_restores_them(tune):
    variant = tune.parse_variant("small: cupy_ops.ops.topk_rows.SMALL_CHUNK=SMALL_CHUNK // 2; "
                                 "cupy_ops.ops.topk_rows.MIN_CHUNK=1024")
    assert variant.label == "small"
    before = (R.SMALL_CHUNK, R.MIN_CHUNK)
    old = tune.apply(variant)
    assert (R.SMALL_CHUNK, R.MIN_CHUNK) == (before[0] // 2, 1024)
    tune.restore(old)
    assert (R.SMALL_CHUNK, R.MIN_CHUNK) == before


def test_a_variant_s_new_kernels_are_listed_by_the_ops_while_it_runs(tune):
    variant = tune.parse_variant("b3: cupy_ops.ops.selective_scan_fwd.KERNELS={**KERNELS, **chunk_kernels(3, 32)}")
    op = ops()["selective_scan_fwd"]
    listed = op.kernels
    old = tune.apply(variant)
    added = set(S.KERNELS.values()) - set(listed)
    assert added and all(", 3, 32>" in k.name_expression for k in added)
    assert added <= set(op.kernels)
    tune.restore(old)
    assert op.kernels == listed and ", 2, 32>" in S.KERNELS["chunk", next(iter(S.DTYPES)), False].name_expression


def test_base_changes_nothing(tune):
    assert tune.parse_variant("base").changes == {}


def test_a_tree_compiles_every_op_s_kernels_from_another_checkout_and_restores_them(tune, tmp_path):
    tree = tmp_path / "cuda_kernels"
    shutil.copytree(compiler.kernel_dir(), tree)
    header = tree / "common" / "types.cuh"  # included by every kernel
    header.write_text(header.read_text() + "\n#define CUPY_OPS_TREE_MARK 1\n")
    variant = tune.parse_tree(f"other={tree}")
    kernels = set(every_kernel())
    merge = next(k for k in ops()["merge_attn_states"].kernels)
    base_key = merge.compile(90).key
    old = tune.apply(variant)
    try:
        assert {k.root for k in kernels} == {str(tree.resolve())}
        assert merge.compile(90).key != base_key  # the tree's sources (its header changed), not this checkout's
    finally:
        tune.restore(old)
    assert {k.root for k in kernels} == {None}
    assert merge.compile(90).key == base_key


def test_a_tree_must_be_a_kernel_folder(tune, tmp_path):
    with pytest.raises(SystemExit, match="not a cuda_kernels/ folder"):
        tune.parse_tree(f"other={tmp_path}")
    with pytest.raises(SystemExit, match="label=DIR"):
        tune.parse_tree(f"={compiler.kernel_dir()}")
    variant = tune.parse_variant(f"w1: tree={compiler.kernel_dir()}; cupy_ops.ops.topk_rows.MIN_WHOLE_STAGES=1")
    assert variant.root == str(compiler.kernel_dir().resolve())
    assert variant.changes == {("cupy_ops.ops.topk_rows", "MIN_WHOLE_STAGES"): 1}


def test_an_edit_compiles_from_a_copy_with_one_text_replaced(tune):
    """`edit=FILE|OLD|NEW`: the variant's kernels compile from a copy of the tree in which FILE's one OLD is NEW;
    this checkout's file is untouched."""
    header = compiler.kernel_dir() / "common" / "types.cuh"
    old_text = "namespace cupy_ops {"
    assert header.read_text().count(old_text) == 1
    variant = tune.parse_variant(f"marked: edit=common/types.cuh|{old_text}|#define CUPY_OPS_EDIT_MARK 1\n{old_text}")
    edited = Path(variant.root) / "common" / "types.cuh"
    assert "CUPY_OPS_EDIT_MARK" in edited.read_text() and "CUPY_OPS_EDIT_MARK" not in header.read_text()
    merge = next(k for k in ops()["merge_attn_states"].kernels)
    base_key = merge.compile(90).key
    old = tune.apply(variant)
    try:
        assert merge.compile(90).key != base_key
    finally:
        tune.restore(old)
    assert merge.compile(90).key == base_key


@pytest.mark.parametrize("edit, message", [
    ("common/types.cuh|no such text anywhere|x", "occurs 0 times"),
    ("common/types.cuh|//|x", "occurs [2-9][0-9]* times"),  # several
    ("common/no_such_file.cuh|a|b", "is not a file"),
    ("common/types.cuh|only-two-parts", "expected edit=FILE|OLD|NEW"),
])
def test_an_edit_that_would_be_silent_or_ambiguous_is_refused(tune, edit, message):
    with pytest.raises(SystemExit, match=message.replace("|", r"\|")):
        tune.parse_variant(f"bad: edit={edit}")


CUTS = bench_script("phase_trees").CUTS


@pytest.mark.parametrize("label", CUTS)
def test_every_phase_cut_applies_to_the_sources_and_compiles(tune, label):
    """`cut=NAME` makes bench/phase_trees.py's edits of that cut (each anchor found exactly once: a source change
    that moves one fails here, not on the GPU machine), and the kernel it cuts compiles: the two-pass kernel, or the
    register kernel in a cluster (its cuts sync it)."""
    variant = tune.parse_variant(f"{label}: cut={label}")
    for edit in CUTS[label]:
        edited = (Path(variant.root) / edit.file).read_text()
        assert edit.new in edited and edited != (compiler.kernel_dir() / edit.file).read_text(), label
    name = ("cupy_ops::persistent_topk_two_pass_kernel<1024>" if label.startswith("tp_")
            else "cupy_ops::persistent_topk_registers_kernel<1024, 2, 5>")
    kernel = next(k for k in every_kernel() if k.name_expression == name)
    report = compiler.ptxas_report(kernel.source, kernel.name_expression, 90, root=variant.root)
    assert report.registers > 0, report.log


def test_an_unknown_phase_cut_is_refused(tune):
    with pytest.raises(SystemExit, match="no cut 'tp_nothing'"):
        tune.parse_variant("bad: cut=tp_nothing")
