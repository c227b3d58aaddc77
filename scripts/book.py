#!/usr/bin/env python3
"""The MiniInfer book: prepare, build, serve and check the mkdocs-material site.

    python scripts/book.py prepare [--solutions DIR] [--results DIR]
    python scripts/book.py build   [--solutions DIR] [--results DIR]   # prepare + mkdocs build --strict
    python scripts/book.py serve   [--solutions DIR] [--results DIR]   # prepare + mkdocs serve
    python scripts/book.py check   [--site site] [--screenshots build/book-screenshots]

``prepare`` puts the generated parts of ``docs/`` in place (all gitignored, all idempotent):

* ``docs/chapters/NN_slug.ipynb``: the executed answer keys, copied from ``solutions/``; mkdocs-jupyter
  renders each one as a chapter page with its outputs and figures (it never executes them);
* ``docs/chapters/index.md``: the list of chapters;
* ``docs/performance.md``: the performance ledger, one section per ``benchmarks/results/*.json``;
* ``docs/assets/vendor/mathjax/``: MathJax 3, from the npm registry's tarball (checked against a
  pinned hash, cached under ``~/.cache/miniinfer/book``), so that math typesets offline.

``check`` serves ``site/`` on localhost, opens every page in headless Chromium (Debian's ``chromium``,
driven by Playwright) and fails on a console error, a page error, a failed or external request,
math left untypeset, a broken image, or a chapter page without code or figures. It writes a
full-page screenshot of every page to ``build/book-screenshots/``.

This file is also the mkdocs hook named in ``mkdocs.yml``: :func:`on_config` builds the navigation
from the chapter notebooks that ``prepare`` put in ``docs/chapters/``.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import functools
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SOLUTIONS = ROOT / "solutions"
RESULTS = ROOT / "benchmarks" / "results"
SITE = ROOT / "site"
SCREENSHOTS = ROOT / "build" / "book-screenshots"
CHROMIUM = "/usr/bin/chromium"

CHAPTER_NAME = re.compile(r"^(\d\d)_[a-z0-9_]+$")

# MathJax 3 from the npm registry, pinned by version and by the registry's sha512 integrity.
MATHJAX_VERSION = "3.2.2"
MATHJAX_INTEGRITY = "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="
# What the book needs from the package's es5/ folder: the combined TeX component, the TeX extensions
# it autoloads (\color, \cancel, ...), its fonts, and what the right-click menu may load.
MATHJAX_PARTS = ("tex-mml-chtml.js", "input/tex/extensions/", "output/chtml/fonts/woff-v2/", "ui/", "a11y/", "sre/")
MATHJAX_STAMP = ".miniinfer-mathjax"

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class BookError(RuntimeError):
    """A problem with the book's inputs, reported without a traceback."""


def log(message: str) -> None:
    print(f"book: {message}", flush=True)


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` unless the file already holds it (keeps mtimes, so `mkdocs serve` stays calm)."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return True


# --------------------------------------------------------------------------------------------------
# Chapters


def chapter_notebooks(folder: Path) -> list[Path]:
    """``NN_slug.ipynb`` files of ``folder``, in chapter order."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.ipynb") if CHAPTER_NAME.match(p.stem))


def _markdown_plain(text: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # [label](link) -> label
    return re.sub(r"[`*_]", "", text).strip()


def chapter_title(notebook: Path) -> str:
    """The first level-1 heading of the notebook's markdown cells, else the slug."""
    try:
        cells = json.loads(notebook.read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError):
        cells = []
    for cell in cells:
        if cell.get("cell_type") != "markdown":
            continue
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else source
        for line in source.splitlines():
            match = re.match(r"^#\s+(.+?)\s*#*\s*$", line)
            if match:
                return _markdown_plain(match.group(1))
    return notebook.stem.split("_", 1)[1].replace("_", " ").capitalize()


def chapter_label(notebook: Path) -> str:
    """The navigation label: '00 · Title' (the number is left out when the title already says it)."""
    title = chapter_title(notebook)
    number = notebook.stem[:2]
    if re.match(r"^(chapter\s*)?\d+\b", title, re.IGNORECASE):
        return title
    return f"{number} · {title}"


