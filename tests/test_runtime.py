"""Process-wide runtime settings of the training stages: keeping freed host memory for reuse (retain_memory)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from veorl.checkpoint import config_differences
from veorl.config import resolve

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Run in a child process: mallopt changes the whole process, and the test must see malloc's state before and after.
# It allocates 96 MiB blocks (above glibc's largest mmap threshold, 32 MiB) with malloc itself and as a torch tensor,
# and reads malloc's statistics (mallinfo2: bytes in mmapped blocks, bytes the heap holds, bytes free in it).
PROBE = r"""
import ctypes, json, sys
import torch
from veorl.runtime import release_freed_memory, resident_bytes, retain_freed_memory

libc = ctypes.CDLL("libc.so.6")
fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in fields]
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
BLOCK = 96 * 2**20

def probe():
    before = libc.mallinfo2()
    block = libc.malloc(BLOCK)
    held = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    tensor = torch.ones(BLOCK // 4)
    with_tensor = libc.mallinfo2()
    del tensor
    return {
        "mmapped_growth": held.hblkhd - before.hblkhd,
        "tensor_mmapped_growth": with_tensor.hblkhd - after.hblkhd,
        "heap_free_after_free": after.fordblks,
    }

def resident_after_release():
    block = libc.malloc(BLOCK)
    ctypes.memset(block, 1, BLOCK)  # resident now
    libc.free(block)
    kept = resident_bytes()
    released = release_freed_memory()
    return {"kept": kept, "released": released, "after_release": resident_bytes()}

report = {"system": probe()}
report["applied"] = retain_freed_memory(sys.argv[1] == "on")
report["after"] = probe()
report["release"] = resident_after_release()
print(json.dumps(report))
"""


def _probe(setting: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="retain_memory acts on glibc's malloc; elsewhere it is a documented no-op")
def test_retained_memory_serves_large_blocks_from_the_heap_and_keeps_them_after_free():
    block = 96 * 2**20
    report = _probe("on")
    # the system's malloc maps a fresh region for such a block (and unmaps it on free)
    assert report["system"]["mmapped_growth"] >= block
    assert report["applied"] is True
    after = report["after"]
    # with the setting, neither malloc nor torch maps one: the block comes from the heap, and stays there once freed
    assert after["mmapped_growth"] == 0 and after["tensor_mmapped_growth"] == 0
    assert after["heap_free_after_free"] >= block
    # the freed block stays resident until release_freed_memory hands its pages back
    release = report["release"]
    assert release["released"] is True and release["kept"] - release["after_release"] >= 0.9 * block


@pytest.mark.skipif(not GLIBC, reason="retain_memory acts on glibc's malloc")
def test_retain_memory_off_leaves_malloc_as_the_system_set_it():
    report = _probe("off")
    assert report["applied"] is False
    assert report["after"]["mmapped_growth"] >= 96 * 2**20 and report["after"]["tensor_mmapped_growth"] >= 96 * 2**20


def test_retain_memory_is_on_by_default_and_a_setting_a_run_may_resume_with():
    params = resolve({}, preset="cpu")
    assert params.pretrain.retain_memory is True and params.finetune.retain_memory is True
    saved = params.model_dump(mode="json")
    current = resolve({}, preset="cpu", overrides=["pretrain.retain_memory=false", "finetune.retain_memory=false"])
    # how the process allocates memory changes no number of training: a checkpoint continues under either value
    assert config_differences(saved, current.model_dump(mode="json")) == []
    changed = resolve({}, preset="cpu", overrides=["pretrain.seed=3"])
    assert config_differences(saved, changed.model_dump(mode="json")) != []


def test_memory_bound_releases_once_the_resident_size_grows_by_half(monkeypatch):
    from veorl import runtime

    sizes = iter([100, 120, 149, 151, 140, 160])
    released = []
    monkeypatch.setattr(runtime, "resident_bytes", lambda: next(sizes))
    monkeypatch.setattr(runtime, "release_freed_memory", lambda: released.append(True) or True)
    monkeypatch.setattr(runtime, "_retaining", False)
    idle = runtime.MemoryBound()
    idle.after_update()  # a process that keeps the system's malloc: nothing to watch
    assert idle.baseline is None and released == []
    monkeypatch.setattr(runtime, "_retaining", True)
    bound = runtime.MemoryBound(growth=1.5)
    for _ in range(6):
        bound.after_update()
    # 100 after the first update; 151 and 160 exceed 150
    assert bound.baseline == 100 and bound.releases == 2 and len(released) == 2
