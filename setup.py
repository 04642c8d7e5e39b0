"""Build: run CMake on csrc/ and place the native libraries inside bnbfuse/lib/.

`pip install .` and `pip install -e .` both go through `build_ext`, which configures and
builds the CMake project in two independent steps, each with its own build folder:

1. the CPU library (``build/cmake-cpu``, ``-DBNBFUSE_CUDA=OFF``), then
2. the CUDA library (``build/cmake-cuda``, target ``bnbfuse_cuda`` only) when ``nvcc`` is
   found, unless ``BNBFUSE_NO_CUDA=1``.

A failure of one does not lose the other: whatever built is installed, and bnbfuse runs its
pure-PyTorch reference kernels where a library is missing (it warns once at import).

Environment variables (docs/quickstart.md lists them too):

- ``BNBFUSE_REQUIRE_NATIVE=1``: a failed CPU build is an error (the README's test command).
- ``BNBFUSE_REQUIRE_CUDA=1``: a failed or impossible (no nvcc) CUDA build is an error; without
  it a CUDA failure prints why and the install goes on with the CPU library.
- ``BNBFUSE_NO_CUDA=1``: build the CPU library only.
- ``BNBFUSE_CUDA_ARCHS`` (else ``CUDAARCHS``): the CUDA architectures, in CMake's syntax
  (``"80;90"``, ``"90-real 120"``, ``all-major``...); commas and spaces separate too. Passed on
  every configure, so a changed value takes effect in the reused build folder; with neither
  set, the folder returns to CMakeLists.txt's default.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _cache_value(build_dir: Path, key: str):
    """The value of `key` in build_dir's CMakeCache.txt, or None."""
    try:
        text = (build_dir / "CMakeCache.txt").read_text(errors="replace")
    except OSError:
        return None
    m = re.search(rf"^{re.escape(key)}:[A-Z]+=(.*)$", text, re.MULTILINE)
    return m.group(1) if m else None


def cuda_arch_args() -> list:
    """The -D/-U argument for CMAKE_CUDA_ARCHITECTURES from the environment."""
    archs = os.environ.get("BNBFUSE_CUDA_ARCHS") or os.environ.get("CUDAARCHS")
    if not archs or not archs.strip():
        # -U: a list cached by an earlier configure of this folder (CUDAARCHS only seeds the
        # cache) must not outlive the environment that asked for it
        return ["-UCMAKE_CUDA_ARCHITECTURES"]
    return ["-DCMAKE_CUDA_ARCHITECTURES=" + ";".join(re.split(r"[;,\s]+", archs.strip()))]


def progress(message: str) -> None:
    """A line the user sees while pip builds: pip captures the build's output and shows it
    only with -v or on failure, so the line also goes to the terminal when there is one."""
    line = "bnbfuse: " + message
    print(line, file=sys.stderr, flush=True)
    try:
        with open("/dev/tty", "w") as tty:
            tty.write("\n" + line + "\n")
    except OSError:
        pass  # no terminal (CI, a pipe): stderr only


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


# what a first build takes on 2 cores (a fresh `pip install -e .`), told before it starts
BUILD_TIME = {"cpu": "about 1 minute on 2 cores",
              "cuda": "about 1.5 minutes on 2 cores for the default architectures"}