def notebook_problems(notebook: Path) -> list[str]:
    """Why a notebook cannot go into the book as an executed answer key (empty when it can)."""
    try:
        nb = json.loads(notebook.read_text(encoding="utf-8"))
    except ValueError as error:
        return [f"{notebook}: not a valid notebook ({error})"]
    problems = []
    code_cells = [c for c in nb.get("cells", []) if c.get("cell_type") == "code" and "".join(c.get("source", "")).strip()]
    if code_cells and not any(c.get("outputs") for c in code_cells):
        problems.append(f"{notebook}: no code cell has an output; execute it first (`make execute`)")
    for index, cell in enumerate(nb.get("cells", [])):
        tags = cell.get("metadata", {}).get("tags", [])
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            if output.get("output_type") == "error" and "raises-exception" not in tags:
                problems.append(f"{notebook}: cell {index} ends in {output.get('ename')}: {output.get('evalue')}"
                                " (the answer key must run cleanly; tag the cell `raises-exception` if intended)")
    return problems


def render_chapter_index(notebooks: list[Path]) -> str:
    lines = [
        "# Chapters",
        "",
        "Each chapter page is the executed answer key, `solutions/NN_slug.ipynb`, with its outputs and",
        "figures. To work through a chapter yourself, open the student version `chapters/NN_slug.ipynb`",
        "in JupyterLab: see [working through a chapter](../index.md#working-through-a-chapter).",
        "",
    ]
    if not notebooks:
        lines += ['!!! note "No chapter rendered yet"',
                  "    Chapter pages appear here once the executed notebooks `solutions/NN_slug.ipynb` exist.",
                  "    The [chapter map](../index.md#chapters-and-the-package) lists what is planned.", ""]
        return "\n".join(lines)
    lines += ["| # | chapter | answer key |", "|---|---|---|"]
    for notebook in notebooks:
        lines.append(f"| {notebook.stem[:2]} | [{chapter_title(notebook)}]({notebook.name}) "
                     f"| `solutions/{notebook.name}` |")
    return "\n".join(lines) + "\n"


# Where a backslash-dollar must stay as written: code (fenced blocks, inline spans) and math.
_MARKDOWN_KEEP = re.compile(r"```[\s\S]*?```|~~~[\s\S]*?~~~|(`+)[\s\S]*?(?<!`)\1(?!`)"
                            r"|(?<!\\)\$\$[\s\S]+?\$\$|(?<!\\)\$(?:\\.|[^$\\\n])+\$")
LITERAL_DOLLAR = '<span class="tex2jax_ignore">&#36;</span>'  # an entity: nbconvert's own math parser must not see it


def protect_dollars(markdown: str) -> str:
    r"""Keep an escaped ``\$`` a literal dollar on the page, as JupyterLab shows it.

    nbconvert's markdown renderer turns ``\$5`` into a bare ``$5``, which MathJax would then pair with
    the next dollar as math. A span of class ``tex2jax_ignore`` (which MathJax skips, see
    ``mathjax-config.js``) holds the dollar instead. Code and math are left alone.
    """
    out, last = [], 0
    for match in _MARKDOWN_KEEP.finditer(markdown):
        out += [markdown[last:match.start()].replace("\\$", LITERAL_DOLLAR), match.group(0)]
        last = match.end()
    out.append(markdown[last:].replace("\\$", LITERAL_DOLLAR))
    return "".join(out)


def render_notebook_copy(notebook: Path) -> bytes:
    """The bytes of the notebook as the book renders it: the same, with escaped dollars protected."""
    data = notebook.read_bytes()
    if b"\\\\$" not in data:  # JSON escapes the backslash: \\$ in the file is \$ in the text
        return data
    nb = json.loads(data)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            source = cell.get("source", "")
            source = "".join(source) if isinstance(source, list) else source
            cell["source"] = protect_dollars(source)
    return (json.dumps(nb, indent=1, ensure_ascii=False) + "\n").encode()


