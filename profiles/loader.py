"""Load and validate sweep profiles (TOML) completely before anything runs.

A profile reads like a table: `[profile]` (run-wide settings), one table per workload's settings
(`[data]`, `[train]`, `[eval]`, `[measure]`, `[decode]`), optional `[models.NAME]` tables that
derive a model from a preset, and `[[sweep]]` entries whose list-valued axes expand into cells.
Every problem is collected and reported together, each naming the file and the key.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from loopscope.bench.backends import BACKENDS as BACKEND_SPECS
from loopscope.bench.backends import canonical_backend
from loopscope.bench.errors import ConfigError

NUM = (int, float)
# section -> key -> accepted python types. A key absent here is an error.
SETTINGS_SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "profile": {"description": (str,), "extends": (str,), "seed": (int,), "timeout_s": NUM,
                "memory_limit_gb": NUM, "device": (str,), "calibration": (str,), "threads": (int,),
                "trace": (bool,), "numba_threading": (str,)},
    "data": {"corpus": (str,), "max_bytes": (int,), "tokenizer": (str,)},
    "train": {"tokens": (int,), "tokens_per_param": NUM, "flops": NUM, "batch": (int,),
              "seq_len": (int,), "lr": NUM, "warmup_frac": NUM, "cooldown_frac": NUM,
              "weight_decay": NUM, "grad_clip": NUM, "betas": (list,), "log_every": (int,),
              "checkpoint_every": (int,), "spike_factor": NUM, "optimizer": (str,),
              "muon_momentum": NUM, "world_size": (int,), "parallel": (str,)},
    "eval": {"seq_len": (int,), "max_tokens": (int,), "stride": (int,), "seeds": (int,),
             "batch": (int,)},
    "measure": {"min_time_s": NUM, "min_count": (int,), "warmup": (int,), "energy": (bool,),
                "memory": (bool,), "energy_window_s": NUM},
    "decode": {"prompt_len": (int,), "new_tokens": (int,)},
}
# Axes a [[sweep]] entry may list; a scalar is a one-element list.
AXES: dict[str, tuple[type, ...]] = {
    "model": (str,), "workload": (str,), "backend": (str,), "device": (str,), "dtype": (str,),
    "batch": (int,), "seq_len": (int,), "loops_test": (int,), "kv_policy": (str,), "lr": NUM,
    "seeds": (int,),  # training seeds: each model trains (and is evaluated) once per seed
    "tokens": (int,),  # this sweep's training budget: replaces [train] tokens, tokens_per_param and flops
}


@dataclass(frozen=True)
class Range:
    """The accepted values of a numeric key: lo..hi, each end closed unless marked open; never NaN or inf."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    @property
    def text(self) -> str:
        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() and abs(v) < 1e16 else f"{v:g}"
        return f"{'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


_POS = Range(0, 1e30, lo_open=True)  # any finite positive number
_FRAC = Range(0, 1)
_COUNT = Range(1, 2**31 - 1)
# section -> key -> accepted range. Every numeric key of SETTINGS_SCHEMA has one (a test checks it).
RANGES: dict[str, dict[str, Range]] = {
    "profile": {"seed": Range(0, 2**32 - 1), "timeout_s": Range(0, 30 * 86400, lo_open=True),
                "memory_limit_gb": Range(0, 1e6, lo_open=True), "threads": Range(0, 4096)},  # threads 0: defaults
    "data": {"max_bytes": Range(1, 2**50)},
    "train": {"tokens": Range(1, 1e18), "tokens_per_param": _POS, "flops": _POS, "batch": Range(1, 65536),
              "seq_len": Range(1, 2**20), "lr": Range(0, 10, lo_open=True), "warmup_frac": _FRAC,
              "cooldown_frac": _FRAC, "weight_decay": Range(0, 10), "grad_clip": Range(0, 1e6, lo_open=True),
              "betas": Range(0, 1, hi_open=True), "log_every": _COUNT, "checkpoint_every": Range(0, 2**31 - 1),
              "spike_factor": Range(1, 1e6, lo_open=True), "muon_momentum": Range(0, 1, hi_open=True),
              "world_size": Range(1, 4096)},
    "eval": {"seq_len": Range(1, 2**20), "max_tokens": Range(1, 1e15), "stride": Range(1, 2**20),
             "seeds": Range(1, 1000), "batch": Range(1, 65536)},
    "measure": {"min_time_s": Range(0, 86400), "min_count": Range(1, 10_000), "warmup": Range(0, 10_000),
                "energy_window_s": Range(0, 3600, lo_open=True)},
    "decode": {"prompt_len": Range(1, 2**20), "new_tokens": Range(1, 2**20)},
}
AXIS_RANGES: dict[str, Range] = {"batch": Range(1, 65536), "seq_len": Range(1, 2**20), "seeds": Range(0, 2**32 - 1),
                                 "tokens": Range(1, 1e18),
                                 "loops_test": Range(1, 4096), "lr": Range(0, 10, lo_open=True)}
