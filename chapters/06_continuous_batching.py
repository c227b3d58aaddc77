# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 06 — Continuous batching
#
# **What you will build.** The heart of a serving engine's loop. A *static* batch pads its prompts
# to the same length and runs until its longest request is done, while finished rows sit idle.
# **Continuous batching** instead decides anew at every step which sequences run: a finished request
# leaves at once and a waiting one takes its place, and a long prompt is computed in **chunks** so
# that it does not stall the others. You will write the two pure functions at the core of
# `miniinfer/engine/`: `pack_batch`, which lays out one step's tokens as a flat batch without padding,
# and `plan_step`, which splits the step's token budget between sequences (chunked prefill
# included) — and run the engine with both plugged in.
#
# **What you need.** Chapter 05: the KV cache, prefill vs decode, left padding and the offset
# causal mask (a prefill chunk is a query block at `start > 0`).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from miniinfer import LLM, SamplingParams
from miniinfer.course import check
from miniinfer.engine import EngineConfig, EngineHooks, LLMEngine
from miniinfer.generate import generate_static_batch

torch.manual_seed(0)
llm = LLM(device="cpu", max_num_seqs=4, num_kv_blocks=256)   # the bundled model on the engine, 4 sequences per step
model, tokenizer = llm.model, llm.tokenizer

# %% [markdown]
# ## 1. A workload with mixed output lengths
#
# Eight requests, with prompts of a few tokens and outputs from 6 to 90 tokens (`ignore_eos=True`
# makes each produce exactly its `max_tokens`, so the workload is the same on every run). Real
# traffic looks like this: most answers are short, a few are long, and nobody knows in advance
# which. Both systems below get **4 slots**: at most 4 sequences per forward pass.

# %%
starts = ["ROMEO:", "JULIET:\nO Romeo, Romeo!", "HAMLET:\nTo be, or not to be", "KING LEAR:",
          "MACBETH:\nIs this a dagger", "PORTIA:\nThe quality of mercy is not strain'd", "PUCK:",
          "OTHELLO:\nIt is the cause"]
max_tokens = [6, 60, 12, 40, 90, 8, 24, 70]
prompts = [tokenizer.encode(text) for text in starts]
params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
SLOTS = 4
print("prompt tokens:", [len(p) for p in prompts], " output tokens:", max_tokens, " total:", sum(max_tokens))

# %% [markdown]
# ### Static batching
#
# `generate_static_batch` (chapter 05's cache, left padding) runs one batch of 4 until all 4 are done;
# the next 4 wait for the whole batch. A row whose request has finished keeps computing a token that
# is thrown away.

# %%
static_results = [generate_static_batch(model, prompts[g:g + SLOTS], params[g:g + SLOTS])
                  for g in range(0, len(prompts), SLOTS)]
static_steps = sum(r.steps + 1 for r in static_results)            # one prefill + the decode steps, per batch
# timeline[slot, step] = request index, or -1; `finished` marks slots held by a request that is done
static_timeline = np.full((SLOTS, static_steps), -1)
static_finished = np.zeros((SLOTS, static_steps), dtype=bool)
offset = 0
for g, result in enumerate(static_results):
    steps = result.steps + 1
    for row, output in enumerate(result.outputs):
        static_timeline[row, offset:offset + steps] = g * SLOTS + row
        static_finished[row, offset + len(output):offset + steps] = True   # after its last token
    offset += steps
static_useful = int((~static_finished & (static_timeline >= 0)).sum())
print(f"static: {static_steps} forward passes, {static_useful} useful slot-steps of {SLOTS * static_steps} "
      f"({static_useful / (SLOTS * static_steps):.0%} utilisation)")


# %% [markdown]
# ### Continuous batching
#
# The engine (`miniinfer/engine/`) keeps a *running* list and a *waiting* queue. Every step the
# scheduler picks the sequences and how many tokens each computes; the model runner packs their
# tokens into one flat batch and runs the model once; new tokens are sampled; finished sequences
# leave and free their slot. After each step, `engine.runner.last_step` says what ran: one entry per
# sequence, with its request, the tokens computed before the step and in it.

