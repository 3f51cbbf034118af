"""keep_freed_memory: after it, re-allocating a large buffer reuses freed memory instead of faulting in new pages."""

import json
import subprocess
import sys

import pytest

from tract_bench.allocator import GLIBC

# Allocates and frees a 48 MiB tensor (over glibc's 32 MiB mmap ceiling) 16 times, before and after the call, and
# prints the page faults of the last 6 rounds of each. After the call glibc grows its heap for the first rounds
# (6 here: torch asks for 64-byte aligned memory, which the block just freed cannot hold), then reuses it.
PROBE = """
import json, resource, torch
from tract_bench.allocator import keep_freed_memory

def faults():
    for i in range(16):
        if i == 10:
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(12 * 2**20)  # 48 MiB of float32, every page written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = faults()
applied = keep_freed_memory()
print(json.dumps({"before": before, "applied": applied, "after": faults()}))
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_freed_buffers_are_reused_not_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.splitlines()[-1])
    assert result["applied"]
    pages = 6 * 48 * 2**20 // 4096  # what 6 rounds touch: 73,728 pages of 4 KiB
    assert result["before"] > pages // 2  # by default each round maps (and the kernel zeroes) fresh pages
    assert result["after"] < pages // 20  # after the call the freed block is reused
