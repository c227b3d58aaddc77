"""The small models that ship inside the package, so that every chapter runs offline on a CPU.

They are trained by ``scripts/bundled_models/`` on Shakespeare's works and stored as ordinary
Hugging Face folders (config.json, model.safetensors, tokenizer files, a model card) under
``miniinfer/data/models/<name>``.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODELS = {
    "shakespeare": "Qwen2ForCausalLM, ~4.4 M parameters: the course's main model",
    "shakespeare-draft": "Qwen2ForCausalLM, ~0.5 M parameters: a speculative-decoding draft for `shakespeare`",
    "shakespeare-moe": "Qwen2MoeForCausalLM, ~4 M parameters: a tiny mixture of experts",
}

_DATA = Path(__file__).resolve().parent.parent / "data" / "models"

# The bundled models' chat template (``chat_template`` in each tokenizer_config.json; the tests check they
# match). The models know no chat format, only plays, so a chat is rendered as a scene: each message is a
# speech ("SPEAKER.\n" on its own line, the text, a blank line), a system message is a stage direction in
# square brackets, as in the edition they were trained on. The user speaks as HORATIO and the model
# answers as HAMLET (both are in the training plays, so the model has seen them address each other), unless
# a message carries a ``name``; the generation prompt opens the next speech of the model's last speaker.
# There is no end-of-turn token: a reply ends at the blank line before the next speech, so stop generation
# at "\n\n" (:data:`CHAT_STOP`). HF renders it identically (``AutoTokenizer.apply_chat_template``).
CHAT_TEMPLATE = """\
{%- set ns = namespace(assistant=(assistant_name | default('HAMLET'))) -%}
{%- for message in messages -%}
    {%- if message['content'] is not string -%}
        {{- raise_exception('message content must be a string for this model') -}}
    {%- endif -%}
    {%- if message['role'] == 'system' -%}
        {{- '[' + message['content'] | trim + ']\\n\\n' -}}
    {%- elif message['role'] == 'user' or message['role'] == 'assistant' -%}
        {%- if message.get('name') -%}
            {%- set speaker = message['name'] -%}
        {%- elif message['role'] == 'user' -%}
            {%- set speaker = user_name | default('HORATIO') -%}
        {%- else -%}
            {%- set speaker = ns.assistant -%}
        {%- endif -%}
        {%- if message['role'] == 'assistant' -%}
            {%- set ns.assistant = speaker -%}
        {%- endif -%}
        {{- speaker | trim | upper + '.\\n' + message['content'] | trim + '\\n\\n' -}}
    {%- else -%}
        {{- raise_exception("unknown role '" + message['role'] + "'; this model's chat template takes "
                            + "system, user and assistant messages") -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- ns.assistant | trim | upper + '.\\n' -}}
{%- endif -%}
"""
# Where a bundled model's chat reply ends (see CHAT_TEMPLATE): the blank line after its speech.
CHAT_STOP = ["\n\n"]


def bundled_model_path(name: str = "shakespeare") -> Path:
    """The folder of a bundled model: ``"shakespeare"``, ``"shakespeare-draft"`` or ``"shakespeare-moe"``."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; choose one of {sorted(BUNDLED_MODELS)}")
    path = _DATA / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"bundled model {name!r} is missing from {path}; reinstall miniinfer or run "
                                "scripts/bundled_models (see its README) to rebuild it")
    return path