# %%
def run_with_timeline(engine: LLMEngine, prompts, params, arrivals=None):
    """Step the engine to the end; return the outputs, and per step the list of StepEntry that ran.
    arrivals[i]: the step at which request i is submitted (default: all at step 0)."""
    arrivals = arrivals or [0] * len(prompts)
    ids, outputs, steps = {}, {}, []
    while len(outputs) < len(prompts):
        for index, arrival in enumerate(arrivals):
            if arrival == len(steps):
                ids[engine.add_request(prompts[index], params[index])] = index
        for output in engine.step():
            if output.finished:
                outputs[ids[output.request_id]] = output.outputs[0].token_ids
        steps.append([entry._replace(request_id=ids[entry.request_id]) for entry in engine.runner.last_step])
    return [outputs[i] for i in range(len(prompts))], steps


def assign_slots(steps, num_slots: int):
    """A request takes the lowest free slot when it first runs and frees it after its last step."""
    last_seen = {entry.request_id: s for s, entries in enumerate(steps) for entry in entries}
    timeline, slot_of, free = np.full((num_slots, len(steps)), -1), {}, list(range(num_slots))
    for s, entries in enumerate(steps):
        for entry in entries:
            if entry.request_id not in slot_of:
                slot_of[entry.request_id] = free.pop(0)
            timeline[slot_of[entry.request_id], s] = entry.request_id
        for request, slot in list(slot_of.items()):
            if last_seen[request] == s:
                free.append(slot)
                free.sort()
                del slot_of[request]
    return timeline


engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=SLOTS, num_kv_blocks=256))
continuous_outputs, continuous_steps = run_with_timeline(engine, prompts, params)
continuous_timeline = assign_slots(continuous_steps, SLOTS)
continuous_useful = int((continuous_timeline >= 0).sum())
print(f"continuous: {len(continuous_steps)} steps, {continuous_useful} useful slot-steps of "
      f"{SLOTS * len(continuous_steps)} ({continuous_useful / (SLOTS * len(continuous_steps)):.0%} utilisation)")
same = continuous_outputs == [output for r in static_results for output in r.outputs]
print("both produce the same tokens:", same)


