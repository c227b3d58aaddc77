"""The book's pure-Python parts: the performance ledger, chapter discovery and the navigation.

The full build (`mkdocs build --strict`) and the browser check run in `make test` through
`scripts/book.py build` and `scripts/book.py check`; these tests stay fast and offline.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def book():
    spec = importlib.util.spec_from_file_location("miniinfer_book_script", ROOT / "scripts" / "book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(**overrides) -> dict:
    record = {
        "benchmark": "vector_add", "title": "Vector add bandwidth", "device": "cuda",
        "card": "NVIDIA H100 80GB HBM3", "date": "2025-11-26T06:00:00Z",
        "command": "python benchmarks/vector_add.py",
        "environment": {"python": "3.11.7", "torch": "2.9.0", "cuda": "12.8", "triton": None, "git_commit": "abc1234"},
        "columns": ["n", "backend", "GB/s"],
        "rows": [{"n": 1048576, "backend": "cuda", "GB/s": 3012.46}, {"n": 1024, "backend": "torch|x", "GB/s": None}],
        "summary": {"peak GB/s": 3012.46},
        "notes": "Measured after a warm-up.",
    }
    record.update(overrides)
    return record


def _notebook(path: Path, title: str = "Setup", outputs: bool = True, error: bool = False) -> Path:
    nb = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell("print(1)")
    if outputs:
        code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    if error:
        code.outputs.append(nbformat.v4.new_output("error", ename="ValueError", evalue="bad", traceback=[]))
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {title}\n\nSome text with $x$."), code]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def test_ledger_without_results_says_so(book, tmp_path):
    for folder in (tmp_path, tmp_path / "missing"):
        text = book.render_ledger(folder)
        assert text.startswith("# Performance ledger")
        assert "No results recorded yet" in text


def test_ledger_lists_gpu_results_first_with_card_date_command_and_table(book, tmp_path):
    (tmp_path / "a_cpu.json").write_text(json.dumps(_result(device="cpu", card="Some CPU (2 cores)", title="CPU run")))
    (tmp_path / "b_h100.json").write_text(json.dumps(_result()))
    text = book.render_ledger(tmp_path)
    assert text.index("## GPU results") < text.index("## CPU results")
    assert text.index("Vector add bandwidth · NVIDIA H100") < text.index("CPU run · Some CPU")
    assert "{#result-b_h100}" in text and "](#result-b_h100)" in text
    assert "2025-11-26 06:00 UTC" in text
    assert "`python benchmarks/vector_add.py`" in text
    assert "torch `2.9.0`" in text and "triton" not in text.split("environment")[1].splitlines()[0]
    # the rows, in column order, numbers right-aligned, missing values as a dash, pipes escaped
    assert "| n | backend | GB/s |\n|---:|---|---:|\n| 1,048,576 | cuda | 3,012.5 |\n| 1024 | torch\\|x | – |" in text
    assert "- peak GB/s: **3,012.5**" in text
    assert "Measured after a warm-up." in text


def test_ledger_names_a_broken_result_file(book, tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(book.BookError, match="broken.json"):
        book.render_ledger(tmp_path)


@pytest.mark.parametrize("value, text", [
    (None, "–"), (True, "yes"), (3, "3"), (123456, "123,456"), (0.000123, "0.000123"),
    (1.23456, "1.235"), (512.34, "512.3"), (2.5e6, "2,500,000"), ("a|b", "a\\|b"), ([1, 2], "[1,2]"),
])
def test_format_value(book, value, text):
    assert book.format_value(value) == text


def test_chapters_are_found_in_order_and_titled_from_their_heading(book, tmp_path):
    _notebook(tmp_path / "01_layers.ipynb", "Building blocks")
    _notebook(tmp_path / "00_setup.ipynb", "Chapter 00 — Setup")
    _notebook(tmp_path / "scratch.ipynb")
    found = book.chapter_notebooks(tmp_path)
    assert [p.name for p in found] == ["00_setup.ipynb", "01_layers.ipynb"]
    assert book.chapter_label(found[0]) == "Chapter 00 — Setup"
    assert book.chapter_label(found[1]) == "01 · Building blocks"


def test_prepare_chapters_copies_notebooks_removes_stale_ones_and_writes_the_index(book, tmp_path):
    solutions, docs = tmp_path / "solutions", tmp_path / "docs"
    _notebook(solutions / "00_setup.ipynb", "Setup")
    _notebook(docs / "chapters" / "07_stale.ipynb")
    book.prepare_chapters(solutions, docs)
    assert sorted(p.name for p in (docs / "chapters").glob("*.ipynb")) == ["00_setup.ipynb"]
    index = (docs / "chapters" / "index.md").read_text()
    assert "[Setup](00_setup.ipynb)" in index
    (docs / "gpu.md").write_text("# GPU\n")
    (docs / "performance.md").write_text("# Ledger\n")
    assert book.build_nav(docs) == [
        {"Home": "index.md"},
        {"Chapters": ["chapters/index.md", {"00 · Setup": "chapters/00_setup.ipynb"}]},
        {"Running on a GPU": "gpu.md"},
        {"Performance ledger": "performance.md"},
    ]
    # no chapters at all: the index says so and the build still has a Chapters page
    (tmp_path / "empty").mkdir()
    book.prepare_chapters(tmp_path / "empty", docs)
    assert not list((docs / "chapters").glob("*.ipynb"))
    assert "No chapter rendered yet" in (docs / "chapters" / "index.md").read_text()


def test_prepare_chapters_refuses_unexecuted_or_failing_notebooks(book, tmp_path):
    _notebook(tmp_path / "a" / "00_setup.ipynb", outputs=False)
    with pytest.raises(book.BookError, match="no code cell has an output"):
        book.prepare_chapters(tmp_path / "a", tmp_path / "docs")
    _notebook(tmp_path / "b" / "00_setup.ipynb", error=True)
    with pytest.raises(book.BookError, match="ValueError"):
        book.prepare_chapters(tmp_path / "b", tmp_path / "docs")


def test_site_config_makes_no_external_requests():
    """No Google Fonts, no CDN MathJax, no GitHub API call for the repository's star count."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["theme"]["font"] is False
    assert "repo_url" not in config
    jupyter = next(p["mkdocs-jupyter"] for p in config["plugins"] if isinstance(p, dict) and "mkdocs-jupyter" in p)
    assert jupyter["execute"] is False
    assert not jupyter["custom_mathjax_url"].startswith(("http:", "https:", "//"))
    extensions = [e if isinstance(e, str) else next(iter(e)) for e in config["markdown_extensions"]]
    assert "pymdownx.arithmatex" in extensions
    assert "pymdownx.emoji" not in extensions  # its default renders emoji as images from a CDN


