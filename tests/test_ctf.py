"""The CTF against an independent full-plane implementation and known physics."""

import numpy as np
import pytest

from dsub.physics.ctf import ctf_2d, electron_wavelength_angstrom
from dsub.simulate import ctf_full_plane


def test_wavelength_at_300_kv():
    # 300 kV electrons: 0.019687 Å (standard relativistic value)
    assert electron_wavelength_angstrom(300.0) == pytest.approx(0.019687, abs=2e-6)


@pytest.mark.parametrize("box", [64, 65])
def test_matches_independent_full_plane_ctf(box):
    params = dict(defocus_u=15000.0, defocus_v=13200.0, angle=37.0, kv=200.0, cs=2.7, q0=0.07, phase=20.0, b=40.0)
    ours = ctf_2d(np, box, [1.3], [params["defocus_u"]], [params["defocus_v"]], [params["angle"]], [params["kv"]],
                  [params["cs"]], [params["q0"]], [params["phase"]], [params["b"]])[0]
    full = ctf_full_plane(box, 1.3, params["defocus_u"], params["defocus_v"], params["angle"], params["kv"],
                          params["cs"], params["q0"], params["phase"], params["b"])
    # The Nyquist column of an even box is +N/2 in an rfft but -N/2 in a full fft; leave it out.
    columns = box // 2 if box % 2 == 0 else box // 2 + 1
    np.testing.assert_allclose(ours[:, :columns], full[:, :columns], atol=2e-5)


def test_first_zero_of_a_pure_phase_ctf():
    # No Cs, no amplitude contrast, no astigmatism: CTF = sin(π λ Δf s²), first zero at s = 1/sqrt(λ Δf).
    box, psize, defocus = 256, 1.0, 20000.0
    ctf = ctf_2d(np, box, [psize], [defocus], [defocus], [0.0], [300.0], [0.0], [0.0], [0.0], [0.0])[0]
    first_zero = 1 / np.sqrt(electron_wavelength_angstrom(300.0) * defocus)  # 1/Å
    along_x = ctf[0]  # ky = 0 row
    s = np.arange(along_x.size) / (box * psize)
    crossing = s[np.flatnonzero(np.diff(np.sign(along_x[1:])) != 0)[0] + 1]
    assert crossing == pytest.approx(first_zero, abs=1.5 / (box * psize))
    assert along_x[1] > 0  # positive at low frequency: protein-white images give positive contrast
