"""The `loopscope` command line. Unusable input: one clear line on stderr and exit code 2.

Exit codes: 0 done; 1 the gate found a regression; 2 unusable input (profile, run directory, argument,
a disk that cannot be written); 3 the run finished but some cells are not ok; 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from loopscope.bench.errors import LoopscopeError
from loopscope.bench.executors import executor_names

EXIT_INTERRUPTED = 130
EXIT_CODES = ("exit codes: 0 done (for gate: no regression); 1 gate only: a regression; "
              "2 unusable input (bad profile, run directory, rules or arguments), one line on stderr; "
              "3 run only: some cells are not ok; 130 interrupted")
RUN_ARG = ("a run directory (written by `loopscope run`) or a pytest-benchmark JSON file "
           "(pytest --benchmark-json)")


class _OneLineParser(argparse.ArgumentParser):
    """A bad argument is one line on stderr (not the usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


def _run_dir_arg(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty: give a run directory")
    return Path(text)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"loopscope {version('loopscope')}"
    except PackageNotFoundError:
        return "loopscope (not installed: version unknown)"


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="loopscope", description="Benchmark looped vs standard transformers "
                       "on this hardware: speed, memory, energy and quality.", epilog=EXIT_CODES)
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a sweep profile into a run directory (resumes by default)",
                       description="Expand a profile into cells and run each in its own process; finished cells "
                                   "are kept, so rerunning resumes. Progress goes to stdout with an ETA from the "
                                   "cells' estimates.", epilog=EXIT_CODES)
    r.add_argument("--profile", help="profile name or path to a .toml (default: this machine's device class)")
    r.add_argument("--out", type=_run_dir_arg, help="run directory (default: runs/<profile>)")
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
    r.add_argument("--allow-profile-change", action="store_true",
                   help="resume a run directory made with another profile: keep the cells both share and "
                        "drop the others from the tables")

    rp = sub.add_parser("repeat", help="run one profile into each directory read from stdin, keeping one worker "
                        "fork server (the A/B gate's repetitions)",
                        description="Read run directories from stdin, one per line, and run PROFILE into each "
                                    "(no report), every cell in a fresh worker forked from one server. stdout "
                                    "carries only the replies: `ready S` once, then `done RC` or `error MESSAGE` "
                                    "per directory.", epilog=EXIT_CODES)
    rp.add_argument("--profile", required=True, help="profile name or path to a .toml")

    mg = sub.add_parser("merge", help="combine the run directories of shards into one run",
                        epilog=EXIT_CODES)
    mg.add_argument("out", type=_run_dir_arg, help="the merged run directory (new or empty)")
    mg.add_argument("runs", type=Path, nargs="+", metavar="RUN")
    mg.add_argument("--no-report", action="store_true", help="skip writing the report of the merged run")

    rep = sub.add_parser("report", help="(re)write report.md, report.html and charts for a run",
                         description="Write RUN/report.md, RUN/report.html and RUN/charts/*.png|svg: the findings "
                                     "first, then the run, charts and tables.", epilog=EXIT_CODES)
    rep.add_argument("run", type=_run_dir_arg, help="a run directory written by `loopscope run`")
    rep.add_argument("--format", choices=["html", "json"], default="html",
                     help="html: write the report files (default); json: print the findings and the rows "
                          "flagged invalid to stdout, write nothing")

    c = sub.add_parser("compare", help="compare two runs metric by metric",
                       description="Compare CAND against BASE cell by cell (cells matched by id, else by axes); "
                                   "each metric gets a ratio, a 95%% CI where samples allow, and a verdict.",
                       epilog=EXIT_CODES)
    c.add_argument("base", type=Path, help=f"the baseline: {RUN_ARG}")
    c.add_argument("cand", type=Path, help=f"the candidate: {RUN_ARG}")
    c.add_argument("--format", choices=["markdown", "csv", "json"], default="markdown",
                   help="output format (default: markdown)")
    c.add_argument("--changed", action="store_true",
                   help="show only rows whose verdict is better, worse or changed (the counts stay in a note)")
    c.add_argument("--all-metrics", action="store_true",
                   help="compare raw metrics even when the two runs' hardware differs")

    g = sub.add_parser("gate", help="exit 1 if CAND regressed against BASE (or, with --against REF, if this "
                       "checkout is slower than commit REF, both timed here, interleaved)",
                       description="Judge CAND against BASE with the gate rules and print the verdicts; or, with "
                                   "--against REF, time commit REF and this checkout here in interleaved fresh "
                                   "processes and judge their timing cells against a measured noise floor.",
                       epilog=EXIT_CODES)
    g.add_argument("base", type=Path, nargs="?", help=f"the baseline: {RUN_ARG}")
    g.add_argument("cand", type=Path, nargs="?", help=f"the candidate: {RUN_ARG}")
    g.add_argument("--base", dest="base_runs", action="append", default=[], type=Path, metavar="RUN",
                   help="another base run (repeatable): several runs per side are process-level replicates, "
                   "across which timing is judged with a measured noise floor")
    g.add_argument("--cand", dest="cand_runs", action="append", default=[], type=Path, metavar="RUN",
                   help="another candidate run (repeatable)")
    g.add_argument("--against", metavar="REF", help="A/B mode: time base commit REF and this working tree "
                   "in interleaved fresh processes and judge their timing cells")
    g.add_argument("--profile", default="ci", help="A/B mode: the profile whose timing cells are run")
    g.add_argument("--budget-s", type=float, default=480.0, help="A/B mode: time budget (default 480)")
    g.add_argument("--min-blocks", type=int, default=2, help="A/B mode: at least this many blocks (ABBAAB or BAABBA)")
    g.add_argument("--tolerance", type=float, default=0.05, help="A/B mode: accepted slowdown (default 0.05)")
    g.add_argument("--seed", type=int, help="A/B mode: seed of the block orders (default: random)")
    g.add_argument("--keep", type=Path, help="A/B mode: keep the checkout and every run under this folder")
    g.add_argument("--rules", type=Path, help="TOML rules per metric (default: shipped rules)")
    g.add_argument("--all-metrics", action="store_true",
                   help="gate raw metrics even when the two runs' hardware differs")

    e = sub.add_parser("export", help="write a run's timings in another tool's format",
                       description="Write RUN's timing metrics (those with raw samples) as a pytest-benchmark "
                                   "JSON document, for pytest-benchmark compare or its CI integrations.",
                       epilog=EXIT_CODES)
    e.add_argument("run", type=Path, help="a run directory written by `loopscope run`")
    e.add_argument("--format", choices=["pytest-benchmark"], default="pytest-benchmark", help="the output format")
    e.add_argument("--out", type=Path, help="output file (default: RUN/pytest-benchmark.json)")

    h = sub.add_parser("history", help="many runs in one table and a trend chart per gated metric",
                       description="Collect runs (one per commit or machine) into one table and one trend "
                                   "chart per gated metric; cells are followed by their cell id.",
                       epilog=EXIT_CODES)
    h.add_argument("runs", type=Path, nargs="+", metavar="RUN", help=f"two or more runs: {RUN_ARG}")
    h.add_argument("--out", type=Path, default=Path("history"),
                   help="folder for history.md, history.csv and history_<metric>.png (default: ./history)")

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
                          report=not args.no_report, allow_profile_change=args.allow_profile_change,
                          shard=args.shard, address=args.address))


