"""bench/monitor.py's tables run end to end on tiny sizes and print one row per setting
(no timing is asserted: these machines are shared)."""

from __future__ import annotations

import re

from _bench import load_bench

bench = load_bench("monitor")
ROW = re.compile(r"^\s*(\w+).*\s(\d+\.\d)x\s*$")


def _ratios(text: str) -> list[tuple[str, float]]:
    return [(m.group(1), float(m.group(2))) for m in map(ROW.match, text.splitlines()) if m]


def test_timing_table_prints_a_row_per_size(capsys):
    bench.timing_table([300], [8, 40], repeats=1, device="cpu")
    rows = [line for line in capsys.readouterr().out.splitlines()
            if re.match(r"^\s+300\s+(8|40)\s+\|", line)]
    assert len(rows) == 2
    for line in rows:  # in-sample and cross-fitted: fisher, monitor, degree, ratio
        assert len(re.findall(r"\d+\.\dx", line)) == 2


def test_zoo_evaluation_table_scores_each_family(capsys):
    bench.zoo_evaluation_table(["mlp", "cnn"], n=120, repeats=1)
    ratios = _ratios(capsys.readouterr().out)
    assert [name for name, _ in ratios] == ["mlp", "cnn"]
    assert all(r > 0 for _, r in ratios)
