"""The engine in a child process (``miniinfer serve --engine-process``): :class:`RemoteEngine`.

    remote = RemoteEngine(model_path, dict(device="cpu"))   # spawns the child, waits until it has loaded
    engine = AsyncEngine(remote, ...)                        # the same bridge as with an in-process engine
    ...
    remote.close()                                           # stops the child

Why a process: with the engine in a thread of the server, the engine thread and the event loop share
one interpreter lock. Every microsecond the loop spends parsing a request or writing an SSE event is
one the engine cannot spend in Python between its torch calls, so each step is slower under load
(chapter 13 measures it). In its own process the engine has an interpreter to itself; the server's
engine thread (still :class:`~miniinfer.server.async_engine.AsyncEngine`'s) mostly waits on a pipe,
which releases the lock. This is the split vLLM v1 makes between its API server and its engine core.

Two more things make the split pay on a small CPU (chapter 13 and ``benchmarks/results/serving_cpu.json``
measure them):

* **Its own CPUs** (``cpus=``, ``miniinfer serve --engine-process --engine-cpus 0``): the child runs on
  those, the server process on the others (:func:`pin_process`). Unpinned, the scheduler moves the
  engine, the event loop and the HTTP clients between the cores and the engine keeps being preempted:
  the split alone measured no faster than the thread on 2 cores;
* **text made in the parent**: for a plain streamed request (one completion, no stop strings, no
  logprobs: :meth:`RemoteEngine._plain`) the child adds it to the engine *without* streaming and sends
  only the token ids each step gave it; the parent detokenizes them (``IncrementalDetokenizer``, as the
  engine would) and builds the streamed outputs, on the server's CPUs. The engine's process then spends
  its time on steps, not on two decodes and one output object per token. Stop strings need the text
  inside the engine (they end a sequence), so such requests, like n > 1 and logprobs, keep the engine's
  own streaming; the outputs a consumer sees are the same either way (tests/test_server_engine_process_detok.py).

:class:`RemoteEngine` offers AsyncEngine the small part of :class:`~miniinfer.engine.LLMEngine` it uses
(``validate_prompt``, ``add_request``, ``abort_request``, ``has_unfinished_requests``, ``step``,
``stats``, ``requests``, ``scheduler.waiting``, ``max_model_len``) and is used, like the engine, from the
engine thread only. Validation runs in the parent with the engine's own code and the configuration the
child reports at start-up, so a bad request still gets its 400 with the engine's message, at once.

The protocol, over one :func:`multiprocessing.Pipe`:

* parent → child: a list of commands per message: ``("add", id, token_ids, params, stream, text,
  parent_detokenizes)``, ``("abort", id)``, ``("shutdown",)``; commands gathered between two steps
  travel together.
* child → parent: ``("ready", info)`` once; then per step ``("outputs", outputs, num_waiting, stats,
  deltas, applied)`` (``outputs``: the engine's; ``deltas``: ``(id, new token ids, num_cached_tokens)`` of
  the requests the parent detokenizes; ``stats`` at most every :data:`STATS_INTERVAL_S`, else None);
  ``("stats", stats, applied)`` when it goes idle (so that /debug/engine sees the KV blocks freed);
  ``("step_failed", message, request ids, applied)`` (the child has aborted those requests). ``applied``:
  how many command messages the child had applied when it reported, so that the parent counts the adds
  sent since as waiting too (the admission bound holds while the child is inside a step).

The child steps as long as it has work, without waiting for the parent to read, and blocks on the pipe
when idle. If it dies, the parent notices (end of pipe, or the process no longer alive) and raises
:class:`EngineProcessDied` from ``step``: AsyncEngine fails the requests in flight, and ``on_death``
lets the server stop accepting requests (/health answers 503) instead of hanging.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import signal
import time
import types
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace

from miniinfer.outputs import CompletionOutput, RequestOutput
from miniinfer.server.async_engine import DeferredOutput

__all__ = ["RemoteEngine", "EngineProcessDied", "STATS_INTERVAL_S", "parse_cpu_list", "pin_process",
           "physical_cores", "auto_engine_cpus"]

log = logging.getLogger("miniinfer.server.engine_process")

# engine.stats() walks the prefix cache's tree: while busy, the child sends it at most this often.
STATS_INTERVAL_S = 0.5


class StepFailed(RuntimeError):
    """A step failed in the engine's process; ``request_ids``: the requests it held then (it aborted them)."""

    def __init__(self, message: str, request_ids: list[str]):
        super().__init__(message)
        self.request_ids = request_ids


