#!/usr/bin/env python3
"""The machine's float32 matrix-multiply peak: C = A @ B with n x n float32 matrices, best of a
few runs, on 1 and 2 threads, with PyTorch (MKL) and with numpy's OpenBLAS using its default
AVX2 kernel (Haswell) and its AVX-512 kernel (OPENBLAS_CORETYPE=SkylakeX). On AMD Zen 5 the
AVX-512 units are full width, so AVX-512 kernels reach about twice the AVX2 rate; MKL takes an
AVX2-class path on AMD CPUs.

    scripts/bench/.venv/bin/python scripts/bench/peak_matmul.py
"""
import json
import os
import subprocess
import sys
import time

import torch

out = {"torch": torch.__version__, "blas": torch.backends.mkl.is_available() and "mkl" or "other",
       "config": [l.strip() for l in torch.__config__.show().splitlines() if "BLAS" in l or "LAPACK" in l or "CPU capability" in l]}
for threads in (1, 2):
    torch.set_num_threads(threads)
    for n in (2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        out[f"gflops_{threads}t_n{n}"] = round(2 * n ** 3 / best / 1e9, 1)
    # a rank-256 update like one calibration sample's covariance: (d x 256) @ (256 x d)
    for d in (1024, 2816):
        x = torch.randn(256, d)
        x.T @ x
        best = float("inf")
        for _ in range(10):
            t = time.perf_counter()
            x.T @ x
            best = min(best, time.perf_counter() - t)
        out[f"gflops_{threads}t_xtx_256x{d}"] = round(2 * 256 * d * d / best / 1e9, 1)
NP = """
import time, numpy as np
n = 4096
a = np.random.rand(n, n).astype(np.float32); b = np.random.rand(n, n).astype(np.float32)
a @ b
best = 1e9
for _ in range(5):
    t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
print(2 * n ** 3 / best / 1e9)
"""
for core in ("Haswell", "SkylakeX"):
    for threads in (1, 2):
        env = dict(os.environ, OPENBLAS_CORETYPE=core, OPENBLAS_NUM_THREADS=str(threads))
        try:
            r = subprocess.run([sys.executable, "-c", NP], env=env, capture_output=True, text=True, check=True)
            out[f"numpy_openblas_{core}_{threads}t_n4096"] = round(float(r.stdout.strip()), 1)
        except (subprocess.CalledProcessError, ValueError):
            pass
print(json.dumps(out, indent=1))
