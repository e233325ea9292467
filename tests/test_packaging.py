"""Packaging: the sdist is complete and installs; import says plainly why the compiled library
cannot be used; the supported torch range is declared, checked at build time, and a library
built against another torch is refused before it is loaded.

The test marked `sdist` compiles fusedrnn from its sdist in a fresh venv (1-3 minutes on
2 cores); `-m "not sdist"` leaves it out while iterating. CI runs it.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
from email.parser import Parser

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import fusedrnn
from fusedrnn import _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = fusedrnn.__version__
# Files in csrc/ that are build products or editor litter, never sources.
NOT_SOURCES = (".o", ".so", ".pyc", ".d")


def _run(cmd, timeout, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def _fake_torch_dir(tmp_path, body: str) -> str:
    """A folder with a `torch` package that shadows the installed one, for setup.py runs."""
    fake = tmp_path / "fake_torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(body)
    return str(fake)


# ---- the sdist -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist, packed on a machine WITHOUT torch (a `torch` that fails to import shadows the
    installed one), so its contents cannot depend on what this machine could compile."""
    tmp = tmp_path_factory.mktemp("sdist")
    # From a copy without build outputs, as a fresh checkout: setuptools also ships whatever an
    # existing fusedrnn.egg-info/SOURCES.txt lists, which would hide a gap in MANIFEST.in.
    source = tmp / "checkout"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "*.so", "*.o"))
    no_torch = _fake_torch_dir(tmp, "raise ImportError('No module named torch (hidden by the sdist test)')\n")
    env = dict(os.environ, PYTHONPATH=no_torch)
    result = _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp / "dist"),
                   str(source)], timeout=300, env=env, cwd=tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    path = tmp / "dist" / f"fusedrnn-{VERSION}.tar.gz"
    assert path.is_file(), os.listdir(tmp / "dist")
    return path


def _sdist_members(path):
    with tarfile.open(path) as tar:
        prefix = f"fusedrnn-{VERSION}/"
        return {m.name[len(prefix):] for m in tar.getmembers() if m.isfile()}


def test_sdist_ships_every_source_file(sdist):
    members = _sdist_members(sdist)
    expected = set()
    for folder in ("csrc", "fusedrnn", "tests", "benchmarks"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            # benchmarks/data (downloaded) and benchmarks/runs (local results) are not sources.
            dirnames[:] = [d for d in dirnames if d not in ("__pycache__", "data", "runs")]
            expected |= {os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames
                         if not f.endswith(NOT_SOURCES)}
    expected |= {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md"}
    missing = sorted(expected - members)
    assert not missing, f"the sdist leaves out {missing}"
    # Headers and the CUDA sources in particular: the build fails without the former, and the
    # sdist must not depend on whether the packing machine had a CUDA toolkit.
    for pattern in ("csrc/cells/", "csrc/layer/", "csrc/cpu/", "csrc/cuda/"):
        assert any(m.startswith(pattern) and m.endswith((".h", ".cuh")) for m in members), pattern
    assert any(m.startswith("csrc/cuda/") and m.endswith(".cu") for m in members)


def test_sdist_ships_no_build_products(sdist):
    members = _sdist_members(sdist)
    products = sorted(m for m in members if m.endswith((".so", ".o", ".pyc")) or m.startswith("build/"))
    assert not products, products


def test_sdist_metadata_states_supported_versions(sdist):
    with tarfile.open(sdist) as tar:
        pkg_info = Parser().parsestr(tar.extractfile(f"fusedrnn-{VERSION}/PKG-INFO").read().decode())
    assert pkg_info["Version"] == VERSION
    torch_req = [r for r in pkg_info.get_all("Requires-Dist") if re.match(r"torch\b", r) and "extra" not in r]
    assert torch_req == ["torch>=2.11"], torch_req
    python_spec = SpecifierSet(pkg_info["Requires-Python"])
    assert "3.10" in python_spec and "3.9" not in python_spec
    # The torch this suite runs on must be inside the range we declare.
    installed = Version(torch.__version__.split("+")[0])
    assert SpecifierSet(torch_req[0][len("torch"):]).contains(installed, prereleases=True), installed
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "torch 2.11 or newer" in readme and "Python 3.10+" in readme


@pytest.mark.sdist
def test_sdist_installs_in_a_fresh_venv_and_matches_torch_nn(sdist, tmp_path):
    """pip install of the sdist, CPU only, into a fresh venv that sees the installed torch, then
    an LSTM and a GRU from the installed package against torch.nn in float64."""
    venv = tmp_path / "venv"
    result = _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], timeout=300)
    assert result.returncode == 0, result.stderr
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FUSEDRNN_CUDA")}
    env.update(FUSEDRNN_CUDA="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    result = _run([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", str(sdist)],
                  timeout=1200, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    check = (
        "import os, warnings, torch\n"
        "warnings.simplefilter('error')  # a load warning would mean the build did not take\n"
        "import fusedrnn\n"
        f"assert fusedrnn.__file__.startswith({str(venv)!r}), fusedrnn.__file__\n"
        "info = fusedrnn.backends()\n"
        "assert info['compiled'] and info['cpu'] and not info['cuda'], info\n"
        "assert info['built_against_torch'] == torch.__version__, info\n"
        "torch.manual_seed(0)\n"
        "for ref_cls, our_cls in ((torch.nn.LSTM, fusedrnn.LSTM), (torch.nn.GRU, fusedrnn.GRU)):\n"
        "    ref = ref_cls(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)\n"
        "    ours = our_cls(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)\n"
        "    ours.load_state_dict(ref.state_dict())\n"
        "    x = torch.randn(7, 4, 3, dtype=torch.float64, requires_grad=True)\n"
        "    (y_ref, _), (y, _) = ref(x), ours(x)\n"
        "    assert (y - y_ref).abs().max() < 1e-10\n"
        "    g = torch.randn_like(y)\n"
        "    gx_ref, = torch.autograd.grad(y_ref, x, g)\n"
        "    gx, = torch.autograd.grad(y, x, g)\n"
        "    assert (gx - gx_ref).abs().max() < 1e-10\n"
        "print('sdist install ok', fusedrnn.__file__)\n"
    )
    result = _run([python, "-c", check], timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sdist install ok" in result.stdout


# ---- build-time checks of the torch version ---------------------------------------------------------

def test_build_without_torch_stops_and_says_to_use_the_installed_torch(tmp_path):
    no_torch = _fake_torch_dir(tmp_path, "raise ImportError('No module named torch')\n")
    result = _run([sys.executable, os.path.join(ROOT, "setup.py"), "build_ext", "--build-temp", str(tmp_path / "t")],
                  timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=no_torch))
    assert result.returncode != 0
    assert "the build cannot import torch" in result.stderr and "--no-build-isolation" in result.stderr, result.stderr