# Keys whose values are checked beyond their type: (section, key) -> (test, what a good value is).
VALUE_RULES: dict[tuple[str, str], tuple[Any, str]] = {
    ("train", "parallel"): (lambda v: v in ("auto", "ddp", "fsdp"), "must be one of auto, ddp, fsdp"),
}
SWEEP_KEYS = set(AXES) | {"name", "include", "exclude"}
WORKLOADS = ("train", "eval", "prefill", "decode", "kernels")
BACKENDS = tuple(BACKEND_SPECS)  # one spelling each; aliases are normalised when a profile is loaded
DTYPES = ("float32", "bfloat16", "float16")
KV_POLICIES = ("per-loop", "last-loop")
OPTIMIZERS = ("adamw", "muon")  # train.optimizer; bench/workloads/optimizers.py builds them


@dataclass(frozen=True)
class Profile:
    name: str
    path: str
    settings: dict[str, dict[str, Any]]  # validated sections, defaults not yet applied
    models: dict[str, dict[str, Any]]  # NAME -> {"preset": ..., overrides...}
    sweeps: list[dict[str, Any]]
    raw_hash: str = field(default="")

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.settings.get(name, {}))


def builtin_profiles() -> dict[str, Path]:
    """Profiles shipped as package data, by name."""
    root = resources.files("loopscope.profiles")
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml")}


def resolve_profile_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or "/" in name_or_path or path.is_file():
        if not path.is_file():
            raise ConfigError(f"profile file {path}: not found")
        return path
    shipped = builtin_profiles()
    if name_or_path not in shipped:
        raise ConfigError(f"unknown profile {name_or_path!r}; known profiles: {', '.join(sorted(shipped))} "
                          "(or give a path to a .toml file)")
    return shipped[name_or_path]


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"profile file {path}: cannot be read ({err.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: TOML syntax error: {err}") from None


def _deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join("number" if t is float else t.__name__ for t in types)


def _check_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _check_range(where: str, key: str, value: Any, accepted: Range, errors: list[str]) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not _check_type(v, NUM):
            errors.append(f"{where}: {key} = {v!r} must be a number")
        elif v not in accepted:
            errors.append(f"{where}: {key} = {v!r} is out of range: expected a value in {accepted.text}")
            return


