"""`vlmfast bench` runs its suites end to end and records what it measured."""

import json

from vlmfast.bench import runner


def test_bench_rotary_quick_writes_json_lines(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert runner.main(["rotary", "--quick", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rotary" in printed and "speedup" in printed
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["case"].endswith("fwd+bwd") for r in records} == {True, False}
    for record in records:
        assert record["suite"] == "rotary" and record["ms"] > 0 and record["gbps"] > 0
        assert record["peer"] == "transformers" and record["peer_ms"] > 0
        assert record["machine"]["torch"] and record["machine"]["date"]


def test_bench_rejects_unknown_suite():
    import pytest

    with pytest.raises(SystemExit, match="unknown suite 'nope'"):
        runner.main(["nope", "--quick"])
