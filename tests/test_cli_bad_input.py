"""Malformed profiles, run directories and arguments: each gives exit 2 and exactly one stderr line
naming what is wrong, never a traceback. Adding a case is one line in CASES.

A case is (id, files, args, expected): `files` maps paths (relative to a fresh directory) to their text,
`args` is the command line with `{d}` standing for that directory, and `expected` is a piece of the one
stderr line (the file, key or value at fault).
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from loopscope.bench.cli import main

SWEEP = '[[sweep]]\nmodel = "gpt-micro"\nworkload = "train"\n'
EVAL_SWEEP = '[[sweep]]\nmodel = "gpt-micro"\nworkload = ["train", "eval"]\n'
FINGERPRINT = {"cpu": {"model": "test"}, "device_class": "cpu"}


def prof(toml: str, sweep: str = SWEEP) -> dict[str, str]:
    """A profile p.toml: the given settings plus one sweep."""
    return {"p.toml": toml + "\n" + sweep}


def run_dir(cell: str | None = None, manifest: str | None = None, cell_id: str = "abc123") -> dict[str, str]:
    """A run directory r/ with a manifest naming one cell, and that cell's file holding `cell`."""
    files = {"r/manifest.json": manifest if manifest is not None else json.dumps(
        {"run_id": "r", "fingerprint": FINGERPRINT, "cell_ids": [cell_id]})}
    if cell is not None:
        files[f"r/cells/{cell_id}.json"] = cell
    return files


RUN = ["run", "--profile", "{d}/p.toml", "--dry-run"]
RUN_REAL = ["run", "--profile", "{d}/p.toml", "--out", "{d}/out", "--no-report"]
GOOD_ROW = {"cell_id": "abc123", "metric": "x", "value": 1.0, "status": "ok"}

