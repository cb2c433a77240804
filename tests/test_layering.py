"""The library runs without Ray: gt_ray never imports ray (only jobs/ and serve/ may)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gt_ray_source_never_imports_ray_or_jobs():
    for path in (ROOT / "gt_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in ("ray", "jobs", "serve"), f"{path.relative_to(ROOT)} imports {name}"


def test_importing_every_gt_ray_module_loads_no_ray():
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for p in (ROOT / "gt_ray").rglob("*.py"))  # packages (gt_ray.rounds) and their modules
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\nprint(len(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "0"


def test_no_unsafe_deserialization():
    for folder in ("gt_ray", "jobs", "serve"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert "pickle.load" not in text, path
            for line in text.splitlines():
                if "torch.load(" in line:
                    assert "weights_only=True" in line, f"{path}: {line.strip()}"


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:  # `from a import b`: a and a.b
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_the_org_library_neither_parses_flags_nor_prints():
    """Flags, printing and progress bars belong to the CLI (jobs/org.py)."""
    paths = sorted((ROOT / "gt_ray" / "org").rglob("*.py"))
    assert paths
    for path in paths:
        for name in _imports(path):
            assert name.split(".")[0] not in ("argparse", "tqdm"), f"{path.relative_to(ROOT)} imports {name}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "print", f"{path.relative_to(ROOT)}:{node.lineno} calls print"


def test_provider_code_never_imports_the_org_client():
    """The provider (rounds, the service) and the organization (gt_ray.org) share only the wire format."""
    paths = sorted((ROOT / "gt_ray").glob("rounds*.py")) + sorted((ROOT / "serve").rglob("*.py"))
    for path in paths:
        for name in _imports(path):
            assert not (name == "gt_ray.org" or name.startswith("gt_ray.org.")), \
                f"{path.relative_to(ROOT)} imports {name}"
