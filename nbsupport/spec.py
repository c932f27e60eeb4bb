"""The base of every system's model spec: what rebuilds a trained network, stored as ``model_spec.json``.

A spec is a frozen dataclass of JSON values (numbers, strings, tuples, dicts). Its fingerprint is stored in every
checkpoint, and a checkpoint whose fingerprint differs from the spec it is loaded into is refused
(:func:`nbsupport.checkpoints.load_weights`). Fingerprints of specs written by earlier versions must never change,
hence the class attributes below (pinned by ``tests/test_spec_fingerprints.py``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, get_origin

Spec = TypeVar("Spec", bound="ModelSpec")


class ModelSpec:
    """Mixin for a system's ``@dataclasses.dataclass(frozen=True)`` spec: JSON round trip and fingerprint."""

    JSON_INDENT: ClassVar[int | None] = 2
    JSON_SORT_KEYS: ClassVar[bool] = True
    # Fields added after specs were first written, with the value the earlier files implied: left out of the JSON (and
    # so of the fingerprint) while they hold it, and read back as it where a file lacks them, so that earlier
    # checkpoints keep their fingerprint and rebuild as they were trained (the dataclass default may differ).
    LATER_FIELDS: ClassVar[Mapping[str, Any]] = {}
    # Fields that do not change the weights (e.g. an inference window): written, but not fingerprinted.
    NOT_FINGERPRINTED: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)  # type: ignore[call-overload]
        for name, default in self.LATER_FIELDS.items():
            if values[name] == default:
                del values[name]
        return values

    def _dumps(self, values: Mapping[str, Any]) -> str:
        return json.dumps(values, indent=self.JSON_INDENT, sort_keys=self.JSON_SORT_KEYS)

    def to_json(self) -> str:
        return self._dumps(self.to_dict())

    @classmethod
    def from_json(cls: type[Spec], text: str) -> Spec:
        """Inverse of :meth:`to_json`; fields missing from older files take their ``LATER_FIELDS`` value, else their
        defaults."""
        values = {**cls.LATER_FIELDS, **json.loads(text)}
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown} in the spec JSON; known: {sorted(names)}")
        for name, value in values.items():
            if isinstance(value, list) and get_origin(hints[name]) is tuple:
                values[name] = tuple(value)
        return cls(**values)

    def fingerprint(self, part: str = "") -> str:
        """16 hex digits of sha256 over ``part`` (a sub-model's name, or '') and the fingerprinted fields."""
        values = {k: v for k, v in self.to_dict().items() if k not in self.NOT_FINGERPRINTED}
        return hashlib.sha256((part + self._dumps(values)).encode()).hexdigest()[:16]


def lora_spec(rank: int, alpha: int, dropout: float) -> type:
    """The spec mixin of a system that adapts a pretrained transformer with LoRA: the fields ``lora_r``,
    ``lora_alpha`` and ``lora_dropout`` with the system's defaults (its seed's), and ``lora_config(**options)``, the
    peft ``LoraConfig`` they describe (``options``: target modules, bias, task type...).

    List it before :class:`ModelSpec` (``class XSpec(lora_spec(16, 16, 0.05), ModelSpec)``). Its fields come first
    in the dataclass, so only a spec whose JSON sorts its keys (the default) may use it: in a spec that keeps field
    order in its JSON, moving them would change every fingerprint.
    """

    @dataclasses.dataclass(frozen=True)
    class LoRASpec:
        lora_r: int = rank
        lora_alpha: int = alpha
        lora_dropout: float = dropout

        def __init_subclass__(cls, **kwargs: Any) -> None:
            super().__init_subclass__(**kwargs)
            if not getattr(cls, "JSON_SORT_KEYS", True):
                raise TypeError(f"{cls.__name__}: lora_spec(...) moves the LoRA fields first, which changes the "
                                "fingerprints of a spec whose JSON keeps field order (JSON_SORT_KEYS = False)")

        def lora_config(self, **options: Any) -> Any:
            from peft import LoraConfig

            return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, **options)

    LoRASpec.__doc__ = f"LoRA adapter fields (defaults r={rank}, alpha={alpha}, dropout={dropout})."
    return LoRASpec


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    """Parameters of a built network: in all, trainable, and per named part (e.g. image encoder, LM, adapters)."""

    total: int
    trainable: int
    parts: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def to_dict(self) -> dict[str, int]:
        """``{"total", "trainable", "frozen", <part>...}``, for ``metrics.json``."""
        return {"total": self.total, "trainable": self.trainable, "frozen": self.frozen, **self.parts}

    def __str__(self) -> str:
        return f"{self.total / 1e6:.2f} M parameters ({self.trainable / 1e6:.2f} M trainable)"


def count_parameters(model: Any, parts: Mapping[str, Any] | None = None) -> ParameterCount:
    """Count ``model``'s parameters (shared tensors once); ``parts``: name -> sub-module to count separately."""

    def numel(module: Any, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

    return ParameterCount(numel(model), numel(model, trainable_only=True),
                          {name: numel(m) for name, m in (parts or {}).items()})
