"""Resolving the stack paths written inside particle metadata.

RELION writes image paths relative to its project folder and cryoSPARC relative
to its project folder too, while the metadata file itself usually sits one or
two folders down (``Refine3D/job012/run_data.star``, ``J24/J24_particles.cs``).
dsub tries the metadata file's folder first, then its parent and grandparent,
and keeps the first folder in which a referenced stack exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def candidate_roots(metadata_path: Path, root=None) -> list[Path]:
    """Folders relative stack paths may be relative to, most likely first."""
    if root is not None:
        return [Path(os.path.abspath(root))]
    folder = Path(os.path.abspath(metadata_path)).parent
    return [folder, folder.parent, folder.parent.parent]


def resolve_stack_names(names, metadata_path: Path, root=None) -> np.ndarray:
    """Absolute, normalised paths for ``names`` (str), resolving each distinct name once."""
    names = np.asarray(names, dtype=object)
    if names.size == 0:
        return np.empty(0, dtype=object)
    uniques, inverse = np.unique(names.astype(str), return_inverse=True)
    roots = candidate_roots(metadata_path, root)
    probes = [names[0]] + [u for u in uniques if u != names[0]][:20]
    probe = next((p for p in probes if not os.path.isabs(p)), None)
    chosen = next((r for r in roots if probe is not None and (r / probe).is_file()), roots[0])
    resolved = np.array([os.path.normpath(os.path.join(chosen, u)) for u in uniques], dtype=object)
    return resolved[inverse.reshape(-1)]
