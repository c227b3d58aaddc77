"""CPU: the radix cache's effect on a shared-prefix workload (prefill tokens and wall time saved).

    python benchmarks/prefix_cache.py                      # the bundled model, writes results/prefix_cache_cpu.json
    python benchmarks/prefix_cache.py --system-tokens 128 --repeat 1 --out /tmp/x.json   # quicker

Workload (chapter 08's): a system prompt shared by every request, and C conversations of T turns.
Each turn's prompt is the system prompt + all earlier turns (user text and the model's greedy reply)
+ a new user line, as token ids; conversation c starts at step c and sends its next turn as soon as
its reply is done (no think time: a throughput test). The same workload runs with
``enable_prefix_caching`` off and on, for several system-prompt lengths (the prologue of *Romeo and
Juliet*, repeated and cut to length).

Columns: prompt tokens submitted, prefill tokens computed, prefix-cache hit tokens (counts from
``llm.stats()``: exact), the wall time of the whole workload and the mean time to first token
(best of ``--repeat`` runs; CPU times depend on the machine and its load), and the ratios
with/without the cache. Outputs are checked to be identical with and without the cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_results  # noqa: E402
from miniinfer import LLM, SamplingParams, bundled_model_path  # noqa: E402

PROLOGUE = """Two households, both alike in dignity,
In fair Verona, where we lay our scene,
From ancient grudge break to new mutiny,
Where civil blood makes civil hands unclean.
From forth the fatal loins of these two foes
A pair of star-cross'd lovers take their life;
Whose misadventured piteous overthrows
Do with their death bury their parents' strife.
The fearful passage of their death-mark'd love,
And the continuance of their parents' rage,
Which, but their children's end, nought could remove,
Is now the two hours' traffic of our stage;
The which if you with patient ears attend,
What here shall miss, our toil shall strive to mend.
"""
LINES = ["What light through yonder window breaks?", "Wilt thou be gone? it is not yet near day.",
         "My bounty is as boundless as the sea.", "Good night, good night! parting is such sweet sorrow.",
         "What's in a name?", "I do protest, I never injured thee.", "Thus with a kiss I die.",
         "These violent delights have violent ends.", "Is love a tender thing?", "O, I am fortune's fool!",
         "A plague o' both your houses!"]
COLUMNS = ["system tokens", "prefix cache", "prompt tokens", "prefill tokens", "cache hit tokens", "hit %",
           "wall s", "mean TTFT ms", "prefill saved %", "wall saved %", "TTFT speedup"]


def run_workload(llm: LLM, system_ids: list[int], user_turns: list[list[list[int]]], reply_tokens: int):
    """Closed loop over all conversations; returns (replies, wall seconds, mean time to first token)."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=reply_tokens, ignore_eos=True)
    num_conversations, num_turns = len(user_turns), len(user_turns[0])
    history = {c: list(system_ids) for c in range(num_conversations)}
    turn = dict.fromkeys(range(num_conversations), 0)
    in_flight, submitted, first_token, replies = {}, {}, [], {}

    def submit(c):
        request_id = engine.add_request(history[c] + user_turns[c][turn[c]], params)
        in_flight[request_id] = c
        submitted[request_id] = time.perf_counter()

    started = time.perf_counter()
    step = 0
    while step < num_conversations or engine.has_unfinished_requests():
        if step < num_conversations:
            submit(step)
        for output in engine.step():
            if output.request_id in submitted and output.outputs[0].token_ids:
                first_token.append(time.perf_counter() - submitted.pop(output.request_id))
            if output.finished:
                c = in_flight.pop(output.request_id)
                replies[(c, turn[c])] = output.token_ids
                history[c] = output.prompt_token_ids + output.token_ids
                turn[c] += 1
                if turn[c] < num_turns:
                    submit(c)
        step += 1
    wall = time.perf_counter() - started
    return replies, wall, sum(first_token) / len(first_token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled shakespeare model)")
    parser.add_argument("--system-tokens", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--reply-tokens", type=int, default=24)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration; the best time is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--notes", default="", help="appended to the JSON notes (e.g. the machine's load)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or bundled_model_path("shakespeare")

    rows = []
    for system_tokens in args.system_tokens:
        outputs = {}
        for caching in (False, True):
            best_wall = best_ttft = float("inf")
            for _ in range(args.repeat):
                llm = LLM(model, device="cpu", block_size=args.block_size, num_kv_blocks=1024,
                          enable_prefix_caching=caching)
                tokenizer = llm.tokenizer
                prologue = tokenizer.encode(PROLOGUE)
                system_ids = (prologue * (system_tokens // len(prologue) + 1))[:system_tokens]
                user_turns = [[tokenizer.encode(f"\nROMEO:\n{LINES[(3 * c + t) % len(LINES)]}\n\nJULIET:\n")
                               for t in range(args.turns)] for c in range(args.conversations)]
                replies, wall, ttft = run_workload(llm, system_ids, user_turns, args.reply_tokens)
                best_wall, best_ttft = min(best_wall, wall), min(best_ttft, ttft)
                stats = llm.stats()
            outputs[caching] = replies
            row = {"system tokens": system_tokens, "prefix cache": "on" if caching else "off",
                   "prompt tokens": stats["prompt_tokens"], "prefill tokens": stats["prefill_tokens_computed"],
                   "cache hit tokens": stats["prefix_cache_hit_tokens"],
                   "hit %": 100 * stats["prefix_cache_hit_tokens"] / stats["prompt_tokens"],
                   "wall s": best_wall, "mean TTFT ms": 1e3 * best_ttft}
            if caching:
                off = rows[-1]
                row["prefill saved %"] = 100 * (1 - row["prefill tokens"] / off["prefill tokens"])
                row["wall saved %"] = 100 * (1 - row["wall s"] / off["wall s"])
                row["TTFT speedup"] = off["mean TTFT ms"] / row["mean TTFT ms"]
            rows.append(row)
            print_table(COLUMNS, [row], floatfmt=".3g")
        if outputs[True] != outputs[False]:
            raise SystemExit(f"system tokens {system_tokens}: the prefix cache changed the outputs")
    print()
    print_table(COLUMNS, rows, floatfmt=".3g")
    notes = (f"{args.conversations} conversations x {args.turns} turns, replies of {args.reply_tokens} greedy tokens, "
             f"block size {args.block_size}, CPU float32; counts are exact, times are the best of {args.repeat} runs "
             "and depend on the machine and its load. Outputs identical with and without the cache. " + args.notes)
    write_results("prefix_cache", "Radix prefix cache on a shared-prefix multi-turn workload (CPU)", "cpu",
                  COLUMNS, rows, summary={"model": args.model or "bundled: shakespeare"}, notes=notes.strip(), out=args.out)


if __name__ == "__main__":
    main()
