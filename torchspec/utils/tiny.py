"""Tiny, locally built targets and tokenizers for tests, the quickstart and benchmarks.

Nothing here downloads anything: tokenizers are trained with `tokenizers` on text we pass in,
and models are random-initialised from transformers configs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

# Special tokens of every chat template we ship, so one tiny tokenizer serves them all.
SPECIAL_TOKENS = [
    "<unk>", "<pad>", "<s>", "</s>",
    # qwen / chatml
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>",
    # llama3
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    # kimi
    "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>", "<|im_end_kimi|>",
]

# A chatml-style template in the tokenizer itself, like Qwen's own tokenizers carry.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def default_corpus(max_chars: int = 2_000_000) -> list[str]:
    """Text that ships with Python: the standard library's own sources."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            t = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        total += len(t)
        if total >= max_chars:
            break
    return texts


def train_tokenizer(out_dir: str | os.PathLike, texts: Iterable[str] | None = None, vocab_size: int = 512,
                    chat_template: str | None = CHATML_TEMPLATE):
    """Train a byte-level BPE tokenizer on `texts`, save it as a HF tokenizer dir and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts) if texts is not None else default_corpus(300_000)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_target_config(arch: str = "qwen3", vocab_size: int = 512, hidden_size: int = 64,
                       num_hidden_layers: int = 4, num_attention_heads: int = 4,
                       num_key_value_heads: int = 2, head_dim: int | None = None,
                       intermediate_size: int = 128, max_position_embeddings: int = 2048, **kw):
    """A transformers config for a tiny Qwen3 or Llama target."""
    from transformers import LlamaConfig, Qwen3Config

    cls = {"qwen3": Qwen3Config, "llama": LlamaConfig}[arch]
    head_dim = head_dim or hidden_size // num_attention_heads
    return cls(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=2, eos_token_id=5, pad_token_id=1, **kw,
    )


def make_tiny_target(out_dir: str | os.PathLike, arch: str = "qwen3", seed: int = 0,
                     tokenizer=None, **config_kw):
    """Build a random tiny target (model + tokenizer) in `out_dir` and return (model, tokenizer).

    `tokenizer` may be an existing tokenizer (its vocab size is used); otherwise one is trained
    on a slice of the standard library's sources.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if tokenizer is None:
        tokenizer = train_tokenizer(out_dir, vocab_size=config_kw.pop("vocab_size", 512))
    else:
        tokenizer.save_pretrained(str(out_dir))
    config_kw["vocab_size"] = len(tokenizer)
    config = tiny_target_config(arch, **config_kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out_dir))
    return model, tokenizer


# Qwen-VL's vision tokens, added to a tiny tokenizer by make_tiny_vlm.
QWEN_VL_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def make_tiny_vlm(out_dir: str | os.PathLike, seed: int = 0, tokenizer=None, hidden_size: int = 64,
                  num_hidden_layers: int = 4, min_pixels: int = 4 * 28 * 28, max_pixels: int = 16 * 28 * 28):
    """A random tiny Qwen2-VL target in `out_dir`: model (vision tower of depth 1), tokenizer with Qwen-VL's
    vision tokens added, and a Qwen2-VL image processor (saved as preprocessor_config.json).
    Returns (model, tokenizer, image_processor). Images become 4..16 merged tokens with these pixel bounds."""
    import torch
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    try:
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor   # no torchvision needed
    except ImportError:  # older transformers: the slow processor is the PIL one
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        train_tokenizer(out_dir, vocab_size=512)
    else:
        tokenizer.save_pretrained(str(out_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))   # a private copy: the caller's is not changed
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_VL_TOKENS})
    start, pad, end, video = tokenizer.convert_tokens_to_ids(QWEN_VL_TOKENS)
    heads = 4
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=heads, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=2, eos_token_id=5, pad_token_id=1),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden_size, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=pad, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    processor = ImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    processor.save_pretrained(str(out_dir))
    return model, tokenizer, processor
