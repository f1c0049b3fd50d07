"""Write gptfast/ops/auto_table.json, the `auto` backend's choices, from committed measurements.

    python benchmarks/make_auto_table.py                  # every bench_ops_*.json and compare_*.json here
    python benchmarks/make_auto_table.py --bench A.json B.json --compare C.json

Method: for every op (attention with and without dropout apart), device type and dtype, each gptfast
backend's forward+backward speed-up over `torch` (the forward's, for the inference-only linear
layers) is the geometric mean over the measured shapes
and machines (`bench_ops` medians, same run, interleaved). Backends are ranked by it; a backend other
than `torch` ranks above `torch` only with a speed-up of at least MIN_WIN (a win, not noise) - except
the fused LM head + loss, whose point is memory: it ranks above `torch` unless below FUSED_MIN. A
backend with any FAIL for that op in a `compare` run on that device type is left out, and so is
Triton on a CPU (its interpreter). The table names the machines, shapes and dates behind each row.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
from collections import defaultdict

from gptfast.ops.spec import OPS

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
TABLE = os.path.join(os.path.dirname(HERE), "gptfast", "ops", "auto_table.json")
BACKENDS = ("reference", "torch", "extension", "triton")      # what `auto` can dispatch to
MIN_WIN = 1.03
# The LM head fused with the loss never holds the (N, V) logits - at GPT-2's vocabulary that is its point
# (bench_ops' peak-memory rows: 3 GB less for a gpt2-124m step) - so a fused backend ranks above the
# unfused `torch` path unless measurably slower: below FUSED_MIN of its speed.
MEMORY_OPS = tuple(key for op in OPS.values() if op.memory_first for key in op.table_keys)
FUSED_MIN = 0.9
# from the op modules: the inference-only ops' rows (no backward: ranked by the forward), and which table rows a
# `compare` row of an op vetoes (attention's: both of its rows)
INFERENCE_OPS = tuple(op.name for op in OPS.values() if op.inference_only and op.bench is not None)
COMPARE_OPS = {op.name: list(op.table_keys) for op in OPS.values() if op.bench is not None}


def device_type(env: dict) -> str:
    return env.get("device_type") or ("cuda" if env.get("cuda") and "GPU" in str(env.get("device")).upper()
                                      else "cpu")


def vetoes(compare_files: list[str]) -> dict:
    """{(device type, dtype): {(op, backend)}} of backends that failed `compare` somewhere."""
    out = defaultdict(set)
    for path in compare_files:
        with open(path) as f:
            report = json.load(f)
        for row in report["rows"]:
            if row["status"] == "FAIL" and row["part"] == "op":
                for op in COMPARE_OPS.get(row["name"], []):
                    out[(report["device_type"], row["dtype"])].add((op, row["backend"]))
    return out


def build(bench_files: list[str], compare_files: list[str]) -> dict:
    speedups = defaultdict(lambda: defaultdict(list))           # (op, dev, dtype) -> backend -> [x torch]
    sources = defaultdict(lambda: {"machines": set(), "shapes": set(), "dates": set()})
    for path in bench_files:
        with open(path) as f:
            run = json.load(f)
        env = run["environment"]
        dev, dtype = device_type(env), env["dtype"].replace("torch.", "")
        by_case = defaultdict(dict)
        for r in run["results"]:
            # untimed rows (a backend checked for correctness only) carry NaN: no figure, no ranking
            ranked_mode = "fwd" if r["op"] in INFERENCE_OPS else "fwd+bwd"
            if r.get("mode") == ranked_mode and math.isfinite(r.get("median_ms", math.nan)):
                by_case[(r["op"], tuple(r["shape"]))][r["backend"]] = r["median_ms"]
        for (op, shape), times in by_case.items():
            if "torch" not in times:
                continue
            key = (op, dev, dtype)
            for backend, ms in times.items():
                if backend in BACKENDS and not (backend == "triton" and dev == "cpu"):
                    speedups[key][backend].append(times["torch"] / ms)
            sources[key]["machines"].add(env["device"])
            sources[key]["shapes"].add("x".join(map(str, shape)))
            sources[key]["dates"].add(env["date"][:10])
    bad = vetoes(compare_files)
    rows = []
    for (op, dev, dtype), per_backend in sorted(speedups.items()):
        ranking = []
        for backend, values in per_backend.items():
            if (op, backend) in bad.get((dev, dtype), set()):
                continue
            gm = math.exp(sum(math.log(v) for v in values) / len(values))
            ranking.append({"backend": backend, "vs_torch": round(gm, 3), "cases": len(values)})
        # torch first among near-ties: another backend must win by MIN_WIN to rank above it (a fused op that
        # saves memory: must not lose by more than FUSED_MIN)
        bar = FUSED_MIN if op in MEMORY_OPS else MIN_WIN
        if op in MEMORY_OPS:
            ranking.sort(key=lambda e: (e["backend"] != "torch" and e["vs_torch"] >= bar, e["vs_torch"]), reverse=True)
        else:
            ranking.sort(key=lambda e: (e["backend"] == "torch" or e["vs_torch"] >= bar, e["vs_torch"]), reverse=True)
        src = sources[(op, dev, dtype)]
        rows.append({"op": op, "device": dev, "dtype": dtype, "ranking": ranking,
                     "shapes": ", ".join(sorted(src["shapes"])), "measured_on": "; ".join(sorted(src["machines"])),
                     "date": max(src["dates"])})
    return {"method": "geometric-mean fwd+bwd speed-up over torch in bench_ops (interleaved medians; the forward "
                      "for the inference-only linear layers); "
                      f"a non-torch backend must win by {MIN_WIN}x (the fused LM head + loss, which holds no logits: "
                      f"must not lose by more than {FUSED_MIN}x); compare failures veto",
            "generated": datetime.date.today().isoformat(),
            "sources": sorted(os.path.relpath(p, os.path.dirname(HERE)) for p in bench_files + compare_files),
            "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", nargs="*", help="bench_ops JSON files (default: results/bench_ops_*.json, not quick)")
    p.add_argument("--compare", nargs="*", help="compare JSON files (default: results/compare_*.json)")
    p.add_argument("--out", default=TABLE)
    args = p.parse_args(argv)
    bench = args.bench if args.bench is not None else sorted(
        f for f in glob.glob(os.path.join(RESULTS, "bench_ops_*.json")) if "_quick" not in f)
    compare = args.compare if args.compare is not None else sorted(glob.glob(os.path.join(RESULTS, "compare_*.json")))
    table = build(bench, compare)
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1, allow_nan=False)      # strict JSON: a NaN here would never compare equal
        f.write("\n")
    for row in table["rows"]:
        best = row["ranking"][0] if row["ranking"] else {"backend": "-", "vs_torch": float("nan")}
        print(f"{row['op']:<21}{row['device']:<5}{row['dtype']:<9} -> {best['backend']:<10} "
              f"{best['vs_torch']:.2f}x torch  ({row['measured_on']}, {row['date']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
