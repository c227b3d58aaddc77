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
# # Chapter 00 — Setup and your first CUDA kernel
#
# **What you will build.** A vector addition, `out = x + y`, three ways: the torch one-liner (the
# reference, runs anywhere), a **Triton** kernel that you write yourself, and the **CUDA C++** kernel
# in `csrc/vector_add.cu`. You will learn how a GPU splits work into a grid of programs, why a kernel
# like this is judged in *bytes per second* rather than FLOP/s, and how to read a bandwidth plot
# measured on an H100.
#
# **What you need.** Python, PyTorch and this repository (`make lab` sets everything up). No GPU:
# on a laptop, Triton kernels run in Triton's *interpreter* on the CPU, and the GPU measurements
# are loaded from `benchmarks/results/`, recorded on an H100.
#
# Every chapter has the same shape: the idea, exercises (a function you write, then a **check
# cell** that tests it on fresh random inputs), a cell that **plugs your code into the engine**, a
# measurement, and a summary.

# %% [markdown]
# ## 1. Where will things run?
#
# `miniinfer.env` reports what this machine has. The last three lines matter most: the torch
# reference runs everywhere; Triton kernels are *compiled* on a GPU and *interpreted* on a CPU
# (same kernel source, same results, thousands of times slower); the CUDA kernels need a GPU and a
# CUDA build of torch.

# %% tags=["nbval-ignore-output"]
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

import miniinfer.kernels  # on a machine without a GPU this sets TRITON_INTERPRET=1 before Triton loads
from miniinfer.env import report

print(report())


# %% [markdown]
# ## 2. The idea: a grid of programs over a vector
#
# A GPU runs one function — the **kernel** — many times in parallel. In CUDA each instance is a
# *thread*, threads are grouped into *blocks*, and the blocks form a *grid*. Triton raises the level
# by one: you write the code of a whole block (a **program**) operating on vectors of `BLOCK`
# elements at once, and Triton spreads it over threads for you.
#
# For vector addition with `n` elements, program number `pid` handles elements
# `pid·BLOCK … pid·BLOCK + BLOCK − 1`. We launch $\lceil n / \text{BLOCK} \rceil$ programs; the last
# one usually runs past the end, so it carries a **mask** that switches off the out-of-range lanes.

# %%
def draw_grid(n: int = 1000, block: int = 256) -> None:
    """Figure: which program handles which elements, and the masked tail of the last program."""
    programs = (n + block - 1) // block
    fig, ax = plt.subplots(figsize=(9, 1.9))
    for pid in range(programs):
        start = pid * block
        valid = min(block, n - start)
        ax.barh(0, valid, left=start, color=f"C{pid}", edgecolor="black")
        ax.text(start + valid / 2, 0, f"program {pid}\n[{start}, {start + valid})", ha="center", va="center",
                fontsize=9)
        if valid < block:
            ax.barh(0, block - valid, left=start + valid, color="lightgrey", hatch="//", edgecolor="grey")
            ax.text(start + valid + (block - valid) / 2, 0, "masked\n(offsets ≥ n)", ha="center", va="center",
                    fontsize=8)
    ax.set_yticks([])
    ax.set_xlabel("element index")
    ax.set_title(f"n = {n}, BLOCK = {block}: {programs} programs, the last one masked")
    ax.set_xlim(0, programs * block)
    fig.tight_layout()


draw_grid()

# %% [markdown]
# ### Why bytes, not FLOPs
#
# Each element costs one addition and three memory accesses of $s$ bytes (read $x_i$, read $y_i$,
# write $\text{out}_i$). An H100 does about $6\times10^{13}$ float32 additions per second but moves
# only about $3\times10^{12}$ bytes per second to and from its memory, so the additions are free and
# the time is set by memory traffic:
#
# $$ t \;\ge\; \frac{3\,n\,s}{\beta}, \qquad \text{achieved bandwidth} = \frac{3\,n\,s}{t}, $$
#
# where $\beta$ is the memory bandwidth. Such a kernel is **memory-bound**, and we grade it by how
# close its achieved bandwidth comes to the best the card can do — which we measure with a plain
# device-to-device copy in the same run. Most of inference is like this: decoding one token reads
# every weight and the whole KV cache once, and does little arithmetic per byte.

# %% [markdown]
# ## 3. The CUDA kernel
#
# Here is the heart of `csrc/vector_add.cu`: one thread per element, a bounds check for the tail.

# %%
from miniinfer.kernels.build import csrc_dir

source = (csrc_dir() / "vector_add.cu").read_text()
start = source.index("// Version 1")
print(source[start:source.index("// Version 2")].strip())