# %%
def draw_timelines():
    fig, axes = plt.subplots(2, 1, figsize=(11, 4.6), sharex=True)
    colours = plt.get_cmap("tab10")
    panels = [(f"static batching: {static_steps} forward passes", static_timeline, static_finished),
              (f"continuous batching: {len(continuous_steps)} steps", continuous_timeline, None)]
    for ax, (title, timeline, finished) in zip(axes, panels):
        for slot in range(SLOTS):
            for step in range(timeline.shape[1]):
                request = timeline[slot, step]
                if request < 0:
                    continue
                idle = finished is not None and finished[slot, step]
                ax.barh(slot, 1, left=step, color="lightgrey" if idle else colours(request),
                        hatch="///" if idle else None, edgecolor="white" if not idle else "grey", linewidth=0.2)
        # label each request where its run starts
        for slot in range(SLOTS):
            row = timeline[slot]
            for step in range(len(row)):
                if row[step] >= 0 and (step == 0 or row[step - 1] != row[step]):
                    ax.text(step + 0.5, slot, f"r{row[step]}", va="center", fontsize=8, color="white",
                            fontweight="bold")
        ax.set_yticks(range(SLOTS))
        ax.set_yticklabels([f"slot {s}" for s in range(SLOTS)], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
    axes[1].set_xlabel("step (one forward pass of the model)")
    axes[0].legend([plt.Rectangle((0, 0), 1, 1, facecolor="lightgrey", hatch="///", edgecolor="grey")],
                   ["slot held by a finished request (wasted)"], fontsize=8, loc="lower right")
    fig.tight_layout()


draw_timelines()


# %% [markdown]
# The static batch's second half waits for `r1` (60 tokens) while three of its slots compute
# nothing useful; then `r4` (90 tokens) holds the batch for a long time alone. The continuous engine
# refills a slot at the very next step after a request ends, so the same work takes far fewer
# steps. Whether that shows in tokens per second depends on what a step costs. On a GPU a decode
# step costs about the same for 1 or 4 rows (it is bound by reading the weights once), so fewer
# steps is directly more throughput. On a CPU with a tiny model, the engine's per-step bookkeeping
# (scheduling in Python, gathering keys from a paged cache) costs about as much as the steps it
# saves, so expect the two to land close to each other here. Timings vary, so this cell's numbers
# are not part of the answer key:

# %% tags=["nbval-ignore-output", "skip-grading"]
def run_static():
    return [generate_static_batch(model, prompts[g:g + SLOTS], params[g:g + SLOTS])
            for g in range(0, len(prompts), SLOTS)]


def run_continuous():
    return llm.generate(prompts, params, use_tqdm=False)


# Alternate the two, best of 3 rounds each, so that a busy moment of the machine hits both alike.
best = {run_static: float("inf"), run_continuous: float("inf")}
for _ in range(3):
    for fn in best:
        start = time.perf_counter()
        fn()
        best[fn] = min(best[fn], time.perf_counter() - start)
static_s, continuous_s = best[run_static], best[run_continuous]
total = sum(max_tokens)
print(f"static:     {static_s * 1e3:6.0f} ms, {total / static_s:6.0f} tokens/s")
print(f"continuous: {continuous_s * 1e3:6.0f} ms, {total / continuous_s:6.0f} tokens/s "
      f"(× {static_s / continuous_s:.2f} the static throughput)")

# %% [markdown]
# On a GPU the gap grows with the number of requests: an H100 runs hundreds of sequences per step,
# and a static batch of hundreds waits for its single longest answer. The benchmark
# `benchmarks/engine_throughput.py --gpu` compares the engine with Hugging Face `generate` (a static,
# left-padded batch) on 256 requests of mixed lengths (this cell shows the latest recorded run):

# %% tags=["nbval-ignore-output"]
from miniinfer.course.results import caption, load_result

record = load_result("engine_throughput", device="cuda")
if record is None:
    print("no GPU result recorded yet: run `python benchmarks/engine_throughput.py --gpu` on a CUDA machine")
else:
    print(caption(record))
    for row in record["rows"]:
        if row.get("HF tok/s"):  # the rows with an HF baseline measured in the same run
            print(f"  {row['row']}: miniinfer {row['tok/s']:,.0f} tok/s, HF generate {row['HF tok/s']:,.0f} "
                  f"tok/s ({row['tok/s'] / row['HF tok/s']:.1f}×)")


# %% [markdown]
# ## 2. The flat batch
#
# In a continuous batch, sequences in a step are at different stages: one decodes its 40th token,
# another computes the second chunk of its prompt, a third has just arrived. Padding them to a
# rectangle `[B, L_max]` would waste most of the batch, so the engine packs the **new tokens** of all
# sequences one after another into `T` rows, and tells the attention where each sequence's rows
# start:
#
# | name | shape | meaning |
# |---|---|---|
# | `input_ids` | `[T]` | the new tokens, sequence after sequence |
# | `positions` | `[T]` | each token's position in *its own* sequence (for RoPE) |
# | `cu_seqlens_q` | `[B+1]` | sequence $b$'s new tokens are rows `cu[b] … cu[b+1]−1` |
# | `seq_lens` | `[B]` | keys sequence $b$ attends to after the step: cached + new |
# | `logits_indices` | `[N]` | the row whose logits give the next token, per sequence that samples |
#
# Every matrix product of the model (projections, MLP) treats the `T` rows alike; only attention
# needs the boundaries. Only the last row of a sequence that has then computed *all* its tokens
# goes through the LM head: a prefill chunk that stops mid-prompt samples nothing.

# %%
def draw_packing():
    # Three sequences: A decodes (6 computed, 1 new); B's first chunk (4 of 7 prompt tokens); C a whole prompt.
    seqs = [("A", 6, 1, 7), ("B", 0, 4, 7), ("C", 0, 3, 3)]
    fig, ax = plt.subplots(figsize=(9, 2.4))
    row = 0
    for colour, (name, computed, new, total) in zip(("C0", "C1", "C2"), seqs):
        for i in range(new):
            ax.add_patch(plt.Rectangle((row, 0), 0.95, 1, color=colour, alpha=0.8))
            ax.text(row + 0.47, 0.62, f"{name}{computed + i}", ha="center", fontsize=9, color="white")
            ax.text(row + 0.47, 0.22, f"pos {computed + i}", ha="center", fontsize=7, color="white")
            if i == new - 1 and computed + new == total:
                ax.text(row + 0.47, 1.12, "logits", ha="center", fontsize=8)
            row += 1
        ax.axvline(row - 0.025, color="black", lw=1)
        ax.text(row - new / 2 - 0.03, -0.45,
                f"{name}: {computed} cached + {new} new = seq_len {computed + new}"
                + ("" if computed + new == total else f" (of {total})"), ha="center", fontsize=8)
    ax.set_xlim(-1.7, row + 0.2)
    ax.set_ylim(-0.7, 1.4)
    ax.set_xticks(np.arange(row) + 0.47)
    ax.set_xticklabels(range(row), fontsize=8)
    ax.set_yticks([])
    ax.set_title("One step, T = 8 rows: cu_seqlens_q = [0, 1, 5, 8], seq_lens = [7, 4, 3], "
                 "logits_indices = [0, 7]", fontsize=10)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()


draw_packing()


# %% [markdown]
# ### Exercise 6.1 — pack the flat batch
#
# Write `pack_batch(token_ids, num_computed, num_new)`: for each of the step's $B$ sequences, all its
# token ids so far, how many already have keys and values in the cache, and how many this step
# computes. Return the five lists of the table, as lists of ints, in that order. (The engine adds a
# sixth, the **slot mapping** — where each new key and value go in the paged cache; that is chapter 07.)

# %% tags=["exercise"] exercise="6.1"
def pack_batch(token_ids: list[list[int]], num_computed: list[int], num_new: list[int]):
    """-> (input_ids [T], positions [T], cu_seqlens_q [B+1], seq_lens [B], logits_indices [N]), lists of ints."""
    # YOUR CODE HERE (Exercise 6.1)
    raise NotImplementedError("Exercise 6.1: implement `pack_batch`")


# %% tags=["check"] exercise="6.1"
check.pack_batch(pack_batch)


# %% [markdown]
# ## 3. The plan of a step: a token budget, and chunked prefill
#
# A step's cost grows with the number of tokens it computes, so the scheduler gives every step a
# **token budget**, `max_num_batched_tokens`, and a seat limit, `max_num_seqs`. Its policy (read
# `miniinfer/engine/scheduler.py`):
#
# 1. **running** sequences first, oldest first: a decode needs 1 token, an unfinished prompt the rest
#    of it; each gets $\min(\text{uncomputed}, \text{budget left})$ — so requests in flight keep
#    streaming;
# 2. then **waiting** sequences in arrival order, while budget remains and fewer than
#    `max_num_seqs` sequences would be running (a running sequence holds its seat even in a step
#    where the budget leaves it out). A prompt longer than the budget left is **chunked**: it gets
#    the remainder now and the rest in the next steps. Without chunked prefill it waits until it
#    fits whole — and so does everyone behind it (first come, first served: no overtaking).
#
# The memory side — blocks for the new tokens, preempting a sequence when the cache is full — is
# chapter 07's; it only ever *shortens* this plan.
#
# ### Exercise 6.2 — plan a step
#
# Write `plan_step(running, waiting, max_num_batched_tokens, max_num_seqs, chunked)`: `running` and
# `waiting` are the uncomputed token counts of each running sequence and each waiting one, in order.
# Return one count per sequence — `running` ones, then `waiting` ones — with 0 for a sequence that
# does not run this step. For example, with 3 decodes and a 50-token prompt waiting, a budget of 20
# gives `[1, 1, 1, 17]` with chunking and `[1, 1, 1, 0]` without.

# %% tags=["exercise"] exercise="6.2"
def plan_step(running: list[int], waiting: list[int], max_num_batched_tokens: int, max_num_seqs: int,
              chunked: bool) -> list[int]:
    """Tokens each sequence computes in the next step: running ones (in order), then waiting ones; 0 = not now."""
    # YOUR CODE HERE (Exercise 6.2)
    raise NotImplementedError("Exercise 6.2: implement `plan_step`")


# %% tags=["check"] exercise="6.2"
check.plan_step(plan_step)

# %% [markdown]
# ## 4. Plug them in
#
# `EngineHooks(pack_batch=..., plan_step=...)` hands your two functions to the engine: the model
# runner packs every step with yours, and the scheduler plans every step with yours, asking once
# about the whole running batch and every admission candidate (each candidate's cached prefix is
# looked up first, which shortens what it must compute). So a different policy — shortest prompt
# first, say — really changes who is admitted. Everything else — paged KV blocks, prefix cache,
# sampling, streaming — is unchanged, and the outputs must be too. A small budget of 24 tokens
# makes the engine chunk the longer prompts.

# %%
hooked = LLM(device="cpu", hooks=EngineHooks(pack_batch=pack_batch, plan_step=plan_step),
             max_num_seqs=SLOTS, max_num_batched_tokens=24, num_kv_blocks=256)
story = ["ROMEO:\n", "JULIET:\n", "FIRST CITIZEN:\nBefore we proceed any further, hear me speak.\n", "HAMLET:\n",
         "MACBETH:\n", "KING RICHARD III:\nNow is the winter of our discontent\n"]
greedy = SamplingParams(temperature=0.0, max_tokens=24)
yours = hooked.generate(story, greedy, use_tqdm=False)
reference = llm.generate(story, greedy, use_tqdm=False)
for prompt, output in zip(story[:3], yours):
    print(prompt + output.text.rstrip() + "\n---")
print("identical to the package's engine:", [o.token_ids for o in yours] == [o.token_ids for o in reference])
print("steps with your hooks:", hooked.stats()["num_steps"])

# %% [markdown]
# ## 5. Chunked prefill keeps decodes flowing
#
# Three short requests are decoding when a long prompt (448 tokens of sonnets) arrives at
# step 4. Without chunked prefill the scheduler must compute that whole prompt in one step (the
# budget has to be at least a prompt's length); with a budget of 64 tokens, the prompt is spread
# over several steps, each also carrying the three decodes.

# %%
sonnet = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
          "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date:\n"
          "Sometime too hot the eye of heaven shines,\nAnd often is his gold complexion dimm'd;\n"
          "And every fair from fair sometime declines,\nBy chance or nature's changing course untrimm'd;\n"
          "But thy eternal summer shall not fade\nNor lose possession of that fair thou owest;\n"
          "Nor shall Death brag thou wander'st in his shade,\nWhen in eternal lines to time thou growest:\n"
          "So long as men can breathe or eyes can see,\nSo long lives this and this gives life to thee.\n")