def test_build_against_an_unsupported_torch_is_refused(tmp_path):
    old_torch = _fake_torch_dir(tmp_path, "__version__ = '2.10.0+cpu'\n")
    result = _run([sys.executable, os.path.join(ROOT, "setup.py"), "build_ext", "--build-temp", str(tmp_path / "t")],
                  timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=old_torch))
    assert result.returncode != 0
    assert "torch 2.10.0+cpu is older than the oldest supported release, 2.11" in result.stderr, result.stderr


# ---- what import says when the compiled library cannot be used --------------------------------------

def _package_copy(tmp_path, with_library: bool) -> str:
    """A copy of the fusedrnn package in tmp_path (with or without its compiled library)."""
    dest = tmp_path / "fusedrnn"
    shutil.copytree(os.path.join(ROOT, "fusedrnn"), dest,
                    ignore=shutil.ignore_patterns("__pycache__", *(() if with_library else ("_C*",))))
    return str(dest)


IMPORT_AND_RUN = (
    # An editable install of this checkout (as .ci/run makes) puts a finder on sys.meta_path that
    # resolves fusedrnn.* to the checkout, so the copy would import the checkout's _C: drop it.
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
    "import warnings\n"
    "with warnings.catch_warnings(record=True) as caught:\n"
    "    warnings.simplefilter('always')\n"
    "    import torch, fusedrnn\n"
    "messages = [str(w.message) for w in caught if 'fusedrnn' in str(w.message)]\n"
    "assert len(messages) == 1, messages\n"
    "print('WARNING:', messages[0])\n"
    "import sys\n"
    "assert 'fusedrnn._C' not in sys.modules and not hasattr(torch.ops.fusedrnn, 'gru_forward')\n"
    "assert fusedrnn.backends()['compiled'] is False\n"
    "torch.manual_seed(0)\n"
    "ref = torch.nn.GRU(3, 4, dtype=torch.float64)\n"
    "ours = fusedrnn.GRU(3, 4, dtype=torch.float64)\n"
    "ours.load_state_dict(ref.state_dict())\n"
    "x = torch.randn(5, 2, 3, dtype=torch.float64)\n"
    "assert (ours(x)[0] - ref(x)[0]).abs().max() < 1e-12  # the reference fallback runs\n"
)


