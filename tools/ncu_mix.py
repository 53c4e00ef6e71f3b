"""Where a kernel's instructions go, from Nsight Compute's source page exported as CSV
(`ncu --import R.ncu-rep --page source --csv --print-source sass`, as benchmarks/ncu_forward.sh
writes it): executed warp instructions by opcode, warp stall reasons, and executed instructions by
ranges of SASS addresses (loops show up as hot ranges; their opcode mix says which loop it is).

    python tools/ncu_mix.py gpu_out/forward_float32_source.csv [--range 100] [--top 20]
"""
import argparse
import collections
import csv
import re


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def opcode(sass):
    """The opcode of one SASS line, without its predicate (`@!P0 LDS R1, ...` -> `LDS`)."""
    return re.sub(r"^@!?U?P\w+\s+", "", sass.strip()).split(" ")[0]


def read(path):
    """(header, rows) of the CSV: its first line names the kernel, the second holds the columns."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    return (lines[1], lines[2:]) if len(lines) > 1 else ([], [])


def report(path, span=100, top=20):
    header, rows = read(path)
    col = {name: i for i, name in enumerate(header)}
    if "Instructions Executed" not in col or "Source" not in col:
        raise SystemExit(f"{path}: no 'Source' and 'Instructions Executed' columns: not the source page of ncu as CSV")
    executed = [number(r[col["Instructions Executed"]]) for r in rows]
    ops = [opcode(r[col["Source"]]) for r in rows]
    total = sum(executed) or 1.0
    out = [f"executed warp instructions: {total:,.0f}"]
    by_op = collections.Counter()
    for op, n in zip(ops, executed):
        by_op[op] += n
    out += [f"  {op:22s} {n / 1e6:8.2f}M {100 * n / total:5.1f}%" for op, n in by_op.most_common(top)]
    stalls = {name: sum(number(r[i]) for r in rows) for name, i in col.items()
              if name.startswith("stall_") and "Not Issued" not in name}
    all_stalls = sum(stalls.values()) or 1.0
    out.append("warp stall samples:")
    out += [f"  {name:26s} {100 * v / all_stalls:5.1f}%"
            for name, v in sorted(stalls.items(), key=lambda item: -item[1])[:12]]
    out.append(f"by address range ({span} SASS lines each; ranges under 0.5% left out):")
    for start in range(0, len(rows), span):
        end = min(start + span, len(rows))
        n = sum(executed[start:end])
        if n < 0.005 * total:
            continue
        mix = collections.Counter()
        for op, k in zip(ops[start:end], executed[start:end]):
            mix[op] += k
        shown = ", ".join(f"{op} {k / 1e6:.1f}M" for op, k in mix.most_common(6))
        out.append(f"  lines {start:5d}-{end - 1:5d} {n / 1e6:7.2f}M {100 * n / total:5.1f}% | {shown}")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", help="source-page CSV files of ncu")
    p.add_argument("--range", type=int, default=100, help="SASS lines per address range")
    p.add_argument("--top", type=int, default=20, help="opcodes listed")
    args = p.parse_args(argv)
    for path in args.csv:
        print(f"== {path}")
        print(report(path, args.range, args.top))


if __name__ == "__main__":
    main()
