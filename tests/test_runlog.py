"""The metrics.jsonl schema: the writer's encoding, the tolerant reader, the layer keys, and
the app's end-of-run summary drawn from them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lsm_train import plots, runlog


def test_encode_record_puts_step_first_and_makes_values_json():
    line = runlog.encode_record(
        {"train/acc": torch.tensor(0.5), "lsm/fc1": np.float32(0.75), "val/acc": math.nan,
         "time/elapsed_s": math.inf, "lsm/fc2": -math.inf, "step": 99}, step=7)
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert list(record)[0] == "step" and record["step"] == 7
    assert record == {"step": 7, "train/acc": 0.5, "lsm/fc1": 0.75, "val/acc": None,
                      "time/elapsed_s": 1e308, "lsm/fc2": -1e308}
    assert runlog.to_record({"val/acc": math.nan}, step=3) == {"step": 3, "val/acc": None}


def test_reader_round_trips_and_accepts_the_run_folder(tmp_path):
    lines = [runlog.encode_record({"train/acc": 0.1 * i}, step=i) for i in range(3)]
    (tmp_path / runlog.METRICS_FILE).write_text("".join(lines) + "\n\n")
    from_dir = runlog.read_metrics(tmp_path)
    assert from_dir == runlog.read_metrics(tmp_path / runlog.METRICS_FILE)
    assert from_dir == [json.loads(line) for line in lines]


def test_reader_drops_a_truncated_last_line_with_a_warning(tmp_path):
    path = tmp_path / runlog.METRICS_FILE
    path.write_text(runlog.encode_record({"train/acc": 0.5}, step=1) + '{"step": 2, "tra')
    with pytest.warns(UserWarning, match=r"truncated last line \(killed run\?\) \(line 2\)"):
        assert runlog.read_metrics(path) == [{"step": 1, "train/acc": 0.5}]


def test_reader_names_malformed_and_non_object_lines(tmp_path):
    path = tmp_path / runlog.METRICS_FILE
    path.write_text('{"step": 0}\nnot json\n[1, 2]\n{"step": 1}\n')
    with pytest.warns(UserWarning) as caught:
        records = runlog.read_metrics(path)
    messages = " ".join(str(w.message) for w in caught)
    assert "malformed line (line 2)" in messages and "line 3: not a JSON object" in messages
    assert records == [{"step": 0}, {"step": 1}]


def test_layer_names_in_first_seen_order_without_aggregates():
    records = [{"step": 0, "lsm/b.0": 0.6, "lsm/mean": 0.6, "val_lsm/b.0": 0.5},
               {"step": 1, "lsm/a.1": 0.8, "lsm/b.0": 0.7, "lsm_loss/a.1": 0.9, "lsm/": 1.0}]
    assert runlog.layer_names(records) == ["b.0", "a.1"]
    assert runlog.layer_names(records, runlog.VAL_LSM) == ["b.0"]
    assert runlog.layer_names(records, runlog.LSM_LOSS) == ["a.1"]
    assert runlog.layer_of("lsm/mean") is None and runlog.layer_of("val/acc") is None
    assert runlog.layer_key(runlog.VAL_LSM, "fc1") == "val_lsm/fc1"
    with pytest.raises(ValueError, match="prefix must be one of"):
        runlog.layer_key("guard/", "fc1")


def test_schema_keys():
    for key in ("step", "train/acc", "probe/acc", "lsm/fc1", "val_lsm/mean", "guard/forced",
                "time/train_s", "pretrain/recon_error_0", "lsm_loss/blocks.0.act"):
        assert runlog.is_schema_key(key), key
    for key in ("acc", "lsm/", "time/", "train/accuracy", "ddp/spread"):
        assert not runlog.is_schema_key(key), key


def test_to_float():
    assert runlog.to_float(3) == 3.0 and runlog.to_float(True) == 1.0
    assert runlog.to_float("0.25") == 0.25
    assert all(math.isnan(runlog.to_float(v)) for v in (None, "nan", "x", [1]))


def _records():
    return [
        {"step": 0, "epoch": 0, "lsm/fc1": 0.6, "val_lsm/fc1": 0.55, "lsm/mean": 0.6},
        {"step": 5, "epoch": 0, "train/acc": 0.5, "val/acc": None},
        {"step": 10, "epoch": 1, "train/acc": 0.9, "val/acc": 0.85, "lsm/fc1": 0.8,
         "val_lsm/fc1": 0.7, "lsm/fc2": 0.9, "guard/accept_rate": 0.75,
         "time/elapsed_s": 12.34},
    ]


def _write(tmp_path, records):
    path = tmp_path / runlog.METRICS_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_series_skips_missing_and_null_values():
    assert plots.series(_records(), "val/acc") == ([10.0], [0.85])
    assert plots.series([{"lsm/x": 0.5}, {"lsm/x": 0.6}], "lsm/x") == ([0.0, 1.0], [0.5, 0.6])


def test_summary_text_lists_layers_first_last_and_final_facts(tmp_path):
    text = plots.summary_text(_write(tmp_path, _records()))
    header, fc1, fc2, facts = text.splitlines()
    assert header.split() == ["layer", "lsm", "first", "lsm", "last", "val_lsm", "last"]
    assert fc1.split() == ["fc1", "0.6000", "0.8000", "0.7000"]
    assert fc2.split() == ["fc2", "0.9000", "0.9000", "-"]
    assert facts.split() == ["step=10", "epoch=1", "train/acc=0.9000", "val/acc=0.8500",
                             "guard/accept_rate=0.7500", "wall", "time", "(s)=12.3000"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / runlog.METRICS_FILE).write_text("")
    assert plots.summary_text(tmp_path / "empty") == "(no metrics logged)"


def test_summary_png_is_a_png(tmp_path):
    out = plots.summary_png(_write(tmp_path, _records()), tmp_path / "summary.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
