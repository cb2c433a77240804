"""The library runs without Ray: gt_ray never imports ray (only jobs/ and serve/ may)."""

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


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


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (``from a import b`` gives a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_library_neither_parses_flags_nor_prints():
    """Flags, printing and progress bars belong to the CLIs in jobs/ (e.g. jobs/org.py); the
    library logs."""
    paths = sorted((ROOT / "gt_ray").rglob("*.py"))
    assert paths
    for path in paths:
        for name in _imported_modules(path):
            assert name.split(".")[0] not in ("argparse", "tqdm"), f"{path.relative_to(ROOT)} imports {name}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "print", f"{path.relative_to(ROOT)}:{node.lineno} calls print"


def test_provider_code_never_imports_the_org_client():
    """The provider (rounds, the service) and the organization (gt_ray.org) share only the wire format."""
    paths = sorted((ROOT / "gt_ray" / "rounds").rglob("*.py")) + sorted((ROOT / "serve").rglob("*.py"))
    assert len(paths) > 3
    for path in paths:
        for name in _imported_modules(path):
            assert not (name == "gt_ray.org" or name.startswith("gt_ray.org.")), \
                f"{path.relative_to(ROOT)} imports {name}"


def test_importing_the_config_loads_no_model_code():
    """Loading a YAML must not pull in torch, transformers or the translator's model."""
    code = ("import sys\nimport gt_ray.config\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
            " or m.startswith('gt_ray.translator.') and m != 'gt_ray.translator.config'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_jobs_share_code_through_gt_ray_not_each_other():
    """The translator and evaluation jobs import no other job but jobs.common (the dispatcher
    `jobs.train_translator.main` may start the tune and eval jobs), and no job imports a
    job that imports it back."""
    jobs = {p.stem: p for p in (ROOT / "jobs").glob("*.py") if p.stem != "__init__"}
    graph = {name: {m.split(".")[1] for m in _imported_modules(path) if m.startswith("jobs.") and m.split(".")[1] in jobs}
             for name, path in jobs.items()}
    for name in ("tune_translator", "eval_translator", "evaluate", "collaborate"):
        assert graph[name] <= {"common"}, f"jobs/{name}.py imports {sorted(graph[name] - {'common'})}"
    assert graph["train_translator"] <= {"common", "tune_translator", "eval_translator"}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph.get(start, ()))

    circles = [name for name in graph if reaches(name, name, {name})]
    assert not circles, f"import circle among jobs: {circles}"