def prepare_chapters(solutions: Path, docs: Path = DOCS) -> list[Path]:
    """Copy the executed solution notebooks into ``docs/chapters/`` and write its index page."""
    if not solutions.is_dir():
        raise BookError(f"{solutions} is not a folder of solution notebooks")
    sources = chapter_notebooks(solutions)
    problems = [p for nb in sources for p in notebook_problems(nb)]
    if problems:
        raise BookError("these notebooks cannot go into the book:\n  " + "\n  ".join(problems))
    target = docs / "chapters"
    target.mkdir(parents=True, exist_ok=True)
    names = {nb.name for nb in sources}
    for stale in target.glob("*.ipynb"):
        if stale.name not in names:
            stale.unlink()
    for notebook in sources:
        destination = target / notebook.name
        content = render_notebook_copy(notebook)
        if not destination.exists() or destination.read_bytes() != content:
            destination.write_bytes(content)
    write_if_changed(target / "index.md", render_chapter_index(sources))
    return [target / nb.name for nb in sources]


def build_nav(docs: Path) -> list:
    """The site navigation: Home, Chapters (index + one page per notebook), GPU, Performance ledger."""
    nav: list = [{"Home": "index.md"}]
    chapters = docs / "chapters"
    section: list = []
    if (chapters / "index.md").exists():
        section.append("chapters/index.md")
    section += [{chapter_label(nb): f"chapters/{nb.name}"} for nb in chapter_notebooks(chapters)]
    if section:
        nav.append({"Chapters": section})
    if (docs / "gpu.md").exists():
        nav.append({"Running on a GPU": "gpu.md"})
    for title, page in (("Architecture", "architecture.md"), ("API", "api.md"), ("Deployment", "deployment.md")):
        if (docs / page).exists():
            nav.append({title: page})
    if (docs / "performance.md").exists():
        nav.append({"Performance ledger": "performance.md"})
    return nav


def on_config(config, **kwargs):
    """mkdocs hook: the navigation follows the chapter notebooks present in docs/chapters/."""
    docs = Path(config["docs_dir"])
    missing = [p for p in ("chapters/index.md", "performance.md", "assets/vendor/mathjax/tex-mml-chtml.js")
               if not (docs / p).exists()]
    if missing:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"docs/ is not prepared ({', '.join(missing)} missing): build the book with "
                          "`python scripts/book.py build` (or run `python scripts/book.py prepare` first)")
    config["nav"] = build_nav(docs)
    return config


# --------------------------------------------------------------------------------------------------
# The performance ledger (schema: benchmarks/common.py)


def format_value(value) -> str:
    """A table cell: compact numbers, '–' for missing, no stray pipes or newlines."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        magnitude = abs(value)
        if magnitude >= 100_000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:,.1f}"
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, (dict, list)):
        value = json.dumps(value, separators=(",", ":"))
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_date(date: str) -> str:
    try:
        moment = _dt.datetime.fromisoformat(str(date).replace("Z", "+00:00"))
    except ValueError:
        return str(date)
    if moment.tzinfo is not None:
        moment = moment.astimezone(_dt.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def load_results(results: Path) -> list[tuple[Path, dict]]:
    """Every ``*.json`` of the results folder, GPU results first, then by benchmark and card."""
    records = []
    for path in sorted(results.glob("*.json")) if results.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise BookError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get("rows", []), list):
            raise BookError(f"{path}: not a benchmark result (see the schema in benchmarks/common.py)")
        records.append((path, record))
    records.sort(key=lambda item: (item[1].get("device") != "cuda", str(item[1].get("benchmark", item[0].stem)),
                                   str(item[1].get("card", "")), item[0].name))
    return records


def result_anchor(path: Path) -> str:
    """The ledger section's HTML id, from the file name: vector_add_h100.json -> result-vector_add_h100."""
    return "result-" + re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower())


def _result_section(path: Path, record: dict) -> list[str]:
    title = record.get("title") or record.get("benchmark") or path.stem
    card = record.get("card") or "unknown device"
    rows = record.get("rows") or []
    columns = list(record.get("columns") or [])
    for row in rows:  # columns the header forgot, in order of appearance
        columns += [c for c in row if c not in columns]
    lines = [f"### {title} · {card} {{#{result_anchor(path)}}}", ""]
    meta = [("card", card), ("date", format_date(record.get("date", "–"))),
            ("benchmark", f"`{record.get('benchmark', path.stem)}`")]
    if record.get("command"):
        meta.append(("command", f"`{record['command']}`"))
    environment = record.get("environment") or {}
    if environment:
        parts = [f"{key} `{value}`" for key, value in environment.items() if value not in (None, "")]
        meta.append(("environment", ", ".join(parts) or "–"))
    meta.append(("file", f"`benchmarks/results/{path.name}`"))
    lines += [f"- **{key}**: {value}" for key, value in meta]
    lines.append("")
    if rows and columns:
        lines.append("| " + " | ".join(format_value(c) for c in columns) + " |")
        numeric = [all(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool)
                       for row in rows if row.get(c) is not None) for c in columns]
        lines.append("|" + "|".join("---:" if right else "---" for right in numeric) + "|")
        for row in rows:
            lines.append("| " + " | ".join(format_value(row.get(c)) for c in columns) + " |")
    else:
        lines.append("*No rows recorded.*")
    lines.append("")
    summary = record.get("summary") or {}
    if summary:
        lines.append("**Summary**")
        lines.append("")
        lines += [f"- {format_value(key)}: **{format_value(value)}**" for key, value in summary.items()]
        lines.append("")
    if record.get("notes"):
        lines += [str(record["notes"]).strip(), ""]
    return lines


