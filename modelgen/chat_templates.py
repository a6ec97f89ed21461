"""The chat templates of the two tokenizer families, which neither tokenizer package ships.

These are the families' standard templates (split here only for line length; the pieces join with
no separator): DeepSeek-V3's verbatim as its tokenizer_config.json carries it, and Qwen2's ChatML
with the tools section Qwen2.5's template adds.
"""

from __future__ import annotations

_HERMES_TOOLS_INTRO = (
    r"\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    r"You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_HERMES_TOOLS_OUTRO = (
    r"\n</tools>\n\nFor each function call, return a json object with function name and "
    r"arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    r"{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
)

# Qwen2-Instruct's ChatML (a default system prompt), with tools as Qwen2.5 and Hermes models see
# them: the tools in the system prompt, calls written as <tool_call> JSON, results as
# <tool_response>. Without tools it renders exactly what Qwen2-Instruct's template does.
CHATML_TEMPLATE = "".join(
    [
        "{% if tools %}",
        r"{{ '<|im_start|>system\n' }}",
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}",
        "{% else %}{{ 'You are a helpful assistant.' }}{% endif %}",
        "{{ '" + _HERMES_TOOLS_INTRO + "' }}",
        r"{% for tool in tools %}{{ '\n' }}{{ tool | tojson }}{% endfor %}",
        "{{ '" + _HERMES_TOOLS_OUTRO + "' }}",
        "{% endif %}",
        "{% for message in messages %}",
        "{% if tools and loop.first and message['role'] == 'system' %}",
        "{% elif message['role'] == 'assistant' and message['tool_calls'] %}",
        r"{{ '<|im_start|>assistant\n' + (message['content'] or '') }}",
        "{% for call in message['tool_calls'] %}",
        r"{{ '\n<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}",
        r"{{ call['function']['arguments'] | tojson }}{{ '}\n</tool_call>' }}",
        "{% endfor %}",
        r"{{ '<|im_end|>\n' }}",
        "{% elif message['role'] == 'tool' %}",
        r"{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}",
        "{% else %}",
        "{% if loop.first and not tools and messages[0]['role'] != 'system' %}",
        r"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}",
        "{% endif %}",
        r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{% endif %}",
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
