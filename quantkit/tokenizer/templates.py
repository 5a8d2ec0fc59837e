"""HF chat templates (Jinja) that reproduce mistral-common's instruct formats v1, v3 and v7.

mistral-common encodes every text chunk on its own, so a sentencepiece chunk starts with the dummy prefix "▁".
Our tokenizer.json only adds that prefix at the very start of a string (Metaspace "first"), so the templates
write it as an explicit space (`sp`) before each text chunk; tekken has no dummy prefix and `sp` is empty.
The three templates share the message-collection preamble below: text parts of a message are joined with
"\\n\\n" (mistral-common's chunk join), images become `{'type': 'image'}` and render as one [IMG] placeholder.
v7 adds the community Pixtral-Large extensions: system messages anywhere, consecutive user messages each in
their own [INST], images in user, assistant and tool messages.
"""

from __future__ import annotations

# Collects messages into ns.out as {role, parts, calls, id}: consecutive messages whose role is in
# MERGE are merged into one (mistral-common's normalizer), every other message stays on its own.
_COLLECT = """\
{%- set ns = namespace(out=[], cur=none, parts=[], calls=[], texts=[], merged=[], system=[], last_user=-1) %}
{%- for message in messages + [{'role': 'end-of-messages'}] %}
    {%- if ns.cur is none or message.role != ns.cur.role or message.role not in MERGE %}
        {%- if ns.cur is not none %}
            {%- set ns.merged = [] %}
            {%- set ns.texts = [] %}
            {%- for p in ns.parts + [{'type': 'flush'}] %}
                {%- if p.type == 'text' %}
                    {%- set ns.texts = ns.texts + [p.text] %}
                {%- else %}
                    {%- if ns.texts %}
                        {%- set ns.merged = ns.merged + [{'type': 'text', 'text': ns.texts | join('\\n\\n')}] %}
                        {%- set ns.texts = [] %}
                    {%- endif %}
                    {%- if p.type == 'image' %}
                        {%- set ns.merged = ns.merged + [p] %}
                    {%- endif %}
                {%- endif %}
            {%- endfor %}
            {%- if ns.cur.role == 'system' and FOLD_SYSTEM %}
                {%- if ns.cur.content %}
                    {%- set ns.system = ns.system + [ns.merged | map(attribute='text') | join('')] %}
                {%- endif %}
            {%- else %}
                {%- set ns.out = ns.out + [{'role': ns.cur.role, 'parts': ns.merged, 'calls': ns.calls,
                                            'id': ns.cur.get('tool_call_id')}] %}
            {%- endif %}
        {%- endif %}
        {%- set ns.cur = message %}
        {%- set ns.parts = [] %}
        {%- set ns.calls = [] %}
    {%- endif %}
    {%- if message.role not in ['system', 'user', 'assistant', 'tool', 'end-of-messages'] %}
        {{- raise_exception('unknown role: ' ~ message.role) }}
    {%- endif %}
    {%- set content = message.content %}
    {%- if content is string %}
        {%- if content %}
            {%- set ns.parts = ns.parts + [{'type': 'text', 'text': content}] %}
        {%- endif %}
    {%- elif content is mapping %}
        {%- set ns.parts = ns.parts + [{'type': 'text', 'text': content | tojson}] %}
    {%- elif content %}
        {%- for p in content %}
            {%- if p.type == 'text' %}
                {%- if p.text %}
                    {%- set ns.parts = ns.parts + [{'type': 'text', 'text': p.text}] %}
                {%- endif %}
            {%- elif p.type in ['image', 'image_url'] %}
                {%- if not IMAGES or message.role not in IMAGE_ROLES %}
                    {{- raise_exception('images are not supported in ' ~ message.role ~ ' messages here') }}
                {%- endif %}
                {%- set ns.parts = ns.parts + [{'type': 'image'}] %}
            {%- else %}
                {{- raise_exception('unsupported content part type: ' ~ p.type) }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {%- if message.tool_calls %}
        {%- set ns.calls = ns.calls + message.tool_calls %}
    {%- endif %}
{%- endfor %}
{%- set system = ns.system | join('\\n\\n') %}
{%- if not ns.out or (FOLD_SYSTEM and ns.out[0].role != 'user') %}
    {%- set ns.out = [{'role': 'user', 'parts': [], 'calls': []}] + ns.out %}
{%- endif %}
{%- for m in ns.out %}
    {%- if m.role == 'user' %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
{%- endfor %}
"""

