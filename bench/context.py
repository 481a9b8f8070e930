"""What a worker needs to know about the run it belongs to (passed as JSON, never global)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunContext:
    run_dir: str
    device_class: str = "cpu"
    calibration: dict[str, Any] = field(default_factory=dict)
    trace: bool = False
    threads: int = 0  # 0: leave the libraries' defaults
    numba_threading: str = ""  # numba's threading layer in the workers; "": loopscope's default (workqueue)

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.run_dir) / "checkpoints"

    def peak_flops(self, dtype: str) -> float:
        """Calibrated GEMM FLOP/s for the dtype (NaN when not calibrated)."""
        key = {"bfloat16": "gemm_bf16_flops", "float16": "gemm_fp16_flops"}.get(dtype, "gemm_fp32_flops")
        return float(self.calibration.get(key, float("nan")))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