long_prompt = tokenizer.encode(sonnet * 3)[:448]
workload = [tokenizer.encode(s) for s in ("ROMEO:", "JULIET:", "NURSE:")] + [long_prompt]
workload_params = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)] * 3 + \
                  [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)]
arrivals = [0, 0, 0, 4]
configs = {"chunked prefill, budget 64": EngineConfig(max_num_batched_tokens=64, num_kv_blocks=256),
           "no chunking": EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=1024, num_kv_blocks=256)}
chunk_runs = {}
for name, engine_config in configs.items():
    outputs, steps = run_with_timeline(LLMEngine(model, tokenizer, engine_config), workload, workload_params, arrivals)
    chunk_runs[name] = (outputs, steps)
    tokens = [sum(e.num_new for e in entries) for entries in steps]
    print(f"{name:27s}: {len(long_prompt)}-token prompt, {len(steps)} steps, "
          f"largest step {max(tokens)} tokens, tokens per step {tokens[:14]} …")
print("same outputs:", chunk_runs["no chunking"][0] == chunk_runs["chunked prefill, budget 64"][0])

def draw_step_tokens():
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
    for ax, (name, (_, steps)) in zip(axes, chunk_runs.items()):
        shown = steps[:17]
        prefill = np.array([sum(e.num_prefill for e in entries) for entries in shown])
        decode = np.array([sum(e.num_new - e.num_prefill for e in entries) for entries in shown])
        x = np.arange(len(shown))
        ax.bar(x, decode, color="#5a9bd4", label="decode tokens")
        ax.bar(x, prefill, bottom=decode, color="#f2a65a", label="prefill tokens")
        for step in np.flatnonzero(prefill + decode > 72):       # clipped bars: write their height
            ax.annotate(f"← {prefill[step] + decode[step]} tokens (clipped)", (step + 0.6, 68), fontsize=8)
        ax.set_ylim(0, 75)
        ax.set_xticks(x[::2])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
    axes[0].axhline(64, color="grey", ls="--", lw=0.8)
    axes[0].text(16.4, 65, "budget 64", ha="right", fontsize=8, color="grey")
    axes[0].set_ylabel("tokens computed in the step")
    axes[0].legend(fontsize=8, loc="center right")
    fig.tight_layout()