CASES: list[tuple[str, dict[str, str], list[str], str]] = [
    # --- profiles: types, ranges, structure ---
    ("extends-int", prof("[profile]\nextends = 5"), RUN, "profile.extends = 5"),
    ("extends-list", prof('[profile]\nextends = ["ci"]'), RUN, "profile.extends = ['ci']"),
    ("extends-empty", prof('[profile]\nextends = ""'), RUN, "profile.extends = ''"),
    ("extends-unknown", prof('[profile]\nextends = "no-such-profile"'), RUN, "no-such-profile"),
    ("batch-negative", prof("[train]\nbatch = -1"), RUN, "train.batch = -1"),
    ("batch-zero", prof("[train]\nbatch = 0"), RUN, "train.batch = 0"),
    ("seq-len-negative", prof("[train]\nseq_len = -8"), RUN, "train.seq_len = -8"),
    ("sweep-batch-zero", prof("", SWEEP + "batch = 0\n"), RUN, "batch = 0"),
    ("sweep-seq-len-negative", prof("", SWEEP + "seq_len = [16, -1]\n"), RUN, "seq_len = -1"),
    ("sweep-loops-zero", prof("", SWEEP.replace('"train"', '"prefill"') + "loops_test = 0\n"), RUN,
     "loops_test = 0"),
    ("sweep-lr-nan", prof("", SWEEP + "lr = nan\n"), RUN, "lr = nan"),
    ("memory-nan", prof("[profile]\nmemory_limit_gb = nan"), RUN, "memory_limit_gb = nan"),
    ("memory-inf", prof("[profile]\nmemory_limit_gb = inf"), RUN, "memory_limit_gb = inf"),
    ("memory-negative", prof("[profile]\nmemory_limit_gb = -1"), RUN, "memory_limit_gb = -1"),
    ("tokens-negative", prof("[train]\ntokens = -5000"), RUN, "train.tokens = -5000"),
    ("threads-negative", prof("[profile]\nthreads = -1"), RUN, "profile.threads = -1"),
    ("timeout-negative", prof("[profile]\ntimeout_s = -5"), RUN, "profile.timeout_s = -5"),
    ("timeout-zero", prof("[profile]\ntimeout_s = 0"), RUN, "profile.timeout_s = 0"),
    ("seed-negative", prof("[profile]\nseed = -1"), RUN, "profile.seed = -1"),
    ("lr-zero", prof("[train]\nlr = 0.0"), RUN, "train.lr = 0.0"),
    ("warmup-frac", prof("[train]\nwarmup_frac = 1.5"), RUN, "train.warmup_frac = 1.5"),
    ("cooldown-frac", prof("[train]\ncooldown_frac = -0.1"), RUN, "train.cooldown_frac = -0.1"),
    ("grad-clip", prof("[train]\ngrad_clip = -1.0"), RUN, "train.grad_clip = -1.0"),
    ("betas-short", prof("[train]\nbetas = [0.9]"), RUN, "train.betas = [0.9]"),
    ("betas-range", prof("[train]\nbetas = [0.9, 1.0]"), RUN, "train.betas = 1.0"),
    ("spike-factor", prof("[train]\nspike_factor = 1.0"), RUN, "train.spike_factor = 1.0"),
    ("muon-momentum", prof("[train]\nmuon_momentum = 1.0"), RUN, "train.muon_momentum = 1.0"),
    ("log-every", prof("[train]\nlog_every = 0"), RUN, "train.log_every = 0"),
    ("checkpoint-every", prof("[train]\ncheckpoint_every = -1"), RUN, "train.checkpoint_every = -1"),
    ("tokens-per-param", prof("[train]\ntokens_per_param = -1.0"), RUN, "train.tokens_per_param = -1.0"),
    ("eval-seeds", prof("[eval]\nseeds = 0", EVAL_SWEEP), RUN, "eval.seeds = 0"),
    ("eval-max-tokens", prof("[eval]\nmax_tokens = 0", EVAL_SWEEP), RUN, "eval.max_tokens = 0"),
    ("eval-stride-zero", prof("[eval]\nstride = 0", EVAL_SWEEP), RUN, "eval.stride = 0"),
    ("eval-stride-long", prof("[eval]\nstride = 512\nseq_len = 64", EVAL_SWEEP), RUN, "eval.stride = 512"),
    ("eval-window-long", prof("[eval]\nmax_tokens = 10\nseq_len = 64", EVAL_SWEEP), RUN, "eval.max_tokens = 10"),
    ("min-count", prof("[measure]\nmin_count = 0"), RUN, "measure.min_count = 0"),
    ("energy-window", prof("[measure]\nenergy_window_s = 0"), RUN, "measure.energy_window_s = 0"),
    ("decode-new-tokens", prof("[decode]\nnew_tokens = 0"), RUN, "decode.new_tokens = 0"),
    ("decode-prompt", prof("[decode]\nprompt_len = -3"), RUN, "decode.prompt_len = -3"),
    ("max-bytes", prof("[data]\nmax_bytes = 0"), RUN, "data.max_bytes = 0"),
    ("batch-string", prof('[train]\nbatch = "8"'), RUN, "train.batch = '8'"),
    ("unknown-key", prof("[train]\nbatchsize = 8"), RUN, "train.batchsize"),
    ("unknown-section", prof("[trian]\nbatch = 8"), RUN, "[trian]"),
    ("toml-syntax", {"p.toml": "[profile\nseed = 1\n"}, RUN, "TOML syntax error"),
    ("no-sweep", {"p.toml": "[profile]\nseed = 1\n"}, RUN, "[[sweep]]"),
    ("unknown-preset", prof("", SWEEP.replace("gpt-micro", "gpt-nope")), RUN, "gpt-nope"),
    ("unknown-workload", prof("", SWEEP.replace('"train"', '"fly"')), RUN, "'fly'"),
    ("model-name-newline", prof('[models."a\\nb"]\npreset = "gpt-micro"'), RUN, "printable"),
    ("profile-missing", {}, ["run", "--profile", "{d}/none.toml", "--dry-run"], "none.toml: not found"),
    ("profile-unknown-name", {}, ["run", "--profile", "no-such-name", "--dry-run"], "unknown profile"),
    ("only-matches-nothing", prof(""), [*RUN, "--only", "zzz-nothing"], "matches no cell"),
    # --- corpora (refused before any cell runs) ---
    ("corpus-empty-file", {**prof('[data]\ncorpus = "{d}/empty.txt"'), "empty.txt": ""}, RUN_REAL, "empty.txt"),
    ("corpus-no-match", prof('[data]\ncorpus = "{d}/nothing-*.txt"'), RUN_REAL, "no file matches"),
    ("eval-longer-than-heldout", {**prof('[data]\ncorpus = "{d}/small.txt"\n[train]\nseq_len = 128',
                                         EVAL_SWEEP), "small.txt": "abc " * 500}, RUN_REAL, "held-out"),
    # --- run directories ---
    ("cell-not-a-record", run_dir('{"hello": "world"}'), ["report", "{d}/r"], "abc123.json: not a cell record"),
    ("cell-a-list", run_dir("[1, 2, 3]"), ["report", "{d}/r"], "expected a JSON object, got list"),
    ("cell-truncated", run_dir('{"cell_id": "abc'), ["report", "{d}/r"], "unreadable JSON"),
    ("cell-wrong-id", run_dir(json.dumps({"cell_id": "other", "status": "ok", "rows": []})),
     ["report", "{d}/r"], "does not match the file name"),
    ("cell-rows-not-list", run_dir(json.dumps({"cell_id": "abc123", "status": "ok", "rows": 5})),
     ["report", "{d}/r"], "'rows' is not a list"),
    ("cell-value-text", run_dir(json.dumps({"cell_id": "abc123", "status": "ok",
                                            "rows": [{**GOOD_ROW, "value": "abc"}]})),
     ["report", "{d}/r"], "not numeric"),
    ("gate-cell-not-a-record", run_dir('{"hello": "world"}'), ["gate", "{d}/r", "{d}/r"], "not a cell record"),
    ("compare-cell-a-list", run_dir("[1, 2, 3]"), ["compare", "{d}/r", "{d}/r"], "not a cell record"),
    ("manifest-truncated", run_dir(manifest='{"run_id": "r", "finger'), ["report", "{d}/r"], "manifest.json"),
    ("manifest-a-list", run_dir(manifest="[1]"), ["report", "{d}/r"], "manifest.json"),
    ("manifest-cell-ids", run_dir(manifest='{"run_id": "r", "fingerprint": {}, "cell_ids": 5}'),
     ["gate", "{d}/r", "{d}/r"], "cell_ids"),
    ("manifest-missing", {"r/cells/x.json": "{}"}, ["report", "{d}/r"], "manifest.json"),
    ("run-dir-missing", {}, ["report", "{d}/nope"], "no such run directory"),
    ("run-dir-a-file", {"f.txt": "x"}, ["gate", "{d}/f.txt", "{d}/f.txt"], "not a run directory"),
    ("resume-truncated-manifest", {**prof(""), "out/manifest.json": '{"run_id": "out", "prof'}, RUN_REAL,
     "manifest.json: unreadable"),
    ("resume-other-profile", {**prof(""), "out/manifest.json": json.dumps(
        {"run_id": "out", "profile": {"path": "old.toml", "hash": "0123456789abcdef"}})}, RUN_REAL,
     "hash 0123456789abcdef"),
    ("resume-fingerprint-not-object", {**prof(""), "out/manifest.json": '{"run_id": "out", "fingerprint": 5}'},
     RUN_REAL, "'fingerprint' = 5"),
    # --- arguments ---
    ("out-empty", prof(""), ["run", "--profile", "{d}/p.toml", "--out", ""], "--out"),
    ("report-empty", {}, ["report", ""], "empty"),
    ("executor-unknown", prof(""), [*RUN, "--executor", "slurm"], "--executor"),
    ("option-unknown", {}, ["run", "--bogus"], "--bogus"),
    ("gate-one-run", {}, ["gate", "{d}"], "give BASE and CAND"),
    ("no-command", {}, [], "required"),
    ("models-context-text", {}, ["models", "--context", "abc"], "--context"),
]


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(("files", "args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, files: dict[str, str], args: list[str],
                                          expected: str) -> None:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("{d}", str(tmp_path)))
    code, _, err = _cli([a.replace("{d}", str(tmp_path)) for a in args])
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert expected in lines[0], lines[0]


def test_there_are_at_least_forty_cases() -> None:
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)
