"""Porting Python sources: imports of label_studio_ml, and the reference's TRAIN_EVENTS on its model classes."""
from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass

from .names import _MODULE_PATH, PORTED_MODULES, REFERENCE, TRAIN_EVENTS_LINES, Unported


# -- Python ---------------------------------------------------------------------------------


@dataclass
class _Edit:
    line: int  # 1-based
    start: int  # column offsets in the line's characters
    end: int
    text: str


def _apply_edits(source: str, edits: list[_Edit], inserts: list[tuple[int, str]]) -> str:
    """Replace spans (same-line edits) and insert text before given lines (1-based)."""
    lines = source.splitlines(keepends=True)
    by_line: dict[int, list[_Edit]] = {}
    for edit in edits:
        by_line.setdefault(edit.line, []).append(edit)
    for number, line_edits in by_line.items():
        line = lines[number - 1]
        for edit in sorted(line_edits, key=lambda e: e.start, reverse=True):
            line = line[:edit.start] + edit.text + line[edit.end:]
        lines[number - 1] = line
    for number, text in sorted(inserts, key=lambda item: item[0], reverse=True):
        lines.insert(number - 1, text)
    return "".join(lines)


def _lsdeploy_has(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(f"lsdeploy.{module}"), name)
    except ImportError:
        return False


def _parents(tree: ast.AST) -> dict:
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def _is_reference(module: str | None) -> bool:
    return module is not None and (module == REFERENCE or module.startswith(REFERENCE + "."))


def _port_python(rel: str, source: str, unported: list) -> tuple[str, bool, list[str], bool]:
    """(new source, uses label-studio-sdk, model classes found, imports the reference)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        if REFERENCE in source:
            unported.append(Unported(rel, exc.lineno or 1, f"not Python this interpreter parses ({exc.msg}); "
                                                           "change its label_studio_ml imports to lsdeploy by hand"))
        return source, False, [], False
    text_lines = source.splitlines(keepends=True)
    edits: list[_Edit] = []
    inserts: list[tuple[int, str]] = []
    uses_sdk = False
    imports_reference = False
    base_names = {"label_studio_ml.model.LabelStudioMLBase"}  # names bound to the reference's LabelStudioMLBase
    module_names = set()  # REFERENCE when `import label_studio_ml[.x]` binds the package's own name

    def replace_at(line: int, col: int, old: str, new: str, chars: bool = False) -> None:
        if not chars:  # ast's column offsets count UTF-8 bytes
            col = len(text_lines[line - 1].encode("utf-8")[:col].decode("utf-8", errors="replace"))
        edits.append(_Edit(line, col, col + len(old), new))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level:
            if _is_reference(node.module):
                imports_reference = True
                parts = node.module.split(".")
                names = [alias.name for alias in node.names]
                if len(parts) == 1:
                    ok = all(n in PORTED_MODULES for n in names)
                    for alias in node.names:
                        if alias.name == "model":
                            base_names.add(f"{alias.asname or alias.name}.LabelStudioMLBase")
                    missing = [n for n in names if n not in PORTED_MODULES]
                    what = f"from label_studio_ml import {', '.join(missing)}"
                else:
                    ok = len(parts) == 2 and parts[1] in PORTED_MODULES
                    missing = [n for n in names if n != "*" and not _lsdeploy_has(parts[1], n)] if ok else []
                    what = f"{node.module} (lsdeploy has no such module)" if not ok else ""
                    if ok and parts[1] == "model":
                        base_names.update(a.asname or a.name for a in node.names if a.name == "LabelStudioMLBase")
                if not ok:
                    unported.append(Unported(rel, node.lineno, f"{what}: not ported; lsdeploy provides only "
                                                               f"label_studio_ml.{{{','.join(PORTED_MODULES)}}}"))
                    continue
                match = re.compile(r"\bfrom\s+(label_studio_ml)\b").search(text_lines[node.lineno - 1])
                if match:
                    replace_at(node.lineno, match.start(1), REFERENCE, "lsdeploy", chars=True)
                if missing:
                    unported.append(Unported(rel, node.lineno, f"lsdeploy.{parts[1]} has no {', '.join(missing)}: "
                                                               "replace it in your code"))
            elif node.module and (node.module == "label_studio_sdk" or node.module.startswith("label_studio_sdk.")):
                uses_sdk = True
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "label_studio_sdk":
                    uses_sdk = True
                if not _is_reference(alias.name):
                    continue
                imports_reference = True
                parts = alias.name.split(".")
                if len(parts) > 2 or (len(parts) == 2 and parts[1] not in PORTED_MODULES):
                    unported.append(Unported(rel, node.lineno, f"import {alias.name}: not ported; lsdeploy provides "
                                                               f"only label_studio_ml.{{{','.join(PORTED_MODULES)}}}"))
                    continue
                if alias.asname and alias.name == f"{REFERENCE}.model":
                    base_names.add(f"{alias.asname}.LabelStudioMLBase")
                if not alias.asname:
                    module_names.add(REFERENCE)
                replace_at(alias.lineno, alias.col_offset, REFERENCE, "lsdeploy")
        elif isinstance(node, ast.Attribute) and node.attr == "label_interface":
            uses_sdk = True
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_PATH.match(node.value) \
                and "." in node.value:
            unported.append(Unported(rel, node.lineno, f"the string {node.value!r} names a label_studio_ml module "
                                                       "(a dynamic import or a mock target): change it by hand"))

    # Names used through a reference module: label_studio_ml.model.X, lsm.utils.Y, ...
    parents = _parents(tree)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and node.id == REFERENCE and REFERENCE in module_names):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.attr in PORTED_MODULES:
            replace_at(node.lineno, node.col_offset, REFERENCE, "lsdeploy")
        else:
            unported.append(Unported(rel, node.lineno, "label_studio_ml used for something lsdeploy does not "
                                                       "provide: change it by hand"))

    # TRAIN_EVENTS on each reference LabelStudioMLBase subclass that has none.
    classes = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        bases = [_base_name(base) for base in node.bases]
        if not any(b == "LabelStudioMLBase" or b.endswith(".LabelStudioMLBase") or b in base_names for b in bases):
            continue
        classes.append(node.name)
        if not any(b in base_names or b == "LabelStudioMLBase" and imports_reference for b in bases):
            continue  # lsdeploy's own LabelStudioMLBase: its TRAIN_EVENTS are the author's choice
        if any(_assigns(stmt, "TRAIN_EVENTS") for stmt in node.body):
            continue
        first = node.body[0]
        if first.lineno == node.lineno:
            unported.append(Unported(rel, node.lineno, f"class {node.name} is on one line: add "
                                                       f"{TRAIN_EVENTS_LINES[1]} to it by hand"))
            continue
        docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str)
        indent = " " * first.col_offset
        block = "".join(f"{indent}{line}\n" for line in TRAIN_EVENTS_LINES)
        inserts.append((first.end_lineno + 1 if docstring else first.lineno, block))  # after a docstring
    if not edits and not inserts:
        return source, uses_sdk, classes, imports_reference
    return _apply_edits(source, edits, inserts), uses_sdk, classes, imports_reference


def _base_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _base_name(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def _assigns(stmt: ast.stmt, name: str) -> bool:
    if isinstance(stmt, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets)
    if isinstance(stmt, ast.AnnAssign):
        return isinstance(stmt.target, ast.Name) and stmt.target.id == name
    return False
