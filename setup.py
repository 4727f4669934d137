"""Builds nudge_engine with its C++ core (`nudge_engine._core`, pybind11, C++17).

CUDA sources in csrc/cuda/ are added only where torch was built with CUDA and nvcc exists.
`kernels/` (Triton) ships inside the package as `nudge_engine.kernels`: `nudge_engine/kernels` is a
symlink to it, and the folder has no `__init__.py`, so a checkout's root on sys.path never hides an
installed package named `kernels` (Hugging Face's, which transformers imports); see kernels/README.md.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup
from pybind11.setup_helpers import Pybind11Extension, build_ext


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


cpp_sources = sorted(glob.glob("csrc/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
define_macros = []
if cuda_sources and _torch_has_cuda():
    # The CUDA part is optional; the engine runs its Triton kernels without it.
    define_macros.append(("NUDGE_WITH_CUDA", "1"))

ext_modules = [
    Pybind11Extension(
        "nudge_engine._core",
        cpp_sources,
        include_dirs=["csrc"],
        cxx_std=17,
        define_macros=define_macros,
        extra_compile_args=["-O2"],
    )
]

# Ranges for users; an upper bound only where a release is known to break, with the reason beside it
# (none today). The versions the suite last passed with are locked in constraints.txt (`make lock`).
runtime = [
    "torch>=2.4",
    "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
    "safetensors>=0.4",
    "tokenizers>=0.21",         # encode_batch_fast (model/tokenizer.py)
    "jinja2>=3.1",
    "numpy>=1.24",
    "tqdm>=4.60",
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "pydantic>=2.5",
    "prometheus_client>=0.19",
    "gguf>=0.10",          # .gguf checkpoints (imported only when a .gguf path is given)
]
test = [
    "pytest>=7",
    "transformers>=4.45",
    "openai>=1.30",
    "httpx>=0.27",
    "scipy>=1.10",
    "schemathesis>=4.0",
    "lm-eval[api]>=0.4.8",
    "accelerate>=0.26",    # transformers needs it to read a GGUF (the real-model reference)
]

setup(
    name="nudge_engine",
    version="0.1.0",
    description="Fast exact nudging: a base model writes, a small aligned model writes where the base is unsure",
    # Every subpackage (cross/, server/, ... found, not listed: a hand-kept list once left two out
    # of the wheel); `.ci/wheel_check.sh` installs the wheel and runs it.
    # nudge_engine.kernels is a namespace package (no __init__.py; see the docstring), so it is named.
    packages=find_packages(include=["nudge_engine", "nudge_engine.*"]) + ["nudge_engine.kernels"],
    package_data={"nudge_engine.testing": ["*.txt"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    install_requires=runtime,
    extras_require={"test": test, "bench": ["matplotlib>=3.7"]},
    entry_points={"console_scripts": ["nudge=nudge_engine.cli:main"]},
)
