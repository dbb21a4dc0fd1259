"""A checkpoint that answers every chat prompt with the same scripted text, for tests of what reads an answer
(tool calls): random weights cannot be made to write a call.

It is the qwen2 fixture's architecture in a real safetensors file, with weights chosen so that the next token
depends on the current one only. Attention and MLP write nothing back (o_proj and down_proj are zero), so the
residual stream is the current token's embedding; each token of the script has a basis vector as embedding,
and the lm_head row of the token that follows it points the same way (logit ~80, every other token ~0). The
chain starts at the generation prompt's last token and ends in EOS. The tokenizer is the fixture's, with each
piece of the script added as one token, so the answer arrives in exactly those pieces.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import tokenizers
from conftest import FIXTURES
from safetensors.numpy import load_file, save_file

from cluster.tokenizer import Tokenizer

# A Qwen3-style (ChatML) template that offers tools and writes calls and their results back into the prompt. It is
# a thinking model's: an earlier turn's reasoning_content goes back in a <think> block, `enable_thinking: false`
# closes an empty block at once, and `open_thinking` (a test's own variable) opens the block in the prompt, as the
# templates of DeepSeek-R1's distillations do.
HERMES_TEMPLATE = """\
{%- set system = messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' %}
{{- '<|im_start|>system\\n' + system }}
{%- if tools %}
    {{- '\\n\\n# Tools\\n\\nYou may call one or more of these functions:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nWrite each call as <tool_call>\\n{"name": <name>, "arguments": <object>}\\n</tool_call>' }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- for m in messages if m.role != 'system' %}
    {%- if m.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + m.role + '\\n' }}
        {%- if m.reasoning_content %}
            {{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- m.content }}
        {%- for call in m.tool_calls or [] %}
            {{- '\\n<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' }}
            {{- (call.function.arguments | tojson) + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- elif open_thinking is defined and open_thinking %}
        {{- '<think>' }}
    {%- endif %}
{%- endif %}"""


def scripted(dst: Path, pieces: list[str], template: str = HERMES_TEMPLATE) -> Path:
    """A model directory at `dst` whose greedy (and, with these margins, sampled) answer is "".join(pieces)."""
    if (dst / "config.json").exists():
        return dst
    src = FIXTURES / "qwen2"
    dst.mkdir(parents=True)
    tok = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    assert tok.add_tokens(pieces) == len(pieces), "every piece must be a new token"
    tok.save(str(dst / "tokenizer.json"))
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "chat_template": template}, indent=2))
    shutil.copy(src / "generation_config.json", dst / "generation_config.json")

    tokenizer = Tokenizer.from_dir(dst)
    start = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])[-1]
    chain = [start, *(tokenizer.token_to_id(p) for p in pieces)]
    eos = tokenizer.token_to_id(tokenizer.eos_token)
    assert len(set(chain)) == len(chain) and eos is not None

    weights = load_file(src / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    vocab, hidden = embed.shape
    assert len(chain) <= hidden
    embed = embed.copy()
    lm_head = np.zeros_like(embed)
    for k, (token, following) in enumerate(zip(chain, [*chain[1:], eos], strict=True)):
        embed[token] = 0
        embed[token, k] = 1  # RMSNorm makes it sqrt(hidden) in direction k
        lm_head[following, k] = 10
    weights["model.embed_tokens.weight"] = embed
    weights["lm_head.weight"] = lm_head
    weights["model.norm.weight"] = np.ones_like(weights["model.norm.weight"])
    for name, value in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = np.zeros_like(value)
    save_file(weights, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}, indent=2))
    return dst