def render_ledger(results: Path) -> str:
    records = load_results(results)
    lines = [
        "# Performance ledger",
        "",
        "Every number on this page was measured by a script in `benchmarks/` and recorded in",
        "`benchmarks/results/*.json` together with the card, the date, the command and the software",
        "versions that produced it. Absolute times hold only for the named card; ratios against a",
        "baseline measured in the same run are what carry over to other machines. To add a result, run",
        "the benchmark (see [Running on a GPU](gpu.md)) and commit the JSON file it writes.",
        "",
    ]
    if not records:
        lines += ['!!! note "No results recorded yet"',
                  "    No benchmark result has been committed to `benchmarks/results/` yet.", ""]
        return "\n".join(lines)
    lines += ["| benchmark | device | card | date |", "|---|---|---|---|"]
    for path, record in records:
        lines.append(f"| [{format_value(record.get('title') or record.get('benchmark') or path.stem)}](#{result_anchor(path)}) "
                     f"| {format_value(record.get('device', '–'))} | {format_value(record.get('card', '–'))} "
                     f"| {format_date(record.get('date', '–'))} |")
    lines.append("")
    groups = [("GPU results", [r for r in records if r[1].get("device") == "cuda"]),
              ("CPU results", [r for r in records if r[1].get("device") != "cuda"])]
    for heading, group in groups:
        if group:
            lines += [f"## {heading}", ""]
            for path, record in group:
                lines += _result_section(path, record)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------
# MathJax, served from the site itself


def cache_dir() -> Path:
    return Path(os.environ.get("MINIINFER_CACHE", Path.home() / ".cache" / "miniinfer")) / "book"


def _integrity_ok(data: bytes) -> bool:
    algorithm, _, expected = MATHJAX_INTEGRITY.partition("-")
    return base64.b64encode(hashlib.new(algorithm, data).digest()).decode() == expected


def fetch_mathjax_tarball(cache: Path) -> bytes:
    """The MathJax package tarball: from the cache, else the npm registry (urllib, then `npm pack`)."""
    tarball = cache / f"mathjax-{MATHJAX_VERSION}.tgz"
    if tarball.exists() and _integrity_ok(tarball.read_bytes()):
        return tarball.read_bytes()
    cache.mkdir(parents=True, exist_ok=True)
    registry = (os.environ.get("npm_config_registry") or os.environ.get("NPM_CONFIG_REGISTRY")
                or "https://registry.npmjs.org/").rstrip("/")
    url = f"{registry}/mathjax/-/mathjax-{MATHJAX_VERSION}.tgz"
    errors = []
    log(f"downloading MathJax {MATHJAX_VERSION} from {url}")
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            data = response.read()
        if _integrity_ok(data):
            tarball.write_bytes(data)
            return data
        errors.append(f"{url}: the download does not match the pinned sha512")
    except OSError as error:
        errors.append(f"{url}: {error}")
    if shutil.which("npm"):
        log("trying `npm pack`")
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(["npm", "pack", f"mathjax@{MATHJAX_VERSION}", "--pack-destination", tmp],
                                  capture_output=True, text=True, cwd=tmp)
            packed = Path(tmp, f"mathjax-{MATHJAX_VERSION}.tgz")
            if done.returncode == 0 and packed.exists() and _integrity_ok(packed.read_bytes()):
                shutil.copyfile(packed, tarball)
                return tarball.read_bytes()
            errors.append(f"npm pack: {(done.stderr or done.stdout).strip()[-500:] or 'no tarball'}")
    raise BookError("could not get MathJax for the book:\n  " + "\n  ".join(errors)
                    + f"\nOn an offline machine, copy mathjax-{MATHJAX_VERSION}.tgz (from {url}) to {tarball}.")


