"""The package's modules import one way: each only from modules on a lower level of ``LAYERS``.

The levels follow the data flow (see docs/architecture.md): capture -> project -> features ->
store -> precondition -> score -> weights -> unlearn -> evaluate, with the helpers every stage
uses below and the command line on top. Imports are read with ``ast`` (those inside functions
too); a package (``ops``, ``store``, ``triton_kernels``) is one unit, free inside itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A new module must be placed here; a module may import only from lower levels.
LAYERS = [
    ("errors",),  # the exceptions every input check raises, and how their messages name parameters
    ("options",),  # ScoreOptions, UnlearnOptions and the names each option accepts (no torch)
    ("batching",),  # what a batch dict means (validation, ids, data positions, length buckets)
    ("config", "lm", "distributed", "data", "outputs"),  # below the flow
    ("sharding",),  # FSDP2-sharded models: the LM head inside its forward, whole weights
    ("ops",),  # torch references and the backend registry
    ("triton_kernels",),  # kernels of the ops (installed as fastinfluence.triton_kernels)
    ("moe",),  # MoE routers and experts as captured layers (hooks driven by capture), weight coverage
    ("capture",),
    ("normalizer", "adam"),  # adam: LESS's Adam update directions of one layer (the callback's "adam" rows);
    # normalizer: optimizer-aware (TrackStar) second-moment scales of A and G, folded into P_in / P_out
    ("projection", "exact", "kfac"),  # project (kfac: full-dimension K-FAC from captured factors)
    ("features",),
    ("store",),
    ("extract", "index"),  # GradientExtractor: capture + project, and the store writer; FAISS index of a store
    ("callback",),  # InfluenceCallback: the extractor's projection inside a Trainer's own step
    ("precondition",),
    ("scoring",),  # score
    ("storeless", "trajectory"),  # scoring without a store; TracIn-CP over the callback's interval stores
    ("weights", "attribution"),  # attribution: LDS, recall@k, Spearman (metrics of scores, no model)
    ("losses",),  # the unlearning losses (also what evaluate measures)
    ("unlearn",),
    ("evaluate",),
    ("__init__",),  # the public API (fastinfluence/__init__.py)
    ("integrations",),  # trainers for other frameworks (open-unlearning)
    ("demo",),  # the backdoor demo (its command is cli.demo)
    ("cli",),  # the command line: one module per command
    ("__main__",),
]
LEVEL = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _sources() -> dict[str, Path]:
    """Dotted module name -> file, for the package and its Triton kernels."""
    out = {}
    roots = ((ROOT / "fastinfluence", "fastinfluence"), (ROOT / "triton_kernels", "fastinfluence.triton_kernels"))
    for base, prefix in roots:
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


SOURCES = _sources()


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import of a fastinfluence module in ``path``."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # ``from . import ops`` names a submodule; ``from . import score`` an attribute of the package
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in SOURCES]
            found += [(node.lineno, s) for s in subs] or [(node.lineno, target)]
    return [(line, name) for line, name in found if name == "fastinfluence" or name.startswith("fastinfluence.")]


def test_every_module_has_a_level():
    missing = sorted({_unit(m) for m in SOURCES} - set(LEVEL))
    assert not missing, f"place these modules in tests/test_layers.py LAYERS: {missing}"


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_module_imports_only_from_lower_levels(module):
    unit = _unit(module)
    where = SOURCES[module].relative_to(ROOT)
    wrong = [
        f"{where}:{line} imports {name} (level {LEVEL[_unit(name)]}, not below {LEVEL[unit]})"
        for line, name in _imports(module, SOURCES[module])
        if _unit(name) != unit and LEVEL[_unit(name)] >= LEVEL[unit]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "store.py"
    bad.write_text("def f():\n    from .scoring import score\n")
    assert _imports("fastinfluence.store", bad) == [(2, "fastinfluence.scoring")]
    assert LEVEL["scoring"] > LEVEL["store"]


def test_every_fi_name_the_docs_use_resolves_in_a_fresh_interpreter():
    """``fi.<name>`` as README.md and docs/ write it works after a bare ``import fastinfluence as fi``."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    texts = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    names = sorted({m for t in texts for m in re.findall(r"\bfi\.([A-Za-z_]\w*)", t.read_text())})
    assert "batching" in names and "Normalizer" in names
    code = "import fastinfluence as fi\n" + "".join(f"getattr(fi, {n!r})\n" for n in names)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
