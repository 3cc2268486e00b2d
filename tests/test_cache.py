"""The compile cache (cupy_ops._runtime.compiler): disk hits across processes, corrupt entries recompiled and
rewritten, one NVRTC run for concurrent first calls, racing processes, content-keyed sources, and a cache
folder that cannot be written. All without a GPU."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cupy_ops._runtime import compiler

REPO_ROOT = Path(__file__).resolve().parents[1]

SOURCE = "merge_attn_states.cu"
NAME = "cupy_ops::merge_attn_states_kernel<float, float, 1, false>"  # the smallest instantiation: fast to build
ARCH = 90


def _entries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _run_child(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=240, check=False)


# Loads the entry with NVRTC disabled; exit 0 only when it got the image whose sha256 is argv[4].
_LOAD_WITHOUT_NVRTC = """
import hashlib, sys
from cupy_ops._runtime import compiler

def no_nvrtc(*args, **kwargs):
    sys.exit(3)  # the entry was on disk: NVRTC must not run

compiler._nvrtc_compile = no_nvrtc
entry = compiler.compile_kernel(sys.argv[1], sys.argv[2], int(sys.argv[3]))
sys.exit(0 if hashlib.sha256(entry.image).hexdigest() == sys.argv[4] else 4)
"""


def test_disk_hit_in_a_fresh_process(fresh_cache, subprocess_env, nvrtc_calls):
    """A new process loads the entry written here, without NVRTC and without rewriting the file."""
    entry = compiler.compile_kernel(SOURCE, NAME, ARCH)
    assert nvrtc_calls == [NAME]
    path = fresh_cache / f"{entry.key}.bin"
    before = path.stat()
    child = _run_child(_LOAD_WITHOUT_NVRTC, subprocess_env, SOURCE, NAME, str(ARCH),
                       hashlib.sha256(entry.image).hexdigest())
    assert child.returncode == 0, f"exit {child.returncode} (3: NVRTC ran, 4: other image)\n{child.stderr}"
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert _entries(fresh_cache) == [path.name]


def _corrupt(blob: bytes, how: str, other_entry: bytes) -> bytes:
    magic = compiler._CACHE_MAGIC
    (header_len,) = struct.unpack_from("<I", blob, len(magic))
    start = len(magic) + 4
    header, image = blob[start:start + header_len], blob[start + header_len:]

    def with_header(new_header: bytes) -> bytes:
        return magic + struct.pack("<I", len(new_header)) + new_header + image

    fields = json.loads(header)
    return {
        "empty": lambda: b"",
        "truncated-in-magic": lambda: blob[:5],
        "truncated-in-header": lambda: blob[:start + header_len // 2],
        "truncated-image": lambda: blob[:len(blob) - len(image) // 2],
        "flipped-image-byte": lambda: blob[:-1] + bytes([blob[-1] ^ 0xFF]),
        "wrong-magic": lambda: b"NOTCUPY\x01" + blob[len(magic):],
        "garbage-json": lambda: with_header(b"{not json"),
        "json-not-an-object": lambda: with_header(b"[1, 2, 3]"),
        "missing-field": lambda: with_header(json.dumps({k: v for k, v in fields.items() if k != "lowered_name"})
                                             .encode()),
        "non-utf8-header": lambda: with_header(b"\xff\xfe\xfd"),
        "header-length-past-the-end": lambda: magic + struct.pack("<I", 2**32 - 1) + blob[start:],
        "entry-of-another-key": lambda: other_entry,
        "changed-lowered-name": lambda: with_header(json.dumps({**fields, "lowered_name": fields["lowered_name"][:-1]
                                                                + "X"}).encode()),
    }[how]()


CORRUPTIONS = ["empty", "truncated-in-magic", "truncated-in-header", "truncated-image", "flipped-image-byte",
               "wrong-magic", "garbage-json", "json-not-an-object", "missing-field", "non-utf8-header",
               "header-length-past-the-end", "entry-of-another-key", "changed-lowered-name"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_entry_is_recompiled_and_rewritten(fresh_cache, nvrtc_calls, how):
    """A damaged entry is a miss: compiled again, silently (no exception, no warning), and replaced by a valid
    entry; no temp file is left behind."""
    entry = compiler.compile_kernel(SOURCE, NAME, ARCH)
    other = compiler.compile_kernel(SOURCE, NAME.replace(", 1,", ", 2,"), ARCH)
    path = fresh_cache / f"{entry.key}.bin"
    blob = _corrupt(path.read_bytes(), how, (fresh_cache / f"{other.key}.bin").read_bytes())
    path.write_bytes(blob)
    assert compiler._read_entry(entry.key) is None  # the damage is real
    compiler.clear_memory_cache()
    nvrtc_calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = compiler.compile_kernel(SOURCE, NAME, ARCH)
    assert nvrtc_calls == [NAME]
    assert (again.key, again.lowered_name) == (entry.key, entry.lowered_name) and again.image
    assert compiler._read_entry(entry.key) == again
    assert _entries(fresh_cache) == sorted([path.name, f"{other.key}.bin"])


def test_entries_are_readable_by_other_users(fresh_cache):
    """0644, not mkstemp's 0600: a cache filled by one user (say while building an image) serves the others."""
    entry = compiler.compile_kernel(SOURCE, NAME, ARCH)
    assert (fresh_cache / f"{entry.key}.bin").stat().st_mode & 0o777 == 0o644


