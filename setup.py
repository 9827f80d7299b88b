"""Build script.

The Python package installs everywhere. Compiled parts are optional: when a C++ compiler
(or, with FASTINFLUENCE_BUILD_CUDA=1, nvcc) is missing or fails, the install still
succeeds and the ops fall back to their torch implementations.
"""

import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

ext_modules = []
cmdclass = {}

try:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
    from build_helpers import OptionalBuildExt, extension_modules  # noqa: E402

    ext_modules = extension_modules()
    cmdclass["build_ext"] = OptionalBuildExt
except ImportError:  # csrc/build_helpers.py absent: pure-Python install
    cmdclass["build_ext"] = build_ext


def _packages() -> list[str]:
    """Every package of the tree, found on disk so that none can be left out of a wheel.

    ``triton_kernels/`` installs as ``fastinfluence.triton_kernels`` (a top-level ``triton_kernels``
    is another project's name) and ``csrc/`` as ``fastinfluence.csrc``: sources only, no ``__init__.py``.
    """
    packages = find_packages(include=["fastinfluence", "fastinfluence.*"])
    packages += ["fastinfluence." + name for name in find_packages(include=["triton_kernels", "triton_kernels.*"])]
    return [*packages, "fastinfluence.csrc"]


setup(
    packages=_packages(),
    package_dir={
        "fastinfluence": "fastinfluence",
        "fastinfluence.triton_kernels": "triton_kernels",
        # The CUDA sources travel with an installed package (built on first use on a GPU).
        "fastinfluence.csrc": "csrc",
    },
    package_data={
        "fastinfluence.integrations": ["open_unlearning_configs/*/*.yaml", "open_unlearning_configs/*/*/*/*.yaml"],
        "fastinfluence.csrc": ["*.h", "*.cu", "*.cpp", "*.py", "*.sh", "*.md"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
