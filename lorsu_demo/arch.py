"""The real architectures, written from their published configurations, built without weights.

This machine can never download LLaVA-1.5, so the full-scale path is checked another way: the
published configurations of `llava-hf/llava-1.5-7b-hf`, `llava-hf/llava-1.5-13b-hf` and
`openai/clip-vit-large-patch14-336` are written out here, and `build_bundle` assembles the same
`Bundle` that `model.load_pretrained` would, with one shared vision tower, either on the meta
device (shapes only: no memory, no weights) or on a GPU with random weights (timings).

The tokenizers are stand-ins (word-level, from `tiny.py`): the real ones come with the
checkpoints. They give sequences of about the real length, and `<image>` keeps the real id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from .model import DEFAULT_TEMPLATES, PRESETS, Bundle, _tie
from .tiny import (
    BASE_WORDS,
    IMAGE_TOKEN,
    LLAVA_CHAT_TEMPLATE,
    build_image_processor,
    build_llava_processor,
    build_word_tokenizer,
)

# openai/clip-vit-large-patch14-336, the vision side (also LLaVA-1.5's vision tower).
CLIP_L14_336_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
# ... and its text side. The ids are the checkpoint's (legacy: eos 2 makes the text tower pool
# at the highest token id, which is CLIP's end-of-text token).
CLIP_L14_336_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
CLIP_PROJECTION_DIM = 768
CLIP_LOGIT_SCALE = 100.0  # exp of the checkpoint's logit_scale (4.6052)

# The Llama (Vicuna-1.5) language models of LLaVA-1.5.
VICUNA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 32001,
}
VICUNA_13B = {
    **VICUNA_7B,
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
}
LLAVA_1_5 = {
    "image_token_index": 32000,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "projector_hidden_act": "gelu",
    "pad_token_id": 32001,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class Arch:
    name: str
    llm: dict
    vision: dict = field(default_factory=lambda: dict(CLIP_L14_336_VISION))
    text: dict = field(default_factory=lambda: dict(CLIP_L14_336_TEXT))
    llava: dict = field(default_factory=lambda: dict(LLAVA_1_5))

    @property
    def preset(self):
        """The `model.PRESETS` entry that loads the real weights of this architecture."""
        return PRESETS[self.name]


ARCHS: dict[str, Arch] = {
    "llava-1.5-7b": Arch("llava-1.5-7b", VICUNA_7B),
    "llava-1.5-13b": Arch("llava-1.5-13b", VICUNA_13B),
}


def get_arch(name: str | Arch) -> Arch:
    if isinstance(name, Arch):
        return name
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}: use one of {', '.join(ARCHS)}") from None


def clip_config(arch: str | Arch) -> CLIPConfig:
    arch = get_arch(arch)
    return CLIPConfig(
        text_config=CLIPTextConfig(**arch.text).to_dict(),
        vision_config=CLIPVisionConfig(**arch.vision).to_dict(),
        projection_dim=CLIP_PROJECTION_DIM,
        logit_scale_init_value=4.6052,
    )


def llava_config(arch: str | Arch) -> LlavaConfig:
    arch = get_arch(arch)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**arch.vision),
        text_config=LlamaConfig(**arch.llm),
        **arch.llava,
    )


def build_models(
    arch: str | Arch, device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16
) -> tuple[CLIPModel, LlavaForConditionalGeneration]:
    """CLIP and LLaVA sharing one vision tower. On "meta" nothing is allocated; on a real device
    the weights are random (transformers' initialisation), made directly in `dtype`."""
    device = torch.device(device)
    # On meta, SDPA's mask shortcut reads the padding mask's values (there are none): eager
    # attention does the same matrix products without that test.
    attention = "eager" if device.type == "meta" else None
    with torch.device(device):
        vlm = LlavaForConditionalGeneration._from_config(
            llava_config(arch), dtype=dtype, attn_implementation=attention
        )
        clip = CLIPModel._from_config(clip_config(arch), dtype=dtype, attn_implementation=attention)
    _tie(clip, vlm)
    return clip, vlm


def stand_in_llava_tokenizer(arch: str | Arch, words: list[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with LLaVA's special ids (`<image>` = 32000, pad = 32001)."""
    arch = get_arch(arch)
    llm, llava = arch.llm, arch.llava
    fixed = {
        "<unk>": 0,
        "<s>": llm["bos_token_id"],
        "</s>": llm["eos_token_id"],
        IMAGE_TOKEN: llava["image_token_index"],
        "<pad>": llava["pad_token_id"],
    }
    vocab = dict(fixed)
    for word in [*BASE_WORDS, *(w.lower() for w in words)]:
        vocab.setdefault(word.lower(), len(vocab) + 1)  # ids 3.. stay below 32000
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=llm["max_position_embeddings"],
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


def build_bundle(
    arch: str | Arch = "llava-1.5-7b",
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.bfloat16,
    words: list[str] = (),
) -> Bundle:
    """The bundle `load_bundle(arch)` would give, at the real sizes, without the checkpoints.

    `device="meta"`: shapes only (tests, FLOP counts). A GPU: random weights (timings); the
    caller applies `model._finish` or its own precision policy."""
    arch = get_arch(arch)
    clip, vlm = build_models(arch, device, dtype)
    for module in (clip, vlm):
        module.eval().requires_grad_(False)
    if clip.logit_scale.is_meta:
        # The one value the loss reads as a number: the checkpoint's temperature, on the CPU.
        clip.logit_scale = torch.nn.Parameter(
            torch.tensor(math.log(CLIP_LOGIT_SCALE)), requires_grad=False
        )
    tokenizer = stand_in_llava_tokenizer(arch, words)
    vision = arch.vision
    return Bundle(
        name=arch.name,
        vlm=vlm,
        processor=build_llava_processor(tokenizer, vision["image_size"], vision["patch_size"]),
        clip=clip,
        clip_tokenizer=build_word_tokenizer(
            [], model_max_length=arch.text["max_position_embeddings"], add_eos=True, characters=True
        ),
        clip_image_processor=build_image_processor(vision["image_size"]),
        device=torch.device(device),
        dtype=dtype,
        caption_templates=list(DEFAULT_TEMPLATES),
        source={
            "model": arch.name,
            "arch": arch.name,
            "weights": "random" if device != "meta" else None,
        },
    )


def parameter_counts(bundle: Bundle) -> dict[str, int]:
    """Parameters per part (numel works on the meta device)."""

    def count(module):
        return sum(p.numel() for p in module.parameters())

    model = bundle.vlm.model
    return {
        "vision_encoder": count(bundle.vision),
        "clip_visual_projection": count(bundle.clip.visual_projection),
        "projector": count(model.multi_modal_projector),
        "language_model": count(model.language_model) + count(bundle.vlm.lm_head),
        "vlm": count(bundle.vlm),
        "clip_text_side": count(bundle.clip.text_model) + count(bundle.clip.text_projection),
    }


# ---- memory modes ---------------------------------------------------------------------------

MEMORY_MODES = {
    "bf16": "LLM and projector in bf16, vision tower in fp32 (about 15.5 GB of weights at 7B)",
    "4bit": "LLM linear layers in 4-bit NF4 (bitsandbytes), the rest as bf16 (about 5 GB at 7B)",
}


def quantize_llm_4bit(bundle: Bundle, device: str | torch.device = "cuda") -> Bundle:
    """Put the LLM's linear layers in 4-bit NF4 (bitsandbytes) on `device`, layer by layer, so a
    bf16 model loaded on the CPU never needs its full size in GPU memory. The vision tower, the
    projector, the embeddings and the LM head keep their precision: the encoder trains, and the
    answer loss back-propagates through the 4-bit layers to it (as QLoRA does).

    Needs a CUDA GPU and `pip install bitsandbytes`."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise RuntimeError(
            "4-bit mode needs bitsandbytes: pip install bitsandbytes (CUDA GPUs only)"
        ) from err
    device = torch.device(device)
    language_model = bundle.vlm.model.language_model
    linears = [
        (name, module)
        for name, module in language_model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    for name, linear in linears:
        parent = language_model.get_submodule(name.rpartition(".")[0])
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.bfloat16,
            quant_type="nf4",
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, quant_type="nf4", module=quantized
        ).to(device)
        if linear.bias is not None:
            quantized.bias = torch.nn.Parameter(linear.bias.data.to(device), requires_grad=False)
        setattr(parent, name.rpartition(".")[2], quantized)
        del linear
    # Everything else (vision tower, projector, embeddings, norms, LM head) moves as it is.
    for module in (bundle.vlm, bundle.clip):
        for sub in module.modules():
            if isinstance(sub, bnb.nn.Linear4bit):
                continue
            for key, param in list(sub._parameters.items()):
                if param is not None and param.device != device:
                    sub._parameters[key] = torch.nn.Parameter(
                        param.data.to(device), requires_grad=False
                    )
            for key, buffer in list(sub._buffers.items()):
                if buffer is not None and buffer.device != device:
                    sub._buffers[key] = buffer.to(device)
    bundle.device = device
    bundle.source["memory"] = "4bit"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 encoder's products
        torch.backends.cudnn.allow_tf32 = True
    return bundle


def load_bundle_4bit(model: str, clip: str | None = None, device: str = "cuda") -> Bundle:
    """A real checkpoint in the 4-bit memory mode: loaded in bf16 on the CPU (about 14 GB of
    RAM at 7B), then quantized onto the GPU one linear layer at a time."""
    from .model import load_bundle

    return quantize_llm_4bit(load_bundle(model, device="cpu", dtype="bf16", clip=clip), device)
