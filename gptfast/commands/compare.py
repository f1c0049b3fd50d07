"""Compare every backend's kernels, and the whole model, with the float64 textbook math.

    python scripts/compare.py --quick                       # < 1 min on 2 CPU cores
    python scripts/compare.py --backend extension --dtype bfloat16
    python -m scripts.compare --device cuda --json results/compare_cuda.json

Every op of gptfast.ops at the cases its module lists (GPT-2 and edge shapes, strided views, dropout, KV cache,
ignore_index): the output and every input gradient against `reference` in float64. Then
the model: logits, loss and every parameter gradient, and a short training run's losses side by side.
Exit status: 0 all within tolerance, 1 any FAIL, 2 bad flags.
"""
from __future__ import annotations

import argparse
import os
import sys

from gptfast.cli import OneLineParser, positive_int
from gptfast.model import PRESETS
from gptfast.ops import BackendError, known_backends


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="compare.py", description="Compare each backend's ops and model with the float64 reference.")
    p.add_argument("--backend", default="",
                   help="NAME[,NAME...] or 'all' (default: every backend available here except reference); "
                        "known: " + ", ".join(known_backends()))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--preset", choices=list(PRESETS),
                   help="model of the model part (default: tiny with --quick, else cpu-small on CPU, book-124m on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive_int, help="steps of the short training run (default: 4 quick, 10 full)")
    p.add_argument("--quick", action="store_true", help="small shapes only (Triton's interpreter included)")
    p.add_argument("--json", metavar="PATH", help="also write every row, the loss curves and the environment here")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--ops-only", action="store_true", help="skip the model part")
    part.add_argument("--model-only", action="store_true", help="skip the op part")
    p.add_argument("--verbose", action="store_true", help="one table line per quantity, not per case")
    return p


def parse_backends(text: str) -> list[str]:
    if not text:
        return []
    if text == "all":
        from gptfast.compare import default_backends

        return default_backends()
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known_backends()]
    if unknown:
        raise BackendError(f"unknown backend {unknown[0]!r}; known: {', '.join(known_backends())}")
    return names


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from gptfast.compare import CompareSettings, curves_table, run_compare, table
    from gptfast.compare.report import use_colour

    try:
        settings = CompareSettings(backends=parse_backends(args.backend), device=args.device, dtype=args.dtype,
                                   preset=args.preset, seed=args.seed, quick=args.quick, steps=args.steps,
                                   ops=not args.model_only, model=not args.ops_only)
        report = run_compare(settings, echo=lambda line: print(line, flush=True))
    except (BackendError, ValueError) as err:
        print(f"compare.py: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print()
    print(table(report.rows, colour=use_colour(), verbose=args.verbose))
    if report.curves:
        print("\ntraining-run losses, step by step:")
        print(curves_table(report.curves))
    counts = {s: sum(r.status == s for r in report.rows) for s in ("PASS", "FAIL", "SKIP")}
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"(quantities checked) in {report.seconds:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(report.json())
        print(f"rows, curves and environment: {args.json}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
