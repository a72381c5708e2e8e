"""A tiny LLaMA-shaped model folder with a word-level tokenizer covering the shipped data.

Fast enough for CPU tests of the trainer, checkpoints and CLI, and real enough to go through the
same load / tokenizer / task code as SmolLM2.
"""

import json
import re

import jax
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import zo2_jax.models as zm
from zo2_jax.train import data as D


def make_tiny_model(folder, layers: int = 2, seed: int = 0) -> str:
    words = set()
    for name in ("sentiment_train.jsonl", "sentiment_eval.jsonl"):
        for line in open(D.shipped_path(name)):
            words.update(re.findall(r"\w+|[^\w\s]", json.loads(line)["text"]))
    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, "[BOS]": 3}
    for w in sorted(words | {"It", "was", "terrible", "great"}):
        vocab.setdefault(w, len(vocab))
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="[BOS] $A",
                                                       special_tokens=[("[BOS]", 3)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="[BOS]",
                                               eos_token="[EOS]", pad_token="[PAD]",
                                               unk_token="[UNK]")
    cfg = zm.DecoderConfig(model_type="llama", vocab_size=len(vocab), hidden_size=32,
                           num_layers=layers, num_heads=4, num_kv_heads=2, intermediate_size=64,
                           max_positions=128, norm="rmsnorm", norm_bias=False, positions="rope",
                           activation="silu", gated_mlp=True, qkv_bias=False, out_bias=False,
                           mlp_bias=False, tie_embeddings=True)
    model = zm.Model(cfg)
    params = model.init(jax.random.key(seed))
    zm.save_pretrained(model, params, str(folder), tokenizer=tok)
    return str(folder)
