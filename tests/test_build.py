"""The build: which CUDA architectures CMake compiles (and the library reports), and
setup.py's two-step build, where a failed CUDA build keeps the CPU library.

The architecture tests only configure (a few seconds each). The setup.py tests build the CPU
library once in a copy of the sources (about half a minute on two cores); the CUDA failure is
a CUDA compiler that cannot compile, so they need no nvcc.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
NVCC = shutil.which("nvcc") or next(
    (p for p in ("/usr/local/cuda/bin/nvcc",) if os.access(p, os.X_OK)), None)
needs_cmake = pytest.mark.skipif(CMAKE is None, reason="cmake not installed")
needs_nvcc = pytest.mark.skipif(NVCC is None or CMAKE is None, reason="nvcc or cmake missing")

# Environment variables that choose architectures or compilers: each test sets its own.
_BUILD_ENV = ("CUDAARCHS", "BNBFUSE_CUDA_ARCHS", "CUDACXX", "CMAKE_CUDA_ARCHITECTURES",
              "BNBFUSE_NO_CUDA", "BNBFUSE_REQUIRE_NATIVE", "BNBFUSE_REQUIRE_CUDA",
              "BNBFUSE_DISABLE_NATIVE", "CXX", "CC")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _BUILD_ENV}
    env.update(extra)
    return env


def configure(build_dir, *args, env=None):
    proc = subprocess.run([CMAKE, "-S", str(ROOT), "-B", str(build_dir), "-DBNBFUSE_CUDA=ON",
                           f"-DBNBFUSE_OUTPUT_DIR={build_dir / 'lib'}", *args],
                          env=env or clean_env(), capture_output=True, text=True, timeout=300)
    return proc


def cache(build_dir, key):
    text = (build_dir / "CMakeCache.txt").read_text()
    m = re.search(rf"^{re.escape(key)}:[A-Z]+=(.*)$", text, re.MULTILINE)
    return m.group(1) if m else None


def compiled_definition(build_dir):
    """The BNBF_CUDA_ARCHS string the generated build passes to nvcc (what bnbf_cuda_archs
    returns once built)."""
    flags = (build_dir / "CMakeFiles" / "bnbfuse_cuda.dir" / "flags.make").read_text()
    m = re.search(r'-DBNBF_CUDA_ARCHS=\\?"\\?"?([^"\\]*)', flags)
    assert m, flags
    return m.group(1)


def nvcc_version():
    out = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    major, minor = re.search(r"release (\d+)\.(\d+)", out).groups()
    return int(major), int(minor)


def default_names():
    """CMakeLists.txt's default for this nvcc, in nvcc's names."""
    v = nvcc_version()
    if v < (11, 8):
        return "sm_75 sm_80 compute_80"
    if v < (12, 8):
        return "sm_75 sm_80 sm_90 compute_90"
    return "sm_75 sm_80 sm_90 sm_100 sm_120 compute_120"


def assert_archs(build_dir, proc, cmake_value, names):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert cache(build_dir, "CMAKE_CUDA_ARCHITECTURES") == cmake_value
    assert cache(build_dir, "BNBF_CUDA_ARCH_NAMES") == names
    assert compiled_definition(build_dir) == names
    assert f"bnbfuse: building CUDA kernels for {names} " in proc.stdout


# ---- architectures -------------------------------------------------------------------------------
@needs_nvcc
@pytest.mark.parametrize("value, names", [
    ("86", "sm_86 compute_86"),
    ("89-real;90-virtual", "sm_89 compute_90"),
    ("80-real;90", "sm_80 sm_90 compute_90"),
])
def test_user_architectures_are_compiled_and_reported(tmp_path, value, names):
    build = tmp_path / "b"
    assert_archs(build, configure(build, f"-DCMAKE_CUDA_ARCHITECTURES={value}"), value, names)


@needs_nvcc
def test_cudaarchs_environment_variable(tmp_path):
    build = tmp_path / "b"
    proc = configure(build, env=clean_env(CUDAARCHS="80-real"))
    assert_archs(build, proc, "80-real", "sm_80")
    assert "from CUDAARCHS" in proc.stdout
    # -D wins over the environment, as in CMake
    build2 = tmp_path / "b2"
    proc = configure(build2, "-DCMAKE_CUDA_ARCHITECTURES=90",
                     env=clean_env(CUDAARCHS="80-real"))
    assert_archs(build2, proc, "90", "sm_90 compute_90")


@needs_nvcc
def test_default_architectures_and_reconfigure(tmp_path):
    build = tmp_path / "b"
    names = default_names()
    value = ";".join(f"{n[3:]}-real" for n in names.split() if n.startswith("sm_"))
    highest = names.split()[-1].removeprefix("compute_")
    value = value.replace(f"{highest}-real", highest)
    proc = configure(build)
    assert_archs(build, proc, value, names)
    assert "from bnbfuse default" in proc.stdout
    # a user's list replaces the default in the same folder; -U (what setup.py passes when
    # no list is asked for) brings the default back
    assert_archs(build, configure(build, "-DCMAKE_CUDA_ARCHITECTURES=86"), "86",
                 "sm_86 compute_86")
    assert_archs(build, configure(build), "86", "sm_86 compute_86")  # a user's value sticks
    assert_archs(build, configure(build, "-UCMAKE_CUDA_ARCHITECTURES"), value, names)


@needs_nvcc
def test_architectures_off_is_refused(tmp_path):
    proc = configure(tmp_path / "b", "-DCMAKE_CUDA_ARCHITECTURES=OFF")
    assert proc.returncode != 0
    assert "bnbfuse: CMAKE_CUDA_ARCHITECTURES='OFF'" in proc.stderr


# ---- setup.py: the CPU library survives a failed CUDA build --------------------------------------
def copy_sources(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "lib", "*.egg-info")
    for name in ("CMakeLists.txt", "setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("csrc", "bnbfuse"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


def build_ext(src: Path, **env):
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src,
                          env=clean_env(**env), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def failed_cuda_build(tmp_path_factory):
    """A copy of the sources built with a CUDA compiler that cannot compile (/bin/false),
    with a library from an 'earlier build' in bnbfuse/lib."""
    if CMAKE is None:
        pytest.skip("cmake not installed")
    src = copy_sources(tmp_path_factory.mktemp("partial"))
    lib = src / "bnbfuse" / "lib"
    lib.mkdir()
    (lib / "libbnbfuse_cuda.so").write_bytes(b"an earlier build's library")
    return src, build_ext(src, CUDACXX="/bin/false", BNBFUSE_REQUIRE_NATIVE="1",
                          BNBFUSE_CUDA_ARCHS="86, 90-real")


def test_failed_cuda_build_keeps_the_cpu_library(failed_cuda_build):
    src, proc = failed_cuda_build
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bnbfuse: CUDA library NOT built: CMake configure of bnbfuse_cuda failed" in proc.stderr
    # the progress lines pip shows on a terminal (stderr here, no terminal)
    assert "bnbfuse: building the native CPU library in " in proc.stderr
    assert "bnbfuse: native CPU library built (" in proc.stderr
    assert "CUDA tensors will use the pure-PyTorch reference kernels" in proc.stderr
    lib = src / "bnbfuse" / "lib"
    assert (lib / "libbnbfuse_cpu.so").is_file()
    assert not (lib / "libbnbfuse_cuda.so").exists()  # the stale one is gone
    check = subprocess.run(
        [sys.executable, "-c", "import bnbfuse; from bnbfuse import _native; "
         "print(bnbfuse.__file__, _native.cpu.loaded, _native.cuda.loaded)"],
        cwd=src, capture_output=True, text=True, timeout=120, env=clean_env())
    assert check.returncode == 0, check.stderr
    path, cpu, cuda = check.stdout.split()
    assert Path(path).is_relative_to(src) and (cpu, cuda) == ("True", "False")
    # setup.py passed BNBFUSE_CUDA_ARCHS on (commas and spaces separate too)
    assert cache(src / "build" / "cmake-cuda", "CMAKE_CUDA_ARCHITECTURES") == "86;90-real"


def test_require_cuda_makes_the_cuda_failure_fatal(failed_cuda_build):
    src, first = failed_cuda_build
    assert first.returncode == 0
    proc = build_ext(src, CUDACXX="/bin/false", BNBFUSE_REQUIRE_CUDA="1")
    assert proc.returncode != 0
    assert "BNBFUSE_REQUIRE_CUDA is set" in proc.stderr
    assert (src / "bnbfuse" / "lib" / "libbnbfuse_cpu.so").is_file()
    # the CPU folder was reused: nothing recompiled
    assert "Building CXX object" not in proc.stdout
    assert "bnbfuse: native CPU library up to date, reused (" in proc.stderr
    # without BNBFUSE_CUDA_ARCHS the folder's list returns to the default (-U)
    assert cache(src / "build" / "cmake-cuda", "CMAKE_CUDA_ARCHITECTURES") == \
        "75-real;80-real;90-real;100-real;120"  # nvcc version unknown: the full default


@needs_cmake
def test_failed_cpu_build(tmp_path):
    src = copy_sources(tmp_path)
    proc = build_ext(src, CXX="/bin/false", BNBFUSE_NO_CUDA="1")
    assert proc.returncode == 0, proc.stderr
    assert "native CPU library build failed (CMake configure of bnbfuse_cpu failed" in proc.stderr
    assert not (src / "bnbfuse" / "lib" / "libbnbfuse_cpu.so").exists()
    proc = build_ext(src, CXX="/bin/false", BNBFUSE_NO_CUDA="1", BNBFUSE_REQUIRE_NATIVE="1")
    assert proc.returncode != 0
    assert "BNBFUSE_REQUIRE_NATIVE is set" in proc.stderr
