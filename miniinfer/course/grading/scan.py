"""Read a student's exercise cell (its syntax tree, never its text) for code that does not belong there.

An exercise is flagged when its cell

* imports or uses the checking machinery (``miniinfer.course``), or a package object named like one of
  the chapter's exercises: ``from miniinfer.rope import apply_rope``, ``rope.apply_rope`` after the
  chapter's ``from miniinfer import rope``, ``from miniinfer.models.qwen2 import rope_cos_sin`` (a
  re-export), ``paged_decode_attention_torch``, or ``import *`` from a module holding them (a building
  block such as ``KVCache`` is fine);
* runs code from strings or files: ``exec``, ``eval``, ``compile``, ``__import__``, ``open``, or
  imports ``importlib``, ``runpy``, ``ctypes``, ``subprocess``, ``pickle``, …;
* reaches into the interpreter or IPython: ``sys.modules``, ``get_ipython``, ``set_custom_exc``,
  ``__builtins__``, ``__globals__``, ``__subclasses__``, ``os.system``, …

The modules holding the references are read from the chapter's check modules: every ``miniinfer``
module they import that defines one of the chapter's exercise names. Comments and strings are never
looked at (``# sanity check.`` is fine). IPython syntax is translated first; ``%time``/``%timeit``
lines are allowed and their code is read too; other magics and ``!shell`` lines are flagged.
"""

from __future__ import annotations

import ast
import importlib
import sys
from dataclasses import dataclass, field

__all__ = ["ChapterRules", "chapter_rules", "scan_exercise"]

CHECKING_MODULE = "miniinfer.course"
DYNAMIC_CODE_CALLS = {"exec", "eval", "compile", "__import__", "open", "breakpoint"}
ESCAPE_MODULES = {"importlib", "imp", "runpy", "ctypes", "subprocess", "builtins", "pickle", "marshal", "dill",
                  "shelve", "IPython", "ipykernel", "jupyter_client", "gc", "code", "codeop", "multiprocessing"}
INTERNAL_NAMES = {"get_ipython", "__builtins__", "__loader__", "__spec__", "__import__", "globals", "vars"}
# Attributes that reach into IPython or the interpreter, whatever object they are read from …
INTERNAL_ATTRIBUTES = {"set_custom_exc", "custom_exceptions", "CustomTB", "InteractiveTB", "showtraceback",
                       "_showtraceback", "user_ns", "user_global_ns", "run_cell", "run_code", "run_line_magic",
                       "run_cell_magic", "__globals__", "__code__", "__builtins__", "__subclasses__", "__bases__",
                       "__mro__", "__closure__", "__loader__", "f_globals", "f_locals", "f_back", "tb_frame",
                       "gi_frame"}
# … and those that do so only on one module (``model.modules()`` is fine, ``sys.modules`` is not).
MODULE_ATTRIBUTES = {"sys": {"modules", "excepthook", "settrace", "setprofile", "meta_path", "path_hooks",
                             "_getframe"},
                     "os": {"system", "popen", "_exit", "execv", "execve", "execvp", "spawnv", "fork", "kill"}}
ALLOWED_MAGICS = {"time", "timeit", "matplotlib"}


@dataclass
class ChapterRules:
    """What a chapter's exercise cells may not touch."""

    exercise_names: set[str]  # the functions the chapter's exercises define (apply_rope, …)
    reference_modules: set[str] = field(default_factory=set)  # modules holding those references
    bound_names: dict[str, str] = field(default_factory=dict)  # name -> dotted target, from the chapter's imports

    def is_reference(self, dotted: str) -> bool:
        """True for ``miniinfer.course…`` and for a package object named like an exercise:
        ``miniinfer.rope.apply_rope``, ``miniinfer.kernels.paged_attention.paged_decode_attention_torch``
        (a class such as ``miniinfer.kv_cache.KVCache`` is a building block, not an answer)."""
        if dotted == CHECKING_MODULE or dotted.startswith(CHECKING_MODULE + "."):
            return True
        last = dotted.rsplit(".", 1)[-1]
        return dotted.startswith("miniinfer.") and any(last == n or last.startswith(n + "_")
                                                       for n in self.exercise_names)