draw_step_tokens()


# %% [markdown]
# Both runs produce the same tokens, and the three short requests get a token at every step in both.
# The difference is *how long* the steps take: the unchunked step holds the whole prompt, and the
# three decodes inside it wait for all of it — a stall every streaming user sees as a frozen
# answer. With chunking, no step exceeds the budget, so the time between two tokens of a running
# request stays bounded, at the price of a few more steps for the long prompt's first token.
# Measured step by step on this CPU:

# %% tags=["nbval-ignore-output", "skip-grading"]
def step_times(engine_config):
    engine = LLMEngine(model, tokenizer, engine_config)
    ids = [engine.add_request(p, sp) for p, sp in zip(workload[:3], workload_params[:3])]
    times, step = [], 0
    while engine.has_unfinished_requests() or step <= arrivals[3]:
        if step == arrivals[3]:
            ids.append(engine.add_request(workload[3], workload_params[3]))
        start = time.perf_counter()
        engine.step()
        times.append(1e3 * (time.perf_counter() - start))
        step += 1
    return times


fig, ax = plt.subplots(figsize=(8, 3.2))
step_times(configs["chunked prefill, budget 64"])               # warm-up (allocator, first calls)
for (name, engine_config), style in zip(configs.items(), ("o-", "s-")):
    times = step_times(engine_config)
    ax.plot(times[:20], style, label=f"{name}: longest step {max(times):.0f} ms")
