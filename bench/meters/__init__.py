"""Meters: time, memory, energy, calibration — each a context manager or a pure measurement.

timing.measure            repeat a call until a minimum time and count; samples, summary, tidy rows
memory.PeakMemory         peak RSS (CPU) or torch.cuda peaks + NVML per-process memory (CUDA)
energy.EnergyMeter        NVML energy counter / power sampling, RAPL powercap, else NaN with a reason
calibration.calibrate     GEMM FLOP/s per dtype and memory bandwidth of this machine, for MFU
nvml                      the NVML seam shared by the meters, the fingerprint and device detection
"""
