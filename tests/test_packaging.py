"""Packaging: the sdist is complete and installs; import says plainly why the compiled library
cannot be used; the supported torch range is declared, checked at build time, and a library
built against another torch is refused before it is loaded.

The test marked `sdist` compiles fusedrnn from its sdist in a fresh venv (1-3 minutes on
2 cores); `-m "not sdist"` leaves it out while iterating. CI runs it. That venv sees the packages
of the interpreter running the tests, whichever it is (a virtualenv, a conda env, a system
Python): see _fresh_venv, and the test after it that runs it from inside a virtualenv.
"""

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
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

_BUILD_OUTPUTS = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                        "*.so", "*.o")


def _not_in_a_fresh_checkout(folder, names):
    """copytree's ignore: build outputs, and any virtualenv or conda env made inside the checkout
    (`python -m venv .venv` is common practice; copying one would copy gigabytes of torch)."""
    env_markers = ("pyvenv.cfg", "conda-meta")
    envs = {n for n in names if any(os.path.exists(os.path.join(folder, n, m)) for m in env_markers)}
    return set(_BUILD_OUTPUTS(folder, names)) | envs


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist, packed on a machine WITHOUT torch (a `torch` that fails to import shadows the
    installed one), so its contents cannot depend on what this machine could compile."""
    tmp = tmp_path_factory.mktemp("sdist")
    # From a copy without build outputs, as a fresh checkout: setuptools also ships whatever an
    # existing fusedrnn.egg-info/SOURCES.txt lists, which would hide a gap in MANIFEST.in.
    source = tmp / "checkout"
    shutil.copytree(ROOT, source, ignore=_not_in_a_fresh_checkout)
    no_torch = _fake_torch_dir(tmp, "raise ImportError('No module named torch (hidden by the sdist test)')\n")
    env = dict(os.environ, PYTHONPATH=no_torch)
    result = _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp / "dist"),
                   str(source)], timeout=300, env=env, cwd=tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    path = tmp / "dist" / f"fusedrnn-{VERSION}.tar.gz"
    assert path.is_file(), os.listdir(tmp / "dist")
    return path


def test_checkout_copy_leaves_out_build_outputs_and_virtualenvs(tmp_path):
    """The sdist is packed from a copy of the checkout: a venv or conda env inside it (`python -m
    venv .venv`) must not be copied (gigabytes), nor build outputs; sources are."""
    source = tmp_path / "checkout"
    for name in ("csrc/cells/lstm.h", "fusedrnn/__init__.py", ".venv/pyvenv.cfg", ".venv/lib/torch/big.so.txt",
                 "myenv/conda-meta/history", "myenv/lib/x.py", "build/temp/x.o", "fusedrnn/_C.so",
                 "fusedrnn.egg-info/SOURCES.txt", "venv-notes/readme.txt"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("x")
    shutil.copytree(source, tmp_path / "copy", ignore=_not_in_a_fresh_checkout)
    copied = {os.path.relpath(os.path.join(d, f), tmp_path / "copy") for d, _, fs in os.walk(tmp_path / "copy") for f in fs}
    assert copied == {"csrc/cells/lstm.h", "fusedrnn/__init__.py", "venv-notes/readme.txt"}, copied


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


# ---- a fresh venv that sees the packages of the interpreter running the tests ---------------------

# Run by the interpreter in question, in an empty folder: where it imports installed packages from
# (its sys.path less the script folder: the standard library, the site dirs and what their .pth
# files and PYTHONPATH add), and which of those are site dirs, whose own .pth files count too.
_IMPORT_DIRS = (
    "import json, os, site, sys\n"
    "sites = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])\n"
    "print(json.dumps({'path': [p for p in sys.path if p not in ('', os.getcwd())], 'sites': sites}))\n"
)


def _import_dirs(python: str, cwd) -> dict:
    result = _run([python, "-c", _IMPORT_DIRS], timeout=120, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def _venv_python(venv) -> str:
    return os.path.join(str(venv), "Scripts" if os.name == "nt" else "bin", "python")


def _add_import_dirs(python: str, dirs: dict, cwd) -> None:
    """Makes `python` (a venv's) import, after its own site-packages, from `dirs` in their order,
    with the site dirs' .pth files processed as their own interpreter processes them (editable
    installs, setuptools' distutils shim). Entries it already has (its standard library) are
    skipped by `site`, as are entries that do not exist."""
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                   timeout=120, cwd=cwd).stdout.strip()
    assert os.path.isdir(purelib), purelib
    lines = [f"import site; site.addsitedir({p!r})" if p in dirs["sites"] else p
             for p in dirs["path"] if "\n" not in p]
    with open(os.path.join(purelib, "_fusedrnn_tests_caller_packages.pth"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _fresh_venv(venv) -> str:
    """A new, empty venv at `venv` whose python imports, after its own site-packages, the packages
    of the interpreter running this function (a virtualenv's, a conda env's or a system Python's),
    without copying them (torch is gigabytes): what a user gets from `python -m venv` with this
    interpreter's packages installed. Returns its python.

    Not `venv --system-site-packages`: that gives the venv the *base* interpreter's packages, which
    from inside a virtualenv are not the virtualenv's, so the build found no wheel ("invalid
    command 'bdist_wheel'") and no torch. Without a pip of its own: `python -m pip` runs this
    interpreter's pip, which installs into the venv it runs in, and the setuptools bundled with
    venv's pip cannot shadow the installed one. That needs no ensurepip either (Debian's python3
    may have none) and takes well under a second."""
    result = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    python = _venv_python(venv)
    _add_import_dirs(python, _import_dirs(sys.executable, cwd=venv), cwd=venv)
    return python


def _env_for_fresh_venv() -> dict:
    """The environment for commands in a _fresh_venv: no PYTHONPATH (the venv has its import dirs),
    a CPU-only build, and this interpreter's scripts folder first on PATH, so the build finds the
    `ninja` installed beside torch even where the virtualenv running the tests is not activated."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FUSEDRNN_CUDA")}
    env.update(FUSEDRNN_CUDA="0", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PATH=os.pathsep.join([sysconfig.get_path("scripts"), env.get("PATH", os.defpath)]))
    return env


