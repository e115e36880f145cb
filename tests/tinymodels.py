"""Tiny, randomly initialised language and vision-language models built offline for the tests.

A real tokenizer (a word-level `tokenizers` model with special tokens and a chat template), a
Llama causal LM and a LLaVA model (CLIP vision tower + Llama), saved with save_pretrained and
loaded back through the same Auto classes a real model uses. Their output is word salad.
"""

from __future__ import annotations

from pathlib import Path

WORDS = [
    "a",
    "the",
    "person",
    "man",
    "woman",
    "face",
    "with",
    "has",
    "have",
    "is",
    "are",
    "wearing",
    "hair",
    "eyes",
    "smiling",
    "young",
    "older",
    "photo",
    "of",
    "and",
    "brown",
    "black",
    "blond",
    "gray",
    "glasses",
    "hat",
    "beard",
    "this",
    "their",
    "her",
    "his",
    "short",
    "long",
    "wavy",
    "straight",
    "nose",
    "lips",
    "cheeks",
    "looks",
    "calm",
    "happy",
    "camera",
    "at",
    "straight",
    "open",
    "mouth",
    "eyebrows",
    "arched",
    "high",
    "cheekbones",
    "clean",
    "shaven",
    "she",
    "he",
    "they",
]
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} "
    "{% endif %}{% endfor %}{% endif %} </s> {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = list(dict.fromkeys([*SPECIAL, *WORDS, ".", ",", "!", "?", ":", "'"]))  # ids must be contiguous
    vocab = {w: i for i, w in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast, vocab


def text_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )


def tiny_llm(folder: Path) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    fast, vocab = tokenizer()
    LlamaForCausalLM(text_config(len(vocab))).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def tiny_vlm(folder: Path) -> Path:
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(0)
    fast, vocab = tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config(len(vocab)),
        image_token_id=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=fast,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(folder)
    return folder
