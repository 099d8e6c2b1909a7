"""The extraction field transformed a group of particles at a time gives what the whole batch at once gives."""

import numpy as np

from dsub.physics import subtract
from dsub.physics.subtract import ParticleTransfer, extract_in_field
from dsub.simulate import simulate_particles, to_particle_table, two_domain_phantom


def test_field_in_groups_matches_the_whole_batch(monkeypatch):
    box, size = 32, 80
    rng = np.random.default_rng(4)
    phantom = two_domain_phantom(box, rng)
    table = to_particle_table(simulate_particles((phantom, phantom), 2, 7, box, 1.5, rng, snr=0.1))
    images = rng.standard_normal((2, len(table), box, box)).astype(np.float32)
    squared = np.arange(len(table)) % 2 == 0  # every other particle's CTF applied twice
    for transfer in (ParticleTransfer(table, size), ParticleTransfer(table, size, squared)):
        whole = extract_in_field(np, images, size, transfer)
        per_particle_bytes = 2 * size * (size // 2 + 1) * 8
        monkeypatch.setattr(subtract, "FIELD_GROUP_BYTES", 3 * per_particle_bytes)  # groups of 3, 3 and 1
        grouped = extract_in_field(np, images, size, transfer)
        monkeypatch.undo()
        assert grouped.shape == whole.shape == images.shape and grouped.dtype == np.float32
        np.testing.assert_allclose(grouped, whole, rtol=0, atol=1e-6 * np.abs(whole).max())
        assert not np.allclose(whole[:, 0], images[:, 0], atol=1e-3)  # the transfer did act
