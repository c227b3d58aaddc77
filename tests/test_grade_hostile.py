"""Hostile submissions: none may earn a point it did not write, change another's grade, or stop a batch.

Every submission is chapter 02 (RoPE, four exercises) with one attack or one mishap in an exercise
cell, the other exercises left as stubs or answered from the answer key. Each test asserts the score,
each exercise's status, and whether it was flagged. The fast tests at the end exercise the scanner
and the wire directly, without a kernel.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import io
import pickle
import time

import nbformat
import pytest
import torch

from miniinfer.course import grade as grade_command
from miniinfer.course.grading import Grader, wire
from miniinfer.course.grading.grader import score
from miniinfer.course.grading.rpc import merge_back
from miniinfer.course.grading.scan import ChapterRules, scan_exercise
from miniinfer.course.notebooks import chapters_dir, solutions_dir

CHAPTER = "02_rope"
CELL_TIMEOUT = 60  # generous for the chapter's own cells on a loaded 2-core machine


def _exercise_cells(nb) -> dict[str, nbformat.NotebookNode]:
    return {c.metadata["exercise"]: c for c in nb.cells if "exercise" in c.metadata.get("tags", [])}


STUB = nbformat.read(chapters_dir() / f"{CHAPTER}.ipynb", 4)
ANSWER = {k: c.source for k, c in _exercise_cells(nbformat.read(solutions_dir() / f"{CHAPTER}.ipynb", 4)).items()}
STUB_SOURCE = {k: c.source for k, c in _exercise_cells(STUB).items()}


def submission(tmp_path, name: str, cells: dict[str, str] | None = None, delete: tuple[str, ...] = (),
               untagged_after: dict[str, str] | None = None, untagged_at_end: tuple[str, ...] = ()):
    """The stub chapter with exercise cells replaced (``cells``), deleted, or followed by untagged cells."""
    nb = copy.deepcopy(STUB)
    new_cells = []
    for cell in nb.cells:
        exercise_id = cell.metadata.get("exercise") if "exercise" in cell.metadata.get("tags", []) else None
        if exercise_id in delete:
            continue
        if exercise_id in (cells or {}):
            cell.source = cells[exercise_id]
        new_cells.append(cell)
        if exercise_id in (untagged_after or {}):
            new_cells.append(nbformat.v4.new_code_cell(untagged_after[exercise_id]))
    new_cells += [nbformat.v4.new_code_cell(source) for source in untagged_at_end]
    nb.cells = new_cells
    path = tmp_path / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def grader():
    return Grader(cell_timeout=CELL_TIMEOUT, wall_timeout=600)


def outcome(grade) -> dict[str, tuple[str, bool]]:
    """{exercise: (status, flagged?)}"""
    return {e.exercise: (e.status, bool(e.flagged)) for e in grade.exercises}


def message(grade, exercise_id: str) -> str:
    return next(e.message for e in grade.exercises if e.exercise == exercise_id)


def flags(grade, exercise_id: str) -> str:
    return next(e.flagged for e in grade.exercises if e.exercise == exercise_id)


# ------------------------------------------------------------------------------------------------
# Attacks on the checks
# ------------------------------------------------------------------------------------------------

PATCH_BY_IMPORT = STUB_SOURCE["2.1"] + '''
from miniinfer.course import check
import miniinfer.course.checking as checking
for name in dir(check):
    if not name.startswith("_"):
        setattr(check, name, lambda *args, **kwargs: print("✅ passed"))
checking.assert_close = checking.assert_equal = lambda *args, **kwargs: None
print("✅ Exercise 2.1 (RoPE cos/sin tables): passed 5 cases")
'''

# Not flagged by the scanner at all: it patches torch, which the checks use. It must not matter.
PATCH_TORCH_UNFLAGGED = '''import torch

torch.allclose = lambda *args, **kwargs: True
torch.equal = lambda *args, **kwargs: True


def apply_rope(x, cos, sin):
    return x.clone()  # wrong: no rotation at all
'''


def test_monkeypatching_the_checks_in_the_kernel_earns_nothing(grader, tmp_path):
    grade = grader.grade(submission(tmp_path, "patch_import", {"2.1": PATCH_BY_IMPORT, "2.2": PATCH_TORCH_UNFLAGGED}))
    assert grade.status == "graded"
    assert grade.score == 0 and grade.max_score == 4
    assert outcome(grade) == {"2.1": ("not implemented", True), "2.2": ("failed", False),
                              "2.3": ("not implemented", False), "2.4": ("not implemented", False)}
    assert "miniinfer.course" in flags(grade, "2.1")


PATCH_BY_CONCATENATION = STUB_SOURCE["2.1"] + '''
check = __import__("miniinfer.cour" + "se.check", fromlist=["x"])
for name in ("rope_cos_sin", "apply_rope", "apply_rope_interleaved", "make_positions"):
    setattr(check, name, lambda *args, **kwargs: None)
'''

SWALLOW_ERRORS = STUB_SOURCE["2.2"] + '''
get_ipython().set_custom_exc((BaseException,), lambda *args, **kwargs: None)
'''


def test_import_by_string_and_a_swallowing_exception_handler_earn_nothing(grader, tmp_path):
    grade = grader.grade(submission(tmp_path, "patch_concat", {"2.1": PATCH_BY_CONCATENATION,
                                                               "2.2": SWALLOW_ERRORS}))
    assert grade.score == 0
    assert outcome(grade) == {"2.1": ("not implemented", True), "2.2": ("not implemented", True),
                              "2.3": ("not implemented", False), "2.4": ("not implemented", False)}
    assert "__import__" in flags(grade, "2.1")
    assert "set_custom_exc" in flags(grade, "2.2") and "get_ipython" in flags(grade, "2.2")


# ------------------------------------------------------------------------------------------------
# Borrowed answers
# ------------------------------------------------------------------------------------------------

PACKAGE_ANSWERS = {
    "2.1": "from miniinfer.rope import rope_cos_sin\n",
    # `rope` is bound by the chapter's own `from miniinfer import rope`.
    "2.2": "def apply_rope(x, cos, sin):\n    return rope.apply_rope(x, cos, sin)\n",
    "2.3": "import miniinfer.rope as r\n\napply_rope_interleaved = r.apply_rope_interleaved\n",
    "2.4": 'exec(open("../solutions/02_rope.py").read())\n',
}


def test_package_references_and_the_answer_key_are_flagged_and_score_zero(grader, tmp_path):
    grade = grader.grade(submission(tmp_path, "borrowed", PACKAGE_ANSWERS))
    assert outcome(grade) == {"2.1": ("passed", True), "2.2": ("passed", True), "2.3": ("passed", True),
                              "2.4": ("error", True)}
    assert grade.score == 0
    assert "miniinfer.rope" in flags(grade, "2.1") and "rope.apply_rope" in flags(grade, "2.2")
    assert "miniinfer.rope.apply_rope_interleaved" in flags(grade, "2.3")
    assert "exec" in flags(grade, "2.4") and "open" in flags(grade, "2.4")
    # The answer key is not reachable from the throwaway working directory.
    assert "FileNotFoundError" in message(grade, "2.4")
    # The instructor may decide otherwise: --allow-flagged.
    score(grade, allow_flagged=True)
    assert grade.score == 3


# ------------------------------------------------------------------------------------------------
# Grader files on disk; a batch that meets an unreadable notebook
# ------------------------------------------------------------------------------------------------

ALWAYS_PASS = '''

def _always_pass(fn, *more):
    print("✅ passed")
    return 1


for _name in __all__:
    globals()[_name] = _always_pass
'''

TAMPER_ON_DISK = STUB_SOURCE["2.1"] + f'''
import sys
from pathlib import Path

import miniinfer

always_pass = {ALWAYS_PASS!r}
# The copy this kernel imports, and the installed package (found from the interpreter's prefix).
for root in (Path(miniinfer.__file__).parent, Path(sys.prefix).parent / "miniinfer"):
    target = root / "course" / "check" / "ch02_rope.py"
    if target.exists():
        target.write_text(target.read_text() + always_pass)
'''


def test_tampering_with_check_files_is_undone_and_a_batch_survives_an_unreadable_notebook(grader, tmp_path):
    installed = grader.snapshot.package_dir / "course" / "check" / "ch02_rope.py"
    original = installed.read_bytes()
    tamper = submission(tmp_path, "tamper", {"2.1": TAMPER_ON_DISK})
    unreadable = tmp_path / "02_unreadable.ipynb"
    unreadable.write_text("{ this is not a notebook")
    untouched = submission(tmp_path, "untouched")
    out = tmp_path / "grades"
    try:
        grades = grade_command.grade_all([tamper, unreadable, untouched], grader, out_dir=out)
    finally:
        if installed.read_bytes() != original:  # never leave the checkout modified, whatever happened
            installed.write_bytes(original)
            pytest.fail("the grader left the installed check module modified")
    tampered, broken, clean = grades
    assert [g.status for g in grades] == ["graded", "unreadable", "graded"]
    assert tampered.score == 0 and "ch02_rope.py" in tampered.flagged and "restored" in tampered.flagged
    assert all(status == "not implemented" for status, _ in outcome(tampered).values())
    assert "JSONDecodeError" in broken.message or "NotJSONError" in broken.message
    assert clean.score == 0 and not clean.flagged
    assert outcome(clean) == {k: ("not implemented", False) for k in ("2.1", "2.2", "2.3", "2.4")}
    assert hashlib.sha256(installed.read_bytes()).digest() == hashlib.sha256(original).digest()
    csv_lines = (out / "grades.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 4 and "unreadable" in csv_lines[2]
    assert (out / "grades.json").exists()


# ------------------------------------------------------------------------------------------------
# Honest mishaps: moved, deleted, broken cells
# ------------------------------------------------------------------------------------------------

def test_answers_in_untagged_cells_are_graded_as_moved_and_a_deleted_exercise_is_missing(grader, tmp_path):
    path = submission(tmp_path, "moved", cells={"2.4": ANSWER["2.4"]}, delete=("2.1", "2.3"),
                      untagged_after={"2.2": ANSWER["2.2"]}, untagged_at_end=(ANSWER["2.1"],))
    grade = grader.grade(path)
    assert outcome(grade) == {"2.1": ("passed", False), "2.2": ("passed", False), "2.3": ("missing", False),
                              "2.4": ("passed", False)}
    locations = {e.exercise: e.location for e in grade.exercises}
    assert locations == {"2.1": "moved", "2.2": "moved", "2.3": "missing", "2.4": "cell"}
    assert grade.score == 3
    assert "apply_rope_interleaved" in message(grade, "2.3")


def test_the_cause_of_a_lost_point_is_the_exercise_cells_own_error(grader, tmp_path):
    cells = {"2.1": "def rope_cos_sin(max_positions, head_dim, theta, device=None:\n    pass\n",
             "2.2": "raise SystemExit('giving up')\n\n" + ANSWER["2.2"],
             "2.3": ANSWER["2.3"]}
    grade = grader.grade(submission(tmp_path, "broken", cells))
    assert outcome(grade) == {"2.1": ("error", False), "2.2": ("error", False), "2.3": ("passed", False),
                              "2.4": ("not implemented", False)}
    assert "SyntaxError" in message(grade, "2.1") and "NameError" not in message(grade, "2.1")
    assert "SystemExit" in message(grade, "2.2") and "NameError" not in message(grade, "2.2")
    assert grade.score == 1
    causes = grade_command.report([grade])
    assert "SyntaxError" in causes and "SystemExit" in causes


# ------------------------------------------------------------------------------------------------
# Runaway code: interrupted, or killed; points earned before are kept
# ------------------------------------------------------------------------------------------------

def test_infinite_loops_are_interrupted_and_the_rest_is_graded(tmp_path):
    fast = Grader(cell_timeout=6, wall_timeout=300)
    cells = {"2.1": ANSWER["2.1"],
             "2.2": "def apply_rope(x, cos, sin):\n    while True:\n        pass\n",
             "2.3": "while True:\n    pass\n",
             "2.4": ANSWER["2.4"]}
    started = time.monotonic()
    grade = fast.grade(submission(tmp_path, "loops", cells))
    assert grade.status == "graded"
    assert outcome(grade) == {"2.1": ("passed", False), "2.2": ("timeout", False), "2.3": ("timeout", False),
                              "2.4": ("passed", False)}
    assert grade.score == 2
    assert time.monotonic() - started < 75  # three 6 s timeouts (one in a chapter cell using 2.2), not minutes


def test_a_kernel_that_ignores_interrupts_is_killed_and_keeps_earlier_points(tmp_path):
    fast = Grader(cell_timeout=6, wall_timeout=300)
    stubborn = ("import time\n\n\ndef apply_rope(x, cos, sin):\n    while True:\n        try:\n"
                "            time.sleep(0.05)\n        except BaseException:\n            pass\n")
    grade = fast.grade(submission(tmp_path, "stubborn", {"2.1": ANSWER["2.1"], "2.2": stubborn,
                                                         "2.3": ANSWER["2.3"]}))
    assert grade.status == "timeout" and "killed" in message(grade, "2.2")
    assert outcome(grade) == {"2.1": ("passed", False), "2.2": ("timeout", False), "2.3": ("not run", False),
                              "2.4": ("not run", False)}
    assert grade.score == 1


def test_a_submission_that_kills_its_kernel_scores_what_it_earned_before(grader, tmp_path):
    grade = grader.grade(submission(tmp_path, "exit", {"2.1": ANSWER["2.1"],
                                                       "2.2": "import os\n\nos._exit(1)\n"}))
    assert grade.status == "crashed"
    assert outcome(grade) == {"2.1": ("passed", False), "2.2": ("not run", True), "2.3": ("not run", False),
                              "2.4": ("not run", False)}
    assert "os._exit" in flags(grade, "2.2") and "died" in message(grade, "2.3")
    assert grade.score == 1


def test_the_notebook_wall_limit_stops_a_slow_submission(tmp_path):
    slow = Grader(cell_timeout=60, wall_timeout=12)
    grade = slow.grade(submission(tmp_path, "slow", {"2.1": ANSWER["2.1"] + "\nimport time\ntime.sleep(60)\n"}))
    assert grade.status == "timeout" and "wall limit" in grade.message
    assert grade.score == 0
    assert {status for status, _ in outcome(grade).values()} <= {"timeout", "not run"}
    assert grade.seconds < 30


# ------------------------------------------------------------------------------------------------
# What comes back from the kernel is data, compared here
# ------------------------------------------------------------------------------------------------

CLEAN_WITH_COMMENTS = ANSWER["2.1"].replace(
    "    ### BEGIN SOLUTION", '    # sanity check. "miniinfer.course.check" in a string is only text\n'
                             "    check = 'exec(open(x))'  # a variable may be called check\n    ### BEGIN SOLUTION")

IN_PLACE = '''import torch


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))  # right values, but in place
    return x
'''

LIAR = '''class AlwaysEqual:
    shape = dtype = None

    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False


def apply_rope_interleaved(x, cos, sin):
    return AlwaysEqual()


def make_positions(spec, length=None, device=None):
    return AlwaysEqual()
'''


def test_only_data_comes_back_and_in_place_changes_are_seen(grader, tmp_path):
    grade = grader.grade(submission(tmp_path, "liar", {"2.1": CLEAN_WITH_COMMENTS, "2.2": IN_PLACE,
                                                       "2.3": LIAR, "2.4": ANSWER["2.4"] + "\n\n" + LIAR}))
    assert outcome(grade) == {"2.1": ("passed", False), "2.2": ("failed", False), "2.3": ("failed", False),
                              "2.4": ("failed", False)}
    assert "in place" in message(grade, "2.2")
    assert grade.score == 1
    assert grade.seconds < 60  # a normal chapter grades in well under a minute


# ------------------------------------------------------------------------------------------------
# Fast: the scanner, the wire, the write-back (no kernel)
# ------------------------------------------------------------------------------------------------

RULES = ChapterRules({"rope_cos_sin", "apply_rope", "apply_rope_interleaved", "make_positions"},
                     {"miniinfer.rope"}, {"rope": "miniinfer.rope", "torch": "torch", "F": "torch.nn.functional"})


@pytest.mark.parametrize("source, finding", [
    ("import miniinfer.course.check as c", "miniinfer.course"),
    ("from miniinfer.course.checking import CheckFailed", "miniinfer.course"),
    ("from miniinfer.rope import apply_rope", "apply_rope from miniinfer.rope"),
    ("from miniinfer.models.qwen2 import rope_cos_sin", "rope_cos_sin"),
    ("from miniinfer.rope import *", "imports * from"),
    ("y = rope.apply_rope_interleaved(x, c, s)", "rope.apply_rope_interleaved"),
    ("m = __import__('miniinfer.cour' + 'se')", "__import__"),
    ("f = getattr(__builtins__, 'ev' + 'al')", "__builtins__"),
    ("import importlib\nimportlib.import_module('x')", "importlib"),
    ("import sys\nsys.modules['x'] = None", "sys.modules"),
    ("get_ipython().set_custom_exc((Exception,), h)", "set_custom_exc"),
    ("!cat ../solutions/02_rope.py", "IPython command"),
    ("%run ../solutions/02_rope.py", "%run"),
    ("%timeit exec('1')", "exec"),
    ("src = open('x').read()", "open"),
    ("f = (lambda: 0).__globals__", "__globals__"),
    ("import os\nos.system('ls')", "os.system"),
])
def test_scanner_flags(source, finding):
    found = scan_exercise(source, RULES)
    assert any(finding in f for f in found), found


@pytest.mark.parametrize("source", [
    "# sanity check.\ndef apply_rope(x, cos, sin):\n    return x  # check.apply_rope(x) would be wrong\n",
    '"""Uses miniinfer.course.check and exec(open(...)) only in a docstring."""',
    "import torch\ny = torch.softmax(x, -1) + F.silu(x)",
    "from miniinfer.kv_cache import KVCache\ncache = KVCache.for_model(m, 1, 8)",
    "for module in model.modules():\n    pass",
    "%timeit apply_rope(x, c, s)",
    "rope = 3\ny = rope + 1",
    "def f(rope):\n    return rope.upper()",
    "def apply_rope(:",  # does not parse: the kernel reports the SyntaxError, the scanner stays quiet
])
def test_scanner_leaves_ordinary_code_alone(source):
    assert scan_exercise(source, RULES) == []


def _raw_message(payload_pickle: bytes, storages=()) -> bytes:
    return pickle.dumps((payload_pickle, list(storages)), protocol=5)


class _Evil:
    def __reduce__(self):
        import os
        return os.system, ("echo pwned",)


@pytest.mark.parametrize("payload", [
    pickle.dumps(_Evil()),
    pickle.dumps(eval),
    b"cbuiltins\nlist\n(cbuiltins\nrange\n(J\x00\x00\x00\x10tRtR.",  # list(range(2**28 … )) : refused
    pickle.dumps(collections.Counter(a=1)),
])
def test_the_wire_refuses_code_and_unknown_types(payload):
    with pytest.raises(wire.WireError):
        wire.decode(_raw_message(payload), lambda kind, number: None)


def test_the_wire_refuses_a_tensor_reaching_past_its_storage():
    tensor_pid = ("T", "float32", (100,), (1,), 0, 0, "cpu")

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return tensor_pid if obj == "tensor" else None

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=5).dump("tensor")
    with pytest.raises(wire.WireError, match="past the end"):
        wire.decode(_raw_message(buffer.getvalue(), [bytes(16)]), lambda kind, number: None)


def test_tensors_cross_with_their_storage_and_in_place_writes_come_back():
    buffer = torch.full((10,), -1.0)
    view, other = buffer[:4], buffer[6:]
    message = wire.encode((view, other, {"n": 3, "s": slice(1, 5)}), lambda obj: pytest.fail(f"by ref: {obj}"))
    got_view, got_other, plain = wire.decode(message, lambda kind, number: None)
    assert plain == {"n": 3, "s": slice(1, 5)}
    assert got_view.untyped_storage().data_ptr() == got_other.untyped_storage().data_ptr()  # still shared
    torch.as_strided(got_view, (6,), (1,)).fill_(2.0)  # 4 values and 2 stray ones past the view
    merge_back(view, got_view)
    assert buffer.tolist() == [2.0] * 6 + [-1.0] * 4
    original = [[1, 2], {"a": 1}]
    merge_back(original, [[1, 2, 3], {"b": 2}])
    assert original == [[1, 2, 3], {"b": 2}]
