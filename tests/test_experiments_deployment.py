"""Chapter 11's reading of the deployment report (privrec.course.experiments.deployment)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from privrec.course.experiments import deployment as dep

PHASES = ["server: encode and push", "delivery", "training", "reply"]


def _round(r: int, sampled: list[int], seconds: float, **more) -> dict:
    return {"round": r, "sampled": sampled, "realised": sampled, "bytes_up": 196_511,
            "bytes_down": 182_916, "seconds": seconds, "epsilon": 1.5 * r,
            "wire_up": 250_000.0 + r, "wire_down": 240_000.0, **more}


def _run(seconds: list[float], *, rmse: float = 0.95, stages: bool = False) -> dict:
    extra = ({"stages": [{"stage": s, "seconds": 0.4} for s in ("setup", "share keys")]}
             if stages else {"breakdown": dict(zip(PHASES, (0.1, 0.2, 0.3, 0.4), strict=True))})
    return {"rounds": [_round(i + 1, [0, 1, 2], s, **extra) for i, s in enumerate(seconds)],
            "epsilon": 4.5, "test_rmse": rmse}


@pytest.fixture
def report() -> dict:
    quant = {"bits": 22, "coordinate_range": 0.5, "step": 2.4e-7, "client_clip": 0.49997,
             "coordinates": 15139, "sum_error_bound_per_coordinate": 7.2e-7,
             "noise_std_on_sum": 0.5, "noise_over_quantisation": 7e5}
    overhead_rows = [{"setting": name, "seconds": s, "cpu_seconds": s / 2, "wire_bytes": b,
                      "payload_bytes": 1e5}
                     for name, s, b in (("plain HTTP", 1.0, 400_000.0), ("TLS", 1.2, 410_000.0),
                                        ("TLS + registered nodes", 1.25, 410_500.0),
                                        ("TLS + registered nodes + SecAgg+", 3.0, 900_000.0))]
    return {
        "admission": {"probes": [
            {"kind": "unregistered", "exit_code": 1, "seconds": 6.2,
             "reason": "[code: 2004] Failed to activate SuperNode."},
            {"kind": "untrusted-ca", "exit_code": 1, "seconds": 7.9,
             "reason": "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"}]},
        "engines": {"gaps": {"fedavgm: deployment vs simulator": 0.0},
                    "runs": {"fedavgm/deployment": _run([2.0, 1.0, 1.2]),
                             "dp-fedavg/deployment": _run([2.0, 1.0, 1.2], rmse=1.175)}},
        "secagg": {"gaps": {"dp-secagg: deployment vs simulator": 1.3e-5}, "quantisation": quant,
                   "runs": {"dp-secagg": _run([3.0, 3.1, 2.9], stages=True),
                            "dp-secagg-dropout": _run([3.0, 9.0, 3.0], stages=True)},
                   "dropout": {"round": 2, "silo": 2}, "threshold": 2, "shares": 3,
                   "below_threshold": {"round": 1, "seconds_to_error": 17.0,
                                       "stage": "collect masked vectors", "deadline": 8.0}},
        "speed": {"before": _run([14.0, 12.0, 13.0]), "after": _run([2.0, 1.0, 1.2]),
                  "seconds_before": 12.5, "load_average_1min": [3.0, 4.0],
                  "seconds_after": 1.1, "breakdown_before": dict.fromkeys(PHASES, 3.0),
                  "breakdown_after": dict.fromkeys(PHASES, 0.25)},
        "overheads": {"rows": overhead_rows},
    }


def _width(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def test_every_table_fits_the_text_column(report):
    tables = [dep.rounds_table(report["engines"]["runs"]["fedavgm/deployment"]),
              dep.gap_table(report), dep.admission_table(report), dep.overhead_table(report),
              dep.speed_table(report)]
    for table in tables:
        assert _width(table.to_string()) <= 80, table.to_string()
    assert max(len(line) for line in dep.secagg_lines(report)) <= 80


def test_overheads_are_the_differences_between_settings(report):
    table = dep.overhead_table(report)
    assert table.loc["TLS", "+CPU s"] == pytest.approx(0.1)
    assert table.loc["TLS + registered nodes + SecAgg+", "+wire kB"] == pytest.approx(489.5)
    assert table.loc["plain HTTP", "+CPU s"] == "-"
    text = dep.threat_model_markdown(report)
    assert "+0.10 CPU s, +10.0 kB" in text and "+0.88 CPU s, +489.5 kB" in text
    assert text.count("\n") == 7 and "Sybil" in text and "refused in 6 s and 8 s" in text


def test_threat_model_says_not_measured_without_the_comparison_runs(report):
    del report["overheads"]
    text = dep.threat_model_markdown(report)
    assert text.count("not measured") == 3


def test_rounds_and_secagg_lines_read_the_report(report):
    table = dep.rounds_table(report["engines"]["runs"]["fedavgm/deployment"])
    assert list(table.columns) == ["sampled", "realised", "kB up", "kB down", "seconds", "epsilon"]
    assert table.loc[2, "kB up"] == 196.5 and table.loc[3, "sampled"] == "0,1,2"
    lines = dep.secagg_lines(report)
    assert "0.499970" in lines[1] and "round 2, silo 2" in lines[4] and "9.0 s" in lines[5]
    assert "'collect masked vectors'" in lines[6] and "8 s deadline" in lines[7]
    assert "17 s in all" in lines[8]


def test_speed_table_ends_with_the_round(report):
    table = dep.speed_table(report)
    assert table.index[-1] == "round (median)"
    assert table.loc["round (median)"].tolist() == [12.5, 1.1]


def test_round_phases_and_figure(report):
    assert dep.round_phases(report, "this deployment", 2)["training"] == 0.3
    assert list(dep.round_phases(report, "SecAgg+ (DP-FedAvg)", 1)) == [
        "SecAgg+ setup", "SecAgg+ share keys"]
    with pytest.raises(ValueError, match="label must be one of"):
        dep.round_phases(report, "nope", 1)
    with pytest.raises(ValueError, match="round_number must be in 1..3"):
        dep.round_phases(report, "Flower defaults", 4)
    fig = dep.draw_round(report, "Flower defaults", 2)
    assert "12.00 s" in fig.axes[0].get_title()
    other = dep.draw_round(report, "this deployment", 2)
    assert other.axes[0].get_xlim() == fig.axes[0].get_xlim()          # one scale for all
    assert math.isclose(fig.get_size_inches()[0], 6.9)


def test_show_function_and_report_lookup(tmp_path):
    source = tmp_path / "app.py"
    source.write_text('import os\n\n\ndef train(x):\n    """Add one."""\n    return x + 1\n')
    assert dep.show_function(source, "train").data == "def train(x):\n    return x + 1"
    assert "Add one" in dep.show_function(source, "train", docstring=True).data
    with pytest.raises(ValueError, match="name must be a function defined in app.py"):
        dep.show_function(source, "evaluate")
    with pytest.raises(TypeError, match="path must be a Path"):
        dep.show_function(str(source), "train")
    with pytest.raises(FileNotFoundError, match="make flower-demo"):
        dep.find_report(tmp_path)
    (tmp_path / "flower" / "results").mkdir(parents=True)
    (tmp_path / "flower" / "results" / "deployment.json").write_text('{"epsilon": Infinity}')
    assert dep.load_report(dep.find_report(tmp_path / "flower")) == {"epsilon": math.inf}
    assert isinstance(dep.find_report(Path(__file__).parent), Path)


def _lora_section() -> dict:
    names = ["clients", "examples", "dense/adapter_down", "dense/lora_B", "rows/item_bias/row"]
    breakdown = {"silo data": 2.5, "training": 0.31}
    return {"config": {"sample-rate": 0.02, "num-partitions": 3}, "n_users": 943, "users": 19,
            "shapes": {"lora_B": [384, 8], "item_bias": [1682]}, "uploaded": names,
            "bytes_up_per_user": 15026.9, "privrec_bytes_up_per_user": 13984.6, "gap": 0.0,
            "simulator_round_seconds": 0.68,
            "run": {"rounds": [_round(1, list(range(19)), 4.2, breakdown=breakdown)],
                    "ledger": "user-level (ε = 1.164, δ = 1e-05) over 943 users\n table"}}


def test_lora_lines_fit_the_column_and_say_what_travelled(report):
    report["lora"] = _lora_section()
    lines = dep.lora_lines(report)
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert "19 of 943 users sampled (q = 0.02), 19 answered" in text
    assert "adapter_down, item_bias, lora_B" in text and "lora_A" not in text
    assert "384 x 8 = 3,072 floats" in text and "15,027 B per user" in text
    assert "inputs 2.5 s, training 0.31 s" in text and "|gap| to the simulator: 0.0e+00" in text
    assert lines[-1] == "user-level (ε = 1.164, δ = 1e-05) over 943 users"
    del report["lora"]
    with pytest.raises(ValueError, match="'lora' section"):
        dep.lora_lines(report)