# %% [markdown]
# The same file holds a second version that moves 16 bytes per thread per access and walks the
# vector with a *grid-stride loop*; `csrc/vector_add_binding.cpp` checks the tensors and launches
# it. On a CUDA machine, `miniinfer.kernels.build.load_cuda_extension` compiles both files with
# `nvcc` the first time you call the kernel (about a minute), caches the build, and imports it.
# On this machine it explains why it cannot (CI still proves every `.cu` compiles, with
# `nvcc -arch=sm_90 -c`, the H100's architecture).

# %% tags=["nbval-ignore-output"]
from miniinfer.kernels.build import cuda_build_problem
from miniinfer.kernels.vector_add import vector_add

problem = cuda_build_problem()
if problem is None:
    x = torch.randn(10_000_019, device="cuda")
    y = torch.randn_like(x)
    print("CUDA kernel equals x + y:", torch.equal(vector_add(x, y, backend="cuda"), x + y))
else:
    print("CUDA kernels are not available here:", problem)

# %% [markdown]
# ## 4. Your Triton kernel
#
# A Triton kernel is a Python function decorated with `@triton.jit`. Inside it:
#
# * `tl.program_id(axis=0)` is this program's number `pid`;
# * `tl.arange(0, BLOCK)` is the vector `[0, 1, …, BLOCK−1]` (BLOCK must be a power of two and a
#   compile-time constant, hence `tl.constexpr`);
# * pointers are plain numbers you can add offsets to: `x_ptr + offsets` is a vector of addresses;
# * `tl.load(ptrs, mask=m)` and `tl.store(ptrs, values, mask=m)` read and write only where `m` is true.
#
# ### Exercise 0.1 — the vector-add kernel
#
# Write the body: compute this program's `offsets`, the mask `offsets < n`, load `x` and `y`, and
# store their sum into `out`. The check launches your kernel on awkward sizes (1, 7, 4097, …) with
# several block sizes, compares with `x + y` exactly, and verifies that nothing is written past
# the end of `out`.

# %% tags=["exercise"] exercise="0.1"
import triton
import triton.language as tl