class EngineProcessDied(RuntimeError):
    """The engine's child process exited (crashed, was killed): no request can be served any more."""


def _mappingproxy(mapping: dict) -> types.MappingProxyType:
    return types.MappingProxyType(mapping)


def _reduce_mappingproxy(proxy):
    return _mappingproxy, (dict(proxy),)


# SamplingParams keeps logit_bias read-only, in a mappingproxy, which pickle refuses: without this, an add
# carrying logit_bias could not be sent to the child (and the failed send failed every request in flight).
# Registered with multiprocessing's pickler only, which the pipe uses: plain pickle is left as it is.
ForkingPickler.register(types.MappingProxyType, _reduce_mappingproxy)


# -- CPU placement --------------------------------------------------------------------------------------


def parse_cpu_list(text: str) -> set[int]:
    """CPU numbers as Linux writes them (``taskset -c``, ``/sys/.../cpulist``): ``"0"``, ``"0-3"``, ``"0,2,4-5"``.
    Raises ValueError for anything else, or for CPUs this process may not run on."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            low, high = int(first), int(last or first)
            if low < 0 or high < low:
                raise ValueError
            cpus.update(range(low, high + 1))
    except ValueError:
        raise ValueError(f"expected CPU numbers such as 0, 0-3 or 0,2,4-5, got {text!r}") from None
    allowed = available_cpus()
    if allowed is not None and not cpus <= allowed:
        raise ValueError(f"CPUs {sorted(cpus - allowed)} are not available to this process (it may run on "
                         f"{format_cpu_list(allowed)})")
    return cpus


def format_cpu_list(cpus) -> str:
    """``{0, 1, 2, 5}`` -> ``"0-2,5"``."""
    ordered, parts = sorted(cpus), []
    for cpu in ordered:
        if parts and cpu == parts[-1][1] + 1:
            parts[-1][1] = cpu
        else:
            parts.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def available_cpus() -> set[int] | None:
    """The CPUs this process may run on (None where the OS cannot say: not Linux)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def physical_cores(cpus, sysfs: str = "/sys/devices/system/cpu") -> list[list[int]]:
    """``cpus`` grouped by the physical core they belong to (hyperthread siblings together), in CPU order.
    Where Linux does not say (no sysfs topology), every CPU is its own core."""
    cores: dict[str, list[int]] = {}
    for cpu in sorted(cpus):
        siblings = None
        for name in ("core_cpus_list", "thread_siblings_list"):  # the new name, then the old one
            try:
                with open(f"{sysfs}/cpu{cpu}/topology/{name}") as file:
                    siblings = file.read().strip()
                break
            except OSError:
                continue
        cores.setdefault(siblings or f"cpu{cpu}", []).append(cpu)
    return list(cores.values())


def auto_engine_cpus(cpus=None, sysfs: str = "/sys/devices/system/cpu", min_server_cpus: int = 4) -> set[int] | None:
    """``--engine-cpus auto``: CPUs for the engine's process, chosen so that nothing else runs on its cores.

    The engine's process is one busy interpreter thread (plus the GPU driver's threads); what slows it is
    another busy thread on the *same physical core*: a hyperthread sibling shares its execution units and
    caches, so pinning it to "CPU 0" while the event loop may run on CPU 0's sibling helps little. So the
    engine gets whole physical cores, the last ones (CPU 0 usually takes the most interrupts): one core when
    cores have two or more hyperthreads, two single-thread cores otherwise. None (no pinning) when fewer than
    ``min_server_cpus`` CPUs would be left for the server process and the clients beside it."""
    cpus = available_cpus() if cpus is None else set(cpus)
    if not cpus:
        return None
    cores = physical_cores(cpus, sysfs)
    chosen: set[int] = set()
    for core in reversed(cores):
        chosen.update(core)
        if len(chosen) >= 2:
            break
    if len(cpus - chosen) < min_server_cpus:
        return None
    return chosen


