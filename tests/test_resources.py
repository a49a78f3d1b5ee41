"""Job resources (vectorgeo.resources): mem_mb from the inputs' size, doubled at each retry."""

from __future__ import annotations

import pytest

from vectorgeo.resources import mem_mb


def test_mem_mb_grows_with_inputs_and_attempts() -> None:
    assert mem_mb(1500, 2.0, 100.0) == 1700
    assert mem_mb(1500, 2.0, 100.0, attempt=2) == 3400
    assert mem_mb(1500, 2.0, 100.0, attempt=3) == 6800
    assert mem_mb(1000, 0.0, 1e6) == 1000  # memory-mapped inputs do not count
    assert mem_mb(500, 4.0, 0.3) == 502  # rounded up


@pytest.mark.parametrize("args", [(-1, 1.0, 1.0, 1), (1, -1.0, 1.0, 1), (1, 1.0, -1.0, 1), (1, 1.0, 1.0, 0)])
def test_mem_mb_refuses_bad_values(args: tuple[float, float, float, int]) -> None:
    with pytest.raises(ValueError, match="mem_mb"):
        mem_mb(*args)
