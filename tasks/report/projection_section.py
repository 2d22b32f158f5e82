"""The HTML of the projection of a full 10B pretraining run (cpmant.projection): how it is computed, what was
measured here, the table and its plot beside the published figures, the check against CPM-Ant's own cost, the two
readings of the published emissions, and the hardware profiles with their sources."""

from __future__ import annotations

from cpmant import projection as P

from .markup import NOT_RUN, esc, img, missing, table
from .plots import plot_projection
from .scores import fmt

COLUMNS = ["label", "device", "basis", "tokens_per_second_per_device", "devices", "device_hours", "wall_days",
           "energy_kwh", "emissions_kg_co2e", "cost_rmb"]
LABELS = {"tokens_per_second_per_device": "tokens/s per device", "device_hours": "device-hours",
          "wall_days": "days", "energy_kwh": "kWh", "emissions_kg_co2e": "kg CO2e", "cost_rmb": "RMB"}


def _method() -> str:
    fpt = P.cpm_ant_flops_per_token()
    return (f"<p>200 B tokens (CPM-Ant's run) on {P.CPM_ANT_PARAMS / 1e9:.2f} B parameters, 32 devices, "
            f"{fpt / 1e9:.1f} GFLOP per token (counted as training counts its MFU: 6 &times; the matmul parameters "
            f"+ attention scores at length {P.CPM_ANT_SEQ_LEN}, every position projected onto the vocabulary). On a "
            "GPU profile the rate is peak &times; utilisation / FLOPs per token, at CPM-Ant's own utilisation of the "
            f"A100 ({P.published_utilisation():.1%}: 1,181 tokens/s &times; {fpt / 1e9:.1f} GFLOP / 312 TFLOP/s); "
            "a row at the MFU our pretraining measured is \"our measured MFU\" only where it was measured on that "
            "kind of device, else \"if a GPU reached the MFU measured here\" (hypothetical: a CPU's MFU says "
            "nothing of a GPU's). On this machine the FLOP/s our pretraining reached (its tokens/s &times; its own "
            "FLOPs per token) is divided by the 10B's FLOPs per token. Energy = device-hours &times; board power "
            "&times; PUE; cost = device-hours &times; the profile's price per device-hour (electricity "
            "included).</p>")


def _measured(m: dict | None) -> str:
    if not m:
        return missing(f"no finished pretraining run: the measured rows are {NOT_RUN}")
    body = (f"<p>Measured: run <code>{esc(m['run_id'])}</code>, {fmt(m['tokens_per_second'])} tokens/s at "
            f"{fmt(m['num_parameters'])} parameters, {fmt(m.get('flops_per_token'))} FLOPs per token, "
            f"MFU {fmt(m.get('mfu'))} on {esc(m.get('device'))}.</p>")
    if not m.get("flops_per_token"):
        body += missing('the run recorded no MFU: its FLOPs per token are unknown, so the row "this machine, '
                        'measured" is left out')
    return body


def _check(check: dict) -> str:
    dev = check["cost_rmb"] / P.CPM_ANT_COST_RMB - 1
    return (f"<p><b>Check:</b> fed CPM-Ant's own figures (1,181 tokens/s per A100, 200 B tokens, 32 GPUs) the "
            f"projection gives {fmt(check['device_hours'])} A100-hours and {fmt(check['cost_rmb'])} RMB, "
            f"{dev:+.1%} from the published 430,000 RMB. {P.CIRCULARITY}</p>")


def _emissions(e: dict, check: dict) -> str:
    """The published emissions read two ways; (2) quotes the table's first row, so the text and table agree."""
    return ("<p><b>Two readings of the published emissions.</b> "
            f"(1) As published: {fmt(e['published_emissions_kg'])} kg CO2e at China's grid "
            f"({fmt(e['grid_g_per_kwh'])} g/kWh) is {fmt(e['implied_energy_kwh'])} kWh over "
            f"{fmt(e['gpu_hours'])} A100-hours: <b>{e['implied_kwh_per_gpu_hour']:.3f} kWh per A100-hour</b>, "
            f"an average draw of {e['implied_kwh_per_gpu_hour'] * 1000:.0f} W, "
            f"{e['implied_share_of_board_power']:.0%} of an A100's {fmt(e['board_power_w'])} W board power, "
            "under half of it, with no data-centre overhead. "
            f"(2) At the board power and PUE {e['pue']}: the table's first row, {fmt(check['device_hours'])} "
            f"A100-hours, uses {fmt(check['energy_kwh'])} kWh and emits <b>{fmt(check['emissions_kg_co2e'])} kg "
            f"CO2e</b>; the published total would need a grid of {fmt(e['grid_needed_at_board_power_g_per_kwh'])} "
            "g/kWh at the board power alone. T5-11B's published 46.7 t stays about "
            f"{P.T5_11B_EMISSIONS_KG / check['emissions_kg_co2e']:.1f}&times; the second reading.</p>")


def _profiles(profiles: dict) -> str:
    src = []
    for p in profiles.values():
        items = "".join(f"<li>{esc(n)}: {esc(v)}</li>" for n, v in p["sources"].items())
        src.append(f"<li><b>{esc(p['name'])}</b>: {fmt(p['peak_flops'] / 1e12)} TFLOP/s, "
                   f"{fmt(p['board_power_w'])} W, PUE {p['pue']}, {fmt(p['grid_g_per_kwh'])} g/kWh, "
                   f"{fmt(p['price_rmb_per_hour'])} RMB per device-hour<ul>{items}</ul></li>")
    return "<p>Hardware profiles and their sources:</p><ul>" + "".join(src) + "</ul>"


def projection_html(data: dict) -> str:
    rows = data["projection"]
    body = _method() + _measured(data["measured"])
    body += img(plot_projection(rows), "projected cost of a 10B pretraining run")
    body += table(rows, COLUMNS, LABELS)
    body += "<p>Published figures beside it (reference figures, never logged as metrics):</p>"
    body += table(data["published"], ["label", "device_hours", "cost_rmb", "emissions_kg_co2e", "source"],
                  LABELS, ("device_hours", "cost_rmb", "emissions_kg_co2e"))
    return body + _check(rows[0]) + _emissions(data["emissions_readings"], rows[0]) + _profiles(data["profiles"])