def _packageless_copy_of_this_python(dest) -> str:
    """This Python with no packages installed, as a new machine has it: a copy of its executable
    beside its standard library, headers and libpython (linked, not copied), and an empty
    site-packages. Returns the copy's executable. The layout is POSIX CPython's (a pyenv, python.org,
    Debian or conda Python); elsewhere the test skips, saying so."""
    executable = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    paths = sysconfig.get_paths()  # in a virtualenv, its base's standard library and headers
    stdlib, include = paths["stdlib"], paths["include"]
    lib = os.path.dirname(stdlib)
    if os.name != "posix" or os.path.basename(lib) != "lib" or not os.path.isdir(include):
        pytest.skip(f"this Python's layout is not POSIX CPython's (stdlib {stdlib}, headers {include}), so the "
                    "test cannot make a package-less copy of it")
    os.makedirs(os.path.join(dest, "bin"))
    copy = os.path.join(dest, "bin", os.path.basename(executable))
    shutil.copy2(executable, copy)  # a copy, not a link: Python finds its prefix from where it lies
    os.makedirs(os.path.join(dest, "lib", os.path.basename(stdlib)))
    for name in os.listdir(stdlib):
        if name not in ("site-packages", "dist-packages"):
            os.symlink(os.path.join(stdlib, name), os.path.join(dest, "lib", os.path.basename(stdlib), name))
    for library in glob.glob(os.path.join(lib, "libpython*")):
        os.symlink(library, os.path.join(dest, "lib", os.path.basename(library)))
    os.makedirs(os.path.join(dest, "include"))
    os.symlink(include, os.path.join(dest, "include", os.path.basename(include)))
    probe = _run([copy, "-c", "import importlib.util, json, sys\n"
                              "print(json.dumps([sys.prefix, importlib.util.find_spec('torch') is None]))"],
                 timeout=120, cwd=dest)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    prefix, no_torch = json.loads(probe.stdout)
    if os.path.realpath(prefix) != os.path.realpath(dest) or not no_torch:
        pytest.skip(f"a copy of {executable} still finds its original prefix ({prefix}) or packages, so the test "
                    "cannot make a package-less Python from it")
    return copy


