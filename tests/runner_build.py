"""Builds the CPU kernel runner (csrc/exec/) with test kernels into a small shared library for
ctypes, with the system C++ compiler: tests/test_kernel_runner.py, tests/test_pointwise_runner.py."""

import ctypes
import hashlib
import os
import shutil
import subprocess
import sysconfig
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compiler():
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    cxx = cxx.split()[0]
    return shutil.which(cxx) or shutil.which("c++") or shutil.which("g++")


def build_library(sources, headers, extra_flags=(), name="runner_kernels"):
    """Compile `sources` into a shared library, cached by the content of every input."""
    cxx = compiler()
    if cxx is None:
        pytest.skip("no C++ compiler found to build the runner's test kernels")
    digest = hashlib.sha256()
    for path in list(sources) + list(headers):
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(extra_flags).encode())
    out_dir = os.path.join(tempfile.gettempdir(), f"fusedrnn-{name}-{digest.hexdigest()[:16]}")
    lib = os.path.join(out_dir, f"lib{name}.so")
    if not os.path.exists(lib):
        os.makedirs(out_dir, exist_ok=True)
        tmp = lib + f".{os.getpid()}.tmp"
        cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-pthread", "-I", os.path.join(ROOT, "csrc"), *extra_flags,
               *sources, "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"building the runner's test kernels failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"
        os.replace(tmp, lib)
    return ctypes.CDLL(lib)
