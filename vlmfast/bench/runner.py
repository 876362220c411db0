"""`vlmfast bench`: runs the suites, prints a table, appends JSON lines with the machine;
`--report` turns the recorded JSON lines into the README's Markdown table (report.py)."""

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from vlmfast.bench import machine, report
from vlmfast.bench.timing import Result
from vlmfast.eval._progress import Progress

# Suite name -> module in vlmfast.bench with run(device, dtype, quick) -> list[Result].
OP_SUITES = ["rotary", "attention", "losses", "patch_embed", "linear_cross_entropy", "linear", "swiglu"]
# Model suites: end-to-end against transformers.
MODEL_SUITES = ["smolvlm", "clip", "finetune", "qwen2vl", "serve", "vlm_families"]
SUITES = {name: f"vlmfast.bench.{name}" for name in OP_SUITES + MODEL_SUITES}
GROUPS = {"ops": OP_SUITES, "models": MODEL_SUITES, "all": None}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suites", nargs="*", default=["ops"],
                        help=f"suites ({', '.join(SUITES)}) or groups ({', '.join(GROUPS)}); default: ops")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--json", type=Path, nargs="?", const=report.DEFAULT_JSON, default=None,
                        help=f"append results as JSON lines to this file (no value, put last: {report.DEFAULT_JSON})")
    parser.add_argument("--quick", action="store_true", help="small shapes: checks that every suite runs")
    parser.add_argument("--no-peaks", action="store_true", help="skip measuring the machine's peaks")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: print the Markdown table of the latest recorded results")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"--report: a JSON-lines file or a folder of *.jsonl (default: ./{report.RESULTS_DIR}, "
                             "else the benchmarks/results of the checkout vlmfast is installed from)")
    parser.add_argument("--plot", type=Path, default=None, help="--report: also draw the speedups here (matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (it is drawn on a terminal only)")


def _resolve(names: list[str]) -> list[str]:
    chosen = []
    for name in names:
        if name in GROUPS:
            chosen += GROUPS[name] if GROUPS[name] is not None else list(SUITES)
        elif name in SUITES:
            chosen.append(name)
        else:
            raise SystemExit(f"vlmfast bench: unknown suite {name!r}; choose from {', '.join([*SUITES, *GROUPS])}")
    return list(dict.fromkeys(chosen))


def _format_table(results: list[Result], peaks: dict | None) -> str:
    header = ["suite", "case", "ms", "GB/s", "TFLOP/s", "% peak", "peer", "peer ms", "speedup"]
    with_memory = any(r.peak_mib is not None for r in results)
    if with_memory:
        header.append("peak MiB")
    rows = []
    for r in results:
        percent = None
        if peaks and r.tflops:
            percent = 100 * r.tflops / peaks["gemm_tflops"]
        elif peaks and r.gbps:
            percent = 100 * r.gbps / peaks["copy_gbps"]
        rows.append([
            r.suite, r.case, f"{r.ms:.3f}", f"{r.gbps:.3g}" if r.gbps else "", f"{r.tflops:.3g}" if r.tflops else "",
            f"{percent:.0f}%" if percent else "", r.peer or "", f"{r.peer_ms:.3f}" if r.peer_ms else "",
            f"{r.speedup:.2f}x" if r.speedup else "",
        ])
        if with_memory:
            rows[-1].append(f"{r.peak_mib:.1f}" if r.peak_mib is not None else "")
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _report(args: argparse.Namespace) -> int:
    try:
        records = report.load(args.results if args.results is not None else report.default_results())
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"vlmfast bench --report: {error}") from None
    print(report.markdown(records))
    if args.plot:
        try:
            report.plot(records, args.plot)
        except ImportError:
            print("vlmfast bench --report: --plot needs matplotlib, which is not installed "
                  "(pip install matplotlib); the table above is complete", file=sys.stderr)
            return 1
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.report:
        return _report(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("vlmfast bench: --device cuda but no CUDA device is available")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    info = machine.describe(device)
    peaks = None if args.no_peaks or args.quick else machine.measured_peaks(device, dtype)
    results, failed, started = [], [], time.perf_counter()
    suites = _resolve(args.suites)
    with Progress(len(suites), "bench", unit="suites", enabled=not args.quiet) as bar:
        for suite in suites:
            bar.update(0, status=suite)
            # One failing suite (a backend missing on this machine, say) must not lose the others.
            try:
                results += importlib.import_module(SUITES[suite]).run(device, dtype, quick=args.quick)
            except Exception:  # noqa: BLE001 - reported, and the exit status says so
                bar.write(traceback.format_exc().rstrip())
                failed.append(suite)
            bar.update(1)
    if peaks and device.type == "cpu":
        machine.remeasure_cpu_peak(peaks, dtype)
    where = info.get("gpu") or f"{info['cpu']} ({info['threads']} threads)"
    print(f"vlmfast {info['vlmfast']} on {where}, torch {info['torch']}, {str(dtype).removeprefix('torch.')}, {info['date']}")
    if peaks:
        print(f"measured peaks: {peaks['gemm_tflops']:.3g} TFLOP/s GEMM ({peaks.get('gemm_source', 'torch GEMM')}"
              + (f"; torch's GEMM {peaks['torch_gemm_tflops']:.3g}" if peaks.get("torch_gemm_tflops") else "")
              + f"), {peaks['copy_gbps']:.1f} GB/s copy")
    print(_format_table(results, peaks))
    print(f"{len(results)} results in {time.perf_counter() - started:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as f:
            for r in results:
                record = {**{k: v for k, v in vars(r).items()}, "speedup": r.speedup,
                          "device": device.type, "dtype": str(dtype), "machine": info, "peaks": peaks}
                f.write(json.dumps(record) + "\n")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmfast bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
