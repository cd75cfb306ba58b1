"""lsm-report: statistics on synthetic metric logs with known answers, sweeps, plots, CLI."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from _bench import load_bench
from scipy.stats import rankdata

from lsm_train import report, runlog, stats

# ------------------------------------------------------------------------------------------
# helpers: synthetic run folders in the metrics.jsonl format of the trainer


def config_of(overrides: list[str], base: dict | None = None) -> dict:
    """The config Hydra would compose: ``base`` with each ``a.b=v`` override applied."""
    config = json.loads(json.dumps(base or {"seed": 0, "model": {"name": "mlp"}}))
    for override in overrides:
        key, value = override.lstrip("+~").split("=", 1)
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


def write_run(folder: Path, rows: list[dict], overrides: list[str] | None = None,
              tail: str | None = None, config: dict | None = None) -> Path:
    """A run folder; with ``overrides`` also ``.hydra/overrides.yaml`` and ``config.yaml``
    (``config``, or the overrides applied to a base config)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        if tail is not None:
            f.write(tail)
    if overrides is not None:
        (folder / ".hydra").mkdir(exist_ok=True)
        (folder / ".hydra" / "overrides.yaml").write_text(
            "".join(f"- {o}\n" for o in overrides)
        )
        (folder / ".hydra" / "config.yaml").write_text(
            yaml.safe_dump(config if config is not None else config_of(overrides)))
    return folder


def lockstep_rows(acc: list[float], sign: float = 1.0, **extra) -> list[dict]:
    """lsm/fc1 moves with acc (sign=+1) or against it (sign=-1); lsm/fc2 tracks it too."""
    rows = []
    for i, a in enumerate(acc):
        rows.append({
            "step": 10 * i, "epoch": i // 5, "train/loss": 1 - a, "train/acc": a,
            "val/acc": a - 0.05, "lsm/fc1": 0.75 + sign * 0.2 * a, "lsm/fc2": 0.5 + a / 2,
            **extra,
        })
    return rows


ACC = [0.1, 0.3, 0.25, 0.55, 0.45, 0.85, 0.95, 0.92]  # distinct changes: no rank ties


# ------------------------------------------------------------------------------------------
# pure statistics


def test_lockstep_gives_fraction_one_and_spearman_one():
    acc = np.array(ACC)
    s = stats.synchronicity(0.5 + acc / 3, acc)
    assert s.same_sign == 1.0 and s.spearman == pytest.approx(1.0)
    assert s.intervals == len(ACC) - 1 == s.used


def test_opposite_gives_fraction_zero_and_spearman_minus_one():
    acc = np.array(ACC)
    s = stats.synchronicity(1.0 - acc / 3, acc)
    assert s.same_sign == 0.0 and s.spearman == pytest.approx(-1.0)


def test_hand_computed_fraction_excludes_zero_changes():
    # Δlsm = [.1, 0, -.05, .15, -.05], Δacc = [.1, .1, -.05, -.05, .1]
    # interval 2 has Δlsm == 0 -> excluded; of the 4 left, signs agree in 2 -> 0.5
    lsm = [0.5, 0.6, 0.6, 0.55, 0.7, 0.65]
    acc = [0.1, 0.2, 0.3, 0.25, 0.2, 0.3]
    s = stats.synchronicity(lsm, acc)
    assert (s.intervals, s.used) == (5, 4)
    assert s.same_sign == 0.5
    dm, da = np.diff(lsm), np.diff(acc)
    # Spearman = Pearson correlation of the (average) ranks, zeros kept
    ref = np.corrcoef(rankdata(dm), rankdata(da))[0, 1]
    assert s.spearman == pytest.approx(ref)


def test_zero_change_in_acc_also_excluded_and_all_zero_is_nan():
    frac, used = stats.same_sign_fraction([0.1, -0.2, 0.3], [0.0, -0.1, -0.1])
    assert (frac, used) == (0.5, 2)
    frac, used = stats.same_sign_fraction([0.0, 0.0], [0.1, 0.2])
    assert math.isnan(frac) and used == 0


def test_same_sign_fraction_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        dx = rng.integers(-2, 3, size=15).astype(float)
        dy = rng.integers(-2, 3, size=15).astype(float)
        pairs = [(a, b) for a, b in zip(dx, dy, strict=True) if a != 0 and b != 0]
        frac, used = stats.same_sign_fraction(dx, dy)
        assert used == len(pairs)
        if pairs:
            assert frac == pytest.approx(sum((a > 0) == (b > 0) for a, b in pairs) / len(pairs))


def test_spearman_nan_safe_for_constant_and_short_series():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConstantInputWarning leaks out
        assert math.isnan(stats.spearman([1.0, 1.0, 1.0], [0.1, 0.2, 0.3]))
        assert math.isnan(stats.spearman([0.1], [0.2]))
        assert math.isnan(stats.synchronicity([0.7] * 5, ACC[:5]).spearman)


