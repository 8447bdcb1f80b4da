"""Methods behind one interface; `METHODS` maps a name to its class."""

from .base import COMMON_DEFAULTS, Method, MethodError
from .baselines import SPU, FullFineTune, LoRA
from .dac import DAC
from .keeplora import KeepLoRA, KeepLoRAPlus
from .lorsu import LoRSU, LoRSUAllHeads, LoRSURandom

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        LoRSU,
        LoRSURandom,
        LoRSUAllHeads,
        LoRA,
        SPU,
        FullFineTune,
        KeepLoRA,
        KeepLoRAPlus,
        DAC,
    )
}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def make_method(name: str, **settings) -> Method:
    try:
        cls = METHODS[name]
    except KeyError:
        raise MethodError(f"Unknown method {name!r}: use one of {', '.join(METHODS)}.") from None
    return cls(**settings)


def method_settings(name: str) -> dict:
    """Every setting of a method with its default."""
    return {**COMMON_DEFAULTS, **METHODS[name].defaults}


def preset_defaults(name: str, preset: dict) -> dict:
    """The part of a model preset's defaults that applies to method `name`: what the method
    does not set itself. A preset's defaults are tuned for LoRSU; a method's own defaults are
    its authors' setting (KeepLoRA's lr 1e-3, DAC's 500 iterations of batch 32 at lr 2e-3),
    unless the preset names that method under "methods"."""
    own = METHODS[name].defaults if name in METHODS else {}
    general = {k: v for k, v in preset.items() if k != "methods" and k not in own}
    # A preset may scale a method's own setting to its encoder: {"methods": {"dac": {...}}}.
    return {**general, **(preset.get("methods") or {}).get(name, {})}


__all__ = [
    "METHODS",
    "Method",
    "MethodError",
    "make_method",
    "method_settings",
    "preset_defaults",
    "register",
]
from . import ppl  # noqa: E402,F401  (registers lorsu-ppl)
