"""Expand a validated profile into the matrix of cells.

A cell is pure data: the model's full config, the workload and its resolved settings, and the
axes. Its id is a hash of its canonical JSON, so the same cell has the same id in every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from loopscope.bench.backends import refusal
from loopscope.bench.errors import ConfigError
from loopscope.bench.tokenizer import vocab_size
from loopscope.profiles.loader import BACKENDS, DTYPES, KV_POLICIES, OPTIMIZERS, WORKLOADS, Profile

DEFAULTS: dict[str, dict[str, Any]] = {
    "profile": {"seed": 0, "timeout_s": 900.0, "memory_limit_gb": 16.0, "calibration": "full",
                "threads": 0, "trace": False, "numba_threading": ""},
    "data": {"corpus": "default", "max_bytes": 8_000_000, "tokenizer": "bytes"},
    "train": {"tokens": 200_000, "batch": 8, "seq_len": 128, "lr": 3e-3, "warmup_frac": 0.05,
              "cooldown_frac": 0.5, "weight_decay": 0.0, "grad_clip": 1.0, "betas": [0.9, 0.95],
              "log_every": 1, "checkpoint_every": 0, "spike_factor": 1.5},
    "eval": {"max_tokens": 65_536, "seeds": 3, "batch": 8},  # seeds: h0 draws for parcae and rdm
    "measure": {"min_time_s": 1.0, "min_count": 5, "warmup": 1, "energy": True, "memory": True,
                "energy_window_s": 5.0},
    "decode": {"prompt_len": 64, "new_tokens": 32},
}
RANDOM_STATE_FAMILIES = ("parcae", "rdm")  # random h0: evaluate over several seeds
DEFAULT_EVAL_LOOPS = [1, 2, 4, 8, 16, 32]  # test-time loop counts when an eval sweep names none
NUMBA_THREADING_LAYERS = ("", "omp", "workqueue", "tbb")  # "": loopscope's default, workqueue


@dataclass(frozen=True)
class Cell:
    model: str
    model_config: dict[str, Any]
    workload: str
    backend: str = "torch"
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 1
    seq_len: int = 128
    loops_test: int | None = None
    kv_policy: str | None = None
    lr: float | None = None
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    depends_on: str | None = None
    timeout_s: float = 900.0

    @property
    def family(self) -> str:
        return self.model_config["family"]

    @property
    def loops_train(self) -> int | None:
        return None if self.family == "gpt" else int(self.model_config.get("mu_rec", 1))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        return cls(**data)

    @property
    def cell_id(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        parts = [self.workload, self.model, self.backend, self.device]
        if self.lr is not None and self.workload in ("train", "eval"):
            parts.append(f"lr={self.lr:g}")
            if self.seed:
                parts.append(f"seed={self.seed}")
        if self.loops_test is not None:
            parts.append(f"T={self.loops_test}")
        if self.kv_policy:
            parts.append(self.kv_policy)
        if self.workload in ("prefill", "decode"):
            parts.append(f"b{self.batch}x{self.seq_len}")
        return " ".join(parts)


def resolved_settings(profile: Profile) -> dict[str, dict[str, Any]]:
    out = {name: {**defaults, **profile.section(name)} for name, defaults in DEFAULTS.items()}
    out["eval"].setdefault("seq_len", out["train"]["seq_len"])
    return out


def _model_configs(profile: Profile, names: set[str], vocab: int | None,
                   errors: list[str]) -> dict[str, dict[str, Any]]:
    """Each model's full config; with a BPE tokenizer, the vocabulary becomes the tokenizer's."""
    from loopscope.models import ModelConfig, preset

    configs: dict[str, dict[str, Any]] = {}
    for name in sorted(names):
        spec = profile.models.get(name)
        try:
            if spec is None:
                cfg = preset(name)
            else:
                overrides = {k: v for k, v in spec.items() if k != "preset"}
                cfg = ModelConfig.from_dict({**preset(spec["preset"]).to_dict(), **overrides})
        except (KeyError, ValueError, TypeError) as err:
            where = f"models.{name}" if spec is not None else "sweep.model"
            msg = err.args[0] if err.args else str(err)
            errors.append(f"{profile.path}: {where} = {name!r}: {msg}")
            continue
        if cfg.d_model % cfg.n_heads:
            errors.append(f"{profile.path}: model {name!r}: n_heads={cfg.n_heads} does not divide "
                          f"d_model={cfg.d_model}")
            continue
        data = cfg.to_dict()
        if vocab is not None:
            data["vocab_size"] = vocab
        configs[name] = data
    return configs


def _axis_values(sweep: dict[str, Any], key: str, default: Any) -> list[Any]:
    value = sweep.get(key, default)
    return list(value) if isinstance(value, list) else [value]


def _matches(rule: dict[str, Any], axes: dict[str, Any]) -> bool:
    return all(axes.get(k) == v for k, v in rule.items())


def expand(profile: Profile, *, device: str = "cpu") -> list[Cell]:
    """All cells of the profile, validated; raises ConfigError listing every problem."""
    settings = resolved_settings(profile)
    run = settings["profile"]
    errors: list[str] = []
    device = run.get("device", device)
    names = {m for s in profile.sweeps for m in _axis_values(s, "model", [])}
    try:
        tokenizer = settings["data"]["tokenizer"]
        vocab = None if tokenizer == "bytes" else vocab_size(tokenizer)
    except ConfigError as err:
        errors.append(f"{profile.path}: {err}")
        vocab = None
    configs = _model_configs(profile, names, vocab, errors)
    if run["numba_threading"] not in NUMBA_THREADING_LAYERS:
        errors.append(f"{profile.path}: profile.numba_threading = {run['numba_threading']!r}: expected one of "
                      f"{', '.join(NUMBA_THREADING_LAYERS[1:])}")
    optimizer = settings["train"].get("optimizer", "adamw")  # not in DEFAULTS: existing cell ids stay the same
    if optimizer not in OPTIMIZERS:
        errors.append(f"{profile.path}: train.optimizer = {optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")

    cells: dict[str, Cell] = {}
    train_cells: dict[tuple[str, float, int], Cell] = {}
    for i, sweep in enumerate(profile.sweeps):
        label = f"{profile.path}: sweep[{i}]"
        axes_lists = {
            "model": _axis_values(sweep, "model", []),
            "workload": _axis_values(sweep, "workload", []),
            "backend": _axis_values(sweep, "backend", "torch"),
            "device": _axis_values(sweep, "device", device),
            "dtype": _axis_values(sweep, "dtype", "float32"),
            "batch": _axis_values(sweep, "batch", None),
            "seq_len": _axis_values(sweep, "seq_len", None),
            "loops_test": _axis_values(sweep, "loops_test",
                                       DEFAULT_EVAL_LOOPS if "eval" in _axis_values(sweep, "workload", []) else None),
            "kv_policy": _axis_values(sweep, "kv_policy", None),
            "lr": _axis_values(sweep, "lr", settings["train"]["lr"]),
            "seeds": _axis_values(sweep, "seeds", run["seed"]),
            "tokens": _axis_values(sweep, "tokens", None),
        }
        for key, allowed in (("workload", WORKLOADS), ("backend", BACKENDS), ("dtype", DTYPES),
                             ("kv_policy", KV_POLICIES + (None,))):
            for value in axes_lists[key]:
                if value not in allowed:
                    errors.append(f"{label}.{key} = {value!r}: expected one of "
                                  f"{', '.join(str(a) for a in allowed if a is not None)}")
        if errors:
            continue
        keys = list(axes_lists)
        for combo in itertools.product(*(axes_lists[k] for k in keys)):
            axes = dict(zip(keys, combo, strict=True))
            if any(_matches(r, axes) for r in sweep.get("exclude", [])):
                continue
            cell = _make_cell(axes, configs, settings, label, errors)
            if cell is not None:
                cells.setdefault(cell.cell_id, cell)
                if cell.workload == "train":
                    train_cells[(cell.model, cell.lr, cell.seed, cell.settings["train"].get("tokens"))] = cell
        for rule in sweep.get("include", []):
            axes = {**{k: v[0] for k, v in axes_lists.items()}, **rule}
            cell = _make_cell(axes, configs, settings, label, errors)
            if cell is not None:
                cells.setdefault(cell.cell_id, cell)

    # Eval cells read the checkpoint of the train cell of the same model, learning rate, seed and budget.
    ordered: list[Cell] = []
    for cell in cells.values():
        if cell.workload == "eval":
            tokens = cell.settings["eval"].get("train_tokens", settings["train"].get("tokens"))
            train = train_cells.get((cell.model, cell.lr, cell.seed, tokens))
            if train is None:
                budget = f", tokens={tokens}" if "train_tokens" in cell.settings["eval"] else ""
                errors.append(f"{profile.path}: eval of {cell.model!r} (lr={cell.lr}, seed={cell.seed}{budget}) "
                              "needs a train cell of the same model, lr, seed and budget in the profile")
                continue
            cell = dataclasses.replace(cell, depends_on=train.cell_id)
        ordered.append(cell)
    from loopscope.bench.workloads.budgets import world_size_errors

    errors.extend(world_size_errors(profile.path, ordered))
    if errors:
        raise ConfigError("\n".join(dict.fromkeys(errors)))
    order = {w: i for i, w in enumerate(("train", "eval", "prefill", "decode", "kernels"))}
    return sorted(ordered, key=lambda c: order[c.workload])


def _make_cell(axes: dict[str, Any], configs: dict[str, dict[str, Any]],
               settings: dict[str, dict[str, Any]], label: str, errors: list[str]) -> Cell | None:
    name, workload = axes["model"], axes["workload"]
    if name not in configs:
        return None  # already reported
    cfg = configs[name]
    looped = cfg["family"] != "gpt"
    refused = refusal(axes["backend"], workload, axes["device"], axes["dtype"])
    if refused:
        errors.append(f"{label}: {refused}")
        return None
    run = settings["profile"]
    base = dict(model=name, model_config=cfg, workload=workload, backend=axes["backend"],
                device=axes["device"], dtype=axes["dtype"], seed=int(axes.get("seeds", run["seed"])),
                timeout_s=float(run["timeout_s"]))
    data = settings["data"]
    if workload == "train":
        train = settings["train"]
        if axes.get("tokens"):  # the sweep's own budget, in tokens: the other budget keys no longer apply
            train = {**{k: v for k, v in train.items() if k not in ("tokens_per_param", "flops")},
                     "tokens": int(axes["tokens"])}
        return Cell(**base, batch=axes["batch"] or train["batch"], seq_len=axes["seq_len"] or train["seq_len"],
                    lr=float(axes["lr"]), settings={"train": train, "data": data})
    if workload == "eval":
        ev = dict(settings["eval"])
        if axes.get("tokens"):  # names the budget of the train cell whose checkpoint it reads
            ev["train_tokens"] = int(axes["tokens"])
        if cfg["family"] in RANDOM_STATE_FAMILIES:
            ev["seeds"] = max(int(ev["seeds"]), 1)
        loops = axes["loops_test"] if looped else None
        seq_len = axes["seq_len"] or ev["seq_len"]
        if ev.get("stride") is not None and int(ev["stride"]) > seq_len:
            errors.append(f"{label}: eval.stride = {ev['stride']} is longer than its window, seq_len = {seq_len}")
            return None
        if int(ev["max_tokens"]) < seq_len:
            errors.append(f"{label}: eval.max_tokens = {ev['max_tokens']} is shorter than one window, "
                          f"seq_len = {seq_len}")
            return None
        return Cell(**base, batch=axes["batch"] or ev["batch"], seq_len=seq_len,
                    loops_test=loops, lr=float(axes["lr"]), settings={"eval": ev, "data": data})
    if workload in ("prefill", "decode"):
        measure = settings["measure"]
        extra = {"measure": measure}
        if workload == "decode":
            extra["decode"] = settings["decode"]
        if run["numba_threading"] and axes["backend"].startswith("numba"):
            extra["numba_threading"] = run["numba_threading"]  # part of the cell: it changes what is measured
        loops = axes["loops_test"] if looped else None
        kv = (axes["kv_policy"] or "per-loop") if (workload == "decode" and looped) else None
        if workload == "decode":  # seq_len is the context: the prompt plus the generated tokens
            dec = settings["decode"]
            seq_len = axes["seq_len"] or int(dec["prompt_len"]) + int(dec["new_tokens"])
            if seq_len <= int(dec["new_tokens"]):
                errors.append(f"{label}: decode seq_len {seq_len} leaves no prompt before "
                              f"decode.new_tokens = {dec['new_tokens']}")
                return None
        else:
            seq_len = axes["seq_len"] or settings["train"]["seq_len"]
        return Cell(**base, batch=axes["batch"] or 1, seq_len=seq_len, loops_test=loops, kv_policy=kv,
                    settings=extra)
    if workload == "kernels":
        extra = {"measure": settings["measure"]}
        if run["numba_threading"]:
            extra["numba_threading"] = run["numba_threading"]
        return Cell(**base, settings=extra)
    return None