ax.set_xlabel("step")
ax.set_ylabel("ms")
ax.set_title("Step time: the gap between two tokens of the decoding requests")
ax.grid(alpha=0.3)
ax.legend(fontsize=8);


# %% [markdown]
# ## 6. Where a step's time goes
#
# Everything above decided *what* a step computes. How long it takes is a different question, and
# the answer is not "the matrix products". One step of the engine is three calls, each owned by one
# part:
#
# ```text
# plan    = scheduler.schedule()            host: who runs, how many new tokens, KV blocks, what to sample
# sampled = runner.run(plan)                device: one upload of the inputs, the forward, the sampler
# updates = scheduler.commit(plan, sampled) host: counts, prefix cache, forks, stops, frees
# ```
#
# followed by detokenizing and building outputs. The **host** phases are Python, a few microseconds
# per sequence each. The **device** phase launches kernels: in eager PyTorch every operation of every
# layer is a separate launch that costs the CPU a few microseconds, whatever the GPU then does with
# it. A decode step of a small model does little arithmetic per kernel — one token per sequence —
# so it can spend more time *launching* kernels than *running* them: it is **launch-bound**. The
# engine fights that on four fronts:
#
# 1. **One upload.** Every integer of a step (token ids, positions, slots, lengths, block tables)
#    goes into one pinned host buffer and reaches the GPU in one copy.
# 2. **CUDA graphs.** At start-up the engine records one decode forward per batch-size bucket; a
#    decode step then replays it with a single launch.
# 3. **Fused kernels.** RMSNorm in bf16 is four elementwise kernels, RoPE seven, SwiGLU two, plus
#    the residual adds; our Triton kernels do each in one (residual add + RMSNorm, RoPE applied in
#    place to q and k, SiLU-and-multiply). Fewer kernels means less GPU time too: each one reads and
#    writes its whole input.
# 4. **A batched sampler.** One pass over the whole batch's logits instead of a Python loop over rows.
#
# On this CPU there are no kernel launches to save, so we only split a decode step into its phases
# by timing each method of a live engine (the numbers vary from run to run):