# Tool definitions and tool calls as mistral-common serializes them (json.dumps, ensure_ascii=False).
# A string of arguments/content that looks like JSON is used as is: pass canonical JSON (or a dict).
_TOOLS = """\
{%- set ns.tools = [] %}
{%- for t in tools or [] %}
    {%- set f = t.function if t.function is defined else t %}
    {%- set ns.tools = ns.tools + [{'type': 'function', 'function': {'name': f.name,
        'description': f.description if f.description is defined and f.description is not none else '',
        'parameters': f.parameters if f.parameters is defined and f.parameters is not none else {}}}] %}
{%- endfor %}
{%- set tools_json = ns.tools | tojson %}
{%- macro json_value(value, empty) -%}
    {%- if value is mapping or (value is iterable and value is not string) -%}{{- value | tojson -}}
    {%- elif value is none or value == '' -%}{{- empty -}}
    {%- elif value[:1] in ['{', '['] -%}{{- value -}}
    {%- else -%}{{- value | tojson -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro calls_json(calls) -%}
    {{- '[' -}}
    {%- for call in calls -%}
        {%- if call.id is not defined or call.id is none or call.id | length != 9 -%}
            {{- raise_exception('tool call ids must be 9 letters or digits') -}}
        {%- endif -%}
        {{- '{"name": ' ~ (call.function.name | tojson) ~ ', "arguments": ' -}}
        {{- json_value(call.function.arguments, '{}') ~ ', "id": ' ~ (call.id | tojson) ~ '}' -}}
        {%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
    {%- endfor -%}
    {{- ']' -}}
{%- endmacro -%}
{%- macro render_parts(parts, sp) -%}
    {%- for p in parts -%}
        {%- if p.type == 'image' -%}{{- '[IMG]' -}}{%- else -%}{{- sp ~ p.text -}}{%- endif -%}
    {%- endfor -%}
{%- endmacro -%}
"""

_V1 = """\
{%- if tools %}
    {{- raise_exception('the v1 instruct format has no tool support') }}
{%- endif %}
{{- bos_token }}
{%- for m in ns.out %}
    {%- set text = m.parts | map(attribute='text') | join('') %}
    {%- if m.role == 'user' %}
        {%- if loop.first and system %}
            {%- set text = system ~ '\\n\\n' ~ text %}
        {%- endif %}
        {{- sp ~ '[INST] ' ~ text ~ ' [/INST]' }}
    {%- elif m.role == 'assistant' %}
        {%- if m.calls or not text %}
            {{- raise_exception('v1 assistant messages need text content and cannot call tools') }}
        {%- endif %}
        {{- sp ~ text ~ eos_token }}
    {%- else %}
        {{- raise_exception('the v1 instruct format has no tool messages') }}
    {%- endif %}
{%- endfor %}
"""

_V3 = """\
{{- bos_token }}
{%- for m in ns.out %}
    {%- if m.role == 'user' %}
        {%- set is_last = loop.index0 == ns.last_user %}
        {%- if is_last and ns.tools %}
            {{- '[AVAILABLE_TOOLS]' ~ sp ~ tools_json ~ '[/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {{- '[INST]' }}
        {%- if m.parts | selectattr('type', 'equalto', 'image') | list | length == 0 %}
            {%- set text = m.parts | map(attribute='text') | join('') %}
            {%- if is_last and system %}
                {%- set text = system ~ '\\n\\n' ~ text %}
            {%- endif %}
            {%- if text %}
                {{- sp ~ text }}
            {%- endif %}
        {%- else %}
            {%- set parts = m.parts %}
            {%- if parts | length == 2 and parts[0].type == 'text' and parts[1].type == 'image' %}
                {%- set parts = [parts[1], parts[0]] %}
            {%- endif %}
            {%- if is_last and system %}
                {{- sp ~ system ~ '\\n\\n' }}
            {%- endif %}
            {{- render_parts(parts, sp) }}
        {%- endif %}
        {{- '[/INST]' }}
    {%- elif m.role == 'assistant' %}
        {%- if m.calls and m.parts %}
            {{- raise_exception('v3 assistant messages have either content or tool calls, not both') }}
        {%- elif m.calls %}
            {{- '[TOOL_CALLS]' ~ sp ~ calls_json(m.calls) }}
        {%- elif m.parts %}
            {%- set text = (m.parts | map(attribute='text') | join('')).rstrip(' ') %}
            {%- if text %}
                {{- sp ~ text }}
            {%- endif %}
        {%- else %}
            {{- raise_exception('assistant messages need content or tool calls') }}
        {%- endif %}
        {{- eos_token }}
    {%- elif m.role == 'tool' %}
        {%- if m.id is none or m.id | length != 9 %}
            {{- raise_exception('tool messages need a tool_call_id of 9 letters or digits') }}
        {%- endif %}
        {%- set content = json_value(m.parts | map(attribute='text') | join(''), '{}') %}
        {{- '[TOOL_RESULTS]' ~ sp ~ '{"content": ' ~ content ~ ', "call_id": ' ~ (m.id | tojson) ~ '}' }}
        {{- '[/TOOL_RESULTS]' }}
    {%- endif %}
{%- endfor %}
"""

