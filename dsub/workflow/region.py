"""Which region of the map a run subtracts, and what share of the map's density lies in it.

Said at the start of every run, so that a mask given in the other program's
convention (RELION's ``--mask`` covers the region to keep, cryoSPARC's the
region to subtract; see ``--mask-keeps``) shows at once.
"""

from __future__ import annotations

import numpy as np

from ..errors import warn
from ..physics.subtract import subtraction_region

#: Below this share, or above 1 minus it, the run subtracts (almost) nothing or (almost) everything.
EXTREME_SHARE = 0.001


def density_share(half_maps, mask: np.ndarray, mask_keeps: bool) -> float:
    """Share of the mean half map's positive density inside the subtracted region, in [0, 1].

    ``half_maps``: the half maps (3D float arrays of one shape); the region is
    ``mask``, or ``1 − mask`` with ``mask_keeps``. Negative density (solvent
    below the mean, noise) is left out of both sums: it is not "density of the
    map" a user thinks of.
    """
    first, *others = (np.asarray(m, dtype=np.float32) for m in half_maps)
    density = first.copy()
    for other in others:
        density += other
    np.maximum(density, 0.0, out=density)  # the mean's positive part, times the number of maps
    total = float(density.sum(dtype=np.float64))
    if total <= 0:
        return 0.0
    density *= subtraction_region(np, np.asarray(mask, dtype=np.float32), mask_keeps)
    return float(density.sum(dtype=np.float64) / total)


def region_line(mask_path, mask_keeps: bool, share: float) -> str:
    """One line saying which region is subtracted and what share of the density it holds."""
    where = (f"outside the mask (1 - mask, --mask-keeps: {mask_path} covers the region to keep)" if mask_keeps
             else f"inside the mask ({mask_path} covers the region to subtract; --mask-keeps for RELION's "
                  "convention)")
    return f"Subtracting the region {where}: {share:.1%} of the map's density lies in it."


def report_region(share: float, mask_path, mask_keeps: bool) -> str:
    """The region line for ``share`` (``density_share``); warns when the region holds (almost) all or none of it."""
    if share >= 1 - EXTREME_SHARE:
        warn(f"{mask_path}: the subtracted region holds {share:.1%} of the map's density, so the run removes "
             "(almost) the whole particle. If the mask covers the region to keep, add --mask-keeps.")
    elif share <= EXTREME_SHARE:
        warn(f"{mask_path}: the subtracted region holds {share:.1%} of the map's density, so the run removes "
             "(almost) nothing. If the mask covers the region to subtract, leave out --mask-keeps.")
    return region_line(mask_path, mask_keeps, share)
