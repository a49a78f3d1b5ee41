"""H3 cells as 64-bit integers: strings, resolution, parents, descendant ranges, boundaries.

An H3 cell index holds, from the high bits down: 1 reserved bit, 4 mode bits, 3 reserved bits, the
resolution :math:`r` (4 bits at :data:`RES_SHIFT` = 52), the base cell (7 bits), then 15 digits of
3 bits, digit :math:`i` at bits :math:`3(15 - i) .. 3(15 - i) + 2`. Digits finer than :math:`r` are
7 (unused), so:

- the parent at resolution :math:`p \\le r` sets the resolution field to :math:`p` and digits
  :math:`p+1..15` to 7: :math:`(c \\mathbin{\\&} \\lnot(15 \\ll 52)) \\mid (p \\ll 52) \\mid (2^{3(15-p)} - 1)`;
- the descendants at resolution :math:`s \\ge r` of a cell are exactly the resolution-:math:`s` cells
  between the index with digits :math:`r+1..s` all 0 and the one with them all 6 (one key range).

Cells are written as 15 lowercase hex digits, the form H3 itself prints.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RES_SHIFT = 52
RES_MASK = 0xF
DIGIT_BITS = 3
MAX_RES = 15
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def to_str(cell: int | np.integer[Any]) -> str:
    """A cell as 15 lowercase hex digits."""
    return f"{int(cell):015x}"


def to_strs(cells: np.ndarray) -> np.ndarray:
    """Cells as 15 lowercase hex digits, vectorised (numpy ``S15`` bytes array)."""
    c = np.asarray(cells, dtype=np.uint64).ravel()
    shifts = np.arange(14, -1, -1, dtype=np.uint64) * np.uint64(4)
    digits = ((c[:, None] >> shifts) & np.uint64(0xF)).astype(np.uint8)
    out: np.ndarray = _HEX_DIGITS[digits].view("S15").ravel()
    return out


def resolution(cell: int | np.integer[Any]) -> int:
    """The resolution field of one cell index."""
    return (int(cell) >> RES_SHIFT) & RES_MASK


def resolutions(cells: np.ndarray) -> np.ndarray:
    """The resolution field of each cell index (int64), vectorised."""
    return ((np.asarray(cells, dtype=np.uint64) >> np.uint64(RES_SHIFT)) & np.uint64(RES_MASK)).astype(np.int64)


def unused_digits(res: int) -> int:
    """Bit mask of the digits finer than ``res`` (all set to 7 in a cell of resolution ``res``)."""
    return (1 << (DIGIT_BITS * (MAX_RES - res))) - 1


def parent(cell: int | np.integer[Any], res: int) -> int:
    """The parent at resolution ``res`` of one cell, by bit operations.

    Raises:
        ValueError: the cell is coarser than ``res``.
    """
    c = int(cell)
    if resolution(c) < res:
        raise ValueError(f"cell {to_str(c)} of resolution {resolution(c)} has no parent at resolution {res}")
    return (c & ~(RES_MASK << RES_SHIFT)) | (res << RES_SHIFT) | unused_digits(res)


def parents(cells: np.ndarray, res: int) -> np.ndarray:
    """The parents at resolution ``res`` of uint64 cells (uint64), vectorised.

    Raises:
        ValueError: a cell is coarser than ``res``.
    """
    h = np.asarray(cells, dtype=np.uint64)
    if h.size and int(resolutions(h).min()) < res:
        raise ValueError(f"cells of resolution {int(resolutions(h).min())} have no parent at resolution {res}")
    out = (h & ~np.uint64(RES_MASK << RES_SHIFT)) | np.uint64(res << RES_SHIFT)
    return out | np.uint64(unused_digits(res))


def descendant_range(cell: int | np.integer[Any], res: int) -> tuple[int, int]:
    """The smallest and largest index of the descendants at resolution ``res`` of a cell.

    Every resolution-``res`` index between the two is such a descendant (see the module docstring),
    so the descendants are one key range.

    Raises:
        ValueError: the cell is finer than ``res``.
    """
    c = int(cell)
    r = resolution(c)
    if res < r:
        raise ValueError(f"cell {to_str(c)} of resolution {r} is finer than resolution {res}")
    lo, hi = descendant_ranges(np.array([c], dtype=np.uint64), res)
    return int(lo[0]), int(hi[0])


def descendant_ranges(cells: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`descendant_range` of many cells of one resolution (uint64 arrays lo, hi)."""
    c = np.asarray(cells, dtype=np.uint64)
    if c.size == 0:
        return c.copy(), c.copy()
    r = resolution(c[0])
    if np.any(resolutions(c) != r) or res < r:
        raise ValueError(f"cells of one resolution <= {res} expected")
    base = (c & np.uint64(~(RES_MASK << RES_SHIFT) & 0xFFFFFFFFFFFFFFFF)) | np.uint64(res << RES_SHIFT)
    # digits r+1..res: 0 in the first descendant, 6 in the last (the finer ones stay 7)
    digits = unused_digits(r) & ~unused_digits(res)
    sixes = sum(6 << ((MAX_RES - i) * DIGIT_BITS) for i in range(r + 1, res + 1))
    lo = base & np.uint64(~digits & 0xFFFFFFFFFFFFFFFF)
    hi = lo | np.uint64(sixes)
    return lo, hi


def is_valid(cell: int) -> bool:
    """True when ``cell`` is a valid H3 cell index."""
    import h3.api.basic_int as h3int

    return 0 < cell < 2**63 and bool(h3int.is_valid_cell(cell))


def cell_at(lat: float, lng: float, res: int) -> int:
    """The cell of resolution ``res`` containing a point (degrees)."""
    import h3.api.basic_int as h3int

    return int(h3int.latlng_to_cell(lat, lng, res))


def disk(cell: int | np.integer[Any], rings: int) -> list[int]:
    """The cell and every cell up to ``rings`` grid steps from it (3 k (k + 1) + 1 cells, fewer next to a
    pentagon)."""
    import h3.api.basic_int as h3int

    return [int(c) for c in h3int.grid_disk(int(cell), rings)]


def boundary(cell: int | np.integer[Any]) -> list[list[float]]:
    """Hexagon (or pentagon) vertices as ``[lng, lat]``, longitudes continuous across ±180°."""
    import h3.api.basic_int as h3int

    pts = np.asarray(h3int.cell_to_boundary(int(cell)), dtype=np.float64)
    lng = pts[:, 1]
    if lng.max() - lng.min() > 180:
        lng = np.where(lng < 0, lng + 360, lng)
    return [[round(float(x), 6), round(float(y), 6)] for x, y in zip(lng, pts[:, 0], strict=True)]