# %% tags=["nbval-ignore-output", "skip-grading"]
def time_phases(engine, prompts, params, steps: int = 24) -> dict[str, float]:
    """Milliseconds per decode step spent in each phase, by wrapping the engine's methods with clocks."""
    spent: dict[str, float] = {}

    def clocked(owner, name, phase):
        method = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - start
        setattr(owner, name, wrapper)

    for prompt in prompts:
        engine.add_request(prompt, params)
    while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in [*engine.scheduler.running,
                                                                           *engine.scheduler.waiting]):
        engine.step()                                           # prefill first: we time decode steps
    clocked(engine.scheduler, "schedule", "schedule")
    clocked(engine.runner, "prepare", "prepare (pack + upload)")
    clocked(engine.runner.model, "forward", "forward")
    clocked(engine.runner, "sample", "sample")
    clocked(engine.scheduler, "commit", "commit")
    clocked(engine, "_process", "detokenize + outputs")
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = time.perf_counter() - start
    phases = {phase: 1e3 * seconds / steps for phase, seconds in spent.items()}
    phases["other"] = 1e3 * total / steps - sum(phases.values())
    return phases


decode_params = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=40, ignore_eos=True)
cpu_phases = {batch: time_phases(LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=256)),
                                 [tokenizer.encode(s) for s in (["ROMEO.\n", "JULIET.\n"] * 8)[:batch]],
                                 decode_params)
              for batch in (1, 16)}
for batch, phases in cpu_phases.items():
    print(f"batch {batch:2d}: {sum(phases.values()):5.2f} ms per step = "
          + ", ".join(f"{name} {ms:.2f}" for name, ms in phases.items()))

# %% [markdown]
# On a CPU the forward dominates: the host phases are a small share of a step that computes on the
# same cores. On a GPU the picture flips. The recorded run below (`benchmarks/step_profile.py --gpu`,
# a Qwen2.5-0.5B-shaped model in bf16) compares four engines: (a) eager and unfused — the engine
# before this chapter's last changes; (b) eager with fused kernels; (c) CUDA graphs without fusion;
# (d) CUDA graphs with fused kernels, the default. Left: kernels per layer of one decode forward.
# Right: the wall time of a decode step, with the GPU's busy time inside it.

# %%
from miniinfer.course.results import caption, load_result

profile = load_result("step_profile", device="cuda")