def pin_process(cpus: set[int], pid: int = 0) -> None:
    """Run every thread of a process (default: this one) on ``cpus`` only. Threads started later inherit
    the mask of the thread that starts them; those already running each have their own, so all are set."""
    pid = pid or os.getpid()
    try:
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        threads = [pid]
    for thread in threads:
        try:
            os.sched_setaffinity(thread, cpus)
        except ProcessLookupError:  # a thread that has just exited
            pass


# -- the child ------------------------------------------------------------------------------------------


def _error_output(request_id: str, text: str | None, token_ids: list[int], n: int, message: str) -> RequestOutput:
    """The final output of a request the child could not add: it fails alone, as in the thread."""
    completions = [CompletionOutput(index=i, text="", token_ids=[], finish_reason="error", error=message)
                   for i in range(n)]
    return RequestOutput(request_id, text, list(token_ids), completions, finished=True)


def _stats(engine, busy_seconds: float = 0.0) -> dict:
    stats = engine.stats()
    stats["engine_pid"] = os.getpid()
    stats["engine_busy_seconds"] = busy_seconds  # in engine.step(), this process's own clock
    return stats


def _apply(engine, commands: list[tuple], failed: list[RequestOutput], tokens_only: dict[str, int]) -> bool:
    """Apply one message's commands to the engine; False when told to shut down. Requests the parent
    detokenizes (``tokens_only``) join the engine without streaming; their sent token counts start at 0."""
    for command in commands:
        kind = command[0]
        if kind == "add":
            _, request_id, token_ids, params, stream, text, parent_detokenizes = command
            try:
                engine.add_request(token_ids, params, request_id=request_id, stream=stream and not parent_detokenizes)
            except Exception as error:  # noqa: BLE001 - this request fails, the engine goes on
                failed.append(_error_output(request_id, text, token_ids, params.n, f"{type(error).__name__}: {error}"))
                continue
            if parent_detokenizes:
                tokens_only[request_id] = 0
            request = engine.requests.get(request_id)
            if request is not None and text is not None:
                request.prompt = text  # the outputs carry the prompt's text, as with the thread
        elif kind == "abort":
            engine.abort_request(command[1])
        elif kind == "shutdown":
            return False
    return True


def _new_tokens(engine, tokens_only: dict[str, int]) -> list[tuple]:
    """The tokens each parent-detokenized request gained in the last step: ``(request id, new token ids,
    num_cached_tokens)``. Only the requests of the step's committed updates (``engine.last_updates``) can
    have gained any: with hundreds of requests waiting for a seat, scanning all of them every step cost
    the engine's process more than the step's own bookkeeping. A finished request is not among them: its
    final output (the engine's own) says the rest; :func:`_forget_finished` drops it from ``tokens_only``."""
    deltas = []
    requests = engine.requests
    seen = set()
    for update in engine.last_updates:
        request_id = update.seq.request_id
        if request_id in seen:  # several tokens of one sequence (speculation): one delta
            continue
        seen.add(request_id)
        sent = tokens_only.get(request_id)
        request = requests.get(request_id)
        if sent is None or request is None or not request.seqs:
            continue
        seq = request.seqs[0]
        num_output = len(seq.token_ids) - len(seq.prompt_token_ids)
        if num_output > sent:
            deltas.append((request_id, seq.token_ids[len(seq.token_ids) - (num_output - sent):],
                           seq.num_cached_tokens))
            tokens_only[request_id] = num_output
    return deltas


