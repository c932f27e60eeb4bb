"""Per-stage configuration built from a notebook's papermill parameters.

Every notebook stage has one frozen dataclass (``seg2d.TrainConfig`` and so on). Its values come from three
layers, later ones winning:

1. the field defaults of the dataclass (the ``full`` sizes where a seed fixes them),
2. the profile (``smoke`` / ``demo`` / ``full``) named by the ``profile`` parameter,
3. every parameter the notebook (or papermill's ``-p``) sets to something other than ``None``.

``None`` in a notebook's ``parameters`` cell therefore means "whatever the profile says". Unknown names and
wrong types are errors that name the parameter and the allowed ones: papermill itself only warns about an
unknown ``-p``, which would silently run with defaults.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, get_args, get_origin

PROFILES = ("smoke", "demo", "full")
_NOTEBOOK_NAMESPACE_NOISE = {"In", "Out", "exit", "quit", "get_ipython", "open"}


class ConfigError(ValueError):
    """A notebook parameter has an unknown name, a wrong type or an invalid value."""


def param(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text (shown by ``describe()`` and in error messages)."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Fields every notebook stage has. Subclasses add their own and set ``SYSTEM``, ``STAGE``, ``PROFILES``."""

    SYSTEM: ClassVar[str] = ""
    STAGE: ClassVar[str] = ""
    # profile name -> {field: value}; only fields that differ from the dataclass defaults.
    PROFILES: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    # old parameter name -> new one: a notebook written with the old name gets an error naming the new one
    RENAMED: ClassVar[Mapping[str, str]] = {}

    profile: Literal["smoke", "demo", "full"] = param("demo", "smoke: seconds on a CPU; demo: minutes on a CPU; full: seed sizes, for a GPU node")
    seed: int = param(0, "random seed for data splits, initialisation and sampling")
    device: str = param("auto", "'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'")
    run_dir: str = param("", "run folder outputs/runs/<run_id>/<system>; '' creates a new run")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "StageConfig":
        """Build the config from notebook parameters; ``None`` values fall back to the profile.

        Raises:
            ConfigError: naming every unknown parameter (with the allowed names) and every wrong type at once.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        problems: list[str] = []
        for name in params:
            if name in cls.RENAMED:
                problems.append(f"parameter {name!r} is now {cls.RENAMED[name]!r}")
            elif name not in fields:
                close = difflib.get_close_matches(name, fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"unknown parameter {name!r}{hint}")
        profile = params.get("profile") or fields["profile"].default
        if profile not in PROFILES:
            problems.append(f"parameter 'profile' must be one of {list(PROFILES)}, got {profile!r}")
            profile = fields["profile"].default
        values: dict[str, Any] = dict(cls.PROFILES.get(profile, {}))
        values["profile"] = profile
        for name, value in params.items():
            if name in fields and value is not None:
                values[name] = value
        converted: dict[str, Any] = {}
        for name, value in values.items():
            if name not in fields:
                raise TypeError(f"{cls.__name__}.PROFILES[{profile!r}] names unknown field {name!r}")
            try:
                converted[name] = _coerce(value, hints[name])
            except (TypeError, ValueError) as err:
                problems.append(f"parameter {name!r}: {err}")
        if problems:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(
                f"{cls._where()}: " + "; ".join(problems) + f".\nAllowed parameters: {allowed}"
            )
        try:
            return cls(**converted)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{cls._where()}: {err}") from err

    @classmethod
    def _where(cls) -> str:
        return f"{cls.SYSTEM}/{cls.STAGE}" if cls.SYSTEM else cls.__name__

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Field name -> help text, for the notebook's documentation cell and ``--help``."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "StageConfig":
        return dataclasses.replace(self, **changes)


def notebook_params(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The literal-valued names of a notebook's global namespace: its parameters.

    Call it right after the ``parameters`` cell (and papermill's injected cell), before other globals exist:
    ``cfg = TrainConfig.from_params(notebook_params(globals()))``. Modules, functions, classes and IPython's
    own names are left out, so a mistyped injected parameter reaches ``from_params`` and is rejected there.
    """
    literal = (str, int, float, bool, type(None), list, tuple, dict)
    return {
        k: v
        for k, v in namespace.items()
        if not k.startswith("_") and k not in _NOTEBOOK_NAMESPACE_NOISE and isinstance(v, literal)
    }