def test_non_finite_changes_are_dropped():
    dx = [0.1, math.nan, 0.2, -0.1]
    dy = [0.2, 0.3, math.inf, -0.3]
    frac, used = stats.same_sign_fraction(dx, dy)
    assert (frac, used) == (1.0, 2)
    assert math.isnan(stats.spearman(dx, dy)) is False
    assert stats.spearman(dx, dy) == pytest.approx(1.0)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="aligned"):
        stats.synchronicity([0.5, 0.6], [0.1, 0.2, 0.3])


def test_steps_to_threshold():
    steps = [0, 10, 20, 30]
    assert stats.steps_to_threshold(steps, [0.5, 0.95, 0.85, 0.99], 0.9) == 10
    assert stats.steps_to_threshold(steps, [0.5, math.nan, 0.9, 0.99], 0.9) == 20
    assert stats.steps_to_threshold(steps, [0.5, 0.6, 0.7, 0.8], 0.9) is None


def test_learning_phase_ends_at_first_point_reaching_threshold():
    assert stats.learning_phase([0.1, 0.5, 0.95, 0.8, 0.99], 0.9) == 3
    assert stats.learning_phase([0.1, math.nan, 0.2], 0.9) == 3  # never reached: all points
    assert stats.learning_phase([0.95, 0.5], 0.9) == 1


def test_learning_phase_synchronicity_of_a_run(tmp_path):
    # in lockstep until acc reaches 0.9 (index 3), then lsm moves against acc
    acc = [0.2, 0.5, 0.7, 0.92, 0.91, 0.95, 0.93]
    lsm = [0.6, 0.75, 0.85, 0.96, 0.97, 0.9, 0.98]
    rows = [{"step": i, "probe/acc": a, "lsm/h": m} for i, (a, m) in enumerate(zip(acc, lsm,
                                                                                     strict=True))]
    run = report.load_runs(write_run(tmp_path / "r", rows))[0]
    whole, early = run.synchronicity()["h"], run.synchronicity(until=0.9)["h"]
    assert (whole.used, whole.same_sign) == (6, 0.5)
    assert (early.used, early.same_sign, early.spearman) == (3, 1.0, pytest.approx(1.0))


def test_mean_std_and_format_hand_computed():
    mean, std, n = stats.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(math.sqrt(7 / 3)) and n == 3
    assert stats.format_mean_std([1.0, 2.0, 4.0]) == "2.333 ± 1.528"
    assert stats.format_mean_std([0.8]) == "0.800"
    assert stats.format_mean_std([100, None, 200], digits=0) == "150 ± 71 (2/3)"
    assert stats.format_mean_std([None, math.nan]) == "–"


# ------------------------------------------------------------------------------------------
# reading


def test_truncated_last_line_and_bad_values_tolerated(tmp_path):
    rows = lockstep_rows(ACC)
    rows[2]["val/acc"] = None
    rows[3]["lsm/fc2"] = "nan"
    run_dir = write_run(tmp_path / "run", rows, tail='{"step": 80, "train/acc": 0.9')
    with pytest.warns(UserWarning, match="truncated last line"):
        run = report.Run.load(run_dir)
    assert len(run.records) == len(ACC)
    assert run.layers == ["fc1", "fc2"]
    assert run.final("val/acc") == pytest.approx(ACC[-1] - 0.05)
    assert math.isnan(run.column("val/acc")[2])
    sync = run.synchronicity()
    assert sync["fc1"].same_sign == 1.0
    assert sync["fc2"].intervals == len(ACC) - 2  # the NaN row is dropped before differencing


def test_malformed_middle_line_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "train/acc": 0.1}\nnot json\n[1, 2]\n{"step": 1}\n')
    with pytest.warns(UserWarning) as caught:
        records = runlog.read_metrics(path)
    messages = " ".join(str(w.message) for w in caught)
    assert "malformed line (line 2)" in messages and "line 3: not a JSON object" in messages
    assert [r["step"] for r in records] == [0, 1]


def test_layer_order_is_file_order_and_aggregates_excluded(tmp_path):
    rows = [
        {"step": 0, "train/acc": 0.1, "lsm/b.0": 0.6, "lsm/mean": 0.6},
        {"step": 1, "train/acc": 0.2, "lsm/b.0": 0.7, "lsm/a.1": 0.8, "lsm/mean": 0.75,
         "val_lsm/b.0": 0.65},
    ]
    run = report.Run.load(write_run(tmp_path / "r", rows))
    assert run.layers == ["b.0", "a.1"]
    assert run.val_layers == ["b.0"]
    assert run.final_mean_lsm() == pytest.approx(0.75)


def test_missing_step_key_uses_record_index(tmp_path):
    rows = [{"train/acc": a, "lsm/x": a} for a in (0.2, 0.5, 0.95)]
    run = report.Run.load(write_run(tmp_path / "r", rows))
    assert run.steps_to(0.9) == 2


# ------------------------------------------------------------------------------------------
# sweeps


