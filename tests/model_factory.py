"""Small real transformers model families for engine tests (no zoo, no training).

A "family" is a random base plus fine-tunes made by adding small, partly sparse
perturbations: homologous models whose task vectors look like real ones enough
for the merge arithmetic, built in well under a second.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          MixtralConfig, Phi3Config, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

CHARS = list("0123456789+-*= abcdefghijklmnopqrstuvwxyz?.\n")


def make_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(CHARS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=256)
    fast.save_pretrained(out)
    return fast


def _config(arch: str, layers: int, vocab: int):
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=128, **common)
    attn = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "mistral":
        return MistralConfig(tie_word_embeddings=False, **attn)
    if arch == "qwen3":
        return Qwen3Config(head_dim=8, tie_word_embeddings=False, **attn)
    if arch == "gemma2":  # ties the head to the embeddings, as Gemma does
        return Gemma2Config(head_dim=8, **attn)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(original_max_position_embeddings=128, tie_word_embeddings=False, **attn)
    if arch == "gpt_neox":  # its head is embed_out, its embeddings embed_in
        return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             max_position_embeddings=128, tie_word_embeddings=False, **common)
    if arch == "mixtral":  # mixture of experts: 4 experts, 2 per token, a router per layer
        return MixtralConfig(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False, **attn)
    raise ValueError(arch)


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox", "mixtral")


def make_family(root: Path, arch: str = "llama", n_models: int = 3, layers: int = 4, seed: int = 0,
                scale: float = 0.02) -> tuple[Path, list[Path]]:
    """Save a base and ``n_models`` fine-tunes under ``root``; return their directories."""
    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    base_dir = root / "base"
    tok = make_tokenizer(base_dir)
    base = AutoModelForCausalLM.from_config(_config(arch, layers, len(tok)))
    base.save_pretrained(base_dir)
    out = []
    for i in range(n_models):
        d = root / f"ft{i}"
        model = AutoModelForCausalLM.from_config(_config(arch, layers, len(tok)))
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                noise = torch.randn_like(p) * scale
                keep = (torch.rand_like(p) < 0.5).float()  # sparse-ish, partly conflicting task vectors
                p.add_(noise * keep)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out.append(d)
    return base_dir, out


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def read_index(model_dir: Path) -> dict:
    return json.loads((model_dir / "model.safetensors.index.json").read_text())