_PROBE_PROJECT = {
    "pyproject.toml": ('[build-system]\nrequires = ["setuptools>=64", "wheel"]\nbuild-backend = "setuptools.build_meta"\n\n'
                       '[project]\nname = "fusedrnn-venv-probe"\nversion = "1.0"\n'),
    "fusedrnn_venv_probe/__init__.py": "",
}
_BUILD_MODULES = ("torch", "setuptools", "wheel", "ninja", "pip", "packaging")


def test_fresh_venv_made_inside_a_virtualenv_sees_the_virtualenvs_packages(tmp_path):
    """The issue's case: the tests run inside a virtualenv made from a Python that has no packages
    (as on a new machine), with torch and the build tools installed in the virtualenv only. The
    venv that the sdist test installs into, made from inside that virtualenv, must import them from
    the virtualenv, and pip must build and install a package into it with them. (With
    `venv --system-site-packages` it saw the empty base instead: no torch, and the build failed with
    "invalid command 'bdist_wheel'".) Seconds: nothing is compiled."""
    base = _packageless_copy_of_this_python(str(tmp_path / "base"))
    virtualenv = tmp_path / "virtualenv"
    result = _run([base, "-m", "venv", "--without-pip", str(virtualenv)], timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # "Installed in the virtualenv": it imports this interpreter's packages, which its base lacks.
    _add_import_dirs(_venv_python(virtualenv), _import_dirs(sys.executable, cwd=tmp_path), cwd=tmp_path)
    specs = {name: importlib.util.find_spec(name) for name in _BUILD_MODULES}
    # (wheel may be missing: setuptools 70.1 and newer build wheels without it)
    here = {name: os.path.realpath(spec.origin) for name, spec in specs.items() if spec is not None}
    assert {"torch", "setuptools", "pip"} <= set(here), here
    where = ("import importlib.util, json, os, sys\n"
             f"names = {sorted(here)!r}\n"
             "specs = {n: importlib.util.find_spec(n) for n in names}\n"
             "print(json.dumps({n: s and os.path.realpath(s.origin) for n, s in specs.items()}))\n")

    def imports_of(python):
        out = _run([python, "-c", where], timeout=120, cwd=tmp_path, env=_env_for_fresh_venv())
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads(out.stdout)

    assert imports_of(base) == dict.fromkeys(here), "the package-less base Python imports packages"
    assert imports_of(_venv_python(virtualenv)) == here

    # From inside the virtualenv, this module's helper makes the venv the sdist test installs into.
    make = ("import sys\n"
            f"sys.path[:0] = [{os.path.join(ROOT, 'tests')!r}, {ROOT!r}]\n"
            "import test_packaging\n"
            "print('VENV-PYTHON', test_packaging._fresh_venv(sys.argv[1]))\n")
    result = _run([_venv_python(virtualenv), "-c", make, str(tmp_path / "venv")], timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    python = result.stdout.split("VENV-PYTHON", 1)[1].strip()
    assert python == _venv_python(tmp_path / "venv"), python
    assert imports_of(python) == here, "the fresh venv does not import the virtualenv's packages"

    project = tmp_path / "probe"
    for name, text in _PROBE_PROJECT.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    result = _run([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", str(project)],
                  timeout=300, env=_env_for_fresh_venv(), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    installed = _run([python, "-c", "import fusedrnn_venv_probe; print(fusedrnn_venv_probe.__file__)"],
                     timeout=120, cwd=tmp_path, env=_env_for_fresh_venv())
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.strip().startswith(str(tmp_path / "venv")), installed.stdout  # not the virtualenv's


@pytest.mark.sdist
def test_sdist_installs_in_a_fresh_venv_and_matches_torch_nn(sdist, tmp_path):
    """pip install of the sdist, CPU only, into a fresh venv that sees the packages of the
    interpreter running the tests (its torch, setuptools, wheel and ninja: the build is
    --no-build-isolation), then an LSTM and a GRU from the installed package against torch.nn in
    float64."""
    venv = tmp_path / "venv"
    python = _fresh_venv(venv)
    env = _env_for_fresh_venv()
    result = _run([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", str(sdist)],
                  timeout=1200, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    check = (
        "import os, warnings, torch\n"
        "warnings.simplefilter('error')  # a load warning would mean the build did not take\n"
        f"assert torch.__file__ == {torch.__file__!r}, ('not the torch running the tests', torch.__file__)\n"
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
