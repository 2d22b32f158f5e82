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


# The 10B's training FLOPs per token, by hand (CPM-Live's config: 48 layers, d 4096, 32 heads x 128, dim_ff 10240,
# vocab 30720; length 1024, every position projected onto the vocabulary):
#   attention matmuls 48 x 4 x 4096 x 4096    = 3,221,225,472
#   gated FFN         48 x 3 x 4096 x 10240   = 6,039,797,760
#   output projection 30720 x 4096 x 1.0      =   125,829,120
#   6 x (sum 9,386,852,352)                   = 56,321,114,112
#   attention scores  12 x 48 x 4096 x 1024   =  2,415,919,104
#   total                                     = 58,737,033,216  (6N with N = 9.39e9 would say 56,340,000,000)
FPT_10B = 58_737_033_216


def test_the_10b_flops_per_token_and_the_published_utilisation():
    assert P.cpm_ant_flops_per_token() == FPT_10B
    util = P.published_utilisation()
    assert util == pytest.approx(1181 * FPT_10B / 312e12)  # 22.2%
    assert 0.22 < util < 0.23
    # the published utilisation gives back the published rate on the A100, 989/312 times it on an H100
    assert P.rate_on_profile(P.PROFILES["a100"], util) == pytest.approx(1181)
    assert P.rate_on_profile(P.PROFILES["h100"], util) == pytest.approx(1181 * 989 / 312)


def test_the_projection_counts_a_small_models_flops_as_training_does():
    """The row "this machine" moves our FLOP/s by real FLOPs per token (training's count), not by 6N."""
    from cpmant.config import ModelConfig
    from cpmant.flops import flops_per_token

    small = ModelConfig(vocab_size=600, dim_model=32, dim_ff=64, num_layers=2, num_heads=2, dim_head=16)
    # by hand, at length 64 with half the positions projected onto the vocabulary (those with a target):
    #   attention matmuls 2 x 4 x 32 x 32 = 8,192; gated FFN 2 x 3 x 32 x 64 = 12,288; output 0.5 x 600 x 32 = 9,600
    #   6 x 30,080 = 180,480; attention scores 12 x 2 x 32 x 64 = 49,152; total 229,632
    fpt = 229_632
    assert flops_per_token(small, 64, vocab_share=0.5) == fpt
    # what the report reads back from the run's MFU (mfu = fpt x tokens/s / processes / peak, as training logs it)
    tps, peak = 2000.0, 1e11
    mfu = fpt * tps / 2 / peak
    assert P.flops_per_token_from_mfu(mfu, peak, tps, processes=2) == pytest.approx(fpt)
    assert P.flops_per_token_from_mfu(0.0, peak, tps) is None
    # the same FLOP/s: 2,000 tokens/s x 229,632 FLOP = 459.264 MFLOP/s, over the 10B's 58,737,033,216 per token
    assert P.scale_measured(tps, fpt) == pytest.approx(2000 * 229_632 / 58_737_033_216)
    rows = P.project_10b({"tokens_per_second": tps, "flops_per_token": fpt, "price_rmb_per_hour": 0.35})
    here = rows[-1]
    assert here.label == "this machine, measured"
    assert here.tokens_per_second_per_device == pytest.approx(2000 * 229_632 / 58_737_033_216)
    assert here.device_hours == pytest.approx(200e9 / (2000 * 229_632 / 58_737_033_216) / 3600)
    # without FLOPs per token (no MFU logged) there is no row for this machine, rather than a 6N guess
    assert all(r.label != "this machine, measured" for r in P.project_10b({"tokens_per_second": tps}))


def test_mfu_rows_say_where_the_mfu_was_measured():
    rows = P.project_10b({"mfu": 0.1, "device": "cpu"})
    mfu_rows = [r for r in rows if "MFU" in r.label]
    assert [r.label for r in mfu_rows] == [f"{n}, if a GPU reached the MFU measured here" for n in
                                           ("A100", "H100", "H200")]
    assert all("hypothetical" in r.basis and "measured on cpu" in r.basis for r in mfu_rows)
    # measured on an H200 (tracking.device h200): that profile's row is ours, the others stay hypothetical
    labels = [r.label for r in P.project_10b({"mfu": 0.1, "device": "h200"}) if "MFU" in r.label]
    assert labels == ["A100, if a GPU reached the MFU measured here", "H100, if a GPU reached the MFU measured here",
                      "H200, our measured MFU"]
    h200 = [r for r in rows if r.label.startswith("H200")][-1]
    assert h200.tokens_per_second_per_device == pytest.approx(989e12 * 0.1 / FPT_10B)


def test_the_check_states_its_circularity():
    # 1,181 tokens/s is the published hours read backwards: 200e9 / 47,040 / 3600 = 1,181.03
    assert 200e9 / P.CPM_ANT_GPU_HOURS / 3600 == pytest.approx(P.CPM_ANT_TOKENS_PER_SECOND, abs=0.05)
    assert "circular" in P.CIRCULARITY and "47,040" in P.CIRCULARITY
    assert "circular" in P.cpm_ant_check().basis


def test_every_profile_states_its_sources_and_the_table_has_the_measured_rows():
    for p in P.PROFILES.values():
        assert all(s.strip() for s in p.sources().values()), p.name
    rows = P.project_10b({"tokens_per_second": 2000.0, "flops_per_token": 3e6, "mfu": 0.1, "device": "cpu",
                          "device_power_w": 50.0, "price_rmb_per_hour": 0.35, "grid_g_per_kwh": 582.0})
    labels = [r.label for r in rows]
    assert labels[0] == "CPM-Ant's own figures"
    assert "H200, if a GPU reached the MFU measured here" in labels and "this machine, measured" in labels
    here = rows[-1]
    hours = 200e9 / (2000 * 3e6 / FPT_10B) / 3600
    assert here.device_hours == pytest.approx(hours)
    assert here.cost_rmb == pytest.approx(hours * 0.35)
    assert here.emissions_kg_co2e == pytest.approx(hours * 0.05 * 0.582)
    # without a measured run: the published rows only
    assert len(P.project_10b(None)) == 1 + len(P.PROFILES)
    with pytest.raises(ValueError):
        P.project("x", 0.0)
