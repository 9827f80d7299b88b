"""A wheel built from the tree holds every package of the tree and runs from a fresh virtualenv."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# setup.py's package_dir: these folders install under another name
RELOCATED = {"triton_kernels": "fastinfluence.triton_kernels"}
# What a copy of the tree leaves out: outputs, caches and builds that are not part of a checkout.
NOT_THE_TREE = shutil.ignore_patterns(
    ".git", ".venv", ".peers", "build", "dist", "*.egg-info", "__pycache__", "*.so", "runs", "demo_out*", "gpu_out"
)


def tree_packages() -> list[str]:
    """Every folder holding an ``__init__.py``, named as it installs."""
    found = []
    for top in ("fastinfluence", *RELOCATED):
        for init in sorted((ROOT / top).rglob("__init__.py")):
            parts = init.parent.relative_to(ROOT).parts
            found.append(".".join([RELOCATED.get(parts[0], parts[0]), *parts[1:]]))
    return found


def run(cmd, cwd, timeout=300, **kw):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _seed_compiled_module(src: Path) -> str | None:
    """The checkout's compiled host module, placed where the wheel's ``build_ext`` puts its own: newer
    than its sources, it is packed as built instead of compiled again (the same flags; ~12 s of g++).
    Its file name, or None when the checkout has none (then the wheel build compiles it)."""
    from setuptools.dist import Distribution

    found = sorted((ROOT / "fastinfluence" / "ops" / "backends").glob("_fi_cpu.*.so"))
    if not found:
        return None
    build = Distribution().get_command_obj("build")
    build.finalize_options()
    target = src / build.build_platlib / "fastinfluence" / "ops" / "backends"
    target.mkdir(parents=True)
    shutil.copy2(found[-1], target / found[-1].name)
    return found[-1].name


def test_tree_packages_are_found():
    names = tree_packages()
    assert {"fastinfluence", "fastinfluence.demo", "fastinfluence.ops.backends", "fastinfluence.triton_kernels"} <= set(
        names
    )


def test_wheel_from_the_tree_holds_every_package_and_runs_the_demo_entry_point(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=NOT_THE_TREE)
    built = _seed_compiled_module(src)
    dist = tmp_path / "dist"
    # offline, against this environment's setuptools and pybind11, as the GPU suite installs
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, "."], src)
    (wheel,) = dist.glob("fastinfluence-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = tree_packages()
    missing = [p for p in packages if p.replace(".", "/") + "/__init__.py" not in names]
    assert not missing, f"the wheel leaves out {missing}"
    assert "fastinfluence/csrc/project.cu" in names and "fastinfluence/csrc/build_helpers.py" in names
    if built is not None:
        assert f"fastinfluence/ops/backends/{built}" in names

    # A fresh virtualenv with this one's dependencies behind it: a plain path line adds them
    # without running their .pth files, so the editable install of the checkout stays out.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path).strip())
    (site / "project_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], tmp_path)

    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTINFLUENCE_CSRC")}
    out = run([env_dir / "bin" / "fastinfluence", "demo", "--quick", "--help"], tmp_path, env=clean)
    assert "--quick" in out
    probe = "import importlib, sys\nfor name in sys.argv[1:]:\n    print(importlib.import_module(name).__file__)\n"
    files = run([python, "-c", probe, *packages], tmp_path, env=clean).split()
    assert len(files) == len(packages)
    outside = [f for f in files if not Path(f).is_relative_to(site)]
    assert not outside, f"imported from outside the installed wheel: {outside}"
