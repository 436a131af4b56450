"""Build mdlm-ctc.

What gets built is decided from the machine (nothing is downloaded at build time):

* torch with CUDA and a CUDA toolkit (``CUDA_HOME`` or ``nvcc`` found) -> ``mdlm_ctc._C`` with the
  C++ CPU kernels *and* the CUDA kernels;
* otherwise, a C++ compiler -> ``mdlm_ctc._C`` with the C++ CPU kernels only;
* no torch at build time, or no compiler -> pure Python (the ``reference`` backend, and Triton
  on GPUs).

Environment switches:

* ``MDLM_CTC_BUILD=auto|cpu|cuda|none``  force a choice (default ``auto``);
* ``MDLM_CTC_CUDA_ARCHS="90;90+PTX"``    CUDA architectures (default sm_90 plus PTX);
* ``MDLM_CTC_CPU_ARCH=native``            ``-march`` for the CPU kernels (``native`` by default:
  the extension is built on the machine that runs it; set e.g. ``x86-64-v2`` for a portable build).
"""

import importlib.util
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _log(msg):
    print(f"[mdlm-ctc setup] {msg}", file=sys.stderr)


def _load_build_flags():
    # the flag helpers live in the package (the JIT path uses them too); load the file directly, since
    # importing the package would need torch
    spec = importlib.util.spec_from_file_location("_build_flags", os.path.join(ROOT, "mdlm_ctc", "_build_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flags = _load_build_flags()


def _cuda_flags():
    try:
        return flags.cuda_flags(flags.parse_archs(os.environ.get("MDLM_CTC_CUDA_ARCHS", "90;90+PTX")))
    except ValueError as error:
        raise SystemExit(str(error)) from None


def _extensions():
    choice = os.environ.get("MDLM_CTC_BUILD", "auto").lower()
    if choice not in ("auto", "cpu", "cuda", "none"):
        raise SystemExit(f"MDLM_CTC_BUILD must be auto, cpu, cuda or none; got {choice!r}")
    if choice == "none":
        _log("MDLM_CTC_BUILD=none: pure-Python install")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable at build time: pure-Python install "
             "(use `pip install --no-build-isolation -e .` to build the C++ kernels)")
        return [], {}

    cpu_sources = [os.path.join(CSRC, name) for name in flags.SOURCES_CPU]
    cuda_sources = [os.path.join(CSRC, name) for name in flags.SOURCES_CUDA]
    include_dirs = [os.path.join(ROOT, CSRC)]
    have_cuda_sources = all(os.path.exists(os.path.join(ROOT, s)) for s in cuda_sources)
    cuda_home = flags.cuda_home()
    if choice == "cuda":  # forced: explain exactly what is missing instead of failing inside the compiler
        missing = []
        if torch.version.cuda is None:
            missing.append(f"the installed torch {torch.__version__} is a CPU-only build (torch.version.cuda is None); "
                           "install a CUDA build of torch")
        if cuda_home is None:
            missing.append("no CUDA toolkit was found (set CUDA_HOME, or put nvcc on PATH)")
        if not have_cuda_sources:
            missing.append(f"the CUDA sources are missing ({', '.join(cuda_sources)})")
        if missing:
            raise SystemExit("MDLM_CTC_BUILD=cuda cannot build the CUDA kernels: " + "; ".join(missing) +
                             ". Use MDLM_CTC_BUILD=cpu (C++ CPU kernels) or MDLM_CTC_BUILD=none, and on a GPU "
                             "machine without a toolkit at install time, MDLM_CTC_JIT=1 at run time.")
    want_cuda = choice == "cuda" or (
        choice == "auto" and torch.version.cuda is not None and cuda_home is not None and have_cuda_sources
    )
    if choice == "auto" and torch.version.cuda is not None and cuda_home is None:
        _log("torch has CUDA but no CUDA toolkit (nvcc) was found: building the CPU kernels only "
             "(set CUDA_HOME to build the CUDA lattice, or use MDLM_CTC_JIT=1 on the GPU machine)")
    if want_cuda:
        os.environ.setdefault("CUDA_HOME", cuda_home)
        if cpp_extension.CUDA_HOME is None:  # torch looked before CUDA_HOME was known
            cpp_extension.CUDA_HOME = cuda_home
        _log(f"building mdlm_ctc._C with CPU and CUDA kernels (CUDA_HOME={cuda_home}, "
             f"archs {os.environ.get('MDLM_CTC_CUDA_ARCHS', '90;90+PTX')})")
        ext = cpp_extension.CUDAExtension(
            "mdlm_ctc._C",
            sources=cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("MDLM_CTC_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": flags.cpu_flags(),
                "nvcc": _cuda_flags(),
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            _log("no C++ compiler found: pure-Python install")
            return [], {}
        _log("building mdlm_ctc._C with the C++ CPU kernels")
        ext = cpp_extension.CppExtension(
            "mdlm_ctc._C",
            sources=cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": flags.cpu_flags()},
            extra_link_args=["-fopenmp"],
        )
    build_ext = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    name="mdlm-ctc",
    version="0.1.0",
    description="Fast CTC losses (surface-preserving slack-CTC and classic CTC) for masked diffusion LMs",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[p for p in ("mdlm_ctc", "mdlm_ctc.triton_kernels", "mdlm_ctc.mdlm")
              if os.path.exists(os.path.join(ROOT, p.replace("mdlm_ctc.triton_kernels", "triton_kernels").replace(".", "/"), "__init__.py"))],
    package_dir={"mdlm_ctc": "mdlm_ctc", "mdlm_ctc.triton_kernels": "triton_kernels"},
    # the default comparison's base model (a few MB; mdlm_ctc/mdlm/base.py, built by build_base.py)
    package_data={"mdlm_ctc.mdlm": ["assets/base/*"]},
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        # what CI's tests need (requirements-ci.txt pins them): the Triton tests run under Triton's
        # interpreter on a CPU, which needs numpy < 2.4 with Triton 3.6; ninja for the JIT build test
        "test": ["pytest>=8", "hypothesis>=6.100", "ninja", "triton>=3.6", "numpy<2.4"],
        "triton": ["triton>=3.6"],
        # the fine-tuning loop (mdlm_ctc.mdlm, the `mdlm-ctc` CLI)
        "mdlm": ["transformers>=5.24", "tokenizers>=0.22", "safetensors>=0.4", "pyyaml>=6", "tqdm>=4.66",
                 "matplotlib>=3.8", "peft>=0.21"],
    },
    entry_points={"console_scripts": ["mdlm-ctc = mdlm_ctc.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
