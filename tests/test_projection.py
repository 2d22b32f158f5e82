"""The 10B projection (cpmant/projection.py) against CPM-Ant's published figures and hand-computed values."""

from __future__ import annotations

import pytest

from cpmant import projection as P

pytestmark = pytest.mark.unit


def test_cpm_ant_own_figures_land_within_25_percent_of_the_published_cost():
    r = P.cpm_ant_check()
    # 200e9 tokens / 1,181 tokens/s / 3600 = 47,041 A100-hours (the third-party table: 47,040)
    assert r.device_hours == pytest.approx(200e9 / 1181 / 3600)
    assert r.device_hours == pytest.approx(P.CPM_ANT_GPU_HOURS, rel=1e-3)
    assert abs(r.cost_rmb / P.CPM_ANT_COST_RMB - 1) < 0.25
    # the price is not derived from the published cost: a source outside CPM-Ant's report
    assert "CPM-Ant" not in P.PROFILES["a100"].price_source
    assert r.wall_days == pytest.approx(r.device_hours / 32 / 24)


def test_both_readings_of_the_published_emissions():
    e = P.emissions_readings()
    # 4,872 kg / 0.582 kg/kWh = 8,371 kWh over 47,040 A100-hours = 0.178 kWh per A100-hour
    assert e["implied_energy_kwh"] == pytest.approx(4872 / 0.582)
    assert e["implied_kwh_per_gpu_hour"] == pytest.approx(0.178, abs=5e-4)
    assert e["implied_share_of_board_power"] < 0.5  # under half an A100's 400 W
    # at the board power and PUE 1.58: 47,040 h x 0.4 kW x 1.58 x 0.582 kg/kWh
    assert e["board_power_emissions_kg"] == pytest.approx(47040 * 0.4 * 1.58 * 0.582)
    assert e["grid_needed_at_board_power_g_per_kwh"] == pytest.approx(4872 / (47040 * 0.4) * 1000)


def test_published_utilisation_and_scaling_by_6n():
    util = P.published_utilisation()
    assert util == pytest.approx(1181 * 6 * 9.39e9 / 312e12)  # about 21%
    assert 0.20 < util < 0.22
    # the published utilisation gives back the published rate on the A100, 989/312 times it on an H100
    assert P.rate_on_profile(P.PROFILES["a100"], util) == pytest.approx(1181)
    assert P.rate_on_profile(P.PROFILES["h100"], util) == pytest.approx(1181 * 989 / 312)
    # the same FLOP/s: a 1 M-parameter model at 9,390 tokens/s is 1 token/s at 9.39 B
    assert P.scale_measured(9390.0, 1e6) == pytest.approx(1.0)


def test_every_profile_states_its_sources_and_the_table_has_the_measured_rows():
    for p in P.PROFILES.values():
        assert all(s.strip() for s in p.sources().values()), p.name
    rows = P.project_10b({"tokens_per_second": 2000.0, "num_parameters": 2e6, "mfu": 0.1, "device_power_w": 50.0,
                          "price_rmb_per_hour": 0.35, "grid_g_per_kwh": 582.0})
    labels = [r.label for r in rows]
    assert labels[0] == "CPM-Ant's own figures"
    assert "H200, our measured MFU" in labels and "this machine, measured" in labels
    here = rows[-1]
    hours = 200e9 / (2000 * 2e6 / 9.39e9) / 3600
    assert here.device_hours == pytest.approx(hours)
    assert here.cost_rmb == pytest.approx(hours * 0.35)
    assert here.emissions_kg_co2e == pytest.approx(hours * 0.05 * 0.582)
    # without a measured run: the published rows only
    assert len(P.project_10b(None)) == 1 + len(P.PROFILES)
    with pytest.raises(ValueError):
        P.project("x", 0.0)
