"""`python -m cupy_ops` for a newcomer: `info` is consistent about NVRTC, `warmup --arch` refuses archs it cannot
serve and says what it compiled and what was cached, and without CuPy/NVRTC `check` and `warmup` say which extra
to install instead of raising a traceback."""

from __future__ import annotations

import pytest

from cupy_ops import _cli
from cupy_ops._runtime import compiler


def test_info_lists_every_op_and_is_consistent_about_nvrtc(capsys):
    assert _cli.main(["info"]) == 0
    out = capsys.readouterr().out
    from cupy_ops.ops import ops

    assert all(f"torch.ops.cupy_ops.{name}" in out for name in ops())
    nvrtc_line = next(line for line in out.splitlines() if line.startswith("NVRTC"))
    gpu_line = next((line for line in out.splitlines() if line.startswith("GPU ")), "")
    assert not ("not found" in nvrtc_line and "compile checks work" in gpu_line)


@pytest.mark.parametrize("arch, message", [(70, "need sm_80 or newer"), (91, "compiles for sm_80")])
def test_warmup_refuses_an_arch_it_cannot_serve(capsys, arch, message):
    assert _cli.main(["warmup", "--arch", str(arch)]) == 2
    assert message in capsys.readouterr().err


def test_warmup_takes_a_gpu_newer_than_nvrtc_as_the_runtime_does():
    """Past the newest arch NVRTC lists, the runtime runs PTX for that one (the driver compiles it): warmup fills
    the cache for such a GPU too, instead of refusing it."""
    newest = max(compiler._nvrtc_archs())
    assert _cli._arch_error(newest + 10) is None
    assert compiler.supported_arch(newest + 10) == (newest, False)


def test_warmup_says_what_it_compiled_and_what_was_cached(capsys, fresh_cache):
    assert _cli.main(["warmup", "--arch", "90"]) == 0
    first = capsys.readouterr().out
    kernels = int(first.split()[0])
    assert f"{kernels} compiled, 0 already in the cache" in first
    compiler.clear_memory_cache()
    assert _cli.main(["warmup", "--arch", "90"]) == 0
    assert f"0 compiled, {kernels} already in the cache" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["check"], ["warmup", "--arch", "90"]])
def test_without_nvrtc_the_commands_name_the_extra(monkeypatch, capsys, command):
    def missing():
        raise ImportError("No module named 'cupy'")

    monkeypatch.setattr(compiler, "_nvrtc", missing)
    code = _cli.main(command)
    captured = capsys.readouterr()
    assert "cupy-ops[cuda13]" in captured.out + captured.err
    if command == ["check"] and not _cli._gpu_available():  # the CPU references still run and pass
        assert code == 0 and "passed, 0 failed" in captured.out
    else:  # nothing to compile with: a GPU check or a warm-up cannot run
        assert code == 2


def test_check_takes_one_op(monkeypatch, capsys):
    """`check --op NAME` checks that op's examples (and, without a GPU, compiles its kernels) only; an unknown name
    is refused by the parser."""
    compiled = []

    def report(source, name_expression, arch, root=None):  # stands in for NVRTC: only which kernels are asked
        compiled.append(source)
        return compiler.PtxasReport(name_expression, arch, 16, 0, 0, 0, 0, "")

    monkeypatch.setattr(compiler, "ptxas_report", report)
    assert _cli.main(["check", "--op", "apply_repetition_penalties_"]) == 0
    rows = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert rows and all(op in ("apply_repetition_penalties_", "nvrtc") for op in rows)
    assert set(compiled) <= {"repetition_penalties.cu"} and (compiled or _cli._gpu_available() or _cli._nvrtc_problem())
    with pytest.raises(SystemExit):
        _cli.build_parser().parse_args(["check", "--op", "no_such_op"])
    assert "invalid choice: 'no_such_op'" in capsys.readouterr().err


def test_check_accepts_only_the_known_spills(monkeypatch, capsys):
    """Without a GPU, `check` fails a kernel that spills, unless its op keeps that spill for this NVRTC and it is no
    larger than declared (Kernel.known_spills; no kernel declares one now, so the test gives top_k_per_row's
    two-pass kernels 64 bytes at sm_90 with NVRTC 13.0); NVRTC and ptxas' report stood in for."""
    from cupy_ops.ops import kernels

    monkeypatch.setattr(_cli, "_gpu_available", lambda: False)
    monkeypatch.setattr(_cli, "_nvrtc_problem", lambda: None)
    monkeypatch.setattr(compiler, "nvrtc_version", lambda: (13, 0, 0))
    spilled = {"bytes": 36}
    monkeypatch.setattr(compiler, "ptxas_report", lambda source, name_expression, arch, root=None:
                        compiler.PtxasReport(name_expression, arch, 64, spilled["bytes"], 64, 24, 0, ""))
    two_pass = [k for k in kernels(["top_k_per_row_prefill"]) if "two_pass" in k.name_expression]
    for kernel in two_pass:
        monkeypatch.setattr(kernel, "known_spills", {((13, 0), 90): 64})
    known = {("sm_90", k.name_expression) for k in two_pass}

    def nvrtc_rows():
        assert _cli.main(["check", "--op", "top_k_per_row_prefill"]) == 1
        rows = [line.split()[:4] for line in capsys.readouterr().out.splitlines() if line.startswith(("PASS", "FAIL"))]
        return {(arch, kernel): verdict for verdict, op, arch, kernel in rows if op == "nvrtc"}

    rows = nvrtc_rows()
    assert known and {key for key, verdict in rows.items() if verdict == "PASS"} == known and len(rows) > len(known)
    spilled["bytes"] = 65  # more than declared
    assert "PASS" not in nvrtc_rows().values()


def test_a_spill_allowance_holds_for_its_nvrtc_and_arch_only(monkeypatch):
    """Kernel.known_spills names (NVRTC major.minor, arch): any other release or arch allows none. No kernel of the
    ops declares a spill (every instantiation compiles spill-free with NVRTC 12.9, 13.0 and 13.5)."""
    from cupy_ops._runtime import Kernel
    from cupy_ops.ops import kernels

    assert not any(k.known_spills for k in kernels())
    kernel = Kernel("top_k_per_row.cu", "cupy_ops::top_k_per_row_two_pass_kernel<256>",
                    known_spills={((13, 0), 90): 64, ((12, 9), 90): 12})
    allowed = {((13, 0, 0), 90): 64, ((13, 0, 2), 90): 64, ((12, 9, 0), 90): 12}
    for version in ((13, 0, 0), (13, 0, 2), (13, 5, 0), (12, 9, 0), (12, 8, 0)):
        monkeypatch.setattr(compiler, "nvrtc_version", lambda v=version: v)
        for arch in (80, 90):
            assert kernel.spill_allowance(arch) == allowed.get((version, arch), 0), (version, arch)
