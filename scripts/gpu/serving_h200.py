"""Issue 17's serving numbers on an H200: ``miniinfer bench serve`` on a Qwen2.5-0.5B-shaped random model.

    python3 scripts/gpu/serving_h200.py --out $OUT/serving_h200.json      # an H200 (about 4 minutes)
    python3 scripts/gpu/serving_h200.py --shape tiny --out /tmp/serving_tiny.json   # CPU test (~20 s)

What it does, with no network (no Hugging Face download anywhere):

1. **A checkpoint folder.** HF transformers' ``Qwen2ForCausalLM`` with Qwen2.5-0.5B's shapes
   (``benchmarks/engine_throughput.py``'s ``hf_05b_config``; ``--shape tiny``: the same config, 2 layers of
   width 64) and random weights, built on the device, saved in bf16 with ``save_pretrained``. No real Qwen
   tokenizer is available offline, so the folder gets a **synthetic tokenizer** covering all 151,936 ids:
   a ``tokenizers`` WordLevel model (lowercasing, whitespace pre-tokenizer) whose first ids are a few
   thousand English words of the bundled Shakespeare tokenizer plus punctuation, ``<|endoftext|>`` /
   ``<|im_start|>`` / ``<|im_end|>`` at Qwen's ids 151643-151645 (``<|endoftext|>`` = config.json's eos),
   and filler tokens ``tok<ID>`` everywhere else, so any generated id detokenizes; a ChatML chat template.
   A random model's samples are spread over the whole vocabulary (mostly filler): the server's
   detokenization and SSE work per token is what it is for any text.
2. **A warm-up** ``miniinfer.LLM(folder)`` in this process, which compiles the CUDA extensions and Triton
   kernels into their on-disk caches (a fresh machine has none), so that the server started next comes up
   quickly (its start-up limit is also raised from 90 to 600 s); it samples 16 tokens of two prompts.
3. **The benchmark**: ``miniinfer bench serve`` (``miniinfer.server.bench.run``, in this process) with
   ``--model FOLDER --device cuda --rates 4 16 64 256 inf --num-requests 128 --max-tokens 128
   --max-num-seqs 128 --overhead-repeats 3`` (each default can be changed, see ``--help``): the sweep of
   offered loads (Poisson arrivals, streaming clients) and the server-vs-offline overhead at saturation,
   written in the ``benchmarks/results`` schema to ``--out`` (default ``$OUT/serving_h200.json``).

The server needs FastAPI and uvicorn (``pip install -e .[serve]``). A GPU image without them (this
workplace's H200 image has neither, nor starlette, pydantic, opentelemetry-api, httptools) takes them as
wheels: put them in ``.whl/`` (or ``--wheels DIR``; cp312 manylinux wheels of fastapi, starlette, pydantic,
pydantic_core, annotated_types, typing_inspection, typing_extensions, opentelemetry_api, uvicorn, httptools)
and this script installs them with ``pip install --no-index --no-deps --target`` before it starts.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.engine_throughput import EOS, SHAPES, hf_05b_config  # noqa: E402

# --shape tiny: the 0.5B config with these fields replaced (the vocabulary stays whole: the tokenizer and
# detokenization paths are the GPU run's).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
# Qwen2.5's special tokens sit right after <|endoftext|>.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
UNK = "[UNK]"
PUNCTUATION = list(".,;:!?'\"-()[]&*/_`")
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SERVER_PACKAGES = ["fastapi", "uvicorn", "httpx", "uvloop"]  # uvloop: the event loop an installed server has

START = time.perf_counter()
SERVER_LOG_DIR = Path(tempfile.mkdtemp(prefix="miniinfer-serving-logs-"))  # TMPDIR of the servers bench starts


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


# -- the server's packages ------------------------------------------------------------------------------


def ensure_server_packages(wheels: Path) -> None:
    """Import-check FastAPI, uvicorn and httpx; where some are missing, install ``wheels/*.whl`` into a
    folder on ``sys.path`` and ``PYTHONPATH`` (the server is a subprocess: it must find them too)."""
    missing = [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        return
    files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not files:
        sys.exit(f"the server needs {', '.join(missing)} (pip install -e .[serve]); no wheels in {wheels} to "
                 "install them from (see this script's docstring)")
    target = Path(tempfile.gettempdir()) / "miniinfer-serving-site"
    log(f"installing {len(files)} wheels from {wheels} into {target} (missing: {', '.join(missing)})")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(target), *map(str, files)], check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    still = [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]
    if still:
        sys.exit(f"still missing after installing the wheels: {', '.join(still)}")


# -- the checkpoint folder -------------------------------------------------------------------------------


def hf_config(shape: str, max_positions: int):
    """HF's Qwen2Config: Qwen2.5-0.5B's shape (``hf_05b_config``), or that config made tiny."""
    config = hf_05b_config(max_positions)
    if shape == "0.5b":
        return config
    fields = config.to_dict()
    for derived in ("layer_types", "head_dim", "transformers_version", "architectures"):
        fields.pop(derived, None)  # recomputed from the new sizes
    fields.update(TINY)
    return type(config)(**fields)


def save_random_model(folder: Path, shape: str, device: str, max_positions: int, seed: int = 0) -> dict:
    """Random weights of ``shape`` built on ``device``, saved in bf16 with HF's ``save_pretrained``
    (as ``benchmarks/engine_throughput.py`` does); returns config.json's contents."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(hf_config(shape, max_positions))
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(folder)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return json.loads((folder / "config.json").read_text())


def shakespeare_words() -> list[str]:
    """The whole words of the bundled Shakespeare tokenizer's vocabulary (BPE tokens that start a word:
    ``Ġword``), lowercased, in vocabulary order, without repeats."""
    from miniinfer.models.bundled import bundled_model_path

    vocab = json.loads((bundled_model_path("shakespeare") / "tokenizer.json").read_text())["model"]["vocab"]
    words: dict[str, None] = {}
    for token in sorted(vocab, key=vocab.get):
        word = token[1:].lower()
        if token.startswith("Ġ") and word.isalpha() and word.isascii() and (len(word) > 1 or word in "aio"):
            words.setdefault(word, None)
    return list(words)


def save_synthetic_tokenizer(folder: Path, vocab_size: int, eos_id: int, max_positions: int) -> int:
    """tokenizer.json (WordLevel over real words + fillers, one token per id of the model's vocabulary) and
    tokenizer_config.json (special tokens, ChatML template); returns how many ids are real words."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    if eos_id + len(SPECIALS) > vocab_size:
        raise ValueError(f"eos id {eos_id} leaves no room for {SPECIALS} in a vocabulary of {vocab_size}")
    special_ids = {eos_id + i: token for i, token in enumerate(SPECIALS)}
    ordinary = iter([UNK, *PUNCTUATION, *shakespeare_words()])
    vocab: dict[str, int] = {}
    num_words = 0
    for token_id in range(vocab_size):
        token = special_ids.get(token_id)
        if token is None:
            token = next(ordinary, None)
            if token is None:
                token = f"tok{token_id}"
            else:
                num_words += 1
        vocab[token] = token_id
    if len(vocab) != vocab_size:
        raise AssertionError(f"{vocab_size - len(vocab)} tokens are repeated")
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # no decoder: decode joins tokens with spaces
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIALS])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": SPECIALS[0],
              "pad_token": SPECIALS[0], "unk_token": UNK, "model_max_length": max_positions,
              "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return num_words


def check_tokenizer(folder: Path, vocab_size: int, eos_id: int) -> None:
    """What the server relies on: miniinfer's Tokenizer loads the folder, covers every id, finds the eos,
    encodes the benchmark's prompts, and decodes (whole and incrementally) random ids of the whole range."""
    from miniinfer.server.bench import PROMPT_LINES
    from miniinfer.tokenizer import IncrementalDetokenizer, Tokenizer

    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer.vocab_size != vocab_size:
        raise AssertionError(f"the tokenizer has {tokenizer.vocab_size} ids, the model {vocab_size}")
    if eos_id not in tokenizer.eos_token_ids or tokenizer.token_to_id(SPECIALS[0]) != eos_id:
        raise AssertionError(f"eos {eos_id} is not the tokenizer's ({tokenizer.eos_token_ids})")
    for line in PROMPT_LINES:
        if not tokenizer.encode(line):
            raise AssertionError(f"{line!r} encodes to nothing")
    rng = random.Random(0)
    ids = [rng.randrange(vocab_size) for _ in range(2000)] + [0, vocab_size - 1, *range(eos_id, eos_id + 3)]
    text = tokenizer.decode(ids)
    stream = IncrementalDetokenizer(tokenizer)
    pieces = "".join(stream.add(i) for i in ids) + stream.flush()
    if pieces != text:
        raise AssertionError("incremental detokenization differs from a whole decode")
    words = tokenizer.encode("to be or not to be that is the question")
    if tokenizer.decode(words) != "to be or not to be that is the question":
        raise AssertionError(f"round trip failed: {tokenizer.decode(words)!r}")
    tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])


def build_folder(folder: Path, shape: str, device: str, max_positions: int) -> None:
    config = save_random_model(folder, shape, device, max_positions)
    vocab_size, eos_id = config["vocab_size"], config["eos_token_id"]
    if shape == "0.5b" and (vocab_size, eos_id) != (SHAPES["0.5b"]["vocab_size"], EOS):
        raise AssertionError(f"unexpected config: vocab {vocab_size}, eos {eos_id}")
    num_words = save_synthetic_tokenizer(folder, vocab_size, eos_id, max_positions)
    check_tokenizer(folder, vocab_size, eos_id)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    log(f"{shape} random model + synthetic tokenizer ({num_words} words, {vocab_size} ids, eos {eos_id}) in "
        f"{folder} ({size:.0f} MiB: {', '.join(sorted(f.name for f in folder.iterdir()))})")


# -- warm-up and the benchmark ----------------------------------------------------------------------------


def warm_up(folder: Path, device: str, max_num_seqs: int) -> None:
    """Load the folder once in this process: compiles (and caches on disk) what the server's start-up would
    otherwise compile under its time limit; checks a sampled generation over the full vocabulary."""
    import torch

    from miniinfer import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(str(folder), device=device, max_num_seqs=max_num_seqs)
    loaded = time.perf_counter() - started
    stats = llm.engine.stats()
    params = SamplingParams(temperature=0.8, seed=0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate(["ROMEO.\n", "To be, or not to be"], params, use_tqdm=False)
    if any(len(o.outputs[0].token_ids) != 16 for o in outputs):
        raise AssertionError("the warm-up did not generate 16 tokens per request")
    log(f"warm-up LLM: loaded in {loaded:.1f} s (backend {llm.engine.attention_backend}, CUDA graphs "
        f"{bool(stats.get('cuda_graphs'))}, {stats.get('kv_blocks_total')} KV blocks); sample: "
        f"{outputs[0].outputs[0].text[:80]!r}")
    del llm, outputs
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def bench_arguments(args, folder: Path) -> list[str]:
    return ["--model", str(folder), "--device", args.device, "--rates", *args.rates,
            "--num-requests", str(args.num_requests), "--max-tokens", str(args.max_tokens),
            "--max-num-seqs", str(args.max_num_seqs), "--overhead-repeats", str(args.overhead_repeats),
            "--server-startup-timeout", str(args.server_startup_timeout), "--out", str(args.out)] + (
        ["--compare-engine-process"] if args.compare_engine_process else []) + (
        ["--engine-process"] if args.engine_process else []) + (
        ["--engine-cpus", args.engine_cpus] if args.engine_cpus else []) + (
        ["--overhead-requests", str(args.overhead_requests)] if args.overhead_requests else []) + (
        ["--prompt-words", str(args.prompt_words)] if args.prompt_words else []) + (
        ["--stream-interval", str(args.stream_interval)] if args.stream_interval != 1 else [])


def run_bench(args, folder: Path) -> dict:
    from miniinfer.server import bench

    argv = bench_arguments(args, folder)
    log("miniinfer bench serve " + " ".join(argv))
    parser = argparse.ArgumentParser(prog="miniinfer bench serve")
    bench.add_bench_serve_arguments(parser)
    bench_args = parser.parse_args(argv)
    os.environ["TMPDIR"] = str(SERVER_LOG_DIR)  # ServerProcess writes its server's log there
    code = bench.run(bench_args)
    if code:
        raise SystemExit(f"miniinfer bench serve exited with {code}")
    return json.loads(Path(args.out).read_text())


MODEL_NOTE = (" Model: Qwen2.5-0.5B's shape (--shape tiny: 2 layers of width 64) with random weights and a "
              "synthetic word-level tokenizer (no real checkpoint offline): samples spread over the whole "
              "vocabulary, and every id detokenizes to one word or filler token, so the server's work per "
              "token (incremental detokenization, JSON, SSE) is that of real text.")


def annotate(path: Path, args, timings: dict) -> None:
    """Say in the results file which model this was and how long each part of the script took."""
    record = json.loads(path.read_text())
    record["model"] = {"shape": args.shape, "max_model_len": args.max_model_len,
                       "weights": "random (HF init, std 0.02), bf16, saved with save_pretrained",
                       "tokenizer": "synthetic WordLevel: Shakespeare words + fillers over the vocabulary"}
    record["script"] = "scripts/gpu/serving_h200.py"
    record["script_timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    record["notes"] += MODEL_NOTE
    path.write_text(json.dumps(record, indent=2) + "\n")


# Defaults per shape: 0.5b, on an H200, in about 4 minutes (a fresh machine compiles the kernels first);
# tiny, on a CPU, in about 20 seconds.
DEFAULTS = {
    "0.5b": {"device": "cuda", "rates": ["4", "16", "64", "256", "inf"], "num_requests": 128,
             "max_tokens": 128, "max_num_seqs": 128, "overhead_repeats": 3, "out": "serving_h200.json"},
    "tiny": {"device": "cpu", "rates": ["4", "16", "inf"], "num_requests": 16, "max_tokens": 16,
             "max_num_seqs": 16, "overhead_repeats": 1, "out": "serving_tiny.json"},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(DEFAULTS), default="0.5b",
                        help="0.5b: Qwen2.5-0.5B's shape (GPU run); tiny: 2 layers of width 64 (CPU test)")
    parser.add_argument("--device", help="default: cuda for 0.5b, cpu for tiny")
    parser.add_argument("--out", type=Path,
                        help="the JSON report (default: $OUT/serving_h200.json; tiny: serving_tiny.json)")
    parser.add_argument("--rates", nargs="+", help="loads: requests/s or inf (default 4 16 64 256 inf)")
    parser.add_argument("--num-requests", type=int, help="requests per rate (default 128)")
    parser.add_argument("--max-tokens", type=int, help="tokens per request (default 128)")
    parser.add_argument("--max-num-seqs", type=int, help="the batch limit (default 128)")
    parser.add_argument("--prompt-words", type=int, default=0,
                        help="long prompts: bench serve's option (each request's line + this many random words)")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="the servers' --stream-interval (default 1: an event every engine step)")
    parser.add_argument("--overhead-repeats", type=int,
                        help="interleaved server/offline pairs at saturation (default 3)")
    parser.add_argument("--max-model-len", type=int, default=4096,
                        help="max_position_embeddings of the saved config, hence the engine's context limit "
                             "(default 4096: keeps the KV pools of the three engines small)")
    parser.add_argument("--folder", type=Path,
                        help="where to build the checkpoint (default: a temporary folder, removed at the "
                             "end); a folder that already holds config.json and tokenizer.json is reused")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl",
                        help="wheels installed if FastAPI or uvicorn are missing (default: .whl)")
    parser.add_argument("--server-startup-timeout", type=float, default=600.0,
                        help="seconds the server may take to come up (default 600)")
    parser.add_argument("--skip-warm-up", action="store_true", help="no LLM load in this process first")
    parser.add_argument("--overhead-requests", type=int,
                        help="requests per run of the server-vs-offline pairs at saturation (default: --num-requests); "
                             "more make the steady state outweigh the first and last steps")
    parser.add_argument("--compare-engine-process", action="store_true",
                        help="also measure a server started with --engine-process, in the same pairs (bench serve's "
                             "option of that name)")
    parser.add_argument("--engine-process", action="store_true",
                        help="the benchmark's server runs its engine in a process of its own (bench serve's option; "
                             "no thread-mode server at all)")
    parser.add_argument("--engine-cpus", metavar="CPUS",
                        help="with --compare-engine-process: the engine process's CPUs (e.g. 0-1); the load "
                             "generator and the server process take the others")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.shape].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not isinstance(args.out, Path):  # the default file name: under $OUT where that is set
        args.out = Path(os.environ.get("OUT") or ".") / args.out
    args.out = args.out.resolve()
    return args


def keep_server_log(out: Path) -> None:
    """Copy the log of the server this run started (``ServerProcess`` writes it to $TMPDIR) beside ``out``,
    unless it is empty (the server logs warnings and errors only)."""
    logs = sorted((p for p in SERVER_LOG_DIR.glob("miniinfer-serve-*.log") if p.stat().st_size),
                  key=lambda p: p.stat().st_mtime)
    if logs:
        target = out.with_name(out.stem + "_server.log")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(logs[-1], target)
        log(f"server log: {target}")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The server is `python -m miniinfer` in a subprocess: let it import this checkout wherever it runs from.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ensure_server_packages(args.wheels)
    import torch

    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("--device cuda, but torch sees no GPU (use --shape tiny --device cpu for a CPU test)")
        log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        log(f"CPU, torch {torch.__version__}, {os.cpu_count()} cores")
    timings = {}
    temporary = args.folder is None
    folder = Path(tempfile.mkdtemp(prefix=f"qwen25-{args.shape}-random-")) if temporary else args.folder
    try:
        started = time.perf_counter()
        if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
            log(f"reusing {folder}")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            build_folder(folder, args.shape, args.device, args.max_model_len)
        timings["build_model"] = time.perf_counter() - started
        if not args.skip_warm_up:
            started = time.perf_counter()
            warm_up(folder, args.device, args.max_num_seqs)
            timings["warm_up"] = time.perf_counter() - started
        started = time.perf_counter()
        record = run_bench(args, folder)
        timings["bench_serve"] = time.perf_counter() - started
        timings["total"] = time.perf_counter() - START
        annotate(args.out, args, timings)
        summary = record["summary"]
        overhead = summary.get("overhead_at_saturation") or {}
        rounded = {k: round(v, 1) for k, v in timings.items()}
        log(f"done: max achieved {summary.get('max_achieved_rps')} req/s; server/offline at saturation "
            f"{overhead.get('server_vs_offline_tok_s')} (tok/s), "
            f"{overhead.get('server_vs_offline_tok_per_cpu_s')} (tok per CPU-s); seconds {rounded}")
    finally:
        keep_server_log(args.out)
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
