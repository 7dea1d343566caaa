"""Imports go one way: the layer order of docs/architecture.md, checked.

Every module of ``collabdm_jax``, ``launch`` and ``experiments`` is parsed
(``ast``, so imports inside functions count too). The order is the three
lines of the code block in ``docs/architecture.md``: a module may import what
stands to its left, never what stands to its right.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("collabdm_jax", "launch", "experiments")
# Names in the drawing that stand for a subpackage, in its own order.
EXPANSIONS = {
    "data": ("data.types", "data.tabular", "data.images", "data"),
    "baselines": ("baselines.common", "baselines.model_cache", "baselines.nets",
                  "baselines.central_dm",
                  "baselines.merged_local_dm", "baselines.fedavg",
                  "baselines.dense", "baselines"),
}
ENTRY_POINTS = ("launch", "experiments")


def drawn_order(text):
  """The modules of the three drawn lines, bottom layer first."""
  block = re.search(r"```\n(foundations:.*?)```", text, re.S)
  assert block, "docs/architecture.md lost its three-line drawing"
  lines = block.group(1).strip().splitlines()
  assert len(lines) == 3, lines
  order = []
  for line in lines:
    for name in line.split(":", 1)[1].split("→"):
      name = name.strip()
      order += EXPANSIONS.get(name, (name,))
  return order


def module_name(path):
  rel = path.relative_to(ROOT).with_suffix("")
  parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
  return ".".join(parts)


def project_files():
  for package in PACKAGES:
    yield from sorted((ROOT / package).rglob("*.py"))


def imports(tree):
  """``(module imported, line, inside a function?)`` of every import."""
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(
          child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        out.extend((a.name, child.lineno, in_function) for a in child.names)
      elif isinstance(child, ast.ImportFrom) and child.level == 0:
        # ``from pkg import mod`` imports pkg.mod when that is a module.
        out.extend((f"{child.module}.{a.name}", child.lineno, in_function)
                   for a in child.names)
      visit(child, nested)

  visit(tree, False)
  return out


def resolve(name, known):
  """The longest known module that ``name`` is or lies inside, or None."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    candidate = ".".join(parts[:n])
    if candidate in known:
      return candidate
  return None


def rank_of(module, order):
  """Position in the drawn order; entry points rank by their package."""
  if module.startswith("collabdm_jax"):
    name = module[len("collabdm_jax."):] if "." in module else ""
    return order.index(name) if name in order else None
  return order.index(module.split(".")[0])


@pytest.fixture(scope="module")
def graph():
  files = {module_name(p): p for p in project_files()}
  return files, {m: imports(ast.parse(p.read_text())) for m, p in
                 files.items()}


@pytest.fixture(scope="module")
def order():
  return drawn_order((ROOT / "docs" / "architecture.md").read_text())


def test_every_library_module_is_placed(graph, order):
  files, _ = graph
  placed = set(order)
  missing = sorted(m for m in files if m.startswith("collabdm_jax.")
                   and m[len("collabdm_jax."):] not in placed)
  assert not missing, f"place these in docs/architecture.md: {missing}"
  stale = sorted(m for m in placed - set(ENTRY_POINTS)
                 if f"collabdm_jax.{m}" not in files)
  assert not stale, f"docs/architecture.md names missing modules: {stale}"


def test_no_import_points_up(graph, order):
  files, deps = graph
  known = set(files)
  upward = []
  for module, found in deps.items():
    if module == "collabdm_jax":
      continue
    mine = rank_of(module, order)
    for name, line, _ in found:
      target = resolve(name, known)
      if target is None or target == "collabdm_jax" or target == module:
        continue
      theirs = rank_of(target, order)
      same_entry = (module.split(".")[0] == target.split(".")[0]
                    and module.split(".")[0] in ENTRY_POINTS)
      if theirs > mine or (theirs == mine and not same_entry):
        upward.append(f"{files[module].relative_to(ROOT)}:{line} imports "
                      f"{target}")
  assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_entry_points_import_each_other_without_cycles(graph):
  files, deps = graph
  known = set(files)
  edges = {m: {resolve(n, known) for n, _, _ in found} - {None, m}
           for m, found in deps.items()
           if m.split(".")[0] in ENTRY_POINTS}
  state = {}

  def visit(m, path):
    if state.get(m) == "done":
      return
    assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
    state[m] = "open"
    for n in sorted(edges.get(m, ())):
      visit(n, path + [m])
    state[m] = "done"

  for m in sorted(edges):
    visit(m, [])


def test_library_imports_at_module_level_only(graph):
  files, deps = graph
  lazy = [f"{files[m].relative_to(ROOT)}:{line} imports {name}"
          for m, found in deps.items() if m.startswith("collabdm_jax")
          for name, line, in_function in found
          if in_function and name.split(".")[0] in PACKAGES]
  assert not lazy, "imports inside functions:\n" + "\n".join(lazy)


def test_no_dynamic_imports():
  found = []
  for path in project_files():
    for node in ast.walk(ast.parse(path.read_text())):
      if not isinstance(node, ast.Call):
        continue
      f = node.func
      name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
      if name in ("import_module", "__import__"):
        found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
  assert not found, f"dynamic imports: {found}"


def test_checker_sees_an_upward_and_a_lazy_import(order):
  """The checks above would catch a violation (not vacuous)."""
  tree = ast.parse("from collabdm_jax import pipeline\n"
                   "def f():\n  from collabdm_jax import stages\n")
  found = imports(tree)
  assert found == [("collabdm_jax.pipeline", 1, False),
                   ("collabdm_jax.stages", 3, True)]
  assert rank_of("collabdm_jax.pipeline", order) > rank_of(
      "collabdm_jax.setup", order)