def ensure_mathjax(vendor: Path | None = None) -> Path:
    """Unpack the needed parts of MathJax into ``docs/assets/vendor/mathjax`` unless already there."""
    vendor = vendor or DOCS / "assets" / "vendor" / "mathjax"
    stamp = vendor / MATHJAX_STAMP
    if stamp.exists() and stamp.read_text().strip() == MATHJAX_VERSION and (vendor / "tex-mml-chtml.js").exists():
        return vendor
    data = fetch_mathjax_tarball(cache_dir())
    staging = Path(tempfile.mkdtemp(prefix=".mathjax-", dir=vendor.parent if vendor.parent.exists() else None))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            for member in archive.getmembers():
                if not member.isfile() or not member.name.startswith("package/es5/"):
                    continue
                relative = member.name[len("package/es5/"):]
                if not relative.startswith(MATHJAX_PARTS) or ".." in Path(relative).parts:
                    continue
                if relative.endswith("/") or Path(relative).is_absolute():
                    continue
                destination = staging / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(archive.extractfile(member).read())
        (staging / MATHJAX_STAMP).write_text(MATHJAX_VERSION + "\n")
        if vendor.exists():
            shutil.rmtree(vendor)
        vendor.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(vendor))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"MathJax {MATHJAX_VERSION} unpacked into {vendor.relative_to(ROOT) if vendor.is_relative_to(ROOT) else vendor}")
    return vendor


# --------------------------------------------------------------------------------------------------
# prepare / build / serve


def prepare(solutions: Path = SOLUTIONS, results: Path = RESULTS, docs: Path = DOCS) -> None:
    started = time.perf_counter()
    chapters = prepare_chapters(solutions, docs)
    write_if_changed(docs / "performance.md", render_ledger(results))
    ensure_mathjax(docs / "assets" / "vendor" / "mathjax")
    log(f"prepared {len(chapters)} chapter(s) from {solutions}, the ledger from {results} "
        f"({time.perf_counter() - started:.1f}s)")


def _mkdocs(*args: str) -> int:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # no end-of-life banner in every build log
    return subprocess.run([sys.executable, "-m", "mkdocs", *args, "-f", str(ROOT / "mkdocs.yml")], cwd=ROOT,
                          env=env).returncode


def build(site: Path = SITE) -> int:
    started = time.perf_counter()
    code = _mkdocs("build", "--strict", "--site-dir", str(site))
    if code == 0:
        log(f"built {site} ({time.perf_counter() - started:.1f}s)")
    return code


# --------------------------------------------------------------------------------------------------
# check: every page in headless Chromium