@triton.jit
def vector_add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out[i] = x[i] + y[i] for the BLOCK elements of this program; n is the vector length."""
    # YOUR CODE HERE (Exercise 0.1)
    raise NotImplementedError("Exercise 0.1: implement `vector_add_kernel`")


# %% tags=["check"] exercise="0.1"
from miniinfer.course import check

check.vector_add_kernel(vector_add_kernel)


# %% [markdown]
# ### Exercise 0.2 — achieved bandwidth
#
# To judge a memory-bound kernel we turn a time into a bandwidth. Write
# `achieved_bandwidth_gbs(num_elements, dtype, seconds)`: the bytes vector addition must move (every
# element of `x` and `y` read once, every element of `out` written once), divided by the time, in
# GB/s with 1 GB = $10^9$ bytes. `dtype.itemsize` gives the bytes per element.

# %% tags=["exercise"] exercise="0.2"
def achieved_bandwidth_gbs(num_elements: int, dtype: torch.dtype, seconds: float) -> float:
    """Bytes moved by out = x + y (reads of x and y, write of out) per second, in GB/s."""
    # YOUR CODE HERE (Exercise 0.2)
    raise NotImplementedError("Exercise 0.2: implement `achieved_bandwidth_gbs`")


# %% tags=["check"] exercise="0.2"
check.achieved_bandwidth_gbs(achieved_bandwidth_gbs)

# %% [markdown]
# ## 5. Plug it in
#
# The package's launcher `miniinfer.kernels.vector_add.vector_add(x, y, backend="triton",
# triton_kernel=...)` computes the grid and launches whatever kernel you hand it — here, yours. On
# this machine it runs in the interpreter; on a GPU, the same cell compiles it to machine code.

# %%
device = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.randn(100_003, device=device)
y = torch.randn_like(x)
out = vector_add(x, y, backend="triton", triton_kernel=vector_add_kernel)
print(f"your kernel on {device}: {out.numel()} elements, equal to torch: {torch.equal(out, x + y)}")

# %% [markdown]
# ## 6. Measure
#
# ### On this machine
#
# First the CPU, with torch's own addition: small vectors are dominated by the fixed cost of a
# call, vectors that fit in the CPU's caches go fast, and large ones fall to the speed of main
# memory. Your `achieved_bandwidth_gbs` turns each time into GB/s. (Timings differ from machine to
# machine and run to run, so this cell's numbers are not part of the answer key.)

# %% tags=["nbval-ignore-output", "skip-grading"]
from miniinfer.course.timing import median_seconds


sizes = [2**k for k in range(10, 24, 2)]
cpu_gbs = []
for n in sizes:
    a, b = torch.randn(n), torch.randn(n)
    result = torch.empty_like(a)
    seconds = median_seconds(lambda: torch.add(a, b, out=result), repeat=25)
    cpu_gbs.append(achieved_bandwidth_gbs(n, torch.float32, seconds))

fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot([4 * n / 1e6 for n in sizes], cpu_gbs, "o-", label="torch.add on this CPU")
ax.set_xscale("log")
ax.set_xlabel("size of one vector (MB)")
ax.set_ylabel("achieved bandwidth (GB/s)")
ax.set_title("Vector add on this machine's CPU")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
fig.tight_layout()

# %% [markdown]
# ### On an H100
#
# The same measurement on an NVIDIA H100, recorded with `python benchmarks/vector_add.py` and
# committed to `benchmarks/results/`. On a GPU machine this cell re-runs it live instead. The dashed
# line is the copy bandwidth measured in the same run — the practical ceiling.

# %%
from miniinfer.course.results import caption, load_result

if torch.cuda.is_available():
    import subprocess
    import sys

    from miniinfer.course.notebooks import repo_root

    subprocess.run([sys.executable, str(repo_root() / "benchmarks" / "vector_add.py"), "--max-log2", "26",
                    "--out", "/tmp/vector_add.json"], check=True, capture_output=True)
    import json

    record = json.load(open("/tmp/vector_add.json"))
else:
    record = load_result("vector_add", device="cuda")

if record is None:
    print("no GPU result recorded yet: run `python benchmarks/vector_add.py` on a CUDA machine")
else:
    rows = record["rows"]
    megabytes = [row["MB per array"] for row in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    for column, style in [("torch GB/s", "o-"), ("triton GB/s", "s-"), ("cuda GB/s", "^-"), ("cuda-simple GB/s", "v-")]:
        if all(row.get(column) is not None for row in rows):
            ax.plot(megabytes, [row[column] for row in rows], style, label=column.replace(" GB/s", ""))
    ax.plot(megabytes, [row["copy GB/s"] for row in rows], "k--", label="copy (ceiling)")
    ax.set_xscale("log")
    ax.set_xlabel("size of one vector (MB)")
    ax.set_ylabel("achieved bandwidth (GB/s)")
    ax.set_title("Vector add, float32\n" + caption(record), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    largest = rows[-1]
    print(f"largest size ({largest['MB per array']:.0f} MB per array): "
          + ", ".join(f"{c.replace(' GB/s', '')} {largest[c]:.0f} GB/s" for c in record["columns"][2:]
                      if largest.get(c) is not None))

# %% [markdown]
# Read the plot from left to right:
#
# * **tiny vectors** — the time is the cost of launching a kernel (a few microseconds), not the data:
#   the bandwidth grows in proportion to the size;
# * **a few MB to a few tens of MB** — the three vectors fit in the H100's 50 MB L2 cache, and
#   repeated timings read them from there, faster than from memory;
# * **hundreds of MB** — every byte comes from HBM, and a good kernel sits close to the copy line.
#   The CUDA kernel's 16-byte loads and Triton's vectorised loads both get there; the difference
#   between kernels is small because the problem is simple — later chapters' kernels (paged
#   attention, flash attention) have to work hard for the same result.

# %% [markdown]
# ## Summary
#
# * A GPU kernel runs as a grid of programs (Triton) or blocks of threads (CUDA); the last one is
#   masked so that nothing reads or writes past the end.
# * Vector addition does one addition per 12 bytes moved: it is memory-bound, so its quality is its
#   achieved bandwidth compared with a copy measured on the same card.
# * Triton kernels run anywhere (interpreted on a CPU); CUDA kernels are built just in time on a
#   CUDA machine from `csrc/`, and CI proves they compile.
#
# **Going further** (no checks):
#
# 1. Change `BLOCK` in the plug-in cell (16, 128, 4096). On a GPU, how does the bandwidth of a
#    256 MB vector change, and why does a tiny block hurt?
# 2. `vector_add_vec16_kernel` in `csrc/vector_add.cu` uses 16-byte loads. What fraction of a 32-byte
#    memory sector does one thread's float load use in the simple kernel, and why does the warp
#    still coalesce the loads?
# 3. Write a Triton kernel for `out = a·x + y` (SAXPY). How many bytes does it move per element?
