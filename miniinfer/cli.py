"""The ``miniinfer`` command (also ``python -m miniinfer``): ``generate``, ``chat``, ``grade``, ``serve``,
``bench serve``, ``convert``.

    miniinfer generate --prompt "ROMEO." --max-tokens 64
    echo "What news, my lord?" | miniinfer chat
    miniinfer chat --message "Who's there?" --message "Long live the king!"

A user's mistake (a model path that does not exist, ``--device cuda`` on a machine without CUDA, a
sampling value out of range, a prompt the tokenizer cannot encode) prints one line, ``error: ...``, on
stderr and exits with status 2, as argparse does for bad options. A traceback is for MiniInfer's own
bugs and only with ``--debug`` (or ``MINIINFER_DEBUG=1``); without it a bug prints one line too and
exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2  # argparse's status for bad usage; we use it for every error the user can fix
EXIT_INTERNAL_ERROR = 1


class UsageError(Exception):
    """Bad command-line usage (argparse's complaints, raised instead of printed so main() decides)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message and exits; we want one line and a return code
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "fix your input": bad values (ValueError, our config and prompt checks), missing
    or unreadable files (OSError), a missing optional package (ImportError), GPU memory exhausted."""
    errors: list[type[BaseException]] = [UsageError, ValueError, OSError, ImportError]
    try:
        import torch

        errors.append(torch.cuda.OutOfMemoryError)
    except (ImportError, AttributeError):
        pass
    return tuple(errors)


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("MINIINFER_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, KeyError) or (isinstance(error, OSError) and not str(error)):
        text = f"{type(error).__name__}: {text}"
    return text


# -- shared pieces ------------------------------------------------------------------------------------


def _model_path(model: str | None) -> str | Path:
    """None -> the bundled shakespeare model; a bundled model's name (unless a local path has that name) -> its
    folder; anything else (a folder, a hub id) as given, for the loader to resolve or refuse."""
    from miniinfer.models.bundled import BUNDLED_MODELS, bundled_model_path

    if model is None:
        return bundled_model_path("shakespeare")
    if model in BUNDLED_MODELS and not Path(model).exists():
        return bundled_model_path(model)
    return model


def _is_bundled(path: str | Path) -> bool:
    from miniinfer.models.bundled import BUNDLED_MODELS, bundled_model_path

    try:
        return any(Path(path).resolve() == bundled_model_path(name).resolve() for name in BUNDLED_MODELS)
    except (OSError, ValueError):
        return False


def _sampling_params(args, path: str | Path, default_stop: list[str] | None = None):
    """SamplingParams from the model's generation_config.json defaults, overridden by the options given."""
    from dataclasses import fields

    from miniinfer.loader import load_generation_config
    from miniinfer.sampling import SamplingParams

    known = {f.name for f in fields(SamplingParams)}
    values = {k: v for k, v in load_generation_config(path).items() if k in known}
    given = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
             "max_tokens": args.max_tokens, "seed": args.seed, "stop": args.stop or default_stop}
    values.update({k: v for k, v in given.items() if v is not None})
    return SamplingParams(**values)


def _load_llm(args, path: str | Path):
    """Check the cheap things first (device, dtype), so that a typo does not cost a model load."""
    from miniinfer.llm import LLM
    from miniinfer.loader import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    resolve_dtype(args.dtype, device)
    options = {} if args.max_model_len is None else {"max_model_len": args.max_model_len}
    return LLM(path, device=args.device, dtype=args.dtype, **options)


def _check_output(output) -> None:
    completion = output.outputs[0]
    if completion.finish_reason == "error":
        raise ValueError(f"generation failed: {completion.error or 'the engine reported an error'}")


# -- commands -----------------------------------------------------------------------------------------


def _generate(args) -> int:
    from miniinfer.tokenizer import check_text

    check_text(args.prompt)  # a lone surrogate from an undecodable argv byte: say so before loading anything
    path = _model_path(args.model)
    params = _sampling_params(args, path)
    llm = _load_llm(args, path)
    output = llm.generate(args.prompt, params, use_tqdm=False)[0]
    _check_output(output)
    print(args.prompt + output.text, flush=True)
    return 0


def _read_turns(args):
    """The user's turns: each --message, else each non-empty line of stdin (with a "> " prompt on a terminal)."""
    if args.message:
        yield from args.message
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input (Ctrl-D)
            return
        yield line


def _fit_context(llm, history: list[dict], max_tokens: int) -> list[dict]:
    """Drop the oldest turns (keeping a leading system message and the newest user turn) until the rendered
    prompt leaves room for ``max_tokens`` in the model's context, as a chat window scrolls."""
    tokenizer, limit = getattr(llm, "tokenizer", None), getattr(getattr(llm, "engine", None), "max_model_len", None)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None) or not isinstance(limit, int):
        return history
    system = history[:1] if history and history[0]["role"] == "system" else []
    turns = history[len(system):]
    while len(turns) > 1:
        prompt = tokenizer.apply_chat_template(system + turns, add_generation_prompt=True)
        if len(tokenizer.encode(prompt, add_special_tokens=False)) + min(max_tokens, limit // 2) < limit:
            break
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":  # start at a user turn
            turns = turns[1:]
    return system + turns


def _chat(args) -> int:
    from miniinfer.models.bundled import CHAT_STOP

    path = _model_path(args.model)
    # The bundled models have no end-of-turn token: their reply is one speech, ending at a blank line.
    params = _sampling_params(args, path, default_stop=CHAT_STOP if _is_bundled(path) else None)
    llm = _load_llm(args, path)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    for line in _read_turns(args):
        text = line.strip()
        if not text:
            continue
        message = {"role": "user", "content": text}
        if args.name:
            message["name"] = args.name
        history = _fit_context(llm, history + [message], params.max_tokens)
        output = llm.chat(history, params, use_tqdm=False)[0]
        _check_output(output)
        reply = output.outputs[0].text.strip()
        print(reply, flush=True)
        history.append({"role": "assistant", "content": reply})
    return 0


def _grade(args) -> int:
    from miniinfer.course import grade

    return grade.main(args)


def _missing_course_tools(error: ImportError) -> int:
    raise ImportError(f"miniinfer grade needs the course tools: pip install 'miniinfer[dev]' ({error})")


def _serve(args) -> int:
    from miniinfer.server.serve import run

    return run(args)


def _bench_serve(args) -> int:
    from miniinfer.server.bench import run

    return run(args)


def _convert(args) -> int:
    from miniinfer.formats.gguf import export_gguf

    output = export_gguf(_model_path(args.path), args.output, args.type)
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB, {args.type})")
    return 0