def test_chapter_pages_are_recognised(book):
    assert book.is_chapter_page("chapters/00_setup/")
    assert not book.is_chapter_page("chapters/")
    assert not book.is_chapter_page("performance/")


def test_escaped_dollars_stay_literal_outside_code_and_math(book, tmp_path):
    literal = book.LITERAL_DOLLAR
    assert book.protect_dollars(r"It costs \$5, not \$10.") == f"It costs {literal}5, not {literal}10."
    for kept in (r"`echo \$HOME`", "```\n\\$x\n```", r"$\$5$", r"$$ a = \$2 $$"):
        assert book.protect_dollars(kept) == kept
    assert book.protect_dollars(r"$x$ then \$3 and $y$") == f"$x$ then {literal}3 and $y$"
    plain = _notebook(tmp_path / "00_plain.ipynb")
    assert book.render_notebook_copy(plain) == plain.read_bytes()
    nb = nbformat.read(plain, as_version=4)
    nb.cells[0].source += "\n\nPrice: \\$2 per million tokens."
    nbformat.write(nb, tmp_path / "01_price.ipynb")
    rendered = json.loads(book.render_notebook_copy(tmp_path / "01_price.ipynb"))
    assert f"Price: {literal}2 per million tokens." in rendered["cells"][0]["source"]
