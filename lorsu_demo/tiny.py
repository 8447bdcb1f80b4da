"""Small models built in code: word-level tokenizers, processors and the `tiny-random` bundle.

The toy world recipe and the tests build on these; nothing here downloads anything.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]

# LLaVA-1.5's conversation format, as a Jinja chat template so that the tiny models and real
# LLaVA go through the same prompt code.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

BASE_WORDS = (
    "user assistant : . , ? ! ' \" - a an the this that is it in of on with photo picture image "
    "what which who there yes no not answer question respond short based option letter from "
    "given choices directly zoomed centered close up sign traffic drawing digit number "
    "0 1 2 3 4 5 6 7 8 9 a b c d e"
).split()


CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"-()/&+")


def build_word_tokenizer(
    words: list[str], model_max_length: int = 512, add_eos: bool = False, characters: bool = False
) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer; `<image>` is special so LLaVA's token expansion works.

    Every sequence starts with `<s>`; `add_eos=True` (for a CLIP text tower, which pools at the
    end token) also ends it with `</s>`. `characters=True` tokenizes letter by letter, so any
    label gets its own text (for random models that must tell unseen class names apart).
    """
    if characters:
        words = list(words) + CHARACTERS
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + [w.lower() for w in words]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if characters:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Whitespace(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
        )
    single = "<s> $A </s>" if add_eos else "<s> $A"
    backend.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=model_max_length,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


def build_image_processor(image_size: int) -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
    )


def build_llava_processor(tokenizer, image_size: int, patch_size: int) -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=build_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def tiny_configs(
    vocab_size: int,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 4,
    text_hidden: int = 32,
    text_layers: int = 2,
    llm_hidden: int = 32,
    llm_layers: int = 2,
    projection_dim: int = 16,
    image_token_index: int = 4,
    pad_token_id: int = 0,
    eos_token_id: int = 3,
    bos_token_id: int = 2,
    max_text_positions: int = 32,
) -> tuple[CLIPConfig, LlavaConfig]:
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
    )
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=4 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        max_position_embeddings=max_text_positions,
        projection_dim=projection_dim,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        hidden_act="quick_gelu",
    )
    clip = CLIPConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=projection_dim,
        logit_scale_init_value=4.6052,  # ln(100), OpenAI CLIP's trained value
    )
    llm = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=llm_hidden,
        intermediate_size=4 * llm_hidden,
        num_hidden_layers=llm_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=llm,
        image_token_index=image_token_index,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=pad_token_id,
    )
    return clip, llava


def build_tiny_random(seed: int = 0, words: list[str] | None = None, **config_overrides):
    """A tiny CLIP + LLaVA pair with one shared vision tower, random weights, seeded.

    Returns (clip, vlm, clip_tokenizer, processor).
    """
    vocabulary = BASE_WORDS + list(words or [])
    tokenizer = build_word_tokenizer(vocabulary)
    clip_tokenizer = build_word_tokenizer([], model_max_length=64, add_eos=True, characters=True)
    clip_config, llava_config = tiny_configs(
        vocab_size=max(len(tokenizer), len(clip_tokenizer)),
        max_text_positions=64,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **config_overrides,
    )
    torch.manual_seed(seed)
    vlm = LlavaForConditionalGeneration(llava_config).eval()
    clip = CLIPModel(clip_config).eval()
    clip.vision_model.load_state_dict(vlm.model.vision_tower.state_dict())
    vc = llava_config.vision_config
    processor = build_llava_processor(tokenizer, vc.image_size, vc.patch_size)
    return clip, vlm, clip_tokenizer, processor