def _validate(path: Path, data: dict[str, Any], errors: list[str]) -> None:
    where = str(path)
    for section, value in data.items():
        if section in ("sweep", "models"):
            continue
        if section not in SETTINGS_SCHEMA:
            errors.append(f"{where}: unknown section [{section}] "
                          f"(known: {', '.join(list(SETTINGS_SCHEMA) + ['models', 'sweep'])})")
            continue
        if not isinstance(value, dict):
            errors.append(f"{where}: [{section}] must be a table")
            continue
        for key, item in value.items():
            types = SETTINGS_SCHEMA[section].get(key)
            if types is None:
                errors.append(f"{where}: unknown key {section}.{key} "
                              f"(known: {', '.join(SETTINGS_SCHEMA[section])})")
            elif not _check_type(item, types):
                errors.append(f"{where}: {section}.{key} = {item!r} must be {_type_name(types)}")
            elif section == "train" and key == "betas" and len(item) != 2:
                errors.append(f"{where}: train.betas = {item!r} must be a list of two numbers")
            elif key in RANGES.get(section, {}):
                _check_range(where, f"{section}.{key}", item, RANGES[section][key], errors)
            elif (section, key) in VALUE_RULES and not VALUE_RULES[section, key][0](item):
                errors.append(f"{where}: {section}.{key} = {item!r} {VALUE_RULES[section, key][1]}")
    models = data.get("models", {})
    if not isinstance(models, dict):
        errors.append(f"{where}: [models] must be a table of [models.NAME] tables")
        models = {}
    for name, spec in models.items():
        if not name.strip() or any(not ch.isprintable() for ch in name):
            errors.append(f"{where}: [models.{name!r}]: a model name must be printable text, on one line")
        if not isinstance(spec, dict) or not isinstance(spec.get("preset"), str):
            errors.append(f"{where}: models.{name} needs preset = \"<preset name>\"")
    sweeps = data.get("sweep", [])
    if not isinstance(sweeps, list) or not sweeps:
        errors.append(f"{where}: the profile needs at least one [[sweep]] entry")
        return
    for i, sweep in enumerate(sweeps):
        label = f"sweep[{i}]" + (f" ({sweep.get('name')})" if isinstance(sweep.get("name"), str) else "")
        for key, value in sweep.items():
            if key not in SWEEP_KEYS:
                errors.append(f"{where}: {label}: unknown axis {key!r} (known: {', '.join(sorted(SWEEP_KEYS))})")
            elif key in AXES:
                values = value if isinstance(value, list) else [value]
                bad = [v for v in values if not _check_type(v, AXES[key])]
                if bad:
                    errors.append(f"{where}: {label}.{key} = {bad[0]!r} must be {_type_name(AXES[key])}")
                elif key in AXIS_RANGES:
                    for v in values:
                        _check_range(where, f"{label}.{key}", v, AXIS_RANGES[key], errors)
        if "model" not in sweep or "workload" not in sweep:
            errors.append(f"{where}: {label}: needs both 'model' and 'workload'")
        for rule_key in ("include", "exclude"):
            rules = sweep.get(rule_key, [])
            if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
                errors.append(f"{where}: {label}.{rule_key} must be a list of inline tables")
                continue
            for rule in rules:
                for k in rule:
                    if k not in AXES:
                        errors.append(f"{where}: {label}.{rule_key} uses unknown axis {k!r}")


def _normalise_backends(data: dict[str, Any]) -> None:
    """Rewrite backend aliases (e.g. `torch.compile`) to their one spelling; unknown names stay for the
    matrix to report."""
    def norm(value: Any) -> Any:
        if isinstance(value, list):
            return [norm(v) for v in value]
        return (canonical_backend(value) or value) if isinstance(value, str) else value

    sweeps = data.get("sweep")
    if not isinstance(sweeps, list):
        return
    for sweep in sweeps:
        if not isinstance(sweep, dict):
            continue
        if "backend" in sweep:
            sweep["backend"] = norm(sweep["backend"])
        for rule_key in ("include", "exclude"):
            for rule in sweep.get(rule_key, []) if isinstance(sweep.get(rule_key), list) else []:
                if isinstance(rule, dict) and "backend" in rule:
                    rule["backend"] = norm(rule["backend"])


def load_profile(name_or_path: str, *, _seen: tuple[str, ...] = ()) -> Profile:
    """Read, extend and validate a profile; raise ConfigError listing every problem."""
    path = resolve_profile_path(name_or_path)
    data = _read_toml(path)
    errors: list[str] = []
    parent = data.get("profile", {}).get("extends") if isinstance(data.get("profile"), dict) else None
    if parent is not None and (not isinstance(parent, str) or not parent.strip()):
        raise ConfigError(f"{path}: profile.extends = {parent!r} must be the name or path of one profile")
    if parent:
        if parent in _seen:
            raise ConfigError(f"{path}: profile.extends = {parent!r} makes a cycle ({' -> '.join(_seen)})")
        is_file = parent.endswith(".toml") or "/" in parent
        base_path = resolve_profile_path(str(path.parent / parent) if is_file else parent)
        base = _read_toml(base_path)
        _validate(base_path, base, errors)
        own_sweeps = data.get("sweep")
        data = _deep_merge(base, {k: v for k, v in data.items() if k != "sweep"})
        if own_sweeps is not None:
            data["sweep"] = own_sweeps
        data["profile"].pop("extends", None)
    _normalise_backends(data)
    _validate(path, data, errors)
    if errors:
        raise ConfigError("\n".join(errors))
    canonical = json.dumps(data, sort_keys=True, default=str)
    return Profile(
        name=path.stem,
        path=str(path),
        settings={k: v for k, v in data.items() if k not in ("sweep", "models")},
        models=data.get("models", {}),
        sweeps=data["sweep"],
        raw_hash=hashlib.sha256(canonical.encode()).hexdigest()[:16],
    )
