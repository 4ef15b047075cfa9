"""The one table of benchmarks/gpu_check.sh, from the rows it ran.

    python benchmarks/gpu_check_table.py WORK ROWS_TSV DEVICE_NAME TORCH_VERSION TINY TOTAL_S

ROWS_TSV has one line per row: id, kind (pytest, train, extract, sample), label, command, status
("ok", "failed (...)", "timed out ...", "skipped (...)") and, for a row that ran, its seconds. Each row
that ran left WORK/<id>.log, and a benchmark row WORK/<id>.json and WORK/<id>.peak.json. Prints the table
and exits 1 when a row failed or timed out.
"""

from __future__ import annotations

import json
import os
import re
import sys


def load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def memory(work: str, row_id: str) -> str:
    peak = load(os.path.join(work, f"{row_id}.peak.json"))
    if not peak:
        return "-"
    if peak.get("gpu_bytes"):
        return f"{peak['gpu_bytes'] / 2**30:.2f} GiB GPU"
    return f"{peak['rss_bytes'] / 2**30:.2f} GiB RSS"


def pytest_result(work: str, row_id: str) -> str:
    with open(os.path.join(work, f"{row_id}.log"), errors="replace") as f:
        lines = [ln.strip() for ln in f if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    return lines[-1].strip("= ") if lines else "no pytest summary"


def table_rows(work: str, records: list[list[str]]) -> list[tuple[str, str, str, str, str, str]]:
    """(label, result, versus, peak memory, time, command) for each record of ROWS_TSV."""
    table, plain_ips = [], None
    for rec in records:
        row_id, kind, label, command, status = rec[:5]
        seconds = rec[5] + " s" if len(rec) > 5 else "-"
        result, versus, mem = status, "-", "-"
        data = load(os.path.join(work, f"{row_id}.json"))
        if status == "ok" or kind == "pytest" and status.startswith("failed"):
            mem = memory(work, row_id) if kind != "pytest" else "-"
            if kind == "pytest":
                result = pytest_result(work, row_id)
            elif kind == "train" and data:
                r = data["results"][0]
                key = "ours" if "ours" in r else "plain fp32 eager"
                ips = r[key]["img_per_s"]
                if key != "ours":
                    plain_ips = ips
                result = f"{ips:.2f} img/s (MFU {100 * r[key]['mfu']:.1f}%)"
                versus = f"{ips / plain_ips:.2f}x plain" if plain_ips else "no plain row"
            elif kind == "extract" and data:
                base = next(r for r in data["rows"] if r["method"] == "per-image baseline")
                ours = next(r for r in data["rows"] if r["method"] != "per-image baseline")
                result = f"{ours['img_s']:.2f} img/s"
                versus = f"{ours['img_s'] / base['img_s']:.2f}x per-image ({base['img_s']:.2f} img/s)"
            elif kind == "sample" and data:
                r = data["rows"][0]
                result = f"{r['images_per_s']:.2f} img/s"
                versus = f"{r['nfe_per_image']} NFE/img"
            elif status == "ok":
                result = "ok, but no JSON written"
        table.append((label, result, versus, mem, seconds, command))
    return table


def render(table: list[tuple], device_name: str, torch_version: str, tiny: bool, total_s: str) -> tuple[str, list[str]]:
    """The printed table, and the labels of the rows that failed or timed out."""
    out = [f"\nGPU check{' (--tiny)' if tiny else ''}: {device_name}; torch {torch_version}; {total_s} s in all"]
    head = ("row", "result", "vs", "peak memory", "time", "command")
    widths = [max(len(str(r[i])) for r in table + [head]) for i in range(5)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  " + head[5]
    out += [line, "-" * len(line)]
    out += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) + "  " + r[5] for r in table]
    failed = [r[0] for r in table if r[1].startswith(("failed", "timed out")) or re.search(r"\d+ (failed|error)", r[1])]
    if failed:
        out.append(f"\n{len(failed)} row(s) failed or timed out: {', '.join(failed)} (logs: --out DIR keeps them)")
    return "\n".join(out), failed


def main(argv: list[str]) -> int:
    work, rows_path, device_name, torch_version, tiny, total_s = argv[:6]
    with open(rows_path) as f:
        records = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    text, failed = render(table_rows(work, records), device_name, torch_version, tiny == "1", total_s)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
