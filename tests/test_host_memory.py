import platform
import subprocess
import sys
import textwrap

import pytest

# Allocates 100 blocks of 2 MiB with malloc after one 4 MiB block was freed (which raises glibc's dynamic mmap
# threshold above 2 MiB), writes them, frees all but the last, and prints the resident MB retained.
RETAINED_AFTER_FREE = textwrap.dedent("""
    import ctypes, sys
    from pathlib import Path
    if sys.argv[1] == "pinned":
        from dgg.host_memory import return_freed_memory
        assert return_freed_memory() is None
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss_mb():
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024
    libc.free(libc.malloc(4 << 20))
    blocks = [libc.malloc(2 << 20) for _ in range(100)]
    for block in blocks:
        ctypes.memset(block, 1, 2 << 20)
    before = rss_mb()
    for block in blocks[:-1]:
        libc.free(block)
    print(before - rss_mb())
""")


def released_mb(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", RETAINED_AFTER_FREE, mode], capture_output=True, text=True,
                          check=True)
    return float(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_after_pinning_the_thresholds_freed_blocks_go_back_to_the_system():
    assert released_mb("pinned") > 150  # 99 blocks of 2 MiB freed: nearly 200 MB leave the process
    assert released_mb("default") < 50  # glibc's own adjustment keeps them in the heap: the problem fixed


def test_the_trainer_pins_them_only_when_asked(tiny_model_dir, tmp_path, monkeypatch):
    import dgg.trainer
    from trainer_helpers import make_trainer

    calls = []
    monkeypatch.setattr(dgg.trainer, "return_freed_memory", lambda: calls.append(1))
    make_trainer(tiny_model_dir, tmp_path / "off", "train.max_batches=1")  # off by default: it costs time
    assert calls == []
    make_trainer(tiny_model_dir, tmp_path / "on", "train.max_batches=1", "train.return_freed_memory=true")
    assert calls == [1]