# Text of the elements MathJax is told to process (see docs/assets/javascripts/mathjax-config.js),
# without code, scripts and typeset output; and a pattern for TeX delimiters in it.
PAGE_PROBE = r"""
async () => {
  const MATH = /\$\$|\\\(|\\\[|\\begin\{|\$[^\s$](?:[^$]*?[^\s$\\])?\$/;
  const SELECTOR = ".arithmatex, .jp-RenderedMarkdown, .jp-RenderedLatex";
  const mathText = (root) => {
    let text = "";
    for (const container of root.querySelectorAll(SELECTOR)) {
      if (container.parentElement && container.parentElement.closest(SELECTOR)) continue;
      const walker = root.createTreeWalker(container, NodeFilter.SHOW_TEXT);
      for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        if (!node.parentElement.closest("pre, code, script, style, mjx-container, .tex2jax_ignore")) {
          text += node.data + "\n";
        }
      }
    }
    return text;
  };
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  // Let images that are still loading finish (or fail) before they are judged.
  const images = [...document.images];
  await Promise.all(images.filter(img => !img.complete).map(img => new Promise(done => {
    img.addEventListener("load", done); img.addEventListener("error", done); setTimeout(done, 10000);
  })));
  const source = await (await fetch(location.href, {cache: "no-store"})).text();
  const original = new DOMParser().parseFromString(source, "text/html");
  const leftover = mathText(document).match(MATH);
  const wrapper = document.querySelector(".jupyter-wrapper");
  return {
    title: document.title,
    mathExpected: MATH.test(mathText(original)),
    mathjaxLoaded: !!(window.MathJax && MathJax.startup && MathJax.version),
    typeset: document.querySelectorAll("mjx-container").length,
    texErrors: document.querySelectorAll("mjx-merror").length,
    leftover: leftover ? leftover[0] : null,
    notebook: !!wrapper,
    figures: wrapper ? wrapper.querySelectorAll(".jp-OutputArea-output img, .jp-RenderedSVG svg").length : 0,
    brokenImages: images.filter(img => !(img.complete && img.naturalWidth > 0))
                        .map(img => (img.currentSrc || img.src).slice(0, 80)),
    codeCells: wrapper ? wrapper.querySelectorAll(".jp-CodeCell .jp-InputArea pre").length : 0,
    outputs: wrapper ? wrapper.querySelectorAll(".jp-OutputArea-output").length : 0,
    articleText: (document.querySelector("article") || document.body).innerText.trim().length,
  };
}
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".js": "text/javascript", ".mjs": "text/javascript", ".json": "application/json",
                      ".woff": "font/woff", ".woff2": "font/woff2", ".svg": "image/svg+xml"}

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def site_pages(site: Path) -> list[str]:
    """URL paths of every HTML page of the built site (MathJax's own files excluded)."""
    pages = []
    for path in sorted(site.rglob("*.html")):
        relative = path.relative_to(site).as_posix()
        if relative.startswith("assets/"):
            continue
        if relative == "index.html":
            pages.append("")
        elif relative.endswith("/index.html"):
            pages.append(relative[: -len("index.html")])
        else:
            pages.append(relative)
    return sorted(pages, key=lambda page: (page == "404.html", page != "", page))


def is_chapter_page(url_path: str) -> bool:
    match = re.fullmatch(r"chapters/([^/]+)/", url_path)
    return bool(match and CHAPTER_NAME.match(match.group(1)))


def judge(url_path: str, probe: dict) -> list[str]:
    """Problems the page probe shows (events such as console errors are added by the caller)."""
    problems = []
    if probe["articleText"] == 0:
        problems.append("the page has no text")
    if probe["mathExpected"] or probe["typeset"]:
        if not probe["mathjaxLoaded"]:
            problems.append("the page holds math but MathJax did not load")
        elif probe["typeset"] == 0:
            problems.append("the page holds math but nothing was typeset")
    if probe["leftover"]:
        problems.append(f"math left as raw TeX: {probe['leftover'][:60]!r}")
    if probe["texErrors"]:
        problems.append(f"{probe['texErrors']} formula(s) with TeX errors")
    if probe["brokenImages"]:
        problems.append(f"broken image(s): {', '.join(probe['brokenImages'][:3])}")
    if is_chapter_page(url_path):
        if not probe["notebook"]:
            problems.append("chapter page without rendered notebook")
        if probe["figures"] == 0:
            problems.append("chapter page without a figure")
        if probe["codeCells"] == 0 or probe["outputs"] == 0:
            problems.append("chapter page without code cells or outputs")
    return problems


def check(site: Path = SITE, screenshots: Path = SCREENSHOTS, chromium: str = CHROMIUM,
          timeout_s: float = 30.0) -> int:
    started = time.perf_counter()
    if not (site / "index.html").exists():
        raise BookError(f"{site} holds no built book; run `python scripts/book.py build` first")
    if not Path(chromium).exists():
        raise BookError(f"{chromium} not found: run `scripts/ensure_chromium.sh` (installs Debian's chromium) "
                        "or pass --chromium PATH")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise BookError("the Python package playwright is missing: pip install -e '.[dev]'") from None

    pages = site_pages(site)
    if screenshots.exists():
        shutil.rmtree(screenshots)
    screenshots.mkdir(parents=True)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}/"
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="book-chromium-") as profile, sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 900}, timeout=60_000)
            external: list[str] = []

            def route(route):
                parts = urlparse(route.request.url)
                if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname not in ("127.0.0.1", "localhost"):
                    external.append(route.request.url)
                    route.abort()
                else:
                    route.continue_()

            context.route("**/*", route)
            for url_path in pages:
                page_started = time.perf_counter()
                events: list[str] = []
                external.clear()
                page = context.new_page()
                page.on("console", lambda msg, events=events: events.append(f"console {msg.type}: {msg.text[:200]}")
                        if msg.type == "error" else None)
                page.on("pageerror", lambda error, events=events: events.append(f"page error: {str(error)[:200]}"))
                page.on("requestfailed", lambda request, events=events: events.append(
                    f"request failed: {request.url[:120]} ({request.failure})"))
                page.on("response", lambda response, events=events: events.append(
                    f"HTTP {response.status}: {response.url[:120]}") if response.status >= 400 else None)
                probe = None
                try:
                    page.goto(origin + url_path, wait_until="load", timeout=timeout_s * 1000)
                    probe = page.evaluate(PAGE_PROBE)
                    page.wait_for_timeout(100)  # late console messages
                    name = (url_path.strip("/").replace("/", "__").removesuffix(".html") or "index") + ".png"
                    page.screenshot(path=str(screenshots / name), full_page=True, timeout=timeout_s * 1000)
                except Exception as error:  # noqa: BLE001 - any failure is reported for this page
                    events.append(f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
                finally:
                    page.close()
                problems = judge(url_path, probe) if probe else []
                problems += [f"external request (offline book!): {u[:120]}" for u in external]
                problems += [e for e in events if not any(u[:120] in e for u in external)]
                results.append((url_path or "/", probe, problems, time.perf_counter() - page_started))
            context.close()
    finally:
        server.shutdown()

    header = f"{'page':<34} {'ms':>6} {'math':>5} {'figs':>5} {'code':>5}  result"
    print(header)
    print("-" * len(header))
    for url_path, probe, problems, seconds in results:
        math = probe["typeset"] if probe else "-"
        figures = probe["figures"] if probe and probe["notebook"] else "-"
        code = probe["codeCells"] if probe and probe["notebook"] else "-"
        verdict = "ok" if not problems else problems[0]
        print(f"{url_path:<34} {seconds * 1000:>6.0f} {math!s:>5} {figures!s:>5} {code!s:>5}  {verdict}")
        for problem in problems[1:]:
            print(f"{'':<34} {'':>6} {'':>5} {'':>5} {'':>5}  {problem}")
    failed = [r for r in results if r[2]]
    print(f"\n{len(results)} page(s), {len(failed)} with problems; screenshots in "
          f"{screenshots.relative_to(ROOT) if screenshots.is_relative_to(ROOT) else screenshots} "
          f"({time.perf_counter() - started:.1f}s)")
    return 1 if failed or not results else 0


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="book.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("prepare", "put the chapters, the ledger and MathJax into docs/"),
                       ("build", "prepare, then mkdocs build --strict"),
                       ("serve", "prepare, then mkdocs serve")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--solutions", type=Path, default=SOLUTIONS, help="folder of executed NN_slug.ipynb")
        sub.add_argument("--results", type=Path, default=RESULTS, help="folder of benchmark results *.json")
        if name == "build":
            sub.add_argument("--site", type=Path, default=SITE, help="output folder (default: site/)")
        if name == "serve":
            sub.epilog = "Other options go to mkdocs serve, e.g. `serve -a 0.0.0.0:8000`."
    sub = commands.add_parser("check", help="open every page of the built site in headless Chromium")
    sub.add_argument("--site", type=Path, default=SITE)
    sub.add_argument("--screenshots", type=Path, default=SCREENSHOTS)
    sub.add_argument("--chromium", default=os.environ.get("CHROMIUM", CHROMIUM), help="browser executable")
    sub.add_argument("--timeout", type=float, default=30.0, help="seconds allowed per page")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    try:
        if args.command == "check":
            return check(args.site.resolve(), args.screenshots.resolve(), args.chromium, args.timeout)
        prepare(args.solutions.resolve(), args.results.resolve())
        if args.command == "build":
            return build(args.site.resolve())
        if args.command == "serve":
            # Replace this process, so that Ctrl-C or a kill reaches mkdocs itself.
            os.chdir(ROOT)
            command = [sys.executable, "-m", "mkdocs", "serve", "-f", str(ROOT / "mkdocs.yml"), *extra]
            os.execve(sys.executable, command, {**os.environ, "NO_MKDOCS_2_WARNING": "1"})
        return 0
    except BookError as error:
        print(f"book: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
