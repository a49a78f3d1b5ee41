"""glibc malloc settings (vectorgeo.jobprocess): freed batches are reused, not faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vectorgeo import jobprocess

# allocate and free 48 MB arrays from two threads, like the embed loop's gather and model threads,
# and report the page faults taken doing it
_PROBE = """
import json, resource, sys, threading
import numpy as np
from vectorgeo import jobprocess
applied = jobprocess.keep_freed_memory() if sys.argv[1] == "tuned" else False
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
    assert jobprocess.glibc_version(), "the test machine runs glibc"
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
    assert jobprocess.user_settings() == [next(iter(env)) if "MALLOC" in next(iter(env)) else "GLIBC_TUNABLES"]
    assert jobprocess.keep_freed_memory() is False


def test_negative_threshold_is_rejected() -> None:
    with pytest.raises(ValueError, match="thresholds"):
        jobprocess.keep_freed_memory(mmap_threshold=-1)


def test_exit_now_flushes_logs_and_streams_and_skips_teardown(tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "job.log"
    code = f"""
import atexit, logging, sys
from vectorgeo import jobprocess
logging.basicConfig(filename={str(log)!r}, level=logging.INFO)
logging.getLogger("job").info("region done")
atexit.register(lambda: print("teardown ran"))
sys.stdout.write("partial line without newline")
jobprocess.exit_now(3)
print("after exit")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 3
    assert proc.stdout == "partial line without newline"  # flushed; neither atexit nor later code ran
    assert "region done" in log.read_text()
