"""Job resources the workflow asks a scheduler for, computed from what a job reads.

``mem_mb`` of a rule is a fixed base (interpreter, libraries, model) plus a multiple of the size of the
inputs it holds in memory, and doubles at each retry, so that a SLURM job killed for memory is resubmitted
with more (Snakemake passes ``attempt`` = 1, 2, ... with ``--retries``):

.. math:: \\text{mem\\_mb} = \\lceil (b + f \\cdot s) \\cdot 2^{a - 1} \\rceil

with :math:`b` the base, :math:`f` the factor, :math:`s` the inputs' size in MB and :math:`a` the attempt.
Memory-mapped inputs (prepared layers) count with factor 0: their pages are file-backed and reclaimable.
"""

from __future__ import annotations

import math


def mem_mb(base_mb: float, factor: float, input_mb: float, attempt: int = 1) -> int:
    """Memory to request for a job (see the module docstring).

    Args:
        base_mb: Fixed part in MB.
        factor: MB of memory per MB of input.
        input_mb: Size of the job's inputs in MB.
        attempt: 1 for the first try, 2 for the first retry, ...

    Raises:
        ValueError: a negative size or factor, or an attempt below 1.
    """
    if base_mb < 0 or factor < 0 or input_mb < 0:
        raise ValueError(f"mem_mb: base, factor and input size must be >= 0, got {base_mb}, {factor}, {input_mb}")
    if attempt < 1:
        raise ValueError(f"mem_mb: attempt must be >= 1, got {attempt}")
    return math.ceil((base_mb + factor * input_mb) * (1 << (attempt - 1)))
