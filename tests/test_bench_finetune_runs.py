"""vlmfast.bench.finetune_runs: the headline fine-tuning case repeated (on the toy model here),
one record per run with both sides' time and peak memory, alternating which side goes first."""

import json

import pytest

pytest.importorskip("transformers")

from vlmfast.bench import finetune_runs  # noqa: E402


def test_runs_record_both_sides_and_alternate_the_order():
    records = finetune_runs.runs(2, repeats=1, spec_name="quick")
    assert [r["first"] for r in records] == ["vlmfast", "transformers"]
    for r in records:
        assert r["ms"] > 0 and r["peer_ms"] > 0
        assert r["speedup"] == pytest.approx(r["peer_ms"] / r["ms"])
        assert r["setting"] == "checkpointing+adamw_in_backward" and r["peer_setting"] == "plain"


def test_main_appends_json_lines_and_rejects_zero_runs(tmp_path, capsys, monkeypatch):
    fake = [{"run": 0, "first": "vlmfast", "speedup": 1.5, "ms": 2.0, "peer_ms": 3.0, "memory_ratio": 0.5,
             "peak_mib": 1.0, "peer_peak_mib": 2.0}]
    monkeypatch.setattr(finetune_runs, "runs", lambda count, dtype: [dict(r) for r in fake])
    out = tmp_path / "runs.jsonl"
    assert finetune_runs.main(["--runs", "1", "--json", str(out)]) == 0
    assert "median 1.50x" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["speedup"] == 1.5 and "cpu" in json.dumps(record["machine"]).lower()
    with pytest.raises(SystemExit):
        finetune_runs.main(["--runs", "0"])
    assert "--runs: expected at least 1, got 0" in capsys.readouterr().err