# -- parser -------------------------------------------------------------------------------------------


def _add_model_options(parser: argparse.ArgumentParser, max_tokens_help: str) -> None:
    parser.add_argument("--model", help="checkpoint folder, hub id, or a bundled model's name (default: the "
                                        "bundled shakespeare model)")
    parser.add_argument("--max-tokens", type=int, default=None, help=max_tokens_help)
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy (default: the model's generation_config.json, else 1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off; default: "
                                                                "generation_config.json, else off)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1.0 = off; default: "
                                                                  "generation_config.json, else off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="end generation at this text (repeatable)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on "
                                                      "CPU, bfloat16 on CUDA)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length to run the model with (default: its max_position_embeddings)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks (also MINIINFER_DEBUG=1)")


def build_parser() -> argparse.ArgumentParser:
    from miniinfer import __version__

    parser = _Parser(prog="miniinfer", description="MiniInfer: a small LLM inference engine.")
    parser.add_argument("--version", action="version", version=f"miniinfer {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also MINIINFER_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    generate = commands.add_parser("generate", help="complete a prompt with a model")
    generate.add_argument("--prompt", required=True, help="the text to continue")
    _add_model_options(generate, "most tokens to generate (default: generation_config.json's max_new_tokens, "
                                 "else 64)")
    generate.set_defaults(run=_generate)

    chat = commands.add_parser(
        "chat", help="chat with a model: one user turn per line of stdin, or per --message",
        description="Each user turn is added to the conversation, rendered with the model's chat template "
                    "(LLM.chat), and the reply printed on its own line. The bundled models answer as a "
                    "character in a play (HAMLET, to HORATIO) and stop at the end of their speech.")
    chat.add_argument("--message", action="append", metavar="TEXT",
                      help="a user turn (repeatable; without it, turns are read from stdin, one per line)")
    chat.add_argument("--system", help="a system message (for the bundled models, a stage direction)")
    chat.add_argument("--name", help="the user's speaker name (the message's 'name'; the bundled models "
                                     "default to HORATIO)")
    _add_model_options(chat, "most tokens per reply (default: generation_config.json's max_new_tokens, else 64)")
    chat.set_defaults(run=_chat)

    grade = commands.add_parser("grade", help="grade student notebooks against the canonical chapter")
    try:
        from miniinfer.course.grade import add_grade_arguments
    except ImportError as error:  # the course tools need the dev extra (nbformat, nbclient); a server image lacks them
        grade.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        grade.set_defaults(run=lambda args, error=error: _missing_course_tools(error))
    else:
        add_grade_arguments(grade)
        grade.set_defaults(run=_grade)

    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (and gRPC)")
    from miniinfer.server.serve import add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(run=_serve)

    bench = commands.add_parser("bench", help="benchmarks: 'bench serve' measures a server under load")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, parser_class=_Parser)
    bench_serve = benchmarks.add_parser(
        "serve", help="a request-rate sweep against `miniinfer serve` (Poisson arrivals, streaming clients)",
        description="Sends streaming completions at each offered load (Poisson arrivals; 'inf' = all at once) "
                    "and reports throughput, TTFT, inter-token latency and errors; with a server it starts "
                    "itself, also the server's throughput at saturation against offline LLM.generate.")
    from miniinfer.server.bench import add_bench_serve_arguments

    add_bench_serve_arguments(bench_serve)
    bench_serve.set_defaults(run=_bench_serve)

    convert = commands.add_parser("convert", help="export a model folder to another format (GGUF)")
    convert.add_argument("path", help="model folder, hub id, or a bundled model's name (e.g. shakespeare)")
    convert.add_argument("--to", required=True, choices=["gguf"], help="the format to write")
    convert.add_argument("--output", required=True, help="the file to write (e.g. model.gguf)")
    convert.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k"],
                         help="type of the 2-D tensors (default f16; norms and biases stay f32)")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) -> exit status (0, 1 for a bug, 2 for a user error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = _debug_requested(argv)
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except BrokenPipeError:  # stdout closed early (`miniinfer chat | head -1`): not worth a message
        sys.stdout = open(os.devnull, "w")  # so that the final flush at exit is quiet
        return EXIT_INTERNAL_ERROR
    except _user_errors() as error:
        if debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130  # the shell's convention for SIGINT
    except Exception as error:
        if debug:
            raise
        print(f"error: internal error ({type(error).__name__}: {_one_line(error)}). This is a bug in MiniInfer: "
              "rerun with --debug (or MINIINFER_DEBUG=1) for the traceback and please report it", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
