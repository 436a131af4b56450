"""Development path: compile ``csrc/`` with ninja at run time (``MDLM_CTC_JIT=1``).

Used on a machine where the package was installed without building ``mdlm_ctc._C`` (for example a
bare GPU machine with no network: ``MDLM_CTC_BUILD=none pip install -e .`` then ``MDLM_CTC_JIT=1``).
It needs the source tree (``csrc/`` next to ``mdlm_ctc/``), a C++ compiler and ninja; the CUDA
kernels are compiled too when torch has CUDA and ``nvcc`` is found.

To stay within about two minutes on a 16-core machine, the CUDA file is compiled for the
architecture of the GPU that is present only (``MDLM_CTC_CUDA_ARCHS`` overrides it, e.g. "90"), the
three sources compile in parallel (ninja; ``MAX_JOBS`` caps the jobs), and the build directory is
reused across runs (``MDLM_CTC_JIT_DIR``, default torch's extension cache), so only the first run pays.
"""

from __future__ import annotations

import os
import platform
import shutil

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def sources(with_cuda: bool) -> list[str]:
    files = [os.path.join(CSRC, "ops.cpp"), os.path.join(CSRC, "slack_ctc_cpu.cpp")]
    if with_cuda:
        files.append(os.path.join(CSRC, "slack_ctc_cuda.cu"))
    return files


def cpu_flags() -> list[str]:
    arch = os.environ.get("MDLM_CTC_CPU_ARCH", "native")
    flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if platform.machine() in ("x86_64", "AMD64") and arch:
        flags.append("-mprefer-vector-width=512")  # use AVX-512 where -march has it
    return flags + ([f"-march={arch}"] if arch else [])


def cuda_home() -> str | None:
    """The CUDA toolkit to compile with (``CUDA_HOME``/``CUDA_PATH``, ``nvcc`` on PATH, /usr/local/cuda)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def cuda_archs() -> list[str]:
    """``MDLM_CTC_CUDA_ARCHS`` ("90", "80;90", "90+PTX"), else the capability of every visible GPU
    (a lazy torch.cuda query: this only runs when the JIT build is requested), else "90"."""
    env = os.environ.get("MDLM_CTC_CUDA_ARCHS")
    if env:
        return [a.strip().replace(".", "") for a in env.replace(",", ";").split(";") if a.strip()]
    archs: list[str] = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            if f"{major}{minor}" not in archs:
                archs.append(f"{major}{minor}")
    return archs or ["90"]


def cuda_flags() -> list[str]:
    flags = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
    for arch in cuda_archs():
        num = arch[: -len("+PTX")] if arch.endswith("+PTX") else arch
        if not num.isdigit():
            raise RuntimeError(f"MDLM_CTC_CUDA_ARCHS: {arch!r} is not a compute capability like 90 or 90+PTX")
        code = f"compute_{num}" if arch.endswith("+PTX") else f"sm_{num}"
        flags.append(f"-gencode=arch=compute_{num},code={code}")
    return flags


def cuda_unavailable_reason() -> str | None:
    """Why the JIT build would leave out the CUDA kernels, or None if it will compile them."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if cuda_home() is None:
        return "no CUDA toolkit (nvcc) was found: set CUDA_HOME or put nvcc on PATH"
    if not os.path.exists(os.path.join(CSRC, "slack_ctc_cuda.cu")):
        return f"{os.path.join(CSRC, 'slack_ctc_cuda.cu')} is missing"
    return None


def load(verbose: bool = False) -> None:
    """Compile and load the kernels (the ops register themselves under ``torch.ops.mdlm_ctc_C``).

    Raises RuntimeError with what is missing when nothing can be built."""
    from torch.utils import cpp_extension

    if not os.path.isdir(CSRC):
        raise RuntimeError(f"no source tree at {CSRC}; the JIT path needs a checkout of the repository "
                           "(or install a wheel with the prebuilt mdlm_ctc._C)")
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as error:
        raise RuntimeError("the JIT build of the kernels needs ninja (`pip install ninja`, or the system "
                           "package) and none was found; without it, install with a C++ compiler present so "
                           "that setup.py builds mdlm_ctc._C ahead of time") from error
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"the JIT build of the kernels needs a C++ compiler and {compiler!r} was not found "
                           "(set CXX); use backend=\"reference\" (pure PyTorch) or backend=\"triton\" meanwhile")
    with_cuda = cuda_unavailable_reason() is None
    if with_cuda:
        home = cuda_home()
        os.environ.setdefault("CUDA_HOME", home)
        if cpp_extension.CUDA_HOME is None:  # torch looked before CUDA_HOME was set
            cpp_extension.CUDA_HOME = home
    build_directory = os.environ.get("MDLM_CTC_JIT_DIR")
    if build_directory:
        os.makedirs(build_directory, exist_ok=True)
    cpp_extension.load(
        name="mdlm_ctc_C_jit_cuda" if with_cuda else "mdlm_ctc_C_jit",
        sources=sources(with_cuda),
        extra_include_paths=[CSRC],
        extra_cflags=cpu_flags() + (["-DMDLM_CTC_WITH_CUDA=1"] if with_cuda else []),
        extra_cuda_cflags=cuda_flags() if with_cuda else None,
        extra_ldflags=["-fopenmp"],
        build_directory=build_directory,
        is_python_module=False,
        verbose=verbose,
    )
