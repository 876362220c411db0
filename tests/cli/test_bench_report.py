"""`vlmfast bench --report` on the records the repository ships (issue 19, item 1): records of
another kind in the folder are left out (not a KeyError), and run from another folder it finds
the checkout's records or says where it looked and how to point it (--results)."""

import json

import pytest

from tests.test_bench import REPORT_RECORDS, REPORT_TABLE
from vlmfast.bench import report, runner

FINETUNE_RUN = {"run": 0, "first": "vlmfast", "setting": "plain", "ms": 6531.5, "peer_ms": 9404.6,
                "machine": {"date": "2026-11-27T22:09:52+00:00", "cpu": "AMD EPYC", "threads": 2}}


def test_report_leaves_out_records_without_a_suite(tmp_path, capsys):
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REPORT_RECORDS))
    (tmp_path / "finetune-runs.jsonl").write_text(json.dumps(FINETUNE_RUN) + "\n")
    assert runner.main(["--report", "--results", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == REPORT_TABLE
    assert "1 in finetune-runs.jsonl" in captured.err


def test_report_of_the_shipped_records_from_another_folder(tmp_path, monkeypatch, capsys):
    if not any(report.CHECKOUT_RESULTS.glob("*.jsonl")):
        pytest.skip("not a source checkout: no benchmarks/results next to the package")
    monkeypatch.chdir(tmp_path)
    assert runner.main(["--report"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| suite | case |") and table.count("\n") > 10


def test_report_says_where_it_looked_when_nothing_is_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report, "CHECKOUT_RESULTS", tmp_path / "gone")
    with pytest.raises(SystemExit) as raised:
        runner.main(["--report"])
    message = str(raised.value)
    assert str(tmp_path / "benchmarks" / "results") in message and str(tmp_path / "gone") in message
    assert "--results" in message


def test_a_folder_of_other_records_only_is_no_table(tmp_path):
    (tmp_path / "finetune-runs.jsonl").write_text(json.dumps(FINETUNE_RUN) + "\n")
    with pytest.raises(SystemExit, match="no `vlmfast bench` records"):
        runner.main(["--report", "--results", str(tmp_path)])
