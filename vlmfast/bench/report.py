"""`vlmfast bench --report`: the README's performance table from the recorded JSON lines.

Every run of `vlmfast bench --json FILE` appends one record per Result (runner.py). The report
keeps the latest record (by the machine's date) of each (suite, case, device) and prints a
Markdown table, one row per record: suite, case, the device and date it was measured on, vlmfast's
ms, the peer, the peer's ms, the speedup (peer ms / vlmfast ms) and the throughput (TFLOP/s or
GB/s). `plot` draws the speedups as bars with matplotlib (optional: not a dependency).
"""

import json
import sys
from pathlib import Path

# Where `--json` appends by default (relative to the working directory: the repository root when
# run from a checkout).
RESULTS_DIR = Path("benchmarks/results")
DEFAULT_JSON = RESULTS_DIR / "bench.jsonl"
# The records shipped with the source: <checkout>/benchmarks/results, next to the vlmfast package.
CHECKOUT_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
# What a benchmark record must hold to be a row (the runner writes them); the folder also keeps
# other measurements (python -m vlmfast.bench.finetune_runs), which the table leaves out.
RECORD_FIELDS = ("suite", "case", "ms")

HEADER = ["suite", "case", "device, date", "vlmfast ms", "peer", "peer ms", "speedup", "TFLOP/s or GB/s"]


def default_results() -> Path:
    """Where --report reads when --results is not given: ./benchmarks/results (a checkout's root),
    else the benchmarks/results of the checkout vlmfast was installed from (an editable install).
    FileNotFoundError naming both places when neither exists (a wheel ships no records)."""
    for candidate in (RESULTS_DIR, CHECKOUT_RESULTS):
        if candidate.is_dir() and any(candidate.glob("*.jsonl")):
            return candidate
    raise FileNotFoundError(
        f"no benchmark records found: looked in {RESULTS_DIR.resolve()} and {CHECKOUT_RESULTS} "
        "(a source checkout's benchmarks/results); pass --results FILE_OR_FOLDER with the JSON lines "
        "that `vlmfast bench --json FILE` writes")


def load(path: Path, *, warn=None) -> list[dict]:
    """Benchmark records of every *.jsonl file under `path` (or of the file `path`), in file order;
    blank lines skipped, a line that is not JSON raises ValueError naming the file and line.
    Lines that are JSON but no benchmark record (no suite, case, ms: finetune_runs' records) are
    left out; warn(message) (default: stderr) is told which files held them."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no JSON lines (*.jsonl) at {path}: run `vlmfast bench --json` first")
    records, other = [], {}
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{file}:{number}: not a JSON line ({error.msg})") from None
                if isinstance(record, dict) and all(k in record for k in RECORD_FIELDS):
                    records.append(record)
                else:
                    other[file.name] = other.get(file.name, 0) + 1
    if other:
        (warn or _stderr)("left out records that are not `vlmfast bench` results (no suite/case/ms): "
                          + ", ".join(f"{n} in {name}" for name, n in other.items()))
    if not records:
        raise FileNotFoundError(f"no `vlmfast bench` records at {path}: run `vlmfast bench --json FILE` first")
    return records


def _stderr(message: str) -> None:
    print(f"vlmfast bench --report: {message}", file=sys.stderr)


def device_name(record: dict) -> str:
    """The GPU's name, or the CPU's model and thread count."""
    machine = record.get("machine") or {}
    if machine.get("gpu"):
        return machine["gpu"]
    cpu = machine.get("cpu") or record.get("device") or "unknown"
    return f"{cpu} ({machine['threads']} threads)" if machine.get("threads") else cpu


def latest(records: list[dict]) -> list[dict]:
    """The latest record of each (suite, case, device), ordered by device, then by where each
    (suite, case) first appeared (the suites' own order)."""
    chosen, first_seen = {}, {}
    for index, record in enumerate(records):
        key = (device_name(record), record["suite"], record["case"])
        first_seen.setdefault(key, index)
        date = (record.get("machine") or {}).get("date") or ""
        # ">=": of two records with the same date, the later line wins.
        if key not in chosen or date >= ((chosen[key].get("machine") or {}).get("date") or ""):
            chosen[key] = record
    return [chosen[key] for key in sorted(chosen, key=lambda k: (k[0], first_seen[k]))]


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _throughput(record: dict) -> str:
    if record.get("tflops"):
        return f"{record['tflops']:.3g} TFLOP/s"
    if record.get("gbps"):
        return f"{record['gbps']:.3g} GB/s"
    return ""


def row(record: dict) -> list[str]:
    date = ((record.get("machine") or {}).get("date") or "")[:10]
    peer_ms = record.get("peer_ms")
    speedup = peer_ms / record["ms"] if peer_ms else None
    return [record["suite"], record["case"], f"{device_name(record)}, {date}" if date else device_name(record),
            _ms(record["ms"]), record.get("peer") or "", _ms(peer_ms),
            f"{speedup:.2f}x" if speedup else "", _throughput(record)]


def markdown(records: list[dict]) -> str:
    """The Markdown table of `latest(records)`."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for record in latest(records):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row(record)) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """Horizontal bars of vlmfast's speedup over its peer, one per (suite, case, device) with a
    peer; raises ImportError when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = [r for r in latest(records) if r.get("peer_ms")]
    labels = [f"{r['suite']}: {r['case']} ({device_name(r)})" for r in rows]
    speedups = [r["peer_ms"] / r["ms"] for r in rows]
    fig, ax = plt.subplots(figsize=(12, 0.3 * len(rows) + 1.2))
    ax.barh(range(len(rows)), speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speedup over the peer (peer ms / vlmfast ms, log scale)")
    ax.set_title("vlmfast against its peers, measured in the same run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
