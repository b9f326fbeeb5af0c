"""A recipe's ``chat_template``: mergekit 0.1.5's rules and its five built-in names.

The setting is ``auto`` (the template most of the input models' tokenizers carry), a built-in name
(``chatml``, ``llama3``, ``mistral``, ``alpaca``, ``exaone``) or a Jinja template written out.
mergekit refuses anything else that is shorter than 20 characters or has no ``{``.

The built-in templates are written here from the formats' published descriptions, to render what
mergekit 0.1.5's own do under transformers' ``apply_chat_template`` (tests/test_tokenizer_merge.py
compares the renderings). Where mergekit's rendering departs from the published format, these follow
mergekit, so that a recipe gives the same prompts in both tools (docs/merging.md lists the
departures): ``llama3`` puts a newline after every ``<|eot_id|>`` and trims each message;
``alpaca`` has no preamble, starts with the last system message (or nothing) and a blank line, and
puts no blank line before the generation prompt's ``### Response:``; ``exaone`` keeps the indentation
of mergekit's template lines in its output.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from evomerge.errors import RecipeError

BUILTIN: dict[str, str] = {
    # ChatML: <|im_start|>ROLE\nCONTENT<|im_end|>\n per message
    "chatml": (
        "{%- for m in messages -%}"
        "{{- '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    # Llama 3: bos, then <|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|> per message
    "llama3": (
        "{{- bos_token if messages else '' -}}"
        "{%- for m in messages -%}"
        "{{- '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\\n\\n' ~ (m['content'] | trim) ~ '<|eot_id|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    ),
    # Mistral v1: <s> [INST] USER [/INST] ASSISTANT</s>..., a system message opening the first user turn
    "mistral": (
        "{%- set has_system = messages and messages[0]['role'] == 'system' -%}"
        "{%- set turns = messages[1:] if has_system else messages -%}"
        "{{- bos_token -}}"
        "{%- for m in turns -%}"
        "{%- if (m['role'] == 'user') != (loop.index0 is even) -%}"
        "{{- raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') -}}"
        "{%- elif m['role'] == 'user' -%}"
        "{{- ' [INST] ' ~ ((messages[0]['content'] ~ '\\n\\n') if (loop.first and has_system) else '') "
        "~ m['content'] ~ ' [/INST]' -}}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{{- ' ' ~ m['content'] ~ eos_token -}}"
        "{%- else -%}"
        "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
        "optional system message!') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    # Alpaca: ### Instruction: / ### Input: / ### Response: sections separated by blank lines
    "alpaca": (
        "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
        "{{- (systems | last)['content'] | trim if systems else '' -}}"
        "{{- '\\n\\n' -}}"
        "{%- set heads = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n', "
        "'user_context': '### Input:\\n'} -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] in heads -%}"
        "{{- heads[m['role']] ~ (m['content'] | trim) ~ ('' if loop.last else '\\n\\n') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{- '### Response:\\n' -}}{%- endif -%}"
    ),
    # EXAONE: [|ROLE|]CONTENT, a user turn ending in a newline, other turns in [|endofturn|]
    "exaone": (
        "{%- for m in messages -%}"
        "{%- if loop.first and m['role'] != 'system' -%}{{- '        [|system|][|endofturn|]\\n\\n' -}}{%- endif -%}"
        "{{- '    [|' ~ m['role'] ~ '|]' ~ m['content'] ~ '\\n        ' -}}"
        "{{- ('\\n' if m['role'] == 'user' else '[|endofturn|]\\n') ~ '\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '    [|assistant|]\\n' -}}{%- endif -%}"
    ),
}


def check_chat_template(setting: object, where: str) -> str | None:
    """The setting, refused here (before any work) where mergekit would refuse it after the merge."""
    if setting is None or setting == "":
        return None
    if not isinstance(setting, str):
        raise RecipeError(f"{where}: chat_template must be a string (auto, a built-in name or a Jinja template), "
                          f"got {setting!r}.")
    if setting == "auto" or setting in BUILTIN or (len(setting) >= 20 and "{" in setting):
        return setting
    raise RecipeError(f"{where}: chat_template {setting!r} is neither 'auto', a built-in template "
                      f"({', '.join(sorted(BUILTIN))}) nor a Jinja template; use one of those or write the template out.")


def resolve_chat_template(setting: str, model_templates: Sequence[str | dict | None]) -> str | None:
    """The template the output tokenizer gets (None: leave the tokenizer's own).

    ``model_templates`` are the input models' tokenizers' templates, in the recipe's model order (a
    dict of named templates counts with its ``default``). ``auto`` takes the most common, the first
    seen among equally common ones (mergekit counts them in the order of a Python set of models,
    which can differ between runs)."""
    if setting == "auto":
        found = []
        for t in model_templates:
            t = t.get("default") if isinstance(t, dict) else t
            if t:
                found.append(t.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    return BUILTIN.get(setting, setting)