def _cmd_repeat(args: argparse.Namespace) -> int:
    from loopscope.bench.repeat import main as repeat

    return repeat(args.profile)


def _cmd_merge(args: argparse.Namespace) -> int:
    from loopscope.bench.merge import merge_runs

    merged = merge_runs(args.out, args.runs, report=not args.no_report)
    emit(f"merged {len(args.runs)} runs ({merged} cells) into {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from loopscope.reports.report import findings_json, write_report

    if args.format == "json":
        import json

        emit(json.dumps(findings_json(args.run), indent=2, default=str, allow_nan=False))
        return 0
    paths = write_report(args.run)
    emit(f"wrote {paths['md']} and {paths['html']}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from loopscope.reports.compare import compare_runs

    result = compare_runs(args.base, args.cand, all_metrics=args.all_metrics)
    result = result.changed_only() if args.changed else result
    emit({"markdown": result.to_markdown, "csv": result.to_csv, "json": result.to_json}[args.format]())
    return 0


def _cmd_gate(args: argparse.Namespace) -> int:
    from loopscope.reports.gate import gate_runs

    if args.against:
        from loopscope.reports.abgate import ABGateError, ab_gate

        if args.base or args.cand or args.base_runs or args.cand_runs:
            raise ABGateError("give either --against REF or runs to gate, not both")
        ab = ab_gate(args.against, profile=args.profile, budget_s=args.budget_s, min_blocks=args.min_blocks,
                     tolerance=args.tolerance, seed=args.seed, keep=args.keep,
                     log=lambda line: print(line, flush=True))
        emit(ab.render())
        return ab.exit_code
    bases = ([args.base] if args.base else []) + args.base_runs
    cands = ([args.cand] if args.cand else []) + args.cand_runs
    if not bases or not cands:
        from loopscope.bench.errors import ConfigError

        raise ConfigError("gate: give BASE and CAND (runs or pytest-benchmark files; more with --base/--cand), "
                          "or --against REF")
    result = gate_runs(bases, cands, rules=args.rules, all_metrics=args.all_metrics)
    emit(result.render())
    return result.exit_code


def _cmd_export(args: argparse.Namespace) -> int:
    from loopscope.reports.pytest_benchmark import export_pytest_benchmark

    out = args.out or args.run / "pytest-benchmark.json"
    export = export_pytest_benchmark(args.run, out)
    print(f"wrote {out}: {len(export.document['benchmarks'])} benchmark(s)"
          + (f"; {len(export.skipped)} timing row(s) left out (no raw samples)" if export.skipped else ""))
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    from loopscope.reports.history import write_history

    history, charts = write_history(list(args.runs), args.out)
    print(history.to_markdown())
    print(f"wrote {args.out / 'history.md'}, {args.out / 'history.csv'} and {len(charts)} trend chart(s)")
    return 0


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


COMMANDS = {"run": _cmd_run, "repeat": _cmd_repeat, "merge": _cmd_merge, "report": _cmd_report, "compare": _cmd_compare,
            "gate": _cmd_gate, "export": _cmd_export, "history": _cmd_history,
            "profiles": _cmd_profiles, "models": _cmd_models, "fingerprint": _cmd_fingerprint}


def emit(text: str) -> None:
    """Print a command's output; a reader that left early (`| head`) does not change the exit code."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's last flush cannot fail again


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LoopscopeError as err:
        for line in str(err).splitlines() or ["error"]:
            print(f"loopscope {args.command}: error: {line}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output that emit() did not guard; the result is unknown, so never 0
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1 if args.command == "gate" else 2
    except OSError as err:  # e.g. a full disk while drawing a chart: one line, not a traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"loopscope {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loopscope {args.command}: interrupted; finished cells are kept, rerun to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