def _imported_modules(tree: ast.AST) -> set[str]:
    """Dotted names of the modules (and ``from`` targets that are modules) a syntax tree imports."""
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def _bindings(tree: ast.AST) -> dict[str, str]:
    """Names bound by imports: ``from miniinfer import rope as r`` -> {"r": "miniinfer.rope"}."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if alias.name != "*":
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def chapter_rules(check_sources: list[str], exercise_names: set[str], chapter_cells: list[str]) -> ChapterRules:
    """The rules for one chapter, from its check modules' sources and the chapter's other code cells."""
    imported = set()
    for source in check_sources:
        imported |= _imported_modules(ast.parse(source))
    references = set()
    for name in sorted(imported):
        if not name.startswith("miniinfer.") or name.startswith(CHECKING_MODULE):
            continue
        module = sys.modules.get(name)
        if module is None:
            try:
                module = importlib.import_module(name)
            except Exception:  # `from miniinfer.x import f`: "miniinfer.x.f" is not a module
                continue
        if any(hasattr(module, exercise) for exercise in exercise_names):
            references.add(name)
    bound: dict[str, str] = {}
    for source in chapter_cells:
        tree = _parse(source)
        if tree is not None:
            bound.update(_bindings(tree))
    return ChapterRules(set(exercise_names), references, bound)


def _parse(source: str) -> ast.AST | None:
    """The syntax tree of a cell, IPython syntax translated; None when it does not parse."""
    from IPython.core.inputtransformer2 import TransformerManager

    try:
        return ast.parse(TransformerManager().transform_cell(source))
    except (SyntaxError, ValueError):
        return None


def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None for anything that is not a plain attribute chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def _magic_call(node: ast.AST) -> tuple[str, list[str]] | None:
    """For ``get_ipython().run_line_magic('timeit', 'f(x)')``: ("timeit", ["f(x)"])."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("run_line_magic", "run_cell_magic", "system", "getoutput")
            and isinstance(node.func.value, ast.Call) and isinstance(node.func.value.func, ast.Name)
            and node.func.value.func.id == "get_ipython"):
        args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        name = args[0] if node.func.attr.startswith("run_") and args else "!" + (args[0] if args else "")
        return name, args[1:]
    return None


def scan_exercise(source: str, rules: ChapterRules) -> list[str]:
    """What the exercise cell ``source`` does that it should not, one finding per line ([] = clean)."""
    tree = _parse(source)
    if tree is None:
        return []  # a cell that does not parse is reported by the kernel (its SyntaxError), not here
    return sorted(set(_Scanner(rules).findings_in(tree)))


class _Scanner(ast.NodeVisitor):
    def __init__(self, rules: ChapterRules):
        self.rules = rules
        self.bound = dict(rules.bound_names)
        self.findings: list[str] = []

    def findings_in(self, tree: ast.AST) -> list[str]:
        # A name the cell assigns itself (a variable called `rope`) is not the chapter's import any more.
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                self.bound.pop(node.id, None)
            elif isinstance(node, ast.arg):
                self.bound.pop(node.arg, None)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.bound.pop(node.name, None)
        self.bound.update(_bindings(tree))
        self.visit(tree)
        return self.findings

    def flag(self, text: str) -> None:
        self.findings.append(text)

    def _check_module(self, dotted: str, how: str) -> None:
        if self.rules.is_reference(dotted):
            what = ("the checking machinery" if dotted.startswith(CHECKING_MODULE)
                    else "the package's reference answers")
            self.flag(f"{how} {dotted} ({what})")
        elif dotted.split(".")[0] in ESCAPE_MODULES:
            self.flag(f"{how} {dotted} (loads or runs code indirectly)")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_module(alias.name, "imports")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if not node.module or node.level:
            return
        self._check_module(node.module, "imports from")
        for alias in node.names:
            if alias.name == "*" and node.module in self.rules.reference_modules:
                self.flag(f"imports * from {node.module} (the package's reference answers)")
            elif not self.rules.is_reference(node.module) and self.rules.is_reference(f"{node.module}.{alias.name}"):
                self.flag(f"imports {alias.name} from {node.module} (the package's reference answers)")

    def visit_Call(self, node: ast.Call) -> None:
        magic = _magic_call(node)
        if magic is not None:
            name, args = magic
            if name not in ALLOWED_MAGICS:
                self.flag(f"runs the IPython command {'%' + name if not name.startswith('!') else name}")
            for code in args:  # %timeit f(x): read f(x) as code too
                inner = _parse(code)
                if inner is not None:
                    self.findings.extend(_Scanner(self.rules).findings_in(inner))
            for arg in node.args[len(args) + 1:]:
                self.visit(arg)
            return
        if isinstance(node.func, ast.Name) and node.func.id in DYNAMIC_CODE_CALLS:
            self.flag(f"calls {node.func.id}() (runs or reads code from strings or files)")
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in INTERNAL_NAMES:
            self.flag(f"uses {node.id} (interpreter or IPython internals)")
        target = self.bound.get(node.id)
        if target is not None and isinstance(node.ctx, ast.Load) and self.rules.is_reference(target):
            self.flag(f"uses {node.id} = {target} (the package's reference answers or the checks)")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        parts = _dotted(node)
        root_module = self.bound.get(parts[0]) if parts and len(parts) == 2 else None
        if node.attr in INTERNAL_ATTRIBUTES or node.attr in MODULE_ATTRIBUTES.get(root_module, ()):
            shown = ".".join(parts) if parts else f"….{node.attr}"
            self.flag(f"uses {shown} (interpreter or IPython internals)")
        if parts and parts[0] in self.bound:
            dotted = ".".join([self.bound[parts[0]], *parts[1:]])
            if self.rules.is_reference(dotted) and not self.rules.is_reference(self.bound[parts[0]]):
                self.flag(f"uses {'.'.join(parts)} = {dotted} (the package's reference answers)")
        self.generic_visit(node)
