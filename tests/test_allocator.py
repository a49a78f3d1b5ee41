"""glibc malloc settings (vectorgeo.allocator): freed batches are reused, not faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vectorgeo import allocator

# allocate and free 48 MB arrays from two threads, like the embed loop's gather and model threads,
# and report the page faults taken doing it
_PROBE = """
import json, resource, sys, threading
import numpy as np
from vectorgeo import allocator
applied = allocator.keep_freed_memory() if sys.argv[1] == "tuned" else False
def churn():
    for _ in range(20):
        a = np.ones(6_000_000)  # 48 MB
        a += 1
        del a
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = threading.Thread(target=churn)
t.start()
churn()
t.join()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""


def _probe(mode: str, env: dict[str, str] | None = None) -> dict[str, int | bool]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    assert allocator.glibc_version(), "the test machine runs glibc"
    default, tuned = _probe("default"), _probe("tuned")
    assert tuned["applied"] is True and default["applied"] is False
    # with glibc's defaults every 48 MB array is mapped and faulted in afresh (how many faults that
    # is depends on the page sizes the kernel uses); with the settings the first ones are and the
    # rest reuse them
    assert default["faults"] > 5_000, default
    assert tuned["faults"] < default["faults"] / 4, (default, tuned)


@pytest.mark.parametrize(
    "env",
    [{"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000"}],
)
def test_settings_from_the_environment_are_left_alone(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert allocator.user_settings() == [next(iter(env)) if "MALLOC" in next(iter(env)) else "GLIBC_TUNABLES"]
    assert allocator.keep_freed_memory() is False


def test_negative_threshold_is_rejected() -> None:
    with pytest.raises(ValueError, match="thresholds"):
        allocator.keep_freed_memory(mmap_threshold=-1)