def _forget_finished(outputs: list[RequestOutput], tokens_only: dict[str, int]) -> None:
    """Requests whose final output is among ``outputs`` (finished, aborted, failed) stop being tracked."""
    for output in outputs:
        if output.finished:
            tokens_only.pop(output.request_id, None)


def _engine_main(conn, model_path, llm_options: dict, cpus: set[int] | None = None) -> None:
    """The child's whole life: load the model, report, then step while there is work."""
    if cpus:  # first, so that every thread torch starts (OpenMP's pool) inherits the mask
        pin_process(cpus)
    # Ctrl-C in a terminal, or a service manager's SIGTERM to the whole group, reaches this process too:
    # ignored, so that the parent can drain its requests first; the parent stops the child (a "shutdown"
    # command, else SIGKILL), and a parent that vanishes ends it through the closed pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from miniinfer.llm import LLM
    from miniinfer.server.serve import keep_freed_memory

    keep_freed_memory()  # as the server process does (see there): no page faults on every step's tensors

    try:
        llm = LLM(model_path, **llm_options)
    except BaseException as error:  # noqa: BLE001 - tell the parent why, rather than just exiting
        conn.send(("failed", f"{type(error).__name__}: {error}"))
        return
    engine = llm.engine
    conn.send(("ready", dict(
        tokenizer=llm.tokenizer, config=engine.config, model_config=engine.model.config,
        max_model_len=engine.max_model_len, max_num_batched_tokens=engine.max_num_batched_tokens,
        num_kv_blocks=engine.num_kv_blocks, device=str(engine.device),
        generation_defaults=dict(llm.generation_defaults), stats=_stats(engine), pid=os.getpid())))
    stats_sent_at = 0.0
    busy = 0.0  # seconds in engine.step()
    idle_reported = True
    tokens_only: dict[str, int] = {}  # requests the parent detokenizes -> output tokens sent so far
    # Command messages applied so far, echoed with every report: the parent counts the adds it sent since
    # as waiting too (its admission bound), until a report says the child has them.
    applied = 0
    try:
        while True:
            failed: list[RequestOutput] = []
            if not engine.has_unfinished_requests():
                if not idle_reported:  # the last step freed its blocks: let the parent see it
                    conn.send(("stats", _stats(engine, busy), applied))
                    idle_reported = True
                applied += 1
                if not _apply(engine, conn.recv(), failed, tokens_only):  # idle: block until there is work
                    return
            while conn.poll():  # everything else that has arrived joins this step
                applied += 1
                if not _apply(engine, conn.recv(), failed, tokens_only):
                    return
            if not engine.has_unfinished_requests():
                if failed:
                    conn.send(("outputs", failed, len(engine.scheduler.waiting), None, [], applied))
                continue
            idle_reported = False
            started = time.perf_counter()
            try:
                outputs = engine.step()
            except Exception as error:  # noqa: BLE001 - the parent fails the requests in flight
                log.exception("engine step failed")
                # As the thread mode does to its engine: the step's requests are aborted here and now (not
                # when the parent's aborts arrive: the next turn would retry the same failing step), and
                # the parent fails exactly these, not the ones it has sent since.
                failed_ids = list(engine.requests)
                for request_id in failed_ids:
                    engine.abort_request(request_id)
                tokens_only.clear()
                conn.send(("step_failed", f"{type(error).__name__}: {error}", failed_ids, applied))
                continue
            now = time.perf_counter()
            busy += now - started
            stats = None
            if now - stats_sent_at >= STATS_INTERVAL_S:
                stats, stats_sent_at = _stats(engine, busy), now
            deltas = _new_tokens(engine, tokens_only) if tokens_only else []
            _forget_finished(outputs, tokens_only)
            conn.send(("outputs", failed + outputs, len(engine.scheduler.waiting), stats, deltas, applied))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent is gone: nothing left to serve


# -- the parent -----------------------------------------------------------------------------------------