def _import_copy(tmp_path) -> str:
    """Imports the copy in tmp_path in a fresh interpreter; returns the one warning it gave."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = _run([sys.executable, "-c", IMPORT_AND_RUN], timeout=120, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split("WARNING:", 1)[1].strip()


def test_unbuilt_checkout_says_the_library_is_not_built_and_how_to_build_it(tmp_path):
    _package_copy(tmp_path, with_library=False)
    message = _import_copy(tmp_path)
    assert "fusedrnn._C is not built" in message, message
    assert "pip install --no-build-isolation" in message, message
    assert "reference implementation" in message, message
    assert "circular import" not in message, message


@pytest.mark.skipif(not _ops.COMPILED, reason="needs the compiled library: " + str(_ops.LOAD_ERROR))
def test_library_for_another_python_is_named(tmp_path):
    package = _package_copy(tmp_path, with_library=False)
    shutil.copy(_ops._C.__file__, os.path.join(package, "_C.cpython-30-x86_64-linux-gnu.so"))
    message = _import_copy(tmp_path)
    assert "is not built" in message and "_C.cpython-30-x86_64-linux-gnu.so, built for another Python" in message


def _other_torch(version: str) -> str:
    """A torch version of the same length with another major release, for an in-place patch."""
    return str(int(version[0]) % 9 + 1) + version[1:]


@pytest.mark.skipif(not _ops.COMPILED, reason="needs the compiled library: " + str(_ops.LOAD_ERROR))
def test_library_built_against_another_torch_is_refused_before_loading(tmp_path):
    package = _package_copy(tmp_path, with_library=True)
    library = glob.glob(os.path.join(package, "_C*"))[0]
    with open(library, "rb") as f:
        data = f.read()
    built = _ops._read_build_info(library)["torch"]
    assert built == torch.__version__
    old, new = f"build-info:torch={built};".encode(), f"build-info:torch={_other_torch(built)};".encode()
    assert data.count(old) == 1
    with open(library, "wb") as f:
        f.write(data.replace(old, new))
    message = _import_copy(tmp_path)  # also asserts fusedrnn._C was never loaded
    assert f"compiled against torch {_other_torch(built)}, but torch {torch.__version__} is installed" in message
    assert "rebuild fusedrnn against the installed torch" in message and "pip install --no-build-isolation" in message


@pytest.mark.skipif(not _ops.COMPILED, reason="needs the compiled library: " + str(_ops.LOAD_ERROR))
@pytest.mark.parametrize("built_against", ["this torch", "another torch"])
def test_library_built_before_build_info_was_recorded(built_against, tmp_path):
    """A library from before csrc/build_info.cpp carries no build facts: it is loaded, and the
    version it reports once loaded decides (the check that came before the pre-load one)."""
    package = _package_copy(tmp_path, with_library=True)
    library = glob.glob(os.path.join(package, "_C*"))[0]
    with open(library, "rb") as f:
        data = f.read().replace(b"fusedrnn-build-info:", b"fusedrnn-build-xxxx:")
    if built_against == "another torch":
        data = data.replace(torch.__version__.encode(), _other_torch(torch.__version__).encode())
    with open(library, "wb") as f:
        f.write(data)
    assert _ops._read_build_info(library) is None
    code = ("import warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import fusedrnn\n"
            "print(fusedrnn.backends()['compiled'], [str(w.message) for w in caught if 'fusedrnn' in str(w.message)])\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = _run([sys.executable, "-c", code], timeout=120, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    if built_against == "this torch":
        assert result.stdout.strip() == "True []", result.stdout
    else:
        assert result.stdout.startswith("False ["), result.stdout
        assert f"compiled against torch {_other_torch(torch.__version__)}" in result.stdout, result.stdout


def test_unloadable_library_reports_the_loaders_error(tmp_path):
    package = _package_copy(tmp_path, with_library=False)
    suffix = next(s for s in __import__("importlib.machinery").machinery.EXTENSION_SUFFIXES if s.endswith(".so"))
    with open(os.path.join(package, "_C" + suffix), "wb") as f:
        f.write(b"not a shared library")
    message = _import_copy(tmp_path)
    assert "fusedrnn._C" in message and "could not be loaded: ImportError" in message, message
    assert "rebuild" in message


@pytest.mark.skipif(not _ops.COMPILED, reason="needs the compiled library: " + str(_ops.LOAD_ERROR))
def test_library_records_the_torch_it_was_built_against():
    info = _ops._read_build_info(_ops._C.__file__)
    assert info["torch"] == torch.__version__ == _ops._C.TORCH_VERSION
    assert info["torch_cuda"] == str(torch.version.cuda or "none")
    assert info["kernels"] == ("cpu+cuda" if _ops._C.WITH_CUDA else "cpu")


@pytest.mark.parametrize("built, cuda, kernels, refused", [
    ("2.14.1+cu130", "13.0", "cpu", False),  # this torch
    ("2.14.0+cu130", "13.0", "cpu", False),  # another patch release of the same minor: same ABI
    ("2.11.0+cu128", "12.8", "cpu", True),   # the GPU machines' torch
    ("3.14.1+cu130", "13.0", "cpu", True),
    ("2.14.1+cu128", "12.8", "cpu+cuda", True),  # CUDA kernels for another CUDA
    ("2.14.1+cpu", "none", "cpu", False),  # CPU kernels do not care which CUDA torch has
])
def test_version_mismatch_rule(built, cuda, kernels, refused, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    why = _ops._version_mismatch(built, cuda, kernels)
    assert (why is not None) == refused, why
    if refused:
        assert "rebuild fusedrnn" in why
