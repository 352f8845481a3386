"""The packing overhead the core reserves is what sealing really adds, at its worst."""

from __future__ import annotations

import os

from meshmirror.mesh.keyring import Keyring


def test_overhead_is_the_largest_growth_sealing_causes() -> None:
    keyring = Keyring([os.urandom(32)])
    for version in (0, 1):
        growth = max(len(keyring.encrypt(b"x" * n, b"", version=version)) - n
                     for n in range(64))
        assert keyring.encrypt_overhead(version) == growth
    assert keyring.encrypt_overhead() == keyring.encrypt_overhead(1) == 29