class _RemoteRequest:
    """What AsyncEngine may read or set on ``engine.requests[id]``: the prompt's text (sent with the add).
    No sequences: AsyncEngine then dates a request's scheduling by its first token."""

    __slots__ = ("prompt", "seqs")

    def __init__(self):
        self.prompt = None
        self.seqs = ()


class _Detokenized:
    """A streamed request whose text the parent makes: the child sends its new token ids each step
    (:func:`_new_tokens`), the parent detokenizes them, as the engine would have (``IncrementalDetokenizer``).

    Two owners: ``num_delivered`` belongs to the thread that runs :meth:`RemoteEngine.step` (it counts the
    ids handed on); ``detokenizer``, ``token_ids`` and ``text`` to whoever makes the outputs' text
    (:meth:`PendingTokens.materialize`: the event loop's thread, with ``deferred_outputs``)."""

    __slots__ = ("request", "prompt_token_ids", "detokenizer", "token_ids", "text", "num_delivered")

    def __init__(self, request: _RemoteRequest, prompt_token_ids: list[int], detokenizer):
        self.request = request  # its .prompt: the text AsyncEngine sets after add_request
        self.prompt_token_ids = prompt_token_ids
        self.detokenizer = detokenizer
        self.token_ids: list[int] = []
        self.text = ""
        self.num_delivered = 0


class PendingTokens(DeferredOutput):
    """The new tokens of a request detokenized in the parent, not yet text: made into a
    :class:`~miniinfer.outputs.RequestOutput` by :meth:`materialize`, when a consumer reads it.

    Why deferred: at saturation the server's process makes ~100 streamed outputs per engine step, and
    decoding each token (two tokenizer calls) and building its output objects as it arrives, in the
    thread that reads the engine's pipe, competed with the event loop for the one interpreter lock. A
    consumer that keeps up still reads one output per step; one that lags gets its pending tokens merged
    (:meth:`merge`: a list concatenation) and decoded once, in one event (``IncrementalDetokenizer.add_many``).
    ``final``: the child's final output of the request (its completion's ``new_token_ids`` already cut to
    the tokens not yet delivered), else None."""

    __slots__ = ("request_id", "state", "token_ids", "num_cached_tokens", "final", "num_generated_tokens")

    def __init__(self, request_id: str, state: _Detokenized, token_ids: list[int], num_cached_tokens: int,
                 num_generated_tokens: int, final: RequestOutput | None = None):
        self.request_id = request_id
        self.state = state
        self.token_ids = token_ids
        self.num_cached_tokens = num_cached_tokens
        self.num_generated_tokens = num_generated_tokens
        self.final = final

    @property
    def finished(self) -> bool:
        return self.final is not None

    @property
    def outputs(self) -> list[CompletionOutput]:
        """The final output's completions (finish reasons, for the engine thread's bookkeeping); [] before."""
        return self.final.outputs if self.final is not None else []

    @property
    def num_new_tokens(self) -> int:
        tail = len(self.final.outputs[0].new_token_ids) if self.final is not None else 0
        return len(self.token_ids) + tail

    def merge(self, newer: PendingTokens) -> PendingTokens:
        newer.token_ids = self.token_ids + newer.token_ids
        return newer

    def materialize(self) -> RequestOutput:
        state = self.state
        text_before, num_before = len(state.text), len(state.token_ids)
        new_text = state.detokenizer.add_many(self.token_ids)
        state.text += new_text
        state.token_ids += self.token_ids
        final = self.final
        if final is None:
            completion = CompletionOutput(0, state.text, list(state.token_ids), None, new_text=new_text,
                                          new_token_ids=self.token_ids)
            return RequestOutput(self.request_id, state.request.prompt, state.prompt_token_ids, [completion],
                                 num_cached_tokens=self.num_cached_tokens)
        # The child decoded the whole text in one piece; the engine streaming it would have flushed the
        # detokenizer only for a natural end (length, stop, EOS): an aborted or failed request keeps the
        # text streamed so far (no U+FFFD for a character cut short), as it would have there.
        completions = []
        for completion in final.outputs:
            new_token_ids = completion.token_ids[num_before:]
            if completion.finish_reason in ("abort", "error"):
                completion = replace(completion, text=state.text, new_text=new_text, new_token_ids=new_token_ids)
            else:
                completion = replace(completion, new_text=completion.text[text_before:], new_token_ids=new_token_ids)
            completions.append(completion)
        return replace(final, outputs=completions)


