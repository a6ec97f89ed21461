"""The chat templates of the two tokenizer families, which neither tokenizer package ships.

These are the families' standard templates, verbatim as the upstream tokenizer_config.json files
carry them (split here only for line length; the pieces join with no separator).
"""

from __future__ import annotations

# Qwen2-Instruct (Qwen/Qwen2-*-Instruct): ChatML with a default system prompt.
CHATML_TEMPLATE = "".join(
    [
        "{% for message in messages %}",
        "{% if loop.first and messages[0]['role'] != 'system' %}",
        r"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}",
        "{% endif %}",
        r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{% endfor %}",
        r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    ]
)

_DS_TOOL_CALL = (
    r"tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + "
    r"tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'"
)

# DeepSeek-V3 (deepseek-ai/DeepSeek-V3): system prompts first, bos written by the template.
DEEPSEEK_V3_TEMPLATE = "".join(
    [
        "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}",
        "{% endif %}",
        "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, ",
        "system_prompt='', is_first_sp=true) %}",
        "{%- for message in messages %}{%- if message['role'] == 'system' %}",
        "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}",
        "{% set ns.is_first_sp = false %}",
        r"{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}",
        "{%- endif %}{%- endif %}{%- endfor %}",
        "{{ bos_token }}{{ ns.system_prompt }}",
        "{%- for message in messages %}",
        "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}",
        "{{'<｜User｜>' + message['content']}}{%- endif %}",
        "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}",
        "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls'] %}",
        "{%- if not ns.is_first %}{%- if message['content'] is none %}",
        "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + " + _DS_TOOL_CALL + "}}",
        "{%- else %}{{'<｜Assistant｜>' + message['content'] + ",
        "'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + " + _DS_TOOL_CALL + "}}",
        "{%- endif %}{%- set ns.is_first = true -%}",
        r"{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + " + _DS_TOOL_CALL + "}}",
        "{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}",
        "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}",
        "{%- if ns.is_tool %}",
        "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}",
        "{%- set ns.is_tool = false -%}",
        "{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}",
        "{%- endif %}{%- endif %}",
        "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}",
        "{%- if ns.is_output_first %}",
        "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + ",
        "'<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}",
        "{%- else %}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}",
        "{%- endif %}{%- endif %}{%- endfor -%}",
        "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}",
        "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}",
    ]
)
