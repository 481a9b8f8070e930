"""The `loopscope` command line. Unusable input: one clear line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loopscope.bench.errors import LoopscopeError
from loopscope.bench.executors import executor_names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loopscope", description="Benchmark looped vs standard transformers "
                                "on this hardware: speed, memory, energy and quality.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a sweep profile into a run directory (resumes by default)")
    r.add_argument("--profile", help="profile name or path to a .toml (default: this machine's device class)")
    r.add_argument("--out", type=Path, help="run directory (default: runs/<profile>)")
    r.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="run only cells whose id, model, workload or label matches (repeatable)")
    r.add_argument("--dry-run", action="store_true", help="print the matrix with estimates and exit")
    r.add_argument("--trace", action="store_true", help="add a profiled pass (Chrome trace) per cell")
    r.add_argument("--retry-failed", action="store_true", help="rerun cells whose status is not ok")
    r.add_argument("--executor", choices=executor_names(), default="local",
                   help="where cells run: local (one process per cell here) or ray (a Ray cluster)")
    r.add_argument("--address", help="Ray cluster address for --executor ray (default: start one on this machine)")
    r.add_argument("--shard", metavar="I/N", help="run only shard I of N of the matrix (0-based); 'auto' or "
                   "'auto/N' read I (and N) from SLURM_ARRAY_TASK_ID/COUNT or JOB_COMPLETION_INDEX")
    r.add_argument("--no-report", action="store_true", help="skip writing the report at the end")

    mg = sub.add_parser("merge", help="combine the run directories of shards into one run")
    mg.add_argument("out", type=Path, help="the merged run directory (new or empty)")
    mg.add_argument("runs", type=Path, nargs="+", metavar="RUN")
    mg.add_argument("--no-report", action="store_true", help="skip writing the report of the merged run")

    rep = sub.add_parser("report", help="(re)write report.md, report.html and charts for a run")
    rep.add_argument("run", type=Path)

    c = sub.add_parser("compare", help="compare two runs metric by metric")
    c.add_argument("base", type=Path)
    c.add_argument("cand", type=Path)
    c.add_argument("--format", choices=["markdown", "csv", "json"], default="markdown")
    c.add_argument("--all-metrics", action="store_true",
                   help="compare raw metrics even when the two runs' hardware differs")

    g = sub.add_parser("gate", help="exit 1 if CAND regressed against BASE")
    g.add_argument("base", type=Path)
    g.add_argument("cand", type=Path)
    g.add_argument("--rules", type=Path, help="TOML rules per metric (default: shipped rules)")
    g.add_argument("--all-metrics", action="store_true",
                   help="gate raw metrics even when the two runs' hardware differs")

    sub.add_parser("profiles", help="list the shipped sweep profiles")
    m = sub.add_parser("models", help="list model families and presets with their accounting")
    m.add_argument("--matched", action="store_true", help="pair looped and dense presets (iso-param/FLOP/memory)")
    m.add_argument("--context", type=int, default=2048, help="context length for the iso-memory pairing")
    sub.add_parser("fingerprint", help="print this machine's fingerprint and device class")
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    from loopscope.bench.runner import RunOptions, run

    return run(RunOptions(profile=args.profile, out=args.out, only=tuple(args.only), dry_run=args.dry_run,
                          trace=args.trace, retry_failed=args.retry_failed, executor=args.executor,
                          report=not args.no_report, shard=args.shard, address=args.address))


def _cmd_merge(args: argparse.Namespace) -> int:
    from loopscope.bench.merge import merge_runs

    merged = merge_runs(args.out, args.runs, report=not args.no_report)
    print(f"merged {len(args.runs)} runs ({merged} cells) into {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from loopscope.reports.report import write_report

    paths = write_report(args.run)
    print(f"wrote {paths['md']} and {paths['html']}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from loopscope.reports.compare import compare_runs

    result = compare_runs(args.base, args.cand, all_metrics=args.all_metrics)
    print({"markdown": result.to_markdown, "csv": result.to_csv, "json": result.to_json}[args.format]())
    return 0


def _cmd_gate(args: argparse.Namespace) -> int:
    from loopscope.reports.gate import gate_runs

    result = gate_runs(args.base, args.cand, rules=args.rules, all_metrics=args.all_metrics)
    print(result.render())
    return result.exit_code


def _cmd_profiles(args: argparse.Namespace) -> int:
    from loopscope.profiles.loader import builtin_profiles, load_profile

    for name, path in sorted(builtin_profiles().items()):
        desc = load_profile(str(path)).settings.get("profile", {}).get("description", "")
        print(f"{name:16} {desc}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    import pandas as pd

    from loopscope.models import listing

    table = listing.matched_table(context=args.context) if args.matched else listing.models_table()
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
        print(table.to_string(index=False))
    return 0


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    import json

    from loopscope.bench.fingerprint import fingerprint
    from loopscope.profiles.detect import detect_device_class

    cls = detect_device_class()
    print(f"device class: {cls.name} ({cls.reason})")
    print(json.dumps(fingerprint(), indent=2, sort_keys=True, default=str))
    return 0


COMMANDS = {"run": _cmd_run, "merge": _cmd_merge, "report": _cmd_report, "compare": _cmd_compare, "gate": _cmd_gate,
            "profiles": _cmd_profiles, "models": _cmd_models, "fingerprint": _cmd_fingerprint}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LoopscopeError as err:
        for line in str(err).splitlines() or ["error"]:
            print(f"loopscope {args.command}: error: {line}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `loopscope gate A B | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"loopscope {args.command}: interrupted; finished cells are kept, rerun to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
