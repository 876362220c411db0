"""`vlmfast bench` runs its suites end to end and records what it measured."""

import json

import pytest
import torch

from vlmfast.bench import report, runner


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
    with pytest.raises(SystemExit, match="unknown suite 'nope'"):
        runner.main(["nope", "--quick"])


# ----------------------------------------------------------------------------- every suite, quick

RECORD_FIELDS = {"suite", "case", "impl", "ms", "peer", "peer_ms", "gbps", "tflops", "peak_mib", "extra",
                 "speedup", "device", "dtype", "machine", "peaks"}


def test_groups_cover_every_suite():
    assert set(runner.SUITES) >= {"rotary", "attention", "losses", "patch_embed", "linear_cross_entropy", "smolvlm"}
    assert runner._resolve(["all"]) == list(runner.SUITES)
    assert set(runner._resolve(["ops", "models"])) == set(runner.SUITES)
    assert "smolvlm" in runner.GROUPS["models"] and "smolvlm" not in runner.GROUPS["ops"]


@pytest.mark.parametrize("suite", sorted(runner.SUITES))
def test_every_suite_runs_quick_and_records_its_peer(suite, tmp_path, capsys):
    if suite in ("smolvlm", "clip", "finetune", "qwen2vl"):
        pytest.importorskip("transformers")
    out = tmp_path / "bench.jsonl"
    assert runner.main([suite, "--quick", "--device", "cpu", "--no-peaks", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records, f"{suite} recorded nothing"
    for record in records:
        assert set(record) == RECORD_FIELDS
        assert record["suite"] == suite and record["case"] in printed
        assert record["device"] == "cpu" and record["dtype"] == "torch.float32" and record["peaks"] is None
        assert record["ms"] > 0 and record["impl"].startswith("vlmfast")
        assert record["peer"] and record["peer_ms"] > 0
        assert record["speedup"] == pytest.approx(record["peer_ms"] / record["ms"])
    if suite in ("smolvlm", "qwen2vl", "vlm_families"):  # decode rows carry the weight bytes streamed per s
        decode = [r for r in records if "decode b=" in r["case"]]
        assert decode and all(r["gbps"] > 0 for r in decode)
    if suite == "attention":
        for record in records:  # the peer is the fastest torch backend, every backend in extra
            timings = record["extra"]["backends_ms"]
            assert record["peer"].startswith("torch-") and timings[record["peer"]] == record["peer_ms"]
            assert record["peer_ms"] == min(ms for name, ms in timings.items() if name.startswith("torch-"))
            assert timings["vlmfast"] == record["ms"] and record["tflops"] > 0
        assert {r["case"].rsplit(" ", 1)[1] for r in records} == {"fwd", "fwd+bwd"}
    if suite in ("losses", "linear_cross_entropy"):
        assert "peak MiB" in printed
        for record in records:
            assert record["peak_mib"] is not None and record["peak_mib"] >= 0
            assert record["extra"]["peer_peak_mib"] is not None and record["extra"]["peer_peak_mib"] >= 0
    if suite == "losses":
        assert {r["case"].split()[0] for r in records} == {"infonce", "siglip"}
        assert {r["peer"] for r in records} == {"materialised"}
        for record in records:  # the kernels' own rate: InfoNCE's 4 products for 3 useful, SigLIP's 3
            products = record["extra"]["kernel_tflops"] / record["tflops"]
            assert products == pytest.approx(4 / 3 if record["case"].startswith("infonce") else 1.0)


def test_json_without_a_file_appends_to_the_results_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert runner.main(["rotary", "--quick", "--device", "cpu", "--json"]) == 0
    lines = (tmp_path / "benchmarks" / "results" / "bench.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["suite"] == "rotary" for line in lines)


# ----------------------------------------------------------------------------- --report

def _record(suite, case, ms, date, *, gpu=None, peer=None, peer_ms=None, tflops=None, gbps=None):
    machine = {"date": date, "cpu": "Test CPU", "threads": 4, "gpu": gpu} if gpu else \
        {"date": date, "cpu": "Test CPU", "threads": 4}
    return {"suite": suite, "case": case, "impl": "vlmfast", "ms": ms, "peer": peer, "peer_ms": peer_ms,
            "gbps": gbps, "tflops": tflops, "peak_mib": None, "extra": {}, "device": "cuda" if gpu else "cpu",
            "dtype": "torch.bfloat16", "machine": machine, "peaks": None}


REPORT_RECORDS = [
    _record("rotary", "x=(197, 12, 64) fwd", 0.5, "2026-11-26T10:00:00+00:00", peer="transformers",
            peer_ms=1.0, gbps=12.345),
    _record("attention", "8x12x197x64 fwd", 4.0, "2026-11-26T10:00:00+00:00", peer="torch-flash",
            peer_ms=5.0, tflops=0.123),
    # a newer run of the same rotary case on the same machine: replaces the first record
    _record("rotary", "x=(197, 12, 64) fwd", 0.25, "2026-11-27T09:00:00+00:00", peer="transformers",
            peer_ms=1.0, gbps=24.69),
    # an older run of the attention case: the newer one above stays
    _record("attention", "8x12x197x64 fwd", 40.0, "2026-11-20T10:00:00+00:00", peer="torch-math", peer_ms=50.0),
    # the same case on a GPU: its own row; a case without a peer
    _record("attention", "8x12x197x64 fwd", 0.0321, "2026-11-27T12:00:00+00:00", gpu="NVIDIA H200",
            peer="torch-cudnn", peer_ms=0.0642, tflops=471.0),
    _record("losses", "infonce B=1048576 D=512 bfloat16 fwd+bwd", 12345.6, "2026-11-27T12:00:00+00:00",
            gpu="NVIDIA H200", tflops=300.0),
]
REPORT_TABLE = """\
| suite | case | device, date | vlmfast ms | peer | peer ms | speedup | TFLOP/s or GB/s |
|---|---|---|---|---|---|---|---|
| attention | 8x12x197x64 fwd | NVIDIA H200, 2026-11-27 | 0.032 | torch-cudnn | 0.064 | 2.00x | 471 TFLOP/s |
| losses | infonce B=1048576 D=512 bfloat16 fwd+bwd | NVIDIA H200, 2026-11-27 | 12345.6 |  |  |  | 300 TFLOP/s |
| rotary | x=(197, 12, 64) fwd | Test CPU (4 threads), 2026-11-27 | 0.250 | transformers | 1.000 | 4.00x | 24.7 GB/s |
| attention | 8x12x197x64 fwd | Test CPU (4 threads), 2026-11-26 | 4.000 | torch-flash | 5.000 | 1.25x | 0.123 TFLOP/s |
"""


def _write_records(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_prints_the_latest_record_of_each_case_and_device(tmp_path, capsys):
    _write_records(tmp_path / "results.jsonl", REPORT_RECORDS)
    assert runner.main(["--report", "--results", str(tmp_path / "results.jsonl")]) == 0
    assert capsys.readouterr().out == REPORT_TABLE


def test_report_reads_every_jsonl_file_of_a_folder(tmp_path, capsys):
    _write_records(tmp_path / "a.jsonl", REPORT_RECORDS[:2])
    _write_records(tmp_path / "b.jsonl", REPORT_RECORDS[2:])
    (tmp_path / "notes.txt").write_text("not read")
    assert runner.main(["--report", "--results", str(tmp_path)]) == 0
    assert capsys.readouterr().out == REPORT_TABLE


def test_report_errors_name_the_problem(tmp_path):
    with pytest.raises(SystemExit, match="no JSON lines"):
        runner.main(["--report", "--results", str(tmp_path)])
    (tmp_path / "bad.jsonl").write_text(json.dumps(REPORT_RECORDS[0]) + "\n{oops\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not a JSON line"):
        runner.main(["--report", "--results", str(tmp_path)])


def test_report_plot_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    _write_records(tmp_path / "r.jsonl", REPORT_RECORDS)
    assert runner.main(["--report", "--results", str(tmp_path), "--plot", str(tmp_path / "p.png")]) == 1
    captured = capsys.readouterr()
    assert captured.out == REPORT_TABLE and "--plot needs matplotlib" in captured.err
    assert not (tmp_path / "p.png").exists()


def test_report_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    _write_records(tmp_path / "r.jsonl", REPORT_RECORDS)
    assert runner.main(["--report", "--results", str(tmp_path), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_latest_prefers_the_later_line_on_equal_dates():
    first, second = (_record("rotary", "c", ms, "2026-11-27T09:00:00+00:00") for ms in (1.0, 2.0))
    assert report.latest([first, second]) == [second]


def test_cpu_peak_remeasured_after_the_suites_keeps_the_larger(monkeypatch):
    """A peak measured while the hypervisor stole the CPU is replaced by a later, higher one; a
    lower later one changes nothing."""
    from vlmfast.bench import machine

    peaks = {"gemm_tflops": 0.23, "gemm_source": "vlmfast avx512_bf16 micro-kernel, bfloat16"}
    monkeypatch.setattr(machine, "_gemm_peak_cpu", lambda dtype: (0.44, "second"))
    machine.remeasure_cpu_peak(peaks, torch.bfloat16)
    assert peaks == {"gemm_tflops": 0.44, "gemm_source": "second"}
    monkeypatch.setattr(machine, "_gemm_peak_cpu", lambda dtype: (0.30, "third"))
    machine.remeasure_cpu_peak(peaks, torch.bfloat16)
    assert peaks == {"gemm_tflops": 0.44, "gemm_source": "second"}
    monkeypatch.setattr(machine, "_gemm_peak_cpu", lambda dtype: (None, "torch GEMM"))
    machine.remeasure_cpu_peak(peaks, torch.bfloat16)
    assert peaks["gemm_tflops"] == 0.44
