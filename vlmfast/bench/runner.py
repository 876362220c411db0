"""`vlmfast bench`: runs the suites, prints a table, appends JSON lines with the machine."""

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

from vlmfast.bench import machine
from vlmfast.bench.timing import Result

# Suite name -> module in vlmfast.bench with run(device, dtype, quick) -> list[Result].
SUITES = {"rotary": "vlmfast.bench.rotary"}
GROUPS = {"ops": ["rotary"], "models": [], "all": None}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suites", nargs="*", default=["ops"],
                        help=f"suites ({', '.join(SUITES)}) or groups ({', '.join(GROUPS)}); default: ops")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--json", type=Path, default=None, help="append results as JSON lines here")
    parser.add_argument("--quick", action="store_true", help="small shapes: checks that every suite runs")
    parser.add_argument("--no-peaks", action="store_true", help="skip measuring the machine's peaks")


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
    rows = []
    for r in results:
        percent = None
        if peaks and r.tflops:
            percent = 100 * r.tflops / peaks["gemm_tflops"]
        elif peaks and r.gbps:
            percent = 100 * r.gbps / peaks["copy_gbps"]
        rows.append([
            r.suite, r.case, f"{r.ms:.3f}", f"{r.gbps:.1f}" if r.gbps else "", f"{r.tflops:.1f}" if r.tflops else "",
            f"{percent:.0f}%" if percent else "", r.peer or "", f"{r.peer_ms:.3f}" if r.peer_ms else "",
            f"{r.speedup:.2f}x" if r.speedup else "",
        ])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("vlmfast bench: --device cuda but no CUDA device is available")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    info = machine.describe(device)
    peaks = None if args.no_peaks or args.quick else machine.measured_peaks(device, dtype)
    results = []
    for suite in _resolve(args.suites):
        results += importlib.import_module(SUITES[suite]).run(device, dtype, quick=args.quick)
    where = info.get("gpu") or f"{info['cpu']} ({info['threads']} threads)"
    print(f"vlmfast {info['vlmfast']} on {where}, torch {info['torch']}, {str(dtype).removeprefix('torch.')}, {info['date']}")
    if peaks:
        print(f"measured peaks: {peaks['gemm_tflops']:.1f} TFLOP/s GEMM, {peaks['copy_gbps']:.1f} GB/s copy")
    print(_format_table(results, peaks))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as f:
            for r in results:
                record = {**{k: v for k, v in vars(r).items()}, "speedup": r.speedup,
                          "device": device.type, "dtype": str(dtype), "machine": info, "peaks": peaks}
                f.write(json.dumps(record) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmfast bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
