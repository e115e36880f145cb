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


# -- Qwen2.5-VL: the architecture vLLM runs on CPU here (tests_vllm/) and on a GPU (bench/gpu_check.py)
QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2.5-VL's own template, reduced to text and image parts.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen/Qwen2.5-VL-3B-Instruct's config.json, as published (token ids are set from the tokenizer).
QWEN25_VL_3B: dict = {
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
    "torch_dtype": "bfloat16",
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}
# The same architecture at toy size. vLLM's CPU attention wants a head size of 64 or more.
QWEN25_VL_TINY: dict = {
    **QWEN25_VL_3B,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 4096,
    "max_window_layers": 2,
    "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
    "sliding_window": 4096,
    "vocab_size": 1024,
    "torch_dtype": "float32",
    "vision_config": {
        **QWEN25_VL_3B["vision_config"],
        "depth": 2,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_heads": 2,
        "out_hidden_size": 128,
        "fullatt_block_indexes": [1],
    },
}


def qwen_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer (like Qwen's own) with Qwen's special tokens and exactly
    ``vocab_size`` ids: merges learnt from the test words and some JSON, then fillers " w<id>" so
    that every id a random model samples decodes. Byte-level tokens concatenate to the text, which
    structured outputs (xgrammar) need; a word-level tokenizer joins its words with spaces."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from facecap.stages.tag.vlm import EXTRAS, answer_schema

    # The tag stage's questionnaire too, so its 50 JSON keys are a few tokens each, not dozens.
    questionnaire = json.dumps({name: spec["enum"][0] for name, spec in answer_schema()["properties"].items()})
    corpus = [
        " ".join(WORDS),
        "user system assistant caption describe face image yes no unsure",
        '{"age": 31, "glasses": true, "hair": "brown"} {"smiling": false, "beard": null} [1, 2, 3]',
        " ".join(str(i) for i in range(100)),
        questionnaire,
        " ".join(v for values in EXTRAS.values() for v in values),
    ] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 900),
        special_tokens=QWEN_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"\u0120w{i}"] = i  # Ġ: byte-level's space
    tok = Tokenizer.from_str(json.dumps(data))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast, {t: tok.token_to_id(t) for t in QWEN_SPECIAL}


def qwen_vl(folder: Path, arch: dict | None = None, weights: bool = True, max_pixels: int = 12845056) -> Path:
    """A random Qwen2.5-VL of ``arch`` (default: QWEN25_VL_TINY) in ``folder``: config, tokenizer,
    image processor, chat template, and safetensors weights unless ``weights`` is False (then load
    it with vLLM's ``load_format="dummy"``, which draws random weights itself)."""
    import json

    arch = dict(arch or QWEN25_VL_TINY)
    folder.mkdir(parents=True, exist_ok=True)
    fast, vocab = qwen_tokenizer(arch["vocab_size"])
    ids = {
        "bos_token_id": vocab["<|endoftext|>"],
        "eos_token_id": vocab["<|im_end|>"],
        "vision_start_token_id": vocab["<|vision_start|>"],
        "vision_end_token_id": vocab["<|vision_end|>"],
        "vision_token_id": vocab["<|vision_pad|>"],
        "image_token_id": vocab["<|image_pad|>"],
        "video_token_id": vocab["<|video_pad|>"],
    }
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "use_cache": True,
        **arch,
        **ids,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"], "do_sample": True}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "min_pixels": 3136,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    fast.save_pretrained(folder)  # with chat_template.jinja, which the processor reads too
    if weights:
        import torch
        from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(folder))
        model.save_pretrained(folder)
    return folder