def _coerce(value: Any, hint: Any) -> Any:
    """Check ``value`` against a field type; lists become tuples, ints are accepted for floats."""
    origin = get_origin(hint)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ValueError(f"expected one of {list(allowed)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise TypeError(" or ".join(errors))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {type(value).__name__} {value!r}")
        args = get_args(hint)
        item = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis or len(args) <= 1:
            return tuple(_coerce(v, item) for v in value)
        if len(args) != len(value):
            raise ValueError(f"expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected True or False, got {type(value).__name__} {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__} {value!r}")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    raise TypeError(f"unsupported field type {hint!r}")


# ---------------------------------------------------------------------------------------------- documentation
def type_name(hint: Any) -> str:
    """A field type as one word papermill's ``# type:`` comment can hold (no spaces): ``int``, ``float|None``,
    ``str`` for a Literal (its choices go into the help), ``list[float]`` for tuples."""
    origin = get_origin(hint)
    if origin is Literal:
        return type(get_args(hint)[0]).__name__
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_name(a) for a in get_args(hint))
    if origin is tuple:
        args = [a for a in get_args(hint) if a is not Ellipsis]
        return f"list[{type_name(args[0])}]" if args else "list"
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint)).replace(" ", "")


def parameter_docs(cls: type[StageConfig], profile: str | None = None) -> list[dict[str, Any]]:
    """Per field of a stage config: name, type, help (choices included) and, for ``profile``, the value it gets."""
    hints = typing.get_type_hints(cls)
    try:  # the values a run gets, after the config's own completion (e.g. the default manifest)
        resolved: Any = cls.from_params({"profile": profile} if profile else {})
    except ConfigError:
        resolved = None
    chosen = dict(cls.PROFILES.get(profile, {})) if profile else {}
    docs = []
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        if get_origin(hints[f.name]) is Literal:
            help_text = f"one of {'|'.join(map(str, get_args(hints[f.name])))}; {help_text}"
        value = getattr(resolved, f.name) if resolved is not None else chosen.get(f.name, f.default)
        docs.append({"name": f.name, "type": type_name(hints[f.name]), "help": help_text, "value": value})
    return docs


def parameter_line(name: str, value_source: str, doc: Mapping[str, Any]) -> str:
    """One line of a notebook's parameters cell, as ``papermill --help-notebook`` reads it:
    ``name = value  # type: <type> <help>``."""
    # papermill skips a line with a second '=' (translators.py, PythonTranslator.inspect): none in the help
    help_text = doc["help"].replace(" = ", " is ").replace("=", " ")
    return f"{name} = {value_source}  # type: {doc['type']} {help_text}"


STAGE_ALIASES = {"preprocess": "01", "train": "02", "infer": "03", "predict": "03", "attention": "04"}


def stage_configs(system: str) -> dict[str, type[StageConfig]]:
    """A system's stage configs by notebook stem (``01_preprocess`` ...), found in ``nbsupport.<system>``."""
    import importlib

    module = importlib.import_module(f"nbsupport.{system}")
    found = {obj.STAGE: obj for obj in vars(module).values()
             if isinstance(obj, type) and issubclass(obj, StageConfig) and obj.STAGE and obj.SYSTEM == system}
    return dict(sorted(found.items()))


def find_stage(system: str, stage: str) -> type[StageConfig]:
    """The config of ``stage``: a notebook stem, its number (``02``) or its verb (``train``)."""
    configs = stage_configs(system)
    prefix = STAGE_ALIASES.get(stage, stage)
    matches = [cls for stem, cls in configs.items() if stem == stage or stem.startswith(prefix + "_")]
    if len(matches) != 1:
        raise ConfigError(f"{system} has no stage {stage!r}; stages: {', '.join(configs)} "
                          f"(or {', '.join(STAGE_ALIASES)})")
    return matches[0]


def parameters_cell(cls: type[StageConfig], source: str) -> str:
    """A notebook's parameters cell rewritten from its config: one ``name = value  # type: <type> <help>`` line
    per field, in field order, keeping the values the cell already has (``None`` = the profile's value for a field
    it lacks). What ``papermill --help-notebook`` shows and what a reader of the notebook sees."""
    values = {}
    for line in source.splitlines():
        name, sep, rest = line.partition("=")
        if sep and name.strip().isidentifier():
            values[name.strip()] = rest.split("  #", 1)[0].strip()
    docs = parameter_docs(cls)
    header = (f"# None = the profile's value (nbsupport params {cls.SYSTEM} {cls.STAGE} --profile PROFILE lists "
              "them); papermill -p NAME VALUE or nbsupport run -p NAME=VALUE sets any of these")
    return "\n".join([header] + [parameter_line(d["name"], values.get(d["name"], "None"), d) for d in docs])
