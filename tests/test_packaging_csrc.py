"""An installed package carries the CUDA sources (built on first use), and the cuda backend finds them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_built_package_holds_the_csrc_sources_and_the_backend_finds_them(tmp_path):
    lib = tmp_path / "lib"
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    shipped = lib / "fastinfluence" / "csrc"
    for name in (ROOT / "csrc").iterdir():
        if name.suffix in (".h", ".cu", ".cpp", ".py"):
            assert (shipped / name.name).read_bytes() == name.read_bytes(), name.name
    # what the cuda backend resolves, imported from the built tree instead of the checkout
    probe = (
        "import os, sys; os.environ.pop('FASTINFLUENCE_CSRC', None); sys.path.insert(0, sys.argv[1]); "
        "import fastinfluence.ops.backends.cuda as c; print(c.CSRC)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(lib)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()) == shipped.resolve()
