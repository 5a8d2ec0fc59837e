"""A tiny random Llama as the hub ships such models: config.json of LlamaForCausalLM with tied embeddings (no
lm_head tensor), model.safetensors written by transformers' own save_pretrained, and a tokenizer.json with
tokenizer_config.json (special tokens, a ChatML template) but no Mistral-native tokenizer file.

The tokenizer is a byte-level BPE trained here on the bundled prose (SmolLM2's pipeline: digits split, then
ByteLevel), so the folder is built offline in a second; transformers' PreTrainedTokenizerFast over the same files
is the reference for token ids and chat templates.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A template that uses tools when given (its shape follows common hub templates).
CHATML_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\nTools:\n' }}{%- for tool in tools %}{{- tool | tojson }}\n"
    "{%- endfor %}{{- '<|im_end|>\n' }}{%- endif %}" + CHATML
)


def train_tokenizer(vocab_size: int = 416):
    """Byte-level BPE with SmolLM2's pre-tokenizer (individual digits, then ByteLevel) trained on the bundled prose."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(ROOT / "calib_data" / "prose_en.txt"), str(ROOT / "calib_data" / "code.txt")], trainer)
    return tok


def build_tiny_llama(folder: Path, tools_template: bool = False, seed: int = 0) -> Path:
    """Write the hub-style folder; returns it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init, so greedy tokens are not all one id
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "chat_template": CHATML_TOOLS if tools_template else CHATML,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {k: tokenizer_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2))  # fmt: skip
    return folder
