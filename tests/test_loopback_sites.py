"""Loopback federations (bench deployment, deployment tests) share the machine's cores among sites."""

from __future__ import annotations

import pytest

from fedguard.simulations.local_federation import site_thread_environment, site_threads


def test_each_site_gets_its_share_of_the_cores_and_at_least_one():
    assert site_threads(3, cores=2) == 1
    assert site_threads(3, cores=16) == 5
    assert site_threads(1, cores=8) == 8
    with pytest.raises(ValueError, match="num_sites"):
        site_threads(0, cores=4)


def test_an_explicit_thread_setting_is_kept():
    assert site_thread_environment(3, base={"PATH": "/bin"})["OMP_NUM_THREADS"] == str(site_threads(3))
    assert site_thread_environment(3, base={"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "4"
