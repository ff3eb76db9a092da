"""The shape of the package: an import graph of tdnn/ without circles, no module importing one above
it (typing-only and function-level imports included), the version written once; the core install
needs no extra."""

import ast
import pathlib
import re
import subprocess
import sys
import tomllib

import tdnn

ROOT = pathlib.Path(tdnn.__file__).parent
REPO = pathlib.Path(__file__).resolve().parents[1]  # the checkout these tests belong to
# Levels, bottom first (docs/architecture.md): a module imports only from its own level or below.
LEVELS = {"version": 0, "core": 0, "algebra": 1, "layers": 2, "planning": 3, "statistics": 4, "deploy": 4,
          "compress": 5, "analysis": 6, "finetune": 6, "config": 7, "cli": 7, "_vision": 7, "": 7}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """Every tdnn module ``path`` imports, anywhere in it (``from package import submodule`` is an
    import of the submodule; of a name defined in the package, one of the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tdnn"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tdnn":
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in imports(path, set(paths)) if m in paths and m != name} for name, path in paths.items()}


def level(module: str) -> int:
    parts = module.split(".")
    return LEVELS[parts[1] if len(parts) > 1 else ""]


def test_every_package_has_a_level():
    for module in graph():
        assert level(module) is not None, module


def test_no_module_imports_one_above_it():
    upward = sorted(f"{m} (level {level(m)}) imports {d} (level {level(d)})"
                    for m, deps in graph().items() for d in deps
                    if level(d) > level(m) and not (m == "tdnn" or d.startswith(m + ".")))
    assert upward == [], "\n".join(upward)


def test_the_import_graph_has_no_circle():
    edges = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_version_is_written_once():
    pyproject = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tdnn.version.__version__"}
    written = [p for p in ROOT.rglob("*.py") if re.search(r"^__version__\s*=", p.read_text(), re.M)]
    assert written == [ROOT / "version.py"]


# -- the core install ------------------------------------------------------------------------

EXTRAS = ["torchvision", "sklearn", "transformers", "onnx", "onnxscript", "onnxruntime", "tltorch",
          "matplotlib", "accelerate", "gguf", "hypothesis", "pytest"]
CORE_SCRIPT = f"""
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS!r}:
            raise ImportError(f"{{name}} is an extra, not a core dependency")
sys.meta_path.insert(0, Blocker())
import os, tempfile, torch, tdnn
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
small = tdnn.compress_model(net, ranks=0.5, calibration=[torch.randn(4, 3, 8, 8)]).eval()
path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
tdnn.save(small, path)
fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
x = torch.randn(2, 3, 8, 8)
assert torch.equal(tdnn.load(path, fresh).eval()(x), small(x))
print("core ok")
"""


def test_the_core_install_imports_compresses_saves_and_loads_without_any_extra():
    done = subprocess.run([sys.executable, "-c", CORE_SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert done.returncode == 0 and "core ok" in done.stdout, done.stderr[-2000:]


def test_every_third_party_import_of_the_core_is_a_core_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip().lower() for dep in project["dependencies"]}
    provides = {"yaml": "pyyaml"}  # import name -> distribution name, where they differ
    optional = {"tdnn/_vision.py", "tdnn/layers/hf_conv1d.py"}  # documented extras, imported on demand
    for path in sorted((REPO / "tdnn").rglob("*.py")):
        if str(path.relative_to(REPO)) in optional:
            continue
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in top:
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                root = module.split(".")[0]
                if not root or root == "tdnn" or root in sys.stdlib_module_names or root == "__future__":
                    continue
                assert provides.get(root, root) in names, f"{path.name} imports {root}, not a core dependency"
