"""The model bundle: one LLaVA-family VLM plus the CLIP text side, sharing one vision encoder.

An update made through the CLIP loss is therefore the update the VLM sees. The bundle is loaded
once per process and shared; users' adaptations are applied to it as deltas (see `delta.py`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
BUNDLE_FILE = "bundle.json"
DEFAULT_TEMPLATES = ["a photo of a {label}."]
OFFLINE_PRESET = "toy"
TEXT_CACHE_SIZE = 256


class BundleError(RuntimeError):
    """A model that cannot be loaded; the message says what to do instead."""


@dataclass(frozen=True)
class Preset:
    name: str
    vlm: str
    clip: str
    description: str
    caption_templates: tuple[str, ...] = tuple(DEFAULT_TEMPLATES)
    control: str | None = None
    defaults: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "llava-1.5-7b": Preset(
        "llava-1.5-7b",
        vlm="llava-hf/llava-1.5-7b-hf",
        clip="openai/clip-vit-large-patch14-336",
        description="LLaVA-1.5 7B with CLIP ViT-L/14-336 (GPU, about 15 GB in bf16)",
    ),
    "llava-1.5-13b": Preset(
        "llava-1.5-13b",
        vlm="llava-hf/llava-1.5-13b-hf",
        clip="openai/clip-vit-large-patch14-336",
        description="LLaVA-1.5 13B with CLIP ViT-L/14-336 (GPU, about 27 GB in bf16)",
    ),
}


def encoder_layers(vision: nn.Module) -> nn.ModuleList:
    """The transformer layers of a CLIP vision encoder, whichever way transformers nests them."""
    for path in (
        "encoder.layers",
        "vision_model.encoder.layers",
        "model.vision_tower.encoder.layers",
    ):
        module = vision
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise TypeError(f"no encoder layers found in {type(vision).__name__}")


def _capture_hook(hook) -> bool:
    """One of the hooks transformers 5 puts on every layer the first time a model is asked for
    its hidden states (LLaVA's features, every chat): they record only inside such a call."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


def _plain_module(module: nn.Module) -> bool:
    """torch, transformers or peft's own code (no method's module), with no hooks on it but
    transformers' own output capturing."""
    origin = type(module).__module__
    hooks = [h for h in module._forward_hooks.values() if not _capture_hook(h)]
    return origin.startswith(("torch.", "transformers.", "peft.")) and not (
        hooks or module._forward_pre_hooks
    )


# Rows the last layer keeps in `class_token_pooled`: the class token and the next three. The
# CPU's matrix products of 1-3 rows take other kernels that round differently; from 4 rows on,
# row 0 comes out bit-identical to the whole layer's.
QUERY_ROWS = 4


def attn_without_projection(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """CLIPAttention's forward (SDPA) up to, not including, `out_proj`."""
    batch, tokens, _ = hidden.shape
    shape = (batch, tokens, -1, attn.head_dim)
    query = attn.q_proj(hidden).view(shape).transpose(1, 2)
    keys = attn.k_proj(hidden).view(shape).transpose(1, 2)
    values = attn.v_proj(hidden).view(shape).transpose(1, 2)
    out = nn.functional.scaled_dot_product_attention(query, keys, values, scale=attn.scale)
    return out.transpose(1, 2).reshape(batch, tokens, -1)


def class_token_pooled(vision: nn.Module, pixels: torch.Tensor) -> torch.Tensor | None:
    """CLIP's `pooler_output` without gradients (evaluations), running the last layer's output
    projection and MLP for the first `QUERY_ROWS` tokens only; None where that does not apply.

    The pooled output is the class token after the last layer, and after the attention no
    token's row mixes with another's: the other rows' output projection and MLP there are never
    read. On the toy (4 layers, 17 tokens) that skips 13/17 of those three products in the last
    layer, about an eighth of an evaluation's FLOPs; on the development CPU the features are
    bit-identical to the whole forward's (tests/test_core_speed.py). Only without gradients (a
    training step's backward would sum its weight gradients over fewer rows, in another
    order), on a plain CLIP tower with SDPA attention and no hooks or method modules (DAC's
    experts, KeepLoRA's input hooks: they see the whole layer as before)."""
    if (
        torch.is_grad_enabled()
        or torch.nn.modules.module._global_forward_hooks
        or torch.nn.modules.module._global_forward_pre_hooks
        or getattr(vision.config, "_attn_implementation", None) != "sdpa"
        or not all(hasattr(vision, a) for a in ("embeddings", "pre_layrnorm", "post_layernorm"))
        or not _plain_module(vision)
        or not _plain_module(getattr(vision, "encoder", vision))
    ):
        return None
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not layers:
        return None
    last = layers[-1]
    attn = getattr(last, "self_attn", None)
    if attn is None or not all(_plain_module(m) for m in last.modules()):
        return None
    if attn.training and attn.dropout:
        return None
    hidden = vision.pre_layrnorm(vision.embeddings(pixels))
    for layer in layers[:-1]:
        hidden = layer(hidden, None)
    rows = min(QUERY_ROWS, hidden.shape[1])
    # The attention itself for every token, as transformers runs it (SDPA with fewer queries
    # rounds otherwise for some head sizes); the output projection and MLP for the kept rows.
    out = attn_without_projection(attn, last.layer_norm1(hidden))
    kept = hidden[:, :rows] + attn.out_proj(out[:, :rows].contiguous())
    kept = kept + last.mlp(last.layer_norm2(kept))
    return vision.post_layernorm(kept[:, 0])


def encode_images(
    vision: nn.Module,
    projection: nn.Module,
    pixel_values: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """CLIP's normalised image embeddings (the vision tower's pooled output, projected)."""
    pixels = pixel_values.to(device, dtype)
    pooled = class_token_pooled(vision, pixels) if device.type == "cpu" else None
    if pooled is None:
        pooled = vision(pixel_values=pixels).pooler_output
    return nn.functional.normalize(projection(pooled).float(), dim=-1)


def layers_read(feature_layer, num_layers: int) -> int:
    """How many of `num_layers` encoder layers LLaVA's `vision_feature_layer` reads."""
    if isinstance(feature_layer, (list, tuple)):
        feature_layer = max(feature_layer, key=lambda i: i % (num_layers + 1))
    # hidden_states has num_layers + 1 entries (the embeddings first).
    return feature_layer % (num_layers + 1)


@dataclass
class Bundle:
    name: str
    vlm: nn.Module  # LlavaForConditionalGeneration
    processor: object  # LlavaProcessor
    clip: nn.Module  # CLIPModel whose vision_model IS the VLM's vision tower
    clip_tokenizer: object
    clip_image_processor: object
    device: torch.device
    dtype: torch.dtype
    caption_templates: list[str]
    control_dir: Path | None = None
    defaults: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    # One lane: deltas are applied to the shared weights for the duration of a call. A plain
    # Lock (not an RLock) because a session generator may be resumed on another thread; take
    # it only at entry points (sessions, chat, export), never inside the library.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The class names a small word-level model was trained on (bundle.json "labels"), for the
    # message that refuses a word it does not know; empty for models that take any text.
    labels: list[str] = field(default_factory=list)
    # text_features' results by list of texts (see there)
    text_cache: dict = field(default_factory=dict, repr=False)
    # Accuracies of the untouched model per test set and reader (evaluate.base_accuracy).
    base_cache: dict = field(default_factory=dict, repr=False)

    @property
    def vision(self) -> nn.Module:
        return self.clip.vision_model

    @property
    def layers(self) -> nn.ModuleList:
        return encoder_layers(self.vision)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def encoder_parameters(self) -> int:
        return sum(p.numel() for p in self.vision.parameters())

    @property
    def num_heads(self) -> int:
        return self.layers[0].self_attn.num_heads

    @property
    def head_dim(self) -> int:
        return self.layers[0].self_attn.head_dim

    @property
    def image_size(self) -> int:
        return self.vision.config.image_size

    @property
    def layers_read_by_vlm(self) -> int:
        """How many encoder layers can change the VLM's answer (LLaVA reads layer -2's output)."""
        return layers_read(self.vlm.config.vision_feature_layer, self.num_layers)

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().float().exp())

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return encode_images(
            self.vision, self.clip.visual_projection, pixel_values, self.device, self.dtype
        )

    def plain_encoder(self) -> bool:
        """Whether the encoder and projection hold only torch, transformers or peft modules
        with no hooks: no method's module keeps state between calls (DAC's router sets its
        gates in a hook for the batch that follows), so calls may run side by side."""
        modules = [*self.vision.modules(), *self.clip.visual_projection.modules()]
        return all(_plain_module(m) for m in modules)

    def frozen_copy(self) -> Bundle | None:
        """The bundle as it is now, on a copy that later training leaves alone: its readings
        are bit-identical to the model's now (the same modules, weights and kernels). A session
        measures its live points on such a copy in another thread while it trains on (a few MB
        and about 20 ms on the toy). None where a copy would not compute what the model does:
        a method's own modules or hooks (DAC's experts, KeepLoRA's input hooks), which a copy
        would share with the model being trained."""
        if not self.plain_encoder():
            return None
        grads = [(p, p.grad) for p in self.vision_state().values()]
        for param, _ in grads:  # the copy needs no gradients: do not copy them
            param.grad = None
        try:
            copied = deepcopy(self, {id(self.lock): threading.Lock()})
        finally:
            for param, grad in grads:
                param.grad = grad
        copied.clip.requires_grad_(False).eval()
        copied.vlm.requires_grad_(False)
        return copied

    def unknown_words(self, labels: list[str]) -> list[str]:
        """The words of `labels` that the CLIP text side, which a session trains against, cannot
        spell: they become its unknown token, so every such class would read the same. Where the
        bundle lists its class names (a small word-level model), any other word is unknown too:
        its tokenizer also spells numerals and prompt words that were never a caption's label,
        and a class named "8" would train towards a text, and a chat answer, that mean nothing."""
        known = {name.lower() for name in self.labels}
        unk = getattr(self.clip_tokenizer, "unk_token_id", None)

        def is_unknown(word: str) -> bool:
            if known:
                return word.lower() not in known
            ids = self.clip_tokenizer(word, add_special_tokens=False).input_ids
            return unk is not None and unk in ids

        words = (word for label in labels for word in label.split())
        return list(dict.fromkeys(word for word in words if is_unknown(word)))

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Normalised CLIP text embeddings. Kept per list of texts: sessions never change the
        text side (deltas cover `vision_state` only), and every evaluation asks for the same
        captions again (on the toy, tokenizing them was a tenth of a session)."""
        key = tuple(texts)
        cached = self.text_cache.get(key)
        if cached is not None:
            return cached.clone()
        tokens = self.clip_tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(
            self.device
        )
        pooled = self.clip.text_model(**tokens).pooler_output
        features = nn.functional.normalize(self.clip.text_projection(pooled).float(), dim=-1)
        if len(self.text_cache) >= TEXT_CACHE_SIZE:  # drop the oldest
            self.text_cache.pop(next(iter(self.text_cache)))
        self.text_cache[key] = features
        return features.clone()

    def vision_state(self) -> dict[str, torch.Tensor]:
        """The parameters a session may change: the shared encoder and the CLIP visual projection."""
        state = {f"vision.{k}": v for k, v in self.vision.named_parameters()}
        state.update(
            {f"projection.{k}": v for k, v in self.clip.visual_projection.named_parameters()}
        )
        return state

    def parameter(self, name: str) -> torch.Tensor:
        return self.vision_state()[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype_for(device: torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


# Largest relative difference (norm of the difference over the norm) tolerated between a
# CLIP's encoder weights and the LLaVA's tower: the two checkpoints may be stored in different
# precisions (LLaVA's in fp16, CLIP's in fp32), which differ by rounding, about 1e-3 in bf16;
# another CLIP (another size, another training) differs by far more than 1e-2.
TOWER_TOLERANCE = 1e-2


def _tie(clip: nn.Module, vlm: nn.Module) -> None:
    """Make the CLIP model use the VLM's vision tower: one copy of the encoder weights."""
    tower = vlm.model.vision_tower
    if type(tower) is not type(clip.vision_model):
        raise BundleError(
            f"the VLM's vision tower ({type(tower).__name__}) is not a "
            f"{type(clip.vision_model).__name__}; the CLIP checkpoint does not fit this VLM"
        )
    clip.vision_model = tower


def check_same_tower(clip: nn.Module, vlm: nn.Module, clip_ref: str | None = None) -> None:
    """Refuse a CLIP whose own vision encoder is not the VLM's tower (before `_tie` drops the
    CLIP's copy): what the CLIP loss teaches must be what the VLM sees."""
    tower = vlm.model.vision_tower
    where = f"The CLIP checkpoint {clip_ref}" if clip_ref else "The CLIP checkpoint"
    fix = (
        "Pass --clip (or LORSU_CLIP) with the CLIP whose vision encoder this LLaVA was built "
        "on (openai/clip-vit-large-patch14-336 for LLaVA-1.5)."
    )
    own, theirs = clip.vision_model.state_dict(), tower.state_dict()
    if own.keys() != theirs.keys():
        raise BundleError(f"{where} has another encoder layout than the VLM's tower. {fix}")
    for name, weight in own.items():
        other = theirs[name]
        if weight.shape != other.shape:
            raise BundleError(
                f"{where} is not this VLM's vision encoder: {name} is "
                f"{tuple(weight.shape)} there and {tuple(other.shape)} in the VLM. {fix}"
            )
        if weight.is_meta or other.is_meta or not weight.is_floating_point():
            continue
        scale = max(float(other.float().norm()), 1e-12)
        change = float((weight.float() - other.float()).norm())
        if change > TOWER_TOLERANCE * scale:
            raise BundleError(
                f"{where} is not this VLM's vision encoder: its weights differ from the VLM's "
                f"tower ({name}: relative difference {change / scale:.3g}). {fix}"
            )


def _is_hub_id(ref: str) -> bool:
    return not Path(ref).exists() and ref.count("/") == 1 and not ref.startswith((".", "/"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, instead of the hub client's minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached(ref: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(ref, "config.json"), str)


def _from_pretrained(loader, ref: str, **kwargs):
    if _is_hub_id(ref) and not _cached(ref) and not _hub_reachable():
        raise BundleError(
            f"Cannot download '{ref}': the Hugging Face Hub is not reachable from here. "
            f"Use --model {OFFLINE_PRESET} (the offline default) or a local directory "
            "that holds the checkpoint."
        )
    try:
        return loader.from_pretrained(ref, **kwargs)
    except OSError as err:
        if _is_hub_id(ref):
            raise BundleError(
                f"Cannot download '{ref}': the Hugging Face Hub is not reachable from here. "
                f"Use --model {OFFLINE_PRESET} (the offline default) or a local directory "
                "that holds the checkpoint."
            ) from err
        raise BundleError(f"Cannot load a model from '{ref}': {err}") from err


def load_pretrained(
    vlm_ref: str,
    clip_ref: str,
    *,
    name: str,
    device: torch.device | str | None = None,
    dtype: str | torch.dtype | None = None,
    caption_templates: list[str] | None = None,
    control_dir: Path | None = None,
    defaults: dict | None = None,
) -> Bundle:
    from transformers import (
        AutoImageProcessor,
        AutoProcessor,
        AutoTokenizer,
        CLIPModel,
        LlavaForConditionalGeneration,
    )

    device = torch.device(device) if device is not None else default_device()
    torch_dtype = _dtype_for(device, dtype)
    vlm = _from_pretrained(LlavaForConditionalGeneration, vlm_ref, dtype=torch_dtype)
    processor = _from_pretrained(AutoProcessor, vlm_ref)
    clip = _from_pretrained(CLIPModel, clip_ref, dtype=torch_dtype)
    clip_tokenizer = _from_pretrained(AutoTokenizer, clip_ref)
    clip_image_processor = _from_pretrained(AutoImageProcessor, clip_ref)
    check_same_tower(clip, vlm, clip_ref)
    _tie(clip, vlm)
    return _finish(
        Bundle(
            name=name,
            vlm=vlm,
            processor=processor,
            clip=clip,
            clip_tokenizer=clip_tokenizer,
            clip_image_processor=clip_image_processor,
            device=device,
            dtype=torch_dtype,
            caption_templates=list(caption_templates or DEFAULT_TEMPLATES),
            control_dir=control_dir,
            defaults=dict(defaults or {}),
            source={"model": name, "vlm": vlm_ref, "clip": clip_ref},
        )
    )


def _finish(bundle: Bundle) -> Bundle:
    for module in (bundle.vlm, bundle.clip):
        module.to(bundle.device, bundle.dtype).eval().requires_grad_(False)
    # The pretrained temperature is part of the loss definition, never trained.
    bundle.clip.logit_scale.data = bundle.clip.logit_scale.data.float()
    if bundle.dtype in (torch.bfloat16, torch.float16):
        keep_encoder_fp32(bundle)
    limit_cpu_threads(bundle)
    return bundle


# Encoders below this many parameters (the toy's and tiny-random's) run on one CPU thread.
SMALL_ENCODER = 50_000_000


def limit_cpu_threads(bundle: Bundle) -> None:
    """One intra-op thread for a small model on the CPU, unless LORSU_THREADS or
    OMP_NUM_THREADS says otherwise. Its matrices (128 wide on the toy) are too small to split
    across cores, and threads that wait for each other spin: on a shared 2-core machine a toy
    session spent 79 s of CPU on two threads and 12 s on one (docs/benchmarks.md). One thread
    also leaves a core to the web server and the other users of the app."""
    if bundle.device.type != "cpu":
        return
    keep_freed_cpu_memory()
    if os.environ.get("LORSU_THREADS", "").isdigit():
        torch.set_num_threads(max(1, int(os.environ["LORSU_THREADS"])))
    elif not os.environ.get("OMP_NUM_THREADS"):
        if bundle.encoder_parameters < SMALL_ENCODER:
            torch.set_num_threads(1)


# glibc's malloc: blocks up to this size come from the heap, and this much free memory at its
# top is kept rather than handed back to the system.
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 256 << 20
_MALLOC_TUNED: list[bool] = []


def keep_freed_cpu_memory() -> bool:
    """Let glibc's malloc reuse freed memory instead of returning it to the system at once.

    A toy step's activations are tensors of 0.1-2 MB, allocated and freed on every step. By
    default glibc serves the larger ones with a fresh mmap and gives them back on free (and
    trims the heap above 128 KB of free space), so every step faults the pages in again: a
    toy session took 20,000-80,000 page faults, and on the development VM writing a 2.2 MB
    tensor into a fresh block took about a millisecond more than into a reused one. With these
    settings a process's second and later sessions take none. The arithmetic is unchanged
    (only where memory comes from). Once per process, on glibc only (LORSU_NO_MALLOPT=1 turns
    it off); returns whether the settings were applied."""
    if _MALLOC_TUNED:
        return _MALLOC_TUNED[0]
    applied = False
    if sys.platform.startswith("linux") and not os.environ.get("LORSU_NO_MALLOPT"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            # mallopt(M_TRIM_THRESHOLD = -1, ...), mallopt(M_MMAP_THRESHOLD = -3, ...)
            applied = bool(libc.mallopt(-1, MALLOC_TRIM_THRESHOLD)) and bool(
                libc.mallopt(-3, MALLOC_MMAP_THRESHOLD)
            )
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            applied = False
    _MALLOC_TUNED.append(applied)
    return applied


def keep_encoder_fp32(bundle: Bundle) -> None:
    """Sessions move encoder weights by steps of about lr = 1e-5, which round away in 16-bit
    weights: the shared vision tower and CLIP's visual projection (0.3 B parameters at
    LLaVA-1.5 scale) stay in fp32 while the LLM and projector run in 16 bits. The projector
    is handed its own dtype; fp32 matrix products use TF32 tensor cores on GPUs."""
    bundle.vision.float()
    bundle.clip.visual_projection.float()
    projector = bundle.vlm.model.multi_modal_projector
    dtype = projector.linear_1.weight.dtype
    projector.register_forward_pre_hook(lambda module, args: tuple(a.to(dtype) for a in args))
    if bundle.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_tiny_random(
    seed: int = 0, device: str | None = "cpu", words: list[str] | None = None, **config
) -> Bundle:
    from .tiny import build_image_processor
    from .tiny import build_tiny_random as build

    clip, vlm, clip_tokenizer, processor = build(seed=seed, words=words, **config)
    _tie(clip, vlm)
    device = torch.device(device or "cpu")
    return _finish(
        Bundle(
            name="tiny-random",
            vlm=vlm,
            processor=processor,
            clip=clip,
            clip_tokenizer=clip_tokenizer,
            clip_image_processor=build_image_processor(vlm.config.vision_config.image_size),
            device=device,
            dtype=torch.float32,
            caption_templates=list(DEFAULT_TEMPLATES),
            defaults={"lr": 1e-3},
            source={"model": "tiny-random", "seed": seed, "words": list(words or []), **config},
        )
    )


def read_bundle_manifest(directory: Path) -> dict:
    manifest_path = directory / BUNDLE_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"{manifest_path} is missing or not valid JSON: {err}") from err
    if manifest.get("format") != "lorsu-demo-bundle":
        raise BundleError(f"{manifest_path} is not a lorsu-demo bundle manifest")
    return manifest


@dataclass
class ModelInfo:
    """What a page shows of a bundle folder before its weights are loaded: `Bundle`'s
    attributes of the same names, read from bundle.json and the two config.json files (a few
    milliseconds, where loading the weights first imports most of transformers)."""

    name: str
    device: torch.device
    num_layers: int
    num_heads: int
    image_size: int
    layers_read_by_vlm: int
    labels: list[str]
    defaults: dict
    control_dir: Path | None
    encoder_parameters: int  # the encoder layers' weight matrices (the bulk of the count)


def bundle_folder(model: str) -> Path:
    """Where `model` names a bundle: a folder under assets/ (`toy`), else the path itself."""
    return ASSETS_DIR / model if (ASSETS_DIR / model / BUNDLE_FILE).exists() else Path(model)


def bundle_device(model: str, device):
    """The device a bundle loads on: the one asked for, the CPU for the offline toy, else
    None (`load_pretrained` then picks `default_device()`)."""
    return device or ("cpu" if model == OFFLINE_PRESET else None)


def bundle_info(
    model: str = OFFLINE_PRESET, *, device=None, clip: str | None = None
) -> ModelInfo | None:
    """`model`'s `ModelInfo` when it is a bundle folder that `load_bundle` would load as it
    is (no other CLIP, no 4-bit LLM), else None: anything else is loaded before it is shown."""
    if clip or os.environ.get("LORSU_CLIP") or os.environ.get("LORSU_MEMORY") == "4bit":
        return None
    if model in PRESETS or model == "tiny-random":
        return None
    directory = bundle_folder(model)
    try:
        manifest = read_bundle_manifest(directory)
        vision = json.loads((directory / manifest["clip"] / "config.json").read_text())
        vision = vision["vision_config"]
        vlm = json.loads((directory / manifest["vlm"] / "config.json").read_text())
        num_layers = int(vision["num_hidden_layers"])
        width, mlp = int(vision["hidden_size"]), int(vision["intermediate_size"])
        control = manifest.get("control")
        return ModelInfo(
            name=manifest.get("name", directory.name),
            device=torch.device(bundle_device(model, device) or default_device()),
            num_layers=num_layers,
            num_heads=int(vision["num_attention_heads"]),
            image_size=int(vision["image_size"]),
            layers_read_by_vlm=layers_read(vlm["vision_feature_layer"], num_layers),
            labels=list(manifest.get("labels", [])),
            defaults=dict(manifest.get("defaults", {})),
            control_dir=(directory / control).resolve() if control else None,
            encoder_parameters=num_layers * (4 * width * width + 2 * width * mlp),
        )
    except (BundleError, OSError, KeyError, TypeError, ValueError):
        return None


def load_bundle(
    model: str = OFFLINE_PRESET,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    clip: str | None = None,
    seed: int = 0,
    memory: str | None = None,
) -> Bundle:
    """Load a preset name, a bundle directory (with bundle.json) or a LLaVA checkpoint directory.

    `memory="4bit"` (or LORSU_MEMORY=4bit) quantizes the LLM with bitsandbytes for 16-24 GB
    GPUs; the encoder stays in fp32 either way. `clip` (or LORSU_CLIP) names the CLIP
    checkpoint, a hub id or a local folder, for a LLaVA folder or in place of a preset's."""
    memory = memory or os.environ.get("LORSU_MEMORY", "bf16")
    clip = clip or os.environ.get("LORSU_CLIP") or None
    if memory == "4bit" and model != "tiny-random":
        from .arch import quantize_llm_4bit

        bundle = _load_bundle(model, device="cpu", dtype="bf16", clip=clip)
        bundle.source["model"] = model
        return quantize_llm_4bit(bundle, str(device or "cuda"))
    if memory not in ("bf16", "4bit"):
        raise BundleError(f"Unknown memory mode {memory!r}: use bf16 or 4bit.")
    if model == "tiny-random":
        return build_tiny_random(seed=seed, device=str(device) if device else "cpu")
    bundle = _load_bundle(model, device=device, dtype=dtype, clip=clip)
    bundle.source["model"] = model
    return bundle


def _load_bundle(model: str, *, device, dtype, clip) -> Bundle:
    if model in PRESETS:
        preset = PRESETS[model]
        return load_pretrained(
            preset.vlm,
            clip or preset.clip,
            name=preset.name,
            device=device,
            dtype=dtype,
            caption_templates=list(preset.caption_templates),
            defaults=preset.defaults,
        )
    directory = bundle_folder(model)
    if (directory / BUNDLE_FILE).exists():
        manifest = read_bundle_manifest(directory)
        control = manifest.get("control")
        bundle = load_pretrained(
            str(directory / manifest["vlm"]),
            clip or str(directory / manifest["clip"]),
            name=manifest.get("name", directory.name),
            device=bundle_device(model, device),
            dtype=dtype,
            caption_templates=manifest.get("caption_templates"),
            control_dir=(directory / control).resolve() if control else None,
            defaults=manifest.get("defaults", {}),
        )
        bundle.labels = list(manifest.get("labels", []))
        return bundle
    if directory.is_dir() and (directory / "config.json").exists():
        if clip is None:
            raise BundleError(
                f"{directory} holds a VLM but no CLIP text side: pass --clip (or LORSU_CLIP) "
                "with the CLIP checkpoint whose vision tower it uses, a local folder or a hub "
                "id (e.g. openai/clip-vit-large-patch14-336)"
            )
        return load_pretrained(
            str(directory), clip, name=directory.name, device=device, dtype=dtype
        )
    if model == OFFLINE_PRESET:
        raise BundleError(
            f"The offline model is missing from {ASSETS_DIR / OFFLINE_PRESET}; "
            "rebuild it with `python -m lorsu_demo.toyworld.train --out assets`."
        )
    known = ", ".join([OFFLINE_PRESET, "tiny-random", *PRESETS])
    raise BundleError(f"Unknown model '{model}': use one of {known}, or a local directory.")


def model_choices() -> list[str]:
    return [OFFLINE_PRESET, "tiny-random", *PRESETS]


def env_model(default: str = OFFLINE_PRESET) -> str:
    """LORSU_MODEL if set; real LLaVA-1.5-7B on a Hugging Face Space with a GPU; else `toy`."""
    if os.environ.get("LORSU_MODEL"):
        return os.environ["LORSU_MODEL"]
    if os.environ.get("SPACE_ID") and torch.cuda.is_available():
        return "llava-1.5-7b"
    return default


def save_bundle(bundle: Bundle, out: Path, *, name: str, description: str) -> Path:
    """Write the bundle as it is now: the VLM at the top (plain transformers loads it), the
    CLIP side in `clip/`, and a bundle.json so that `load_bundle(out)` reads it back. Callers
    hold `bundle.lock` with the deltas they want applied."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle.vlm.save_pretrained(out)
    bundle.processor.save_pretrained(out)
    for part in (bundle.clip, bundle.clip_tokenizer, bundle.clip_image_processor):
        part.save_pretrained(out / "clip")
    manifest = {
        "format": "lorsu-demo-bundle",
        "version": 1,
        "name": name,
        "vlm": ".",
        "clip": "clip",
        "caption_templates": bundle.caption_templates,
        "defaults": bundle.defaults,
        "description": description,
    }
    (out / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2))
    return out
