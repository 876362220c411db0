"""Builds vlmfast's native extensions.

vlmfast._C       C++ CPU kernels (csrc/cpu/*.cpp + csrc/bindings.cpp), -O3 and OpenMP, portable:
                 the hot loops are compiled for several instruction sets (GCC target_clones)
                 and the loader picks one at run time from the CPU's features.
vlmfast._C_cuda  CUDA kernels (csrc/cuda/*.cu, compiled by nvcc to SASS for sm_80 and sm_90a and
                 to compute_90 PTX that newer GPUs JIT-compile), built only with VLMFAST_CUDA=1.
                 nvcc comes from CUDA_HOME, /usr/local/cuda, PATH, or NVIDIA's PyPI wheels
                 (nvidia-cuda-nvcc & co. install it under site-packages/nvidia/cu13). ptxas's
                 resource report (-Xptxas -v) of each .cu is kept next to its object as
                 <name>.ptxas.log; .ci/ptxas_report.py reads it (registers, spills, shared memory).

VLMFAST_NO_EXT=1 builds neither; vlmfast then runs on Triton and the PyTorch reference.
VLMFAST_CUDA=only builds vlmfast._C_cuda alone (CI's compile check of the CUDA sources).
Neither extension includes torch headers, so one source tree builds against any torch release.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _sources(folder: str, suffix: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob(f"*{suffix}"))


def _cpu_extension():
    from pybind11.setup_helpers import Pybind11Extension

    return Pybind11Extension(
        "vlmfast._C",
        ["csrc/bindings.cpp", *_sources("csrc/cpu", ".cpp")],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"],
        extra_link_args=["-fopenmp"],
    )


def _wheel_cuda_home() -> Path | None:
    """The toolkit NVIDIA's PyPI wheels install (nvidia-cuda-nvcc, -nvvm, -crt, -runtime, -cccl
    for CUDA 13 land under site-packages/nvidia/cu13)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for home in sorted(Path(folder).glob("cu1*"), reverse=True):
            if (home / "bin" / "nvcc").exists():
                return home
    return None


def _cuda_home() -> Path:
    nvcc = shutil.which("nvcc")
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "include" / "cuda_runtime.h").exists():
            return Path(candidate)
    if nvcc:
        return Path(nvcc).resolve().parent.parent
    home = _wheel_cuda_home()
    if home is not None:
        return home
    raise RuntimeError(
        "VLMFAST_CUDA=1 but nvcc was not found; set CUDA_HOME, put nvcc on PATH, or "
        "pip install nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt nvidia-cuda-runtime nvidia-cuda-cccl"
    )


def _cuda_extension():
    from pybind11.setup_helpers import Pybind11Extension

    home = _cuda_home()
    lib = home / "lib64" if (home / "lib64").exists() else home / "lib"
    return Pybind11Extension(
        "vlmfast._C_cuda",
        ["csrc/cuda/module.cpp", *_sources("csrc/cuda", ".cu")],
        include_dirs=["csrc", str(home / "include")],
        cxx_std=17,
        extra_compile_args=["-O3"],
        # Static cudart: the module does not depend on which CUDA runtime torch ships.
        extra_link_args=[f"-L{lib}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"],
    )


class BuildExt(build_ext):
    """build_ext that hands .cu files to nvcc and the rest to the C++ compiler."""

    NVCC_FLAGS = [
        "-O3",
        "-std=c++17",
        "-Xcompiler",
        "-fPIC",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        # PTX of the newest portable arch (compute_90a's PTX would run on sm_90 only): a newer
        # GPU's driver JIT-compiles it.
        "-gencode=arch=compute_90,code=compute_90",
        "-Xptxas=-v",  # the resource report (registers, spills, shared memory), kept as a log
        "--threads=0",  # the archs of one source compile in parallel
    ]

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if not cu_sources:
            return super().build_extension(ext)
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        objects = self._nvcc(cu_sources, ext.include_dirs)
        ext.extra_objects = list(ext.extra_objects or []) + objects
        return super().build_extension(ext)

    def _nvcc(self, sources, include_dirs):
        home = _cuda_home()
        nvcc = shutil.which("nvcc") or str(home / "bin" / "nvcc")
        if not Path(nvcc).exists() and (home / "bin" / "nvcc").exists():
            nvcc = str(home / "bin" / "nvcc")
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PATH=f"{home / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
        objects = []
        for source in sources:
            obj = out_dir / (Path(source).stem + ".o")
            cmd = [nvcc, "-c", source, "-o", str(obj), *self.NVCC_FLAGS]
            cmd += [f"-I{d}" for d in include_dirs]
            print(" ".join(cmd), file=sys.stderr)
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            (out_dir / (Path(source).stem + ".ptxas.log")).write_text(done.stdout + done.stderr)
            if done.returncode:
                sys.stderr.write(done.stdout + done.stderr)
                raise RuntimeError(f"nvcc failed on {source} (exit status {done.returncode})")
            objects.append(str(obj))
        return objects


def _extensions():
    if _flag("VLMFAST_NO_EXT"):
        return []
    from pybind11.setup_helpers import ParallelCompile

    # The C++ sources compile in parallel, one per CPU (VLMFAST_BUILD_JOBS=N to choose).
    ParallelCompile("VLMFAST_BUILD_JOBS").install()
    if os.environ.get("VLMFAST_CUDA", "").lower() == "only":  # CI's compile check of the .cu files
        return [_cuda_extension()]
    extensions = [_cpu_extension()]
    if _flag("VLMFAST_CUDA"):
        extensions.append(_cuda_extension())
    return extensions


setup(
    packages=[*find_packages(include=["vlmfast", "vlmfast.*"]), "vlmfast.kernels"],
    package_dir={"vlmfast.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