def draw_step_profile(record):
    rows = [row for row in record["rows"] if row.get("kernels_per_layer") is not None]
    batches = sorted({row["batch"] for row in rows})
    configs = list(dict.fromkeys(row["config"] for row in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    first = [next(r for r in rows if r["config"] == c and r["batch"] == batches[0]) for c in configs]
    left.bar(range(len(configs)), [r["kernels_per_layer"] for r in first], color="#5a9bd4")
    for x, row in enumerate(first):
        left.text(x, row["kernels_per_layer"] + 0.3, f"{row['kernels_per_layer']:.0f}", ha="center", fontsize=8)
    left.set_xticks(range(len(configs)), [c.split(":")[0] for c in configs])
    left.set_ylabel("kernels per layer (decode)")
    left.set_title("kernels per layer", fontsize=10)
    width = 0.8 / len(batches)
    for i, batch in enumerate(batches):
        chosen = [next(r for r in rows if r["config"] == c and r["batch"] == batch) for c in configs]
        x = np.arange(len(configs)) + (i - (len(batches) - 1) / 2) * width
        right.bar(x, [r["step_ms"] for r in chosen], width, color=f"C{i}", alpha=0.45,
                  label=f"batch {batch}: step (wall)")
        right.bar(x, [r["gpu_ms"] for r in chosen], width * 0.5, color=f"C{i}", label=f"batch {batch}: GPU busy")
    right.set_xticks(range(len(configs)), configs, fontsize=7, rotation=12)
    right.set_ylabel("ms per decode step")
    right.legend(fontsize=7)
    right.set_title("step time vs GPU time", fontsize=10)
    fig.suptitle(caption(record), fontsize=8)
    fig.tight_layout()


if profile is None:
    print("no GPU profile recorded yet: run `python benchmarks/step_profile.py --gpu` on a CUDA machine")
else:
    draw_step_profile(profile)

# %% [markdown]
# Where the wide bar is much taller than the narrow one, the GPU sits idle for most of the step,
# waiting for the CPU to launch its next kernel: that is what CUDA graphs remove. An eager step's
# time is the host's — how fast that machine's CPU launches 300 to 650 kernels — so it varies from
# run to run (in this run the fused eager engine happened to be slower than the unfused one; an
# earlier run on the same card measured 10.5 against 13.0 ms). Fusion cuts the kernels the GPU
# itself runs: 26 per layer become 11, and the GPU's busy time drops by a third. What is left at
# batch 1 is still four times the floor of reading every weight once per token: about 270 kernels
# of a few microseconds each, most of them too small to reach the memory bandwidth. The same
# run's end-to-end numbers (`benchmarks/engine_throughput.py --gpu`), against the hardware floor
# where there is one:

# %%
throughput = load_result("engine_throughput", device="cuda")
if throughput is None:
    print("no GPU throughput recorded yet")
else:
    print(caption(throughput))
    for row in throughput["rows"]:
        details = [f"{row['tok/s']:,.0f} tok/s"]
        if row.get("% floor") is not None:
            details.append(f"{row['% floor']:.0f} % of the floor ({row['floor tok/s']:,.0f} tok/s)")
        if row.get("pct_of_greedy") is not None:
            details.append(f"{row['pct_of_greedy']:.0f} % of greedy's throughput")
        if row.get("TTFT s") is not None and row["prompt tokens"] > 10_000:
            details.append(f"first token after {row['TTFT s']:.2f} s")
        print(f"  {row['row']:>24s}: " + ", ".join(details))

# %% [markdown]
# ## Summary
#
# * **Static batching** runs a padded batch until its longest request ends: finished rows and the
#   queue behind them wait. **Continuous batching** re-plans every step, so slots are refilled at
#   once and the same work takes fewer steps.
# * Each step is a **flat batch**: the new tokens of every sequence back to back, with positions,
#   `cu_seqlens_q`, `seq_lens` and the rows to sample (`pack_batch`). Prefill and decode are the
#   same operation with different numbers of new tokens.
# * A **token budget** bounds each step (`plan_step`): running sequences first, then the queue in
#   order; **chunked prefill** splits a long prompt over steps so that decodes never stall behind it.
# * A step is **plan → run → commit**. On a GPU a small model's decode is launch-bound: one upload,
#   CUDA graphs, fused kernels and a batched sampler bring it toward the floor of reading the weights.
#
# **Going further** (no checks):
#
# 1. Give the engine a tiny KV pool (`num_kv_blocks`) and watch `stats()["num_preemptions"]`. The
#    outputs do not change — why not, and what does a preemption cost?
# 2. Write a plan that caps the prefill tokens per step at half the budget even when fewer
#    decodes are running (a "decode-first" policy). Plug it in and compare the step times above.
# 3. Time to first token vs time between tokens: with a budget of 16, 64 and 512, measure both for
#    the long prompt and for the short requests. Which budget would you choose for a chat service?
# 4. Static batching with a *queue*: refill a finished row of `generate_static_batch` with the next
#    request. What makes it awkward with one contiguous `[B, S_max]` cache (hint: chapter 07)?