def make_sweep(root: Path) -> Path:
    """2 settings x 3 seeds (jobs 0..5) with hand-chosen final val/acc and thresholds."""
    finals = {"relu": [0.80, 0.90, 1.00], "tanh": [0.70, 0.70, 0.70]}
    job = 0
    for act, vals in finals.items():
        for seed, final in enumerate(vals):
            acc = [0.2, 0.5, 0.95 if act == "relu" and seed < 2 else 0.6, final]
            rows = lockstep_rows(acc, sign=1.0 if act == "relu" else -1.0)
            for i, row in enumerate(rows):
                row["val/acc"] = final
                row["time/elapsed_s"] = 10.0 * (seed + 1) * (i + 1) / len(rows)
                if act == "relu":
                    row["guard/accept_rate"] = 0.5 + 0.1 * seed
            write_run(root / str(job), rows,
                      overrides=["recipe=paper/activation", f"model.activation={act}",
                                 f"seed={seed}"])
            job += 1
    return root


def test_sweep_grouping_and_mean_std_table(tmp_path):
    root = make_sweep(tmp_path / "sweep")
    rep = report.build_report(root, tmp_path / "out", threshold=0.9, plots=False)
    assert [g.label for g in rep.groups] == ["model.activation=relu", "model.activation=tanh"]
    assert [[r.name for r in g.runs] for g in rep.groups] == [["0", "1", "2"], ["3", "4", "5"]]
    summary = rep.tables[0]
    rows = {row[0]: dict(zip(summary.columns, row, strict=True)) for row in summary.rows}
    relu, tanh = rows["model.activation=relu"], rows["model.activation=tanh"]
    assert relu["runs"] == "3"
    assert relu["final val/acc"] == "0.900 ± 0.100"
    assert tanh["final val/acc"] == "0.700 ± 0.000"
    # relu: seeds 0,1 reach 0.95 at step 20, seed 2 reaches 1.0 at step 30
    assert relu["steps to train/acc ≥ 0.9"] == "23 ± 6"
    assert tanh["steps to train/acc ≥ 0.9"] == "n/r"
    assert relu["wall time (s)"] == "20.0 ± 10.0"
    assert relu["guard accept rate"] == "0.600 ± 0.100"
    assert tanh["guard accept rate"] == "–"
    # per-layer table: relu lockstep, tanh fc1 opposite
    tables = {t.title.split(" (")[0]: t for t in rep.tables}
    sync_rows = {r[0]: r for r in tables["Synchronicity by setting"].rows}
    # tanh: fc1 (first) always opposite, fc2 (last) in lockstep -> mean over layers 0.5
    assert sync_rows["model.activation=tanh"][2:5] == [
        "0.000 ± 0.000", "1.000 ± 0.000", "0.500 ± 0.000"]
    assert sync_rows["model.activation=relu"][5] == "1.000 ± 0.000"
    layer_rows = {(r[0], r[1]): r for r in tables["Per layer"].rows}
    assert layer_rows[("model.activation=relu", "fc1")][4] == "1.000 ± 0.000"
    assert layer_rows[("model.activation=tanh", "fc1")][4] == "0.000 ± 0.000"
    assert layer_rows[("model.activation=tanh", "fc1")][5] == "-1.000 ± 0.000"
    assert (tmp_path / "out" / "report.md").is_file()
    summary_json = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary_json["runs"][0]["synchronicity"]["fc1"]["same_sign"] == 1.0


def test_seed_override_variants_are_ignored_for_grouping():
    for o in ("seed=1", "+seed=2", "trainer.seed=3", "++seed=4"):
        assert report.is_seed_override(o)
    assert not report.is_seed_override("model.seeding=1")


def test_grouping_ignores_override_order_and_labels_only_what_varies(tmp_path):
    rows = lockstep_rows(ACC)
    write_run(tmp_path / "s" / "0", rows, overrides=["debug=smoke", "lsm=loss", "seed=0"])
    write_run(tmp_path / "s" / "1", rows, overrides=["seed=1", "lsm=loss", "debug=smoke"])
    write_run(tmp_path / "s" / "2", rows, overrides=["debug=smoke", "lsm=guard", "seed=0"])
    groups = report.group_runs(report.load_runs(tmp_path / "s"))
    assert [(g.label, [r.name for r in g.runs]) for g in groups] == [
        ("lsm=loss", ["0", "1"]), ("lsm=guard", ["2"])]


def test_single_setting_label_keeps_command_line_order(tmp_path):
    rows = lockstep_rows(ACC)
    for seed in (0, 1):
        write_run(tmp_path / "s" / str(seed), rows,
                  overrides=["recipe=paper/width", "model.kwargs.width=8", f"seed={seed}"])
    (group,) = report.group_runs(report.load_runs(tmp_path / "s"))
    assert group.label == "recipe=paper/width model.kwargs.width=8"


