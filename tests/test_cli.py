"""The command line: ``python -m miniinfer`` and the console script, one-line errors, ``chat``.

Most tests call :func:`miniinfer.cli.main` in-process with a stand-in ``LLM`` (no model load), so the
file runs in seconds; two subprocess runs check what a shell sees, one of them with the real model.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

import miniinfer.llm
from miniinfer.cli import main
from miniinfer.models.bundled import CHAT_STOP, bundled_model_path
from miniinfer.outputs import CompletionOutput, RequestOutput
from miniinfer.tokenizer import Tokenizer


@dataclass
class FakeEngine:
    max_model_len: int = 1024


@dataclass
class FakeLLM:
    """Records what the CLI asks for; replies "Reply N." (or ``reply``)."""

    model: object = None
    device: object = None
    dtype: object = None
    options: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)
    reply: str | None = None
    finish_reason: str = "stop"
    error: Exception | None = None
    engine: FakeEngine = field(default_factory=FakeEngine)
    tokenizer: Tokenizer | None = None

    def _output(self, prompt) -> RequestOutput:
        if self.error is not None:
            raise self.error
        text = self.reply if self.reply is not None else f" Reply {len(self.calls)}.\n"
        completion = CompletionOutput(0, text, [1], finish_reason=self.finish_reason,
                                      error="boom" if self.finish_reason == "error" else None)
        return RequestOutput(str(len(self.calls)), prompt, [1], [completion], finished=True)

    def generate(self, prompts, params=None, use_tqdm=True):
        self.calls.append(("generate", prompts, params))
        return [self._output(prompts)]

    def chat(self, messages, sampling_params=None, *, chat_template=None, add_generation_prompt=True,
             use_tqdm=False):
        self.calls.append(("chat", [dict(m) for m in messages], sampling_params))
        return [self._output(None)]


@pytest.fixture
def fake(monkeypatch):
    """Replace LLM with a FakeLLM factory; the created instance is ``fake.llm``."""

    class Holder:
        llm: FakeLLM | None = None
        settings: dict = {}

    def factory(model=None, *, device=None, dtype=None, **options):
        Holder.llm = FakeLLM(model, device, dtype, options, **Holder.settings)
        return Holder.llm

    monkeypatch.setattr(miniinfer.llm, "LLM", factory)
    return Holder


def run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_uses_generation_config_defaults_and_overrides(fake, capsys):
    code, out, err = run(["generate", "--prompt", "ROMEO.\n"], capsys)
    assert (code, out, err) == (0, "ROMEO.\n Reply 1.\n\n", "")
    kind, prompt, params = fake.llm.calls[0]
    assert fake.llm.model == bundled_model_path("shakespeare") and prompt == "ROMEO.\n"
    # The bundled generation_config.json: temperature 0.8, top_k 50, top_p 0.95.
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == (0.8, 50, 0.95, 64)
    code, _, _ = run(["generate", "--prompt", "x", "--temperature", "0", "--top-k", "0", "--max-tokens", "5",
                      "--stop", "\n\n", "--seed", "3", "--model", "shakespeare-draft", "--max-model-len", "128"], capsys)
    params = fake.llm.calls[0][2]
    assert code == 0 and (params.temperature, params.top_k, params.top_p, params.max_tokens) == (0, 0, 0.95, 5)
    assert list(params.stop) == ["\n\n"] and params.seed == 3
    assert fake.llm.model == bundled_model_path("shakespeare-draft") and fake.llm.options == {"max_model_len": 128}


def test_chat_messages_keep_the_conversation(fake, capsys):
    code, out, err = run(["chat", "--message", "What news?", "--message", "  ", "--message", "Then is doomsday near.",
                          "--system", "Enter Horatio and Hamlet.", "--name", "Rosencrantz"], capsys)
    assert (code, out, err) == (0, "Reply 1.\nReply 2.\n", "")
    (_, first, params), (_, second, _) = fake.llm.calls
    system = {"role": "system", "content": "Enter Horatio and Hamlet."}
    assert first == [system, {"role": "user", "content": "What news?", "name": "Rosencrantz"}]
    assert second == first + [{"role": "assistant", "content": "Reply 1."},
                              {"role": "user", "content": "Then is doomsday near.", "name": "Rosencrantz"}]
    assert list(params.stop) == CHAT_STOP  # the bundled models end a reply at the blank line after the speech


def test_chat_reads_stdin_lines(fake, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who's there?\n\nNay, answer me.\n"))
    folder = tmp_path / "model"  # not a bundled model: no default stop string
    folder.mkdir()
    code, out, _ = run(["chat", "--model", str(folder), "--stop", "END"], capsys)
    assert code == 0 and out == "Reply 1.\nReply 2.\n"
    assert [m["content"] for m in fake.llm.calls[1][1]] == ["Who's there?", "Reply 1.", "Nay, answer me."]
    assert list(fake.llm.calls[0][2].stop) == ["END"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # end of input at once: no turn, no output
    assert run(["chat", "--model", str(folder)], capsys)[:2] == (0, "")
    assert fake.llm.calls == []


def test_chat_drops_old_turns_to_fit_the_context(fake, capsys):
    """A long chat scrolls: the oldest turns go, the system message and the newest user turn stay."""
    fake.settings = {"tokenizer": Tokenizer.from_folder(bundled_model_path()), "engine": FakeEngine(96),
                     "reply": "Ay, my lord, " * 6}
    turns = [f"Question number {i}, my good lord?" for i in range(8)]
    argv = ["chat", "--system", "A room in the castle.", "--max-tokens", "16"]
    code, _, _ = run(argv + [a for t in turns for a in ("--message", t)], capsys)
    assert code == 0
    last = fake.llm.calls[-1][1]
    assert last[0]["role"] == "system" and last[1]["role"] == "user" and last[-1]["content"] == turns[-1]
    assert len(last) < 2 * len(turns)
    prompt = fake.llm.tokenizer.apply_chat_template(last)
    assert len(fake.llm.tokenizer.encode(prompt)) + 16 < 96


@pytest.mark.parametrize("argv, match", [
    (["generate", "--prompt", "x", "--model", "/no/such/model"], "no model folder at /no/such/model"),
    (["generate", "--prompt", "x", "--device", "gpu"], "unknown device 'gpu'"),
    (["generate", "--prompt", "x", "--device", "cuda:99"], "device 'cuda:99' requested, but"),
    (["generate", "--prompt", "x", "--dtype", "int8"], "dtype must be a floating"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["generate", "--prompt", "x", "--top-p", "2"], r"top_p must be in \(0, 1\]"),
    (["generate", "--prompt", "x", "--max-tokens", "0"], "max_tokens must be an integer >= 1"),
    (["generate", "--prompt", "bad \udcff byte"], "lone surrogate .* at index 4"),
    (["generate", "--prompt", "x", "--top-k", "many"], "argument --top-k: invalid int value: 'many'"),
    (["generate"], "the following arguments are required: --prompt"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["serve", "--port", "eighty"], "argument --port: invalid int value: 'eighty'"),
    (["serve", "--stream-interval", "0"], "--stream-interval must be >= 1 engine step, got 0"),
    ([], "the following arguments are required: command"),
])
def test_user_errors_are_one_line(argv, match, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(match, err), err


def test_model_errors_are_one_line(tmp_path, capsys):
    """Errors from the real loader: a config that is a JSON array, naming the file."""
    (tmp_path / "config.json").write_text(json.dumps([{"model_type": "qwen2"}]))
    code, _, err = run(["chat", "--model", str(tmp_path), "--message", "hi", "--device", "cpu"], capsys)
    assert code == 2 and err == f"error: {tmp_path / 'config.json'} must hold a JSON object " \
                                '({"model_type": ...}), got a JSON array\n'


def test_failed_request_and_internal_bugs(fake, capsys, monkeypatch):
    fake.settings = {"finish_reason": "error"}
    code, _, err = run(["chat", "--message", "hi"], capsys)
    assert code == 2 and err == "error: generation failed: boom\n"
    fake.settings = {"error": RuntimeError("index out of range\nin step")}
    code, out, err = run(["generate", "--prompt", "x"], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("error: internal error (RuntimeError: index out of range in step)") and "--debug" in err
    with pytest.raises(RuntimeError, match="index out of range"):  # --debug: the traceback, for bugs ...
        main(["--debug", "generate", "--prompt", "x"])
    with pytest.raises(ValueError, match="temperature"):  # ... and for user errors, after the subcommand too
        main(["generate", "--prompt", "x", "--temperature", "-1", "--debug"])
    monkeypatch.setenv("MINIINFER_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["generate", "--prompt", "x"])


def test_console_script_is_the_same_main():
    from importlib.metadata import entry_points

    scripts = [e for e in entry_points(group="console_scripts") if e.name == "miniinfer"]
    assert [e.value for e in scripts] == ["miniinfer.cli:main"]


def _python_m(*args, **env):
    import os

    return subprocess.run([sys.executable, "-m", "miniinfer", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def test_python_m_miniinfer_generates_with_the_real_model():
    result = _python_m("generate", "--prompt", "ROMEO.\n", "--max-tokens", "12", "--seed", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO.\n") and len(result.stdout) > len("ROMEO.\n") + 5


def test_python_m_miniinfer_user_error_has_no_traceback():
    result = _python_m("chat", "--message", "hi", "--device", "cuda:99", "--temperature", "0.5")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: device 'cuda:99' requested") and result.stderr.count("\n") == 1


@pytest.mark.skipif(not hasattr(miniinfer.llm.LLM, "chat"), reason="LLM.chat is not in this checkout yet")
def test_chat_with_the_real_model(capsys):
    """The bundled model answers in character, one speech per turn (the stop at the blank line)."""
    code, out, err = run(["chat", "--message", "What news, my lord?", "--message", "Where is the king?",
                          "--seed", "0", "--device", "cpu", "--max-tokens", "40"], capsys)
    assert code == 0 and out.strip() and "\n\n" not in out, (err, out)
    speaker_lines = re.findall(r"^[A-Z][A-Z' ]+\.$", out, re.M)
    assert not speaker_lines, out  # each reply stops at the end of its speech, before the next speaker