class CMakeBuild(build_ext):
    def run(self):
        for ext in self.extensions:
            self.build_cmake(ext)

    def build_cmake(self, ext):
        # Libraries land in bnbfuse/lib of the source tree (editable installs) and are then
        # copied next to the built package (regular installs).
        src_lib = ROOT / "bnbfuse" / "lib"
        built = []
        cpu_error = self.build_library("cpu", ["-DBNBFUSE_CUDA=OFF"], "bnbfuse_cpu", src_lib)
        if cpu_error is None:
            built.append("libbnbfuse_cpu.so")
        elif _flag("BNBFUSE_REQUIRE_NATIVE"):
            raise RuntimeError(f"bnbfuse: the native CPU library failed to build ({cpu_error}) "
                               "and BNBFUSE_REQUIRE_NATIVE is set")
        else:
            print(f"bnbfuse: native CPU library build failed ({cpu_error}); the reference "
                  "kernels will be used on CPU", file=sys.stderr)
        if _flag("BNBFUSE_NO_CUDA"):
            if _flag("BNBFUSE_REQUIRE_CUDA"):
                raise RuntimeError("bnbfuse: BNBFUSE_REQUIRE_CUDA and BNBFUSE_NO_CUDA are both set")
        else:
            cuda_error = self.build_library("cuda", ["-DBNBFUSE_CUDA=ON", *cuda_arch_args()],
                                            "bnbfuse_cuda", src_lib)
            if cuda_error is None:
                built.append("libbnbfuse_cuda.so")
            else:
                self.cuda_failed(cuda_error, src_lib)
        if not self.inplace:
            dest = Path(self.build_lib) / "bnbfuse" / "lib"
            dest.mkdir(parents=True, exist_ok=True)
            for name in built:
                shutil.copy2(src_lib / name, dest / name)

    @staticmethod
    def cuda_failed(error: str, src_lib: Path) -> None:
        if _flag("BNBFUSE_REQUIRE_CUDA"):
            raise RuntimeError(f"bnbfuse: the CUDA library was not built ({error}) and "
                               "BNBFUSE_REQUIRE_CUDA is set")
        if not error.startswith("nvcc not found"):
            # A library left by an earlier build is from other sources (or another toolchain)
            # than this install: it must not load as if it were this build's.
            stale = src_lib / "libbnbfuse_cuda.so"
            if stale.exists():
                stale.unlink()
        print("bnbfuse: " + "=" * 70 + "\n"
              f"bnbfuse: CUDA library NOT built: {error}\n"
              "bnbfuse: the CPU library is installed; CUDA tensors will use the pure-PyTorch "
              "reference kernels.\nbnbfuse: set BNBFUSE_REQUIRE_CUDA=1 to make this an error. "
              "`python -m bnbfuse` shows what loads.\nbnbfuse: " + "=" * 70,
              file=sys.stderr)

    def build_library(self, flavour: str, options: list, target: str, src_lib: Path):
        """Configures build/cmake-<flavour> and builds `target`; None on success, else why.

        The folder outlives pip's temporary ones: a second `pip install -e .` (the README's
        main job, then its tests) recompiles only what changed.
        """
        build_dir = ROOT / "build" / f"cmake-{flavour}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake") or "cmake"
        cfg = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
               f"-DBNBFUSE_OUTPUT_DIR={src_lib}", *options]
        try:
            try:
                subprocess.check_call(cfg)
            except subprocess.CalledProcessError:
                cached = _cache_value(build_dir, "CMAKE_COMMAND")
                if cached is None or Path(cached).resolve() == Path(cmake).resolve():
                    raise  # a real configure error: keep the folder (and its objects)
                # a cache written by another CMake (pip's isolated one of an earlier install)
                # can refuse to reconfigure: start that folder afresh
                print(f"bnbfuse: {build_dir} was configured by {cached}; reconfiguring afresh",
                      file=sys.stderr)
                shutil.rmtree(build_dir, ignore_errors=True)
                subprocess.check_call(cfg)
            if flavour == "cuda" and _cache_value(build_dir, "BNBFUSE_CUDA_TARGET") != "ON":
                return "nvcc not found (set CUDACXX or put nvcc on PATH)"
            jobs = str(os.cpu_count() or 2)
            started = time.monotonic()
            library = src_lib / f"lib{target}.so"
            before = library.stat().st_mtime_ns if library.exists() else None
            progress(f"building the native {flavour.upper()} library in {build_dir} with {jobs} "
                     f"jobs ({BUILD_TIME[flavour]} the first time; unchanged sources are not "
                     "recompiled)")
            subprocess.check_call([cmake, "--build", str(build_dir), "--target", target,
                                   "-j", jobs])
            fresh = not library.exists() or library.stat().st_mtime_ns != before
            progress(f"native {flavour.upper()} library "
                     f"{'built' if fresh else 'up to date, reused'} "
                     f"({time.monotonic() - started:.0f} s): {library}")
        except OSError as err:
            return f"cannot run CMake: {err}"
        except subprocess.CalledProcessError as err:
            step = "configure" if err.cmd == cfg else "build"
            return f"CMake {step} of {target} failed (exit {err.returncode}, see the output above)"
        return None


setup(ext_modules=[CMakeExtension("bnbfuse._native_build")], cmdclass={"build_ext": CMakeBuild})