def test_grouping_uses_the_real_config_not_the_override_string(tmp_path):
    """Same overrides, different configs (a recipe edited between runs): two settings,
    labelled by the config value that differs; same config, other seed: one setting."""
    rows = lockstep_rows(ACC)
    for name, weight, seed in (("0", 0.1, 0), ("1", 0.1, 1), ("2", 0.3, 0)):
        overrides = ["lsm=loss", f"seed={seed}"]
        config = {"seed": seed, "lsm": {"mode": "loss", "weight": weight}}
        write_run(tmp_path / "s" / name, rows, overrides=overrides, config=config)
    groups = report.group_runs(report.load_runs(tmp_path / "s"))
    assert [[r.name for r in g.runs] for g in groups] == [["0", "1"], ["2"]]
    assert [g.label for g in groups] == ["[lsm.weight=0.1]", "[lsm.weight=0.3]"]


def test_logging_and_progress_keys_are_not_settings(tmp_path):
    rows = lockstep_rows(ACC)
    base = {"seed": 0, "model": {"name": "mlp"}, "trainer": {"progress": True, "epochs": 2}}
    write_run(tmp_path / "s" / "0", rows, overrides=["seed=0"], config=base)
    other = {**base, "seed": 1, "trainer": {"progress": False, "epochs": 2},
             "logger": {"mode": "offline"}, "tags": ["x"]}
    write_run(tmp_path / "s" / "1", rows, overrides=["seed=1"], config=other)
    (group,) = report.group_runs(report.load_runs(tmp_path / "s"))
    assert [r.name for r in group.runs] == ["0", "1"]


def test_configs_with_only_a_seed_and_a_run_without_overrides(tmp_path):
    rows = lockstep_rows(ACC)
    write_run(tmp_path / "s" / "0", rows, overrides=[], config={"seed": 0})
    write_run(tmp_path / "s" / "1", rows, overrides=["seed=1"], config={"seed": 1})
    write_run(tmp_path / "s" / "2", rows, overrides=["lsm=loss"], config={"seed": 0, "lsm": 1})
    groups = report.group_runs(report.load_runs(tmp_path / "s"))
    assert [(g.label, [r.name for r in g.runs]) for g in groups] == [
        ("(no overrides)", ["0", "1"]), ("lsm=loss", ["2"])]


def test_broad_folder_is_searched_only_for_real_run_folders_near_the_top(tmp_path):
    rows = lockstep_rows(ACC)
    write_run(tmp_path / "sweep" / "0", rows, overrides=["seed=0"])  # depth 2: found
    write_run(tmp_path / "a" / "b" / "c" / "d" / "run", rows, overrides=["seed=0"])  # depth 5
    write_run(tmp_path / "notes" / "x", rows)  # a metrics.jsonl without .hydra: not a run
    write_run(tmp_path / ".hidden" / "run", rows, overrides=["seed=0"])
    with pytest.warns(UserWarning, match="skipped 1 metrics.jsonl"):
        runs = report.load_runs(tmp_path)
    assert [r.name for r in runs] == ["sweep/0"]
    with pytest.warns(UserWarning, match="skipped 1"):
        deep = report.load_runs(tmp_path, max_depth=5)
    assert [r.name for r in deep] == ["a/b/c/d/run", "sweep/0"]
    with pytest.raises(report.ReportError, match="max_depth"):
        report.load_runs(tmp_path, max_depth=0)


def test_a_run_folder_is_not_searched_inside(tmp_path):
    rows = lockstep_rows(ACC)
    outer = write_run(tmp_path / "s" / "0", rows, overrides=["seed=0"])
    write_run(outer / "nested", rows, overrides=["seed=1"])
    assert [r.name for r in report.load_runs(tmp_path / "s")] == ["0"]


def test_cli_no_run_folder_within_depth_exits_2(tmp_path, capsys):
    write_run(tmp_path / "a" / "b" / "c" / "d" / "run", lockstep_rows(ACC), overrides=["seed=0"])
    assert report.main([str(tmp_path), "--no-plots"]) == 2
    assert "up to 4 levels" in capsys.readouterr().err
    assert report.main([str(tmp_path), "--no-plots", "--max-depth", "5"]) == 0


