"""Where the server's time goes at saturation (issue 17): py-spy profiles of both processes of
``miniinfer serve --engine-process`` while it serves a saturated run, with each process's CPU per token.

    python3 scripts/gpu/serving_profile.py --folder /root/q05 --out-dir $OUT/serving_profile   # an H200
    python3 scripts/gpu/serving_profile.py --folder DIR --device cpu --num-requests 64            # CPU check

``--folder``: a checkpoint folder (``scripts/gpu/serving_h200.py --folder DIR`` builds Qwen2.5-0.5B's shape with
random weights and a synthetic tokenizer there; if DIR does not exist, this script builds it the same way).
py-spy (``pip install py-spy``, or its wheel in ``.whl/``) samples without stopping the processes
(``--nonblocking``) for ``--profile-s`` seconds in the middle of the run. Writes into ``--out-dir``: the raw
stacks (with ``--keep-raw``: ``parent.txt``, ``engine.txt``, ``offline.txt``: py-spy's "raw" format, one stack and its
count per line), a summary of each (``*_top.txt``: functions by their own and inclusive share of the busy samples) and ``profile.json``
(throughput, CPU seconds per token of the server process and of the engine process, the engine's CPUs).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))

import serving_h200  # noqa: E402  (the wheels, the model folder, the warm-up)

# Leaf frames that mean "waiting", not working: excluded from the busy share.
IDLE_LEAVES = ("select (", "poll (", "wait (", "epoll", "_recv (", "recv_bytes", "accept (", "_poll (",
               "sleep (", "acquire (")


def summarise(raw: Path, top: int = 40) -> str:
    """Functions by their own and their inclusive share of the busy samples of a py-spy raw file."""
    own, inclusive, threads = collections.Counter(), collections.Counter(), collections.Counter()
    busy = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        count = int(count)
        frames = stack.split(";")
        if any(mark in frames[-1] for mark in IDLE_LEAVES):
            idle += count
            continue
        busy += count
        threads[frames[0]] += count
        own[frames[-1]] += count
        for frame in set(frames[1:]):
            inclusive[frame] += count
    lines = [f"busy samples {busy}, idle {idle}"]
    lines += [f"  {100 * n / max(busy, 1):5.1f}%  {name}" for name, n in threads.most_common()]
    lines.append("-- own")
    lines += [f"  {100 * n / max(busy, 1):5.1f}%  {name}" for name, n in own.most_common(top)]
    lines.append("-- inclusive")
    lines += [f"  {100 * n / max(busy, 1):5.1f}%  {name}" for name, n in inclusive.most_common(top + 20)]
    return "\n".join(lines) + "\n"


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    for candidate in (Path(sys.executable).parent / "py-spy", Path("/tmp/miniinfer-serving-site/bin/py-spy")):
        if candidate.exists():
            return str(candidate)
    return None


def child_pid(parent: int) -> int | None:
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    for pid in map(int, children):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


OFFLINE_CHILD = """
import json, sys, time
from miniinfer.server.bench import load_offline_llm, offline_run
llm = load_offline_llm(sys.argv[1], sys.argv[2], int(sys.argv[3]))
offline_run(llm, 32, 16)
print("READY", flush=True)
sys.stdin.readline()
result = offline_run(llm, int(sys.argv[4]), int(sys.argv[5]))
result["decode_only_steps"] = llm.engine.counters["num_decode_only_steps"]
print(json.dumps(result), flush=True)
"""


def profile_offline(args, spy: str | None) -> dict:
    """The same requests through ``LLM.generate`` in a process of its own, profiled like the server's."""
    from miniinfer.server.bench import process_cpu_seconds

    process = subprocess.Popen([sys.executable, "-c", OFFLINE_CHILD, str(args.folder), args.device,
                                str(args.max_num_seqs), str(args.num_requests), str(args.max_tokens)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    while True:
        line = process.stdout.readline()
        if not line or line.startswith("READY"):
            break
    spying = None
    if spy is not None:
        spying = subprocess.Popen(["bash", "-c", f"sleep 0.5; exec {spy} record -p {process.pid} --threads "
                                   f"--nonblocking -r {args.rate} -d {args.profile_s} -f raw -o {args.out_dir}/offline.txt"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu_before = process_cpu_seconds(process.pid)
    process.stdin.write("go\n")
    process.stdin.flush()
    result = json.loads(process.stdout.readline())
    result["process_cpu_s"] = process_cpu_seconds(process.pid) - cpu_before
    process.stdin.close()
    process.wait(60)
    if spying is not None:
        spying.wait(args.profile_s + 60)
        raw = args.out_dir / "offline.txt"
        if raw.exists():
            (args.out_dir / "offline_top.txt").write_text(summarise(raw))
            if not args.keep_raw:
                raw.unlink()
    tokens = result["tokens"]
    return {"output_tok_s": round(tokens / result["wall_s"], 1), "steps": result["steps"],
            "step_ms": round(1e3 * result["wall_s"] / result["steps"], 2),
            "cpu_us_per_token": round(1e6 * result["process_cpu_s"] / tokens, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-requests", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--engine-cpus", default="auto")
    parser.add_argument("--profile-s", type=int, default=3, help="seconds py-spy samples (whole seconds)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")) / "serving_profile")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    parser.add_argument("--nonblocking", action=argparse.BooleanOptionalAction, default=True,
                        help="py-spy without pausing the processes (default; --no-nonblocking: exact stacks, "
                             "slower processes)")
    parser.add_argument("--keep-raw", action="store_true", help="keep py-spy's raw stacks next to the summaries")
    parser.add_argument("--offline", action=argparse.BooleanOptionalAction, default=True,
                        help="also profile LLM.generate of the same requests in a process of its own")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    serving_h200.ensure_server_packages(args.wheels)
    if not (args.folder / "config.json").exists():
        args.folder.mkdir(parents=True, exist_ok=True)
        serving_h200.build_folder(args.folder, "0.5b" if args.device.startswith("cuda") else "tiny", args.device, 4096)
        serving_h200.warm_up(args.folder, args.device, args.max_num_seqs)
    from miniinfer.server.bench import load_generator_cpus, process_cpu_seconds, run_rate, served_model_name
    from miniinfer.server.testing import ServerProcess

    spy = py_spy()
    # ServerProcess passes --device cpu first; the later --device wins (argparse).
    server_args = ["--model", str(args.folder), "--device", args.device, "--max-num-seqs", str(args.max_num_seqs),
                   "--engine-process", "--log-level", "warning", "--max-waiting", str(args.num_requests)]
    if args.engine_cpus != "none":
        server_args += ["--engine-cpus", args.engine_cpus]
    server = ServerProcess(*server_args, startup_timeout=600.0)
    try:
        url = server.url
        parent = server.process.pid
        engine = child_pid(parent)
        stats = server.engine_stats()
        model = served_model_name(url)
        generator_cpus = load_generator_cpus(server)  # the load generator stays off the engine's cores
        if generator_cpus:
            os.sched_setaffinity(0, generator_cpus)
        run_rate(url, model, float("inf"), 32, 16)  # warm: the first requests' compilations and allocations
        spies = []
        if spy is not None:
            # Start sampling after the run's ramp: the middle of a saturated run.
            delay = 0.7
            for name, pid in (("parent", parent), ("engine", engine)):
                if pid is None:
                    continue
                command = [spy, "record", "-p", str(pid), "--threads", *(["--nonblocking"] if args.nonblocking else []), "-r", str(args.rate),
                           "-d", str(args.profile_s), "-f", "raw", "-o", str(args.out_dir / f"{name}.txt")]
                spies.append((name, subprocess.Popen(["bash", "-c", f"sleep {delay}; exec " + " ".join(command)],
                                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        time.sleep(1.0)  # the engine's process reports its counters when it goes idle
        steps_before = server.engine_stats()
        cpu_before = {name: process_cpu_seconds(pid) for name, pid in (("parent", parent), ("engine", engine)) if pid}
        start = time.perf_counter()
        row = run_rate(url, model, float("inf"), args.num_requests, args.max_tokens)
        wall = time.perf_counter() - start
        cpu = {name: process_cpu_seconds(pid) - before for name, pid, before in
               [(n, p, cpu_before[n]) for n, p in (("parent", parent), ("engine", engine)) if p]}
        time.sleep(1.0)
        steps_after = server.engine_stats()
        for name, process in spies:
            try:
                _, err = process.communicate(timeout=args.profile_s + 60)
            except subprocess.TimeoutExpired:
                process.kill()
                err = b"timed out"
            raw = args.out_dir / f"{name}.txt"
            if raw.exists():
                (args.out_dir / f"{name}_top.txt").write_text(summarise(raw))
                if not args.keep_raw:
                    raw.unlink()
            else:
                print(f"py-spy ({name}) wrote nothing: {err.decode(errors='replace')[-500:]}")
        tokens = args.num_requests * args.max_tokens
        report = {"num_requests": args.num_requests, "max_tokens": args.max_tokens, "wall_s": round(wall, 3),
                  "output_tok_s": row["output_tok_s"], "ok": row["ok"], "engine_cpus": stats.get("engine_cpus"),
                  "cpus": os.cpu_count(), "py_spy": spy,
                  "engine_steps": steps_after.get("num_steps", 0) - steps_before.get("num_steps", 0),
                  "engine_decode_only_steps": (steps_after.get("num_decode_only_steps", 0)
                                               - steps_before.get("num_decode_only_steps", 0)),
                  "merged_outputs": steps_after.get("num_merged_outputs", 0) - steps_before.get("num_merged_outputs", 0),
                  "cpu_us_per_token": {name: round(1e6 * seconds / tokens, 1) for name, seconds in cpu.items()},
                  "cpu_busy_fraction": {name: round(seconds / wall, 3) for name, seconds in cpu.items()}}
        server.stop()
        if args.offline:
            report["offline"] = profile_offline(args, spy)
        (args.out_dir / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        for name in ("parent", "engine", "offline"):
            top = args.out_dir / f"{name}_top.txt"
            if top.exists():
                print(f"== {name}\n" + "\n".join(top.read_text().splitlines()[:45]))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
