"""Build: run CMake on csrc/ and place the native libraries inside bnbfuse/lib/.

`pip install .` and `pip install -e .` both go through `build_ext`, which configures and
builds the CMake project. Without a C++ compiler or CMake the package still installs and
runs on its pure-PyTorch reference kernels (it warns once at import).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        for ext in self.extensions:
            self.build_cmake(ext)

    def build_cmake(self, ext):
        # A build folder that outlives pip's temporary ones: a second `pip install -e .`
        # (the README's main job, then its tests) recompiles only what changed.
        flavour = "cpu" if os.environ.get("BNBFUSE_NO_CUDA") else "all"
        build_temp = ROOT / "build" / f"cmake-{flavour}"
        build_temp.mkdir(parents=True, exist_ok=True)
        # Libraries land in bnbfuse/lib of the source tree (editable installs) and are
        # then copied next to the built package (regular installs).
        src_lib = ROOT / "bnbfuse" / "lib"
        cmake = shutil.which("cmake") or "cmake"
        cfg = [
            cmake, "-S", str(ROOT), "-B", str(build_temp),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DBNBFUSE_OUTPUT_DIR={src_lib}",
        ]
        if os.environ.get("BNBFUSE_NO_CUDA"):
            cfg.append("-DBNBFUSE_CUDA=OFF")
        try:
            try:
                subprocess.check_call(cfg)
            except subprocess.CalledProcessError:
                # a cache written by another CMake (pip's isolated one of an earlier
                # install) can refuse to reconfigure: start that folder afresh
                shutil.rmtree(build_temp, ignore_errors=True)
                subprocess.check_call(cfg)
            jobs = str(os.cpu_count() or 2)
            subprocess.check_call([cmake, "--build", str(build_temp), "-j", jobs])
        except (OSError, subprocess.CalledProcessError) as err:
            if os.environ.get("BNBFUSE_REQUIRE_NATIVE"):
                raise
            print(f"bnbfuse: native build failed ({err}); the reference kernels will be used",
                  file=sys.stderr)
            return
        if not self.inplace:
            dest = Path(self.build_lib) / "bnbfuse" / "lib"
            dest.mkdir(parents=True, exist_ok=True)
            for lib in src_lib.glob("*.so"):
                shutil.copy2(lib, dest / lib.name)


setup(ext_modules=[CMakeExtension("bnbfuse._native_build")], cmdclass={"build_ext": CMakeBuild})