def test_empty_metrics_file_warns_and_reports_dashes(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text("")
    with pytest.warns(UserWarning, match="no records"):
        rep = report.build_report(tmp_path / "r", plots=False)
    assert rep.tables[0].rows[0][2] == "–"


def test_wall_time_falls_back_to_file_times(tmp_path):
    run_dir = write_run(tmp_path / "r", lockstep_rows(ACC), overrides=["seed=0"])
    for p in (run_dir / ".hydra").glob("*.yaml"):
        os.utime(p, (1000.0, 1000.0))
    os.utime(run_dir / "metrics.jsonl", (1042.5, 1042.5))
    assert report.Run.load(run_dir).wall_time() == pytest.approx(42.5)
    bare = write_run(tmp_path / "bare", lockstep_rows(ACC))
    assert math.isnan(report.Run.load(bare).wall_time())


def test_accept_rate_from_counts(tmp_path):
    rows = [{"step": 0, "guard/accepted": 3, "guard/rejected": 1}]
    assert report.Run.load(write_run(tmp_path / "r", rows)).accept_rate() == 0.75


def make_controls_sweep(root: Path) -> dict[str, dict[str, list[float]]]:
    """Arms x 2 seeds: per run a val/acc curve, a train time and (guard) an accept rate."""
    arms = {
        "plain": {"mode": "monitor", "curves": [[0.5, 0.7, 0.6], [0.4, 0.8, 0.7]],
                  "train_s": [10.0, 30.0]},
        "loss": {"mode": "loss", "curves": [[0.6, 0.65, 0.9], [0.5, 0.6, 0.8]],
                 "train_s": [50.0, 70.0]},
        "guard": {"mode": "guard", "curves": [[0.3, 0.2, 0.1], [0.3, 0.4, 0.2]],
                  "train_s": [20.0, 20.0], "rate": [0.5, 0.9]},
        "wide": {"mode": "monitor", "curves": [[0.1, 0.9, 0.9], [0.2, 0.9, 0.95]],
                 "train_s": [15.0, 25.0]},
    }
    job = 0
    for arm, spec in arms.items():
        for seed in range(2):
            rows = []
            for i, acc in enumerate(spec["curves"][seed]):
                row = {"step": 10 * i, "val/acc": acc,
                       "time/train_s": spec["train_s"][seed] * (i + 1) / 3,
                       "time/elapsed_s": 99.0}
                if "rate" in spec:
                    row["guard/accept_rate"] = spec["rate"][seed]
                rows.append(row)
            overrides = [f"+arm={arm}", f"seed={seed}"]
            config = {"seed": seed, "arm": arm, "lsm": {"mode": spec["mode"]}}
            write_run(root / str(job), rows, overrides=overrides, config=config)
            job += 1
    return arms


def test_controls_table_against_numpy(tmp_path):
    arms = make_controls_sweep(tmp_path / "sweep")
    rep = report.build_report(tmp_path / "sweep", tmp_path / "out", plots=False)
    table = next(t for t in rep.tables if t.title.startswith("Controls"))
    assert "time ratio to +arm=plain" in table.title
    rows = {row[0]: dict(zip(table.columns, row, strict=True)) for row in table.rows}
    assert list(rows) == [f"+arm={a}" for a in arms]
    ref_time = np.mean(arms["plain"]["train_s"])
    for arm, spec in arms.items():
        row = rows[f"+arm={arm}"]
        finals = [c[-1] for c in spec["curves"]]
        bests = [max(c) for c in spec["curves"]]
        assert row["test acc (final)"] == f"{np.mean(finals):.3f} ± {np.std(finals, ddof=1):.3f}"
        assert row["test acc (best evaluation)"] == (
            f"{np.mean(bests):.3f} ± {np.std(bests, ddof=1):.3f}")
        assert row["seeds"] == "2"
        assert row["train time ratio"] == f"{np.mean(spec['train_s']) / ref_time:.2f}x"
        rates = spec.get("rate")
        assert row["guard accept rate"] == (
            "–" if rates is None else f"{np.mean(rates):.3f} ± {np.std(rates, ddof=1):.3f}")
    assert rows["+arm=loss"]["train time ratio"] == "3.00x"  # 60 s / 20 s


def test_controls_table_needs_a_plain_setting(tmp_path):
    root = tmp_path / "sweep"
    for job, (mode, seconds) in enumerate([("loss", 8.0), ("guard", 2.0)]):
        write_run(root / str(job), [{"step": 0, "val/acc": 0.5, "time/train_s": seconds}],
                  overrides=[f"+arm={mode}"],
                  config={"seed": 0, "lsm": {"mode": mode}})
    rep = report.build_report(root, tmp_path / "out", plots=False)
    assert not any(t.title.startswith("Controls") for t in rep.tables)
    # all settings plain (a width sweep): nothing to control either
    rows = [{"step": 0, "val/acc": 0.5}]
    for job, width in enumerate([8, 16]):
        write_run(tmp_path / "plain" / str(job), rows, overrides=[f"model.width={width}"],
                  config={"seed": 0, "model": {"width": width}, "lsm": {"mode": "monitor"}})
    rep = report.build_report(tmp_path / "plain", tmp_path / "out2", plots=False)
    assert not any(t.title.startswith("Controls") for t in rep.tables)
    # the first plain setting is the reference, wherever it comes in the sweep
    write_run(root / "2", [{"step": 0, "val/acc": 0.5, "time/train_s": 4.0}],
              overrides=["+arm=off"], config={"seed": 0, "lsm": {"mode": "off"}})
    rep = report.build_report(root, tmp_path / "out", plots=False)
    table = next(t for t in rep.tables if t.title.startswith("Controls"))
    assert table.title.endswith("time ratio to +arm=off)")
    assert [r[-1] for r in table.rows] == ["2.00x", "0.50x", "1.00x"]


def _results_figures():
    return load_bench("results_figures")


def test_results_figures_draw_a_controls_sweep(tmp_path):
    make_controls_sweep(tmp_path / "sweep")
    _results_figures().main(["--out", str(tmp_path / "png"), f"study={tmp_path / 'sweep'}"])
    for name in ("study_acc_by_arm.png", "study_test_acc_curves.png"):
        assert _is_png(tmp_path / "png" / name)


def test_results_figures_synchronicity_null_against_brute_force(tmp_path):
    lsm = [0.5, 0.6, 0.55, 0.7, 0.7, 0.8, 0.75, 0.9]
    acc = [0.1, 0.2, 0.3, 0.25, 0.4, 0.5, 0.6, 0.55]
    rows = [{"step": i, "probe/acc": a, "lsm/fc": m}
            for i, (m, a) in enumerate(zip(lsm, acc, strict=True))]
    run = report.Run.load(write_run(tmp_path / "r", rows))
    observed, null = _results_figures().sync_against_null(run, "fc")
    pairs = [(lsm[i + 1] - lsm[i], acc[i + 1] - acc[i]) for i in range(len(lsm) - 1)]
    pairs = [(a, b) for a, b in pairs if a != 0 and b != 0]  # the flat lsm step is left out
    same = sum((a > 0) == (b > 0) for a, b in pairs) / len(pairs)
    up_l = sum(a > 0 for a, _ in pairs) / len(pairs)
    up_a = sum(b > 0 for _, b in pairs) / len(pairs)
    assert len(pairs) == 6
    assert observed == pytest.approx(same)
    assert null == pytest.approx(up_l * up_a + (1 - up_l) * (1 - up_a))


# ------------------------------------------------------------------------------------------
# plots and CLI


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pngs_written_for_sweep(tmp_path):
    root = make_sweep(tmp_path / "sweep")
    rep = report.build_report(root)
    out = root / "report"
    for name in ("lsm_grid.png", "final_lsm_bars.png", "final_acc_bars.png",
                 "runs/0_lsm.png", "runs/5_sync.png"):
        assert _is_png(out / name), name
    assert all(_is_png(p) for p in rep.images)
    assert "![lsm_grid](lsm_grid.png)" in (out / "report.md").read_text()


def test_cli_single_run(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", lockstep_rows(ACC), overrides=["model=mlp", "seed=0"])
    assert report.main([str(run_dir), "--out", str(tmp_path / "o"), "--threshold", "0.5"]) == 0
    text = capsys.readouterr().out
    # all 7 intervals; learning phase: the 3 intervals up to train/acc 0.55 >= 0.5 (step 30)
    assert "| fc1 | 7 | 7 | 1.000 | 1.000 | 3 | 1.000 | 1.000 |" in text
    assert "| 30 |" in text or " 30 | " in text  # first train/acc >= 0.5 at step 30
    assert _is_png(tmp_path / "o" / "run_lsm.png") and _is_png(tmp_path / "o" / "run_sync.png")


def test_cli_bad_input_gives_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no run folder in" in err and "metrics.jsonl" in err
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    run_dir = write_run(tmp_path / "run", lockstep_rows(ACC))
    assert report.main([str(run_dir), "--threshold", "90", "--no-plots"]) == 2
    assert "threshold" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert report.main([str(tmp_path / "notes.txt")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    # the metrics file itself stands for its run folder
    assert report.main([str(run_dir / "metrics.jsonl"), "--no-plots"]) == 0


def test_cli_prints_warnings_for_truncated_runs(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", lockstep_rows(ACC), tail='{"step": 8')
    assert report.main([str(run_dir), "--no-plots"]) == 0
    assert "warning:" in capsys.readouterr().err


def test_wandb_offline_logging(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    root = make_sweep(tmp_path / "sweep")
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out), "--wandb"]) == 0
    runs = list(out.glob("wandb/offline-run-*"))
    assert runs, "no offline wandb run folder written"
    assert list(runs[0].glob("*.wandb")), "offline run has no .wandb log"
    assert "wandb logging failed" not in capsys.readouterr().err


def test_wandb_failure_only_warns(tmp_path, monkeypatch, capsys):
    import wandb

    def boom(*args, **kwargs):
        raise RuntimeError("no wandb today")

    monkeypatch.setattr(wandb, "init", boom)
    run_dir = write_run(tmp_path / "run", lockstep_rows(ACC))
    assert report.main([str(run_dir), "--wandb", "--no-plots"]) == 0
    assert "wandb logging failed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# accuracy key for synchronicity, and the trainer's own file format


def test_probe_acc_preferred_for_synchronicity(tmp_path):
    # lsm moves with probe/acc (same monitor call) but against the lagging train/acc
    rows = []
    for i, a in enumerate(ACC):
        rows.append({"step": 10 * i, "train/acc": 1 - a, "probe/acc": a, "lsm/fc1": 0.5 + a / 3})
    rows.insert(1, {"step": 5, "train/acc": 0.5})  # a log-only row without lsm: not aligned
    run_dir = write_run(tmp_path / "r", rows)
    auto = report.load_runs(run_dir)[0]
    assert auto.sync_acc_key == "probe/acc"
    assert auto.synchronicity()["fc1"].same_sign == 1.0
    forced = report.load_runs(run_dir, acc_key="train/acc")[0]
    assert forced.synchronicity()["fc1"].same_sign == 0.0
    no_probe = write_run(tmp_path / "q", [{k: v for k, v in r.items() if k != "probe/acc"}
                                          for r in rows])
    assert report.load_runs(no_probe)[0].sync_acc_key == "train/acc"


def test_reads_the_trackers_own_format(tmp_path):
    from lsm_train.tracking import Tracker

    with Tracker(tmp_path / "run") as tracker:
        for i, a in enumerate(ACC):
            tracker.log({"epoch": 0, "train/acc": a, "probe/acc": a, "val/acc": a,
                         "lsm/layers.0": 0.5 + a / 3, "lsm/layers.2": 0.6 + a / 3,
                         "lsm/mean": 0.55 + a / 3, "val_lsm/layers.0": math.nan,
                         "guard/accept_rate": 0.75, "time/elapsed_s": 0.5 * i,
                         "time/train_s": 0.25 * i, "time/monitor_s": 0.25 * i}, step=5 * i)
    run = report.load_runs(tmp_path / "run")[0]
    assert run.layers == ["layers.0", "layers.2"]
    assert run.wall_time() == pytest.approx(3.5)
    assert run.train_time() == pytest.approx(1.75)
    table = report.summary_table(report.group_runs([run]), 0.9)
    assert "train time (s)" in table.columns
    assert table.rows[0][table.columns.index("train time (s)")].startswith("1.8")
    assert run.accept_rate() == 0.75
    assert run.synchronicity()["layers.2"].same_sign == 1.0
    assert run.steps_to(0.9) == 30


# ------------------------------------------------------------------------------------------
# the paper and ablation recipes (need the Hydra app)

PAPER = ["paper/synchronicity", "paper/activation", "paper/width", "paper/depth"]
ABLATION = ["ablation/zoo", "ablation/zoo-cifar10"]
# one cheap point of each sweep (few hidden layers: the monitor dominates the cost)
ONE_POINT = {
    "paper/synchronicity": ["model=dbn"],
    "paper/activation": ["model.kwargs.activation=sigmoid"],
    "paper/width": ["model.kwargs.width=16"],
    "paper/depth": ["model.kwargs.depth=2"],
    "ablation/zoo": ["model=dbn", "lsm=both"],
}
REPO = Path(__file__).resolve().parents[1]


def _sweep_params(recipe: str) -> dict[str, list[str]]:
    from lsm_train.app import compose

    cfg = compose([f"recipe={recipe}"], return_hydra_config=True)
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


@pytest.mark.parametrize("recipe", PAPER + ABLATION)
def test_recipe_sweeps_name_valid_choices(recipe):
    from lsm_train.app import conf_dir, list_recipes
    from lsm_train.models import list_models
    from lsm_train.models.mlp import ACTIVATIONS

    assert recipe in list_recipes()
    text = (REPO / "recipes" / f"{recipe}.yaml").read_text()
    assert text.startswith("# @package _global_")
    params = _sweep_params(recipe)
    assert params["seed"] == ["0", "1", "2"]
    families = ["mlp", "cnn", "dbn", "resnet", "vgg", "alexnet", "vit", "googlenet"]
    if "model" in params:
        assert params["model"] == families and set(families) <= set(list_models())
    if "lsm" in params:
        assert params["lsm"] == ["off", "loss", "guard", "both"]
        assert all((conf_dir() / "lsm" / f"{m}.yaml").is_file() for m in params["lsm"])
    if recipe == "paper/activation":
        assert params["model.kwargs.activation"] == [
            "sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu"]
        assert set(params["model.kwargs.activation"]) <= set(ACTIVATIONS)


@pytest.mark.parametrize("recipe", PAPER + ["ablation/zoo"])
def test_recipe_one_point_trains_with_debug_smoke(recipe, tmp_path):
    """In-process: compose one point of the sweep with debug=smoke and train it."""
    from lsm_train.app import compose, train_from_config

    overrides = [f"recipe={recipe}", *ONE_POINT[recipe], "debug=smoke", "logger=none",
                 "trainer.progress=false", "trainer.plots=false", "trainer.checkpoint=false"]
    cfg = compose(overrides)
    if recipe.startswith("paper/"):
        assert cfg.lsm.mode == "monitor"
    result = train_from_config(cfg, tmp_path / "run", recipe=recipe)
    assert result.status == "completed"
    run = report.load_runs(tmp_path / "run")[0]
    assert [k for k in run.keys if not runlog.is_schema_key(k)] == []  # the trainer's keys
    if cfg.lsm.mode != "off":
        assert run.layers, "no lsm/<layer> logged"
        assert all(s.intervals >= 1 for s in run.synchronicity().values())
    assert math.isfinite(run.final("val/acc"))


def test_paper_activation_multirun_then_report(tmp_path, capsys):
    """End to end: a 2-job multirun of the real app (subprocess), then lsm-report on it."""
    import subprocess
    import sys

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "lsm_train", "-m", "recipe=paper/activation", "debug=smoke",
           "model.kwargs.activation=sigmoid,tanh", "model.kwargs.depth=1", "seed=0", "logger=none",
           "trainer.progress=false", "trainer.plots=false", "trainer.checkpoint=false",
           f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report.main([str(sweep), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "model.kwargs.activation=sigmoid" in out and "model.kwargs.activation=tanh" in out
    assert "seed=0" not in out.split("## Per layer")[0]  # the seed is not a setting
    assert _is_png(tmp_path / "rep" / "final_lsm_bars.png")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [r for r in PAPER if r != "paper/activation"])
def test_paper_recipe_subprocess_smoke(recipe, tmp_path):
    """The same as the in-process test, through ``python -m lsm_train -m`` (one job)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "lsm_train", "-m", f"recipe={recipe}", *ONE_POINT[recipe],
           "seed=0", "debug=smoke", "logger=none", "trainer.progress=false",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(report.load_runs(tmp_path / "sweep")) == 1


def _kept_figures(monkeypatch) -> list:
    """Figures the plot functions close, kept open for inspection (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    return kept


def _layer_lines(ax) -> dict[str, np.ndarray]:
    return {ln.get_label(): np.asarray(ln.get_ydata(), float) for ln in ax.get_lines()
            if not ln.get_label().startswith("_")}


def test_lsm_curves_are_one_minus_m_on_an_inverted_log_axis(tmp_path, monkeypatch):
    from lsm_train.report import plots as report_plots

    kept = _kept_figures(monkeypatch)
    rows = lockstep_rows(ACC)
    rows[-1]["lsm/fc2"] = 1.0  # m = 1: drawn at the floor
    rows[2]["lsm/fc1"] = 0.999
    rows[3]["lsm/fc1"] = 0.9999
    run_dir = write_run(tmp_path / "run", rows, overrides=["model=mlp", "seed=0"])
    report.build_report(run_dir, tmp_path / "out", threshold=0.5)
    ax = kept[0].axes[0]  # <run>_lsm.png, the MD-LSM axis
    assert ax.get_yscale() == "log" and ax.yaxis_inverted()
    assert "1 − MD-LSM (log" in ax.get_ylabel()
    lines = _layer_lines(ax)
    expected_fc1 = np.maximum(1 - np.array([r["lsm/fc1"] for r in rows]), report_plots.GAP_FLOOR)
    np.testing.assert_allclose(lines["fc1"], expected_fc1, rtol=1e-9)
    assert lines["fc2"][-1] == report_plots.GAP_FLOOR
    np.testing.assert_allclose(lines["fc2"][:-1], [1 - r["lsm/fc2"] for r in rows[:-1]],
                               rtol=1e-9)
    assert lines["fc1"][2] / lines["fc1"][3] == pytest.approx(10.0)  # a decade apart


def test_summary_png_draws_train_and_test_gaps_on_a_log_axis(tmp_path, monkeypatch):
    from lsm_train import plots

    kept = _kept_figures(monkeypatch)
    rows = [{"step": s, "lsm/fc1": m, "val_lsm/fc1": m - 0.01, "train/acc": 0.5}
            for s, m in ((0, 0.9), (10, 0.99), (20, 1.0))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plots.summary_png(tmp_path / "metrics.jsonl", tmp_path / "summary.png")
    ax = kept[0].axes[0]
    assert ax.get_yscale() == "log" and "1 − MD-LSM" in ax.get_ylabel()
    train, test = (np.asarray(ln.get_ydata(), float) for ln in ax.get_lines()[:2])
    np.testing.assert_allclose(train, [0.1, 0.01, 1e-6], rtol=1e-9)
    np.testing.assert_allclose(test, [0.11, 0.02, 0.01], rtol=1e-9)
    assert _is_png(tmp_path / "summary.png")


def test_final_layer_markers_are_one_minus_mean_m_on_a_log_axis(tmp_path, monkeypatch):
    kept = _kept_figures(monkeypatch)
    root = make_sweep(tmp_path / "sweep")
    report.build_report(root, tmp_path / "out", threshold=0.9)
    fig = next(f for f in kept if f.axes and f.axes[0].get_title().startswith("Final per-layer"))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.yaxis_inverted()
    finals = {"relu": [0.80, 0.90, 1.00], "tanh": [0.70, 0.70, 0.70]}  # make_sweep's
    for container, (act, accs) in zip(ax.containers, finals.items(), strict=True):
        sign = 1.0 if act == "relu" else -1.0
        m_fc1 = [0.75 + sign * 0.2 * a for a in accs]  # lockstep_rows at the last row
        m_fc2 = [0.5 + a / 2 for a in accs]
        expected = [1 - np.mean(m_fc1), 1 - np.mean(m_fc2)]
        got = np.asarray(container.lines[0].get_ydata(), dtype=float)
        np.testing.assert_allclose(got, expected, rtol=1e-9)