class _RemoteScheduler:
    """``scheduler.waiting`` for AsyncEngine's admission count: the child's last report, the adds sent since
    that the child had not applied when it reported, and the adds not sent yet."""

    def __init__(self, remote: RemoteEngine):
        self._remote = remote

    @property
    def waiting(self) -> range:
        remote = self._remote
        in_transit = sum(adds for _, adds in remote._in_transit)
        return range(remote._num_waiting + in_transit + sum(1 for c in remote._outbox if c[0] == "add"))


class RemoteEngine:
    """An :class:`~miniinfer.engine.LLMEngine` in a child process, behind the engine's own surface.

    ``model_path`` and ``llm_options`` are what ``LLM(model_path, **llm_options)`` takes; the child
    builds it (a CUDA context is created there, never in the parent: "spawn", not "fork").
    ``on_death(error)`` is called (in the engine thread) once, when the child is found dead.
    ``cpus``: the CPUs the child may run on (its every thread; None: wherever the OS puts it). Whoever
    passes them usually keeps the server process off them (:func:`pin_process`, as ``miniinfer serve
    --engine-cpus`` does): on a small CPU the engine then has its cores to itself, and the event loop, the
    HTTP clients and the parent's unpickling of the outputs run beside it instead of preempting it."""

    def __init__(self, model_path, llm_options: dict | None = None, *, startup_timeout: float = 600.0,
                 on_death: Callable[[BaseException], None] | None = None, cpus: set[int] | None = None,
                 detokenize_in_parent: bool = True, deferred_outputs: bool = False):
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self.cpus = set(cpus) if cpus else None
        self.process = context.Process(target=_engine_main,
                                       args=(child_conn, model_path, dict(llm_options or {}), self.cpus),
                                       name="miniinfer-engine-core", daemon=True)
        self.process.start()
        child_conn.close()  # the parent keeps one end only: the child's exit then reads as end-of-pipe
        self.on_death = on_death
        self.dead: EngineProcessDied | None = None
        self._outbox: list[tuple] = []                    # commands not yet sent (one message per step)
        self._num_sent = 0                                # command messages sent
        self._in_transit: collections.deque[tuple[int, int]] = collections.deque()  # (message number, adds)
        self._pending: collections.deque = collections.deque()  # received, not yet returned by step()
        self._live: set[str] = set()                      # added, final output not yet returned
        self._detokenized: dict[str, _Detokenized] = {}   # streamed requests whose text is made here
        self._num_waiting = 0
        self.requests: dict[str, _RemoteRequest] = {}
        self.scheduler = _RemoteScheduler(self)
        try:
            info = self._wait_ready(startup_timeout)
        except BaseException:  # e.g. Ctrl-C while the model loads: the child ignores SIGINT/SIGTERM, so kill it
            self.close(timeout=1)
            raise
        self.tokenizer = info["tokenizer"]
        self.config = info["config"]
        self.model = SimpleNamespace(config=info["model_config"])  # validate_prompt reads model.config
        self.max_model_len = info["max_model_len"]
        self.max_num_batched_tokens = info["max_num_batched_tokens"]
        self.num_kv_blocks = info["num_kv_blocks"]
        self.device = info["device"]
        self.generation_defaults = info["generation_defaults"]
        # Streamed requests' text is made here, from the token ids the child sends (see _plain):
        # detokenization and building a streamed output every step leave the engine's process.
        self.detokenize_in_parent = detokenize_in_parent
        # Their outputs as PendingTokens, made into RequestOutputs by the consumer (AsyncEngine's streams, in
        # the event loop's thread) rather than here: ``miniinfer serve`` sets it.
        self.deferred_outputs = deferred_outputs
        self.pid = info["pid"]
        self._stats = info["stats"]

    def _wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.2):
            if not self.process.is_alive():
                raise EngineProcessDied(f"the engine process exited with code {self.process.exitcode} "
                                        "while loading the model")
            if time.monotonic() > deadline:
                raise EngineProcessDied(f"the engine process did not load the model in {timeout} s")
        kind, payload = self._conn.recv()
        if kind == "failed":
            self.process.join(10)
            raise RuntimeError(f"the engine process could not load the model: {payload}")
        return payload

    # -- the engine's surface (engine thread only) -------------------------------------------------------

    def validate_prompt(self, prompt, params=None):
        """The engine's own validation (same checks, same messages), on the configuration the child sent."""
        from miniinfer.engine.engine import LLMEngine

        return LLMEngine.validate_prompt(self, prompt, params)

    def add_request(self, prompt, params, request_id: str, *, stream: bool = True) -> str:
        """Queue an add for the child (sent with the next step). ``prompt``: token ids, validated by
        AsyncEngine already; the text AsyncEngine sets on ``requests[id].prompt`` travels with it."""
        if self.dead is not None:
            raise self.dead
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._live.add(request_id)
        request = self.requests[request_id] = _RemoteRequest()
        token_ids = list(prompt)
        here = self.detokenize_in_parent and stream and self._plain(params)
        if here:
            from miniinfer.tokenizer import IncrementalDetokenizer

            self._detokenized[request_id] = _Detokenized(
                request, token_ids, IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens))
        self._outbox.append(("add", request_id, token_ids, params, stream, request, here))
        return request_id

    def _plain(self, params) -> bool:
        """Whether a streamed request's outputs can be made here from its token ids alone: one completion,
        no stop strings (the engine needs the text to find them), no logprobs."""
        return (self.tokenizer is not None and params.n == 1 and not params.stop_strings
                and params.logprobs is None and params.prompt_logprobs is None)

    def abort_request(self, request_id: str) -> bool:
        if self.dead is not None or request_id not in self._live:
            return False
        self._outbox.append(("abort", request_id))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._live) or bool(self._pending)

    def step(self) -> list[RequestOutput]:
        """Send the gathered commands; return the outputs of the child's next step (waiting for it)."""
        self._flush()
        while not self._pending:
            self._receive(block=True)
        item = self._pending.popleft()
        if isinstance(item, BaseException):
            raise item
        return self._step_outputs(item)

    # -- without a thread: driven by an event loop (AsyncEngine's pump) ----------------------------------

    def fileno(self) -> int:
        """The pipe's file descriptor: readable when the child has sent something (or has died)."""
        return self._conn.fileno()

    def flush(self) -> None:
        """Send the gathered commands now (``step`` does it before it waits)."""
        self._flush()

    def ready_steps(self) -> list:
        """Every step the child has finished and this side not yet returned, without waiting: each the list
        of its outputs (as ``step`` returns them), or the exception of a step that failed. Raises
        :class:`EngineProcessDied` when the child is gone."""
        self._receive(block=False)
        ready = []
        while self._pending:
            item = self._pending.popleft()
            ready.append(item if isinstance(item, BaseException) else self._step_outputs(item))
        return ready

    def _step_outputs(self, item: tuple) -> list:
        outputs = self._outputs(*item)
        for output in outputs:
            if output.finished:
                self._live.discard(output.request_id)
                self.requests.pop(output.request_id, None)
        return outputs

    def stats(self) -> dict:
        """The child's latest stats (it sends them with its steps and when it goes idle)."""
        if self.dead is None:
            try:
                self._receive(block=False)
            except EngineProcessDied:
                pass
        stats = dict(self._stats)
        stats["engine_process_alive"] = self.dead is None
        stats["engine_cpus"] = format_cpu_list(self.cpus) if self.cpus else None
        return stats

    def _outputs(self, outputs: list[RequestOutput], deltas: list[tuple]) -> list:
        """One step's outputs as the engine would have streamed them: the child's own, and one output per
        new-token delta. Those of requests detokenized here are :class:`PendingTokens`; without
        ``deferred_outputs`` they are made into outputs at once (then this thread owns their text too)."""
        detokenized = self._detokenized
        if detokenized:
            for position, output in enumerate(outputs):
                state = detokenized.pop(output.request_id, None) if output.finished else None
                if state is not None:  # streamed so far from here: the rest comes with its text, later
                    cut = [replace(c, new_token_ids=c.token_ids[state.num_delivered:]) for c in output.outputs]
                    outputs[position] = PendingTokens(output.request_id, state, [], output.num_cached_tokens,
                                                      len(output.outputs[0].token_ids),
                                                      final=replace(output, outputs=cut))
        for request_id, new_token_ids, num_cached_tokens in deltas:
            state = detokenized.get(request_id)
            if state is None or request_id not in self.requests:  # aborted meanwhile: its final output follows
                continue
            state.num_delivered += len(new_token_ids)
            outputs.append(PendingTokens(request_id, state, new_token_ids, num_cached_tokens, state.num_delivered))
        if not self.deferred_outputs:
            outputs = [o.materialize() if isinstance(o, PendingTokens) else o for o in outputs]
        return outputs

    # -- plumbing ----------------------------------------------------------------------------------------

    def _flush(self) -> None:
        if not self._outbox or self.dead is not None:
            return
        commands = []
        for command in self._outbox:
            if command[0] == "add":  # the prompt's text, as AsyncEngine set it after add_request
                command = (*command[:5], command[5].prompt, command[6])
            commands.append(command)
        self._outbox = []
        self._num_sent += 1
        adds = sum(1 for command in commands if command[0] == "add")
        if adds:
            self._in_transit.append((self._num_sent, adds))
        try:
            self._conn.send(commands)
        except (OSError, EOFError):
            self._died()

    def _receive(self, block: bool) -> None:
        """Read what the child has sent (at least one message when ``block``); notice its death."""
        while True:
            try:
                ready = self._conn.poll(0.5 if block else 0)
                if not ready:
                    if not self.process.is_alive():
                        self._died()
                    if block:
                        continue
                    return
                kind, *payload = self._conn.recv()
            except (OSError, EOFError):
                self._died()
            if kind == "outputs":
                outputs, self._num_waiting, stats, deltas, applied = payload
                self._applied(applied)
                self._pending.append((outputs, deltas))
                if stats is not None:
                    self._stats = stats
                if block:
                    return
            elif kind == "stats":
                self._stats, applied = payload
                self._num_waiting = self._stats.get("num_waiting", 0)
                self._applied(applied)
            elif kind == "step_failed":
                message, failed_ids, applied = payload
                self._applied(applied)
                self._pending.append(StepFailed(message, failed_ids))
                if block:
                    return

    def _applied(self, num_messages: int) -> None:
        """The child has applied the first ``num_messages`` command messages: their adds are its to count."""
        while self._in_transit and self._in_transit[0][0] <= num_messages:
            self._in_transit.popleft()

    def _died(self):
        """The child is gone: forget its requests, tell the server once, raise for the caller."""
        if self.dead is None:
            self.process.join(1)
            self.dead = EngineProcessDied(f"the engine process (pid {self.process.pid}) exited with code "
                                          f"{self.process.exitcode}")
            log.error("engine process died", extra={"fields": {"pid": self.process.pid,
                                                               "exitcode": self.process.exitcode}})
            self._live.clear()
            self._in_transit.clear()
            self._detokenized.clear()
            self.requests.clear()
            self._pending.clear()
            self._outbox = []
            if self.on_death is not None:
                try:
                    self.on_death(self.dead)
                except Exception:  # noqa: BLE001
                    log.exception("on_death callback failed")
        raise self.dead

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to stop; kill it if it does not within ``timeout`` seconds (it ignores SIGTERM)."""
        if self.process.is_alive():
            try:
                self._conn.send([("shutdown",)])
            except (OSError, EOFError):
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()