_V7 = """\
{{- bos_token }}
{%- for m in ns.out %}
    {%- if m.role == 'system' %}
        {{- '[SYSTEM_PROMPT]' ~ render_parts(m.parts, sp) ~ '[/SYSTEM_PROMPT]' }}
    {%- elif m.role == 'user' %}
        {%- if loop.index0 == ns.last_user and ns.tools %}
            {{- '[AVAILABLE_TOOLS]' ~ sp ~ tools_json ~ '[/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {%- set parts = m.parts %}
        {%- if parts | length == 2 and parts[0].type == 'text' and parts[1].type == 'image' %}
            {%- set parts = [parts[1], parts[0]] %}
        {%- endif %}
        {{- '[INST]' ~ render_parts(parts, sp) ~ '[/INST]' }}
    {%- elif m.role == 'assistant' %}
        {%- if not m.parts and not m.calls %}
            {{- raise_exception('assistant messages need content or tool calls') }}
        {%- endif %}
        {%- if m.parts | selectattr('type', 'equalto', 'image') | list | length == 0 %}
            {%- set text = (m.parts | map(attribute='text') | join('')).rstrip(' ') %}
            {%- if text %}
                {{- sp ~ text }}
            {%- endif %}
        {%- else %}
            {{- render_parts(m.parts, sp) }}
        {%- endif %}
        {%- if m.calls %}
            {{- '[TOOL_CALLS]' ~ sp ~ calls_json(m.calls) }}
        {%- endif %}
        {{- eos_token }}
    {%- elif m.role == 'tool' %}
        {%- if m.id is none or m.id | length != 9 %}
            {{- raise_exception('tool messages need a tool_call_id of 9 letters or digits') }}
        {%- endif %}
        {{- '[TOOL_RESULTS]' ~ sp ~ m.id ~ '[TOOL_CONTENT]' ~ render_parts(m.parts, sp) ~ '[/TOOL_RESULTS]' }}
    {%- endif %}
{%- endfor %}
"""

# version -> (body, roles merged when consecutive, v1/v3 normalizer (system messages folded into one prompt, an
# empty user message first if the chat does not start with one), roles whose messages may hold images)
_FORMATS = {
    "v1": (_V1, ["user", "assistant"], True, []),
    "v3": (_V3, ["user", "assistant"], True, ["user"]),
    "v7": (_V7, ["assistant"], False, ["user", "assistant", "tool"]),
}


def supported_versions() -> list[str]:
    return list(_FORMATS)


def chat_template(version: str, spm: bool, images: bool) -> str:
    """The Jinja chat template for one tokenizer version; `spm` selects the explicit dummy-prefix space."""
    body, merge, fold_system, image_roles = _FORMATS[version]
    header = (
        f"{{#- Mistral instruct {version} format ({'sentencepiece' if spm else 'tekken'}), written by quantkit. -#}}\n"
        f"{{%- set sp = {' ' if spm else ''!r} %}}\n"
        f"{{%- set MERGE = {merge!r} %}}\n"
        f"{{%- set FOLD_SYSTEM = {str(fold_system).lower()} %}}\n"
        f"{{%- set IMAGES = {str(images).lower()} %}}\n"
        f"{{%- set IMAGE_ROLES = {image_roles!r} %}}\n"
    )
    return header + _COLLECT + _TOOLS + body
