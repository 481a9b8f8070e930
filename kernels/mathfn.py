"""Scalar math that vectorises inside @njit loops.

`np.exp` inside njit is a scalar libm call (SVML is not in the PyPI llvmlite), which the probe measured at
0.19 Gexp/s against 1.2-1.3 Gexp/s for a polynomial that LLVM can vectorise. `fexp` is that polynomial:
exp(x) = 2^n * exp(r), n = round(x/ln2), r = x - n*ln2 (Cody-Waite split), exp(r) by its degree-6 Taylor
series on |r| <= ln2/2 (relative truncation error < 2e-7), 2^n built from the float's exponent bits.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

F32 = np.float32
LOG2E = F32(1.4426950408889634)
LN2_HI = F32(0.693145751953125)  # ln2 split so that n*LN2_HI is exact for |n| < 2^8
LN2_LO = F32(1.428606765330187e-06)
EXP_MIN = F32(-87.0)  # below: clamp (result ~1.6e-38, harmless in softmax/sigmoid)
EXP_MAX = F32(88.0)


@intrinsic
def _int32_bits_as_float32(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32 (a bitcast LLVM can vectorise)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always", fastmath=True, cache=True)
def fexp(x):
    x = min(max(x, EXP_MIN), EXP_MAX)
    n = np.floor(x * LOG2E + F32(0.5))
    r = x - n * LN2_HI - n * LN2_LO
    p = F32(1.0 / 720.0)
    p = p * r + F32(1.0 / 120.0)
    p = p * r + F32(1.0 / 24.0)
    p = p * r + F32(1.0 / 6.0)
    p = p * r + F32(0.5)
    p = p * r + F32(1.0)
    p = p * r + F32(1.0)
    scale = _int32_bits_as_float32((np.int32(n) + np.int32(127)) << np.int32(23))
    return p * scale


@njit(inline="always", fastmath=True, cache=True)
def fsigmoid(x):
    return F32(1.0) / (F32(1.0) + fexp(-x))


@njit(inline="always", fastmath=True, cache=True)
def fsilu(x):
    return x / (F32(1.0) + fexp(-x))