def test_concurrent_first_calls_compile_once(fresh_cache, nvrtc_calls):
    """8 threads released together into an empty cache: one NVRTC run, one identical result for all."""
    barrier = threading.Barrier(8)

    def first_call() -> compiler.CompiledKernel:
        barrier.wait()
        return compiler.compile_kernel(SOURCE, NAME, ARCH)

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(first_call) for _ in range(8)]
        results = [f.result(timeout=120) for f in futures]  # re-raises a thread's exception
    assert nvrtc_calls == [NAME]
    assert all(r is results[0] for r in results)


_COMPILE = """
import sys
from cupy_ops._runtime import compiler
sys.exit(0 if compiler.compile_kernel(sys.argv[1], sys.argv[2], int(sys.argv[3])).image else 5)
"""


def test_racing_processes_leave_one_valid_entry(fresh_cache, subprocess_env, nvrtc_calls):
    """4 processes started together on one empty folder all succeed; one complete entry, no temp files."""
    children = [subprocess.Popen([sys.executable, "-c", _COMPILE, SOURCE, NAME, str(ARCH)], env=subprocess_env,
                                 cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(4)]
    outcomes = [(child.wait(timeout=240), child.communicate()[1]) for child in children]
    assert all(code == 0 for code, _ in outcomes), outcomes
    entry = compiler.compile_kernel(SOURCE, NAME, ARCH)
    assert nvrtc_calls == []  # loaded from the entry the children left
    assert _entries(fresh_cache) == [f"{entry.key}.bin"]


# The files merge_attn_states.cu reaches through #include "..." (types.cuh only through the other headers).
SOURCE_TREE = ["merge_attn_states.cu", "common/dtypes.cuh", "common/fast_divmod.cuh", "common/vec.cuh",
               "common/types.cuh"]


@pytest.fixture
def kernel_copy(tmp_path, monkeypatch, fresh_cache):
    """A copy of cuda_kernels/ that the compiler reads instead of the real one."""
    copy = tmp_path / "cuda_kernels"
    shutil.copytree(compiler.kernel_dir(), copy)
    monkeypatch.setattr(compiler, "_kernel_dir", lambda: copy)
    compiler.clear_memory_cache()  # also forgets the cached source tree digests
    yield copy
    compiler.clear_memory_cache()


def _key() -> str:
    compiler.clear_memory_cache()
    return compiler.compile_kernel(SOURCE, NAME, ARCH).key


@pytest.mark.parametrize("edited", SOURCE_TREE)
def test_key_follows_the_content_of_every_included_file(kernel_copy, edited):
    """Editing the .cu or any header it includes, even a comment, changes the key; an unrelated file does not."""
    before = _key()
    (kernel_copy / "common" / "unrelated.cuh").write_text("// not included by merge_attn_states.cu\n")
    assert _key() == before
    path = kernel_copy / edited
    path.write_text(path.read_text() + "\n// edited\n")
    assert _key() != before


def test_key_follows_headers_as_nvrtc_finds_them(tmp_path, kernel_copy):
    """An include in <> under a kernel tree is keyed; a quoted include resolves beside its includer first (a tree's
    own copy of a header the package's header includes is not what NVRTC opens); a toolkit header or one inside
    #if 0, found in no tree, is NVRTC's and breaks nothing. No NVRTC call: the source tree's digest only."""
    tree = tmp_path / "tree"
    (tree / "common").mkdir(parents=True)
    (tree / "probe.cu").write_text('#include <common/angle.cuh>\n#include "cuda_fp16.h"\n#if 0\n#include "gone.cuh"\n'
                                   '#endif\n#include "common/fast_divmod.cuh"\n')
    (tree / "common" / "angle.cuh").write_text("// one\n")
    (tree / "common" / "types.cuh").write_text("// the tree's copy: fast_divmod.cuh includes the package's\n")

    def digest():
        compiler.clear_memory_cache()  # the digests are cached per process
        return compiler._source_tree("probe.cu", tree)[1]

    before = digest()
    (tree / "common" / "angle.cuh").write_text("// two\n")
    assert digest() != before
    before = digest()
    (tree / "common" / "types.cuh").write_text("// edited, still not opened\n")
    assert digest() == before
    package_types = kernel_copy / "common" / "types.cuh"
    package_types.write_text(package_types.read_text() + "\n// edited\n")
    assert digest() != before


def test_edited_header_is_compiled_from_the_new_content(kernel_copy, nvrtc_calls):
    """After compiling once, a header edit makes the next call compile again, from the edited text."""
    compiler.compile_kernel(SOURCE, NAME, ARCH)
    header = kernel_copy / "common" / "types.cuh"
    header.write_text(header.read_text() + '\n#error "edited header reached NVRTC"\n')
    compiler.clear_memory_cache()
    with pytest.raises(compiler.CompileError, match="edited header reached NVRTC"):
        compiler.compile_kernel(SOURCE, NAME, ARCH)
    assert nvrtc_calls == [NAME, NAME]


def _compiles_without_disk(folder, nvrtc_calls) -> None:
    entry = compiler.compile_kernel(SOURCE, NAME, ARCH)
    assert entry.image and nvrtc_calls == [NAME]
    assert compiler.compile_kernel(SOURCE, NAME, ARCH) is entry  # the memory level still holds it
    assert nvrtc_calls == [NAME]


def test_read_only_cache_folder_still_compiles(fresh_cache, nvrtc_calls):
    """A folder without write permission costs only the disk level."""
    fresh_cache.mkdir()
    fresh_cache.chmod(0o500)
    try:
        probe = fresh_cache / "probe"
        try:
            probe.write_bytes(b"")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("chmod 0o500 does not stop this user (root) from writing; the next test covers it")
        _compiles_without_disk(fresh_cache, nvrtc_calls)
        assert _entries(fresh_cache) == []
    finally:
        fresh_cache.chmod(0o700)


def test_cache_folder_below_a_file_still_compiles(tmp_path, monkeypatch, fresh_cache, nvrtc_calls):
    """A cache path that cannot be created, even by root (its parent is a regular file), costs only the disk
    level."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CUPY_OPS_CACHE_DIR", str(blocker / "cache"))
    _compiles_without_disk(blocker / "cache", nvrtc_calls)
    assert blocker.is_file() and blocker.read_text() == ""


def test_extra_options_from_the_environment_are_compiled_with_and_keyed(fresh_cache, nvrtc_calls, monkeypatch):
    """CUPY_OPS_NVRTC_OPTIONS reaches NVRTC (-lineinfo adds a line table to the cubin) and makes another entry."""
    plain = compiler.compile_kernel(SOURCE, NAME, ARCH)
    monkeypatch.setenv("CUPY_OPS_NVRTC_OPTIONS", "-lineinfo")
    with_lines = compiler.compile_kernel(SOURCE, NAME, ARCH)
    assert with_lines.key != plain.key and nvrtc_calls == [NAME, NAME]
    assert b".nv_debug_line_sass" in with_lines.image and b".nv_debug_line_sass" not in plain.image


BINDINGS = {"ctypes": None,  # libnvrtc through ctypes, the library CuPy compiled with
            "cupy": ("_nvrtc_library", lambda: None),  # no ctypes library found: CuPy's image, mended
            "another-library": ("nvrtc_version", lambda: (0, 0))}  # ctypes found another NVRTC: CuPy's, mended


def _use_binding(monkeypatch, binding):
    if BINDINGS[binding] is not None:
        monkeypatch.setattr(compiler, *BINDINGS[binding])


@pytest.mark.parametrize("binding", BINDINGS)
def test_a_cubin_is_whole(fresh_cache, monkeypatch, binding):
    """The image holds every byte its ELF header spans (CuPy's nvrtc.getCUBIN drops the last one; without ctypes'
    libnvrtc the image is padded back), and the cache hands the same bytes back."""
    _use_binding(monkeypatch, binding)
    entry = compiler.compile_kernel(SOURCE, NAME, ARCH)
    assert entry.image[:4] == b"\x7fELF" and len(entry.image) == compiler.elf_extent(entry.image)
    compiler.clear_memory_cache()
    assert compiler.compile_kernel(SOURCE, NAME, ARCH).image == entry.image


@pytest.mark.parametrize("binding", BINDINGS)
def test_ptx_ends_in_one_nul(fresh_cache, monkeypatch, binding):
    """cuModuleLoadData reads PTX as a NUL-terminated text; CuPy's nvrtc.getPTX drops the NUL."""
    _use_binding(monkeypatch, binding)
    entry = compiler.compile_kernel(SOURCE, NAME, ARCH, native=False)
    assert b".entry" in entry.image and entry.image.endswith(b"\0") and entry.image.count(b"\0") == 1
    compiler.clear_memory_cache()
    assert compiler.compile_kernel(SOURCE, NAME, ARCH, native=False).image == entry.image
