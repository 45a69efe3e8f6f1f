"""The shared base of every stage's config: strict sections, YAML files with dotted overrides, CLI help.

Each stage keeps its schema beside its code (``viscy.data.config``, ``viscy.models.config``,
``viscy.train.config``, ``viscy.tune.config``, ``viscy.predict.config``, ``viscy.evaluate.config``,
``viscy.serve.config``); this module imports none of them. Every section is a :class:`StrictModel` (unknown
keys are rejected). :func:`load_config` merges a YAML file and command-line overrides such as
``--data.yx_patch_size 256 256`` and validates the result; errors name the full key path and, where the
field is an enumeration, the allowed values. Keys that were renamed stay readable under their old name
(:attr:`StrictModel.renamed_keys`), with a :class:`DeprecatedKeyWarning` naming the new one.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import re
import warnings
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from viscy.errors import ViscyError

CONFIG_FILENAME = "viscy_config.yaml"


class ConfigError(ViscyError, ValueError):
    """A configuration could not be loaded or validated; the message names the key and the fix."""


class DeprecatedKeyWarning(FutureWarning):
    """A config key was given by its old name; the message names the key to use instead."""


def _as_list(value: Any) -> Any:
    """A single value given where a list is expected (``--positions A/1/0``, ``--cols 1``) becomes a one-item list."""
    return value if value is None or isinstance(value, (list, tuple, set, frozenset)) else [value]


StrList = Annotated[list[str], BeforeValidator(_as_list)]
PathList = Annotated[list[Path], BeforeValidator(_as_list)]


def _leaf_types(annotation: Any) -> list[Any]:
    """The members of ``X | None`` / ``Annotated[X, ...]`` (``None`` left out)."""
    if get_origin(annotation) is Annotated:
        return _leaf_types(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return [m for a in get_args(annotation) for m in _leaf_types(a)]
    return [] if annotation is type(None) else [annotation]


def _coerce_scalar(value: Any, types: list[Any]) -> Any:
    """A number (or YAML date) where the schema wants a string, a path or a string choice becomes that string."""
    if isinstance(value, bool) or not isinstance(value, (int, float, _dt.date)):
        return value
    text = value.isoformat() if isinstance(value, _dt.date) else str(value)
    for t in types:
        if t is str or (isinstance(t, type) and issubclass(t, Path)):
            return text
        if get_origin(t) is Literal and text in get_args(t):
            return text
    return value


def _coerce_field(annotation: Any, value: Any) -> Any:
    """Command-line friendly coercion of one field's input, decided by its annotation only."""
    types = _leaf_types(annotation)
    lists = [t for t in types if get_origin(t) is list]
    if lists and value is not None and not isinstance(value, (list, tuple, set, frozenset, dict)):
        value = [value]
    elif lists and isinstance(value, dict) and any(_submodel(get_args(t)[0]) for t in lists):
        value = [value]  # one section where a list of sections is expected (e.g. one normalization group)
    if lists and isinstance(value, (list, tuple)):
        item_types = [i for t in lists for i in _leaf_types(get_args(t)[0])]
        return [_coerce_scalar(v, item_types) for v in value]
    return _coerce_scalar(value, types)


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated.

    Values typed on the command line are parsed as YAML without knowing the schema, so every section
    coerces them generically: a number (or date) where a string, path or string choice is expected
    becomes that string (``--cols 1 2 3``, ``--trainer.run_name 2024``, ``--trainer.precision 32``), and a
    single value where a list is expected becomes a one-item list (``--cols 1``, ``--positions A/1/0``).
    Tuples of fixed length (``yx``) are not filled from one value: ``--yx 512`` is an error naming the
    number of values to give, because a silent square guess would hide a missing value.

    A section lists the keys it renamed in ``renamed_keys`` (old name -> new name): the old name is still
    read, in YAML files and on the command line, with a :class:`DeprecatedKeyWarning`; help and saved
    configs show the new name only.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)
    renamed_keys: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _coerce_command_line_values(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = _rename_keys(cls, dict(data))
        for name, field in cls.model_fields.items():
            if name in out:
                out[name] = _coerce_field(field.annotation, out[name])
        return out


# ------------------------------------------------------------------------------------------ renamed keys
def _rename_keys(model: type[BaseModel], data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``data`` (one section's mapping) with the old names of ``model``'s renamed keys replaced by the new ones."""
    for old, new in getattr(model, "renamed_keys", {}).items():
        if old not in data:
            continue
        if new in data:
            raise ValueError(
                f"'{prefix}{old}' and '{prefix}{new}' are both set; '{old}' is the old name of '{new}': keep "
                f"'{prefix}{new}' only"
            )
        warnings.warn(
            f"config key '{prefix}{old}' is deprecated; use '{prefix}{new}' (the old name is still read for now)",
            DeprecatedKeyWarning,
            stacklevel=2,
        )
        data = {new if k == old else k: v for k, v in data.items()}
    return data


def rename_old_keys(schema: type[BaseModel], tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``tree`` with every renamed key, in every section, under its new name (warnings name the full keys)."""
    tree = _rename_keys(schema, dict(tree), prefix)
    for name, value in tree.items():
        field = schema.model_fields.get(name)
        sub = _submodel(field.annotation) if field is not None else None
        if sub is None:
            continue
        if isinstance(value, dict):
            tree[name] = rename_old_keys(sub, value, f"{prefix}{name}.")
        elif isinstance(value, list):
            tree[name] = [
                rename_old_keys(sub, v, f"{prefix}{name}.{i}.") if isinstance(v, dict) else v
                for i, v in enumerate(value)
            ]
    return tree


def canonical_key(schema: type[BaseModel], dotted: str) -> str:
    """A dotted key (``data.source_channel``) with each renamed part under its new name, with a warning."""
    model: type[BaseModel] | None = schema
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if model is None:
            break
        new = getattr(model, "renamed_keys", {}).get(part)
        if new is not None:
            old_key, parts[i] = ".".join(parts[: i + 1]), new
            warnings.warn(
                f"config key '{old_key}' is deprecated; use '{'.'.join(parts[: i + 1])}' (the old name is still "
                "read for now)",
                DeprecatedKeyWarning,
                stacklevel=2,
            )
        field = model.model_fields.get(parts[i])
        model = _submodel(field.annotation) if field is not None else None
    return ".".join(parts)


# ------------------------------------------------------------------------------------------ loading
TConfig = TypeVar("TConfig", bound=BaseModel)


def parse_override_value(tokens: list[str]) -> Any:
    """Turn the tokens after ``--key`` into a YAML value: one token is a scalar, several a list."""
    values = [yaml.safe_load(t) if t != "" else "" for t in tokens]
    if not values:
        return True
    return values[0] if len(values) == 1 else values


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Parse ``--a.b v1 [v2 ...]`` pairs into ``{"a.b": value}``.

    Raises
    ------
    ConfigError
        If a token does not belong to any ``--key``.
    """
    out: dict[str, Any] = {}
    key: str | None = None
    tokens: list[str] = []
    for arg in args:
        if arg.startswith("--") and len(arg) > 2 and not re.match(r"^--\d", arg):
            if key is not None:
                out[key] = parse_override_value(tokens)
            key, tokens = arg[2:], []
            if "=" in key:
                key, value = key.split("=", 1)
                tokens = [value]
        elif key is None:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key VALUE")
        else:
            tokens.append(arg)
    if key is not None:
        out[key] = parse_override_value(tokens)
    return out


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = _submodel(field.annotation)
        if sub is not None:
            keys.extend(_known_keys(sub, prefix + name + "."))
    return keys


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``X``, ``X | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b] = value`` for ``dotted == "a.b"``, creating sections as needed."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _tuple_length(schema: type[BaseModel], loc: tuple[Any, ...]) -> int | None:
    """Number of items of the fixed-length tuple field at ``loc`` (``None`` if it is not one)."""
    model: type[BaseModel] | None = schema
    annotation: Any = None
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = _submodel(annotation)
    tuples = [t for t in _leaf_types(annotation) if get_origin(t) is tuple]
    args = get_args(tuples[0]) if tuples else ()
    return len(args) if args and Ellipsis not in args else None


def format_validation_error(err: ValidationError, schema: type[BaseModel]) -> str:
    """One line per problem: full key path, what is wrong, and how to fix it."""
    lines = []
    known = _known_keys(schema)
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        kind = e["type"]
        if kind == "extra_forbidden":
            parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
            siblings = [k[len(parent) :] for k in known if k.startswith(parent) and "." not in k[len(parent) :]]
            lines.append(f"unknown key '{path}'; allowed keys here: {', '.join(sorted(siblings))}")
        elif kind == "missing":
            lines.append(f"missing required key '{path}'; set it in the YAML or with --{path} VALUE")
        elif kind == "tuple_type" and _tuple_length(schema, e["loc"]):
            n = _tuple_length(schema, e["loc"])
            example = " ".join([str(e.get("input"))] * n)
            lines.append(f"invalid value {e.get('input')!r} for '{path}': give {n} values, e.g. --{path} {example}")
        elif kind == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            lines.append(f"invalid value {e.get('input')!r} for '{path}'; allowed values: {allowed}")
        elif not path:  # a check across sections: its message names the keys
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"invalid value {e.get('input')!r} for '{path}': {e['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(
    schema: type[TConfig], path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TConfig:
    """Load a YAML file (optional), apply dotted overrides, validate against ``schema``.

    Old names of renamed keys are read as their new names, in the file and in the overrides, with a
    :class:`DeprecatedKeyWarning`; an override given by either name replaces the file's value.

    Raises
    ------
    ConfigError
        With every problem named by its full key path.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML with --config")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(loaded).__name__}")
        tree = copy.deepcopy(loaded)
    try:
        tree = rename_old_keys(schema, tree)
        for dotted, value in (overrides or {}).items():
            set_dotted(tree, canonical_key(schema, dotted), value)
        tree = rename_old_keys(schema, tree)  # old names inside mapping values of overrides
    except ValueError as exc:
        raise ConfigError(f"invalid configuration:\n  {exc}") from None
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, schema)) from None


def absolute_paths(config: TConfig) -> TConfig:
    """``config`` with every relative path made absolute against the current directory.

    Ray tasks and actors run in their own working directories (on a cluster, on other nodes), so paths are
    resolved once, in the driver, before anything is sent to them; the saved config then records them too.
    """

    def fix(value: Any) -> Any:
        if isinstance(value, Path):
            return value if value.is_absolute() else Path.cwd() / value.expanduser()
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, BaseModel):
            return absolute_paths(value)
        return value

    update = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        fixed = fix(value)
        if fixed is not value:
            update[name] = fixed
    return config.model_copy(update=update) if update else config


def config_to_yaml(config: BaseModel) -> str:
    """Serialise a config to YAML (paths and tuples as plain strings and lists)."""
    return yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False)


def save_config(
    config: BaseModel, directory: str | Path, command: str | None = None, filename: str = CONFIG_FILENAME
) -> Path:
    """Write the resolved config (``viscy_config.yaml``) into a directory the command owns.

    Commands that write a single file (``export``) pass ``filename`` so the config sits beside that file
    without replacing another command's config in the same directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = f"# resolved config written by viscy {command or ''} at {_dt.datetime.now().isoformat()}\n"
    out = directory / filename
    out.write_text(header + config_to_yaml(config))
    return out


def describe_schema(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) rows for ``--help``."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        key = prefix + name
        sub = _submodel(field.annotation)
        if field.is_required():
            default = "REQUIRED"
        elif field.default_factory is not None:
            default = "(section)" if sub is not None else str(field.default_factory())
        else:
            default = json.dumps(field.default, default=str)
        ann = field.annotation
        allowed = ""
        if getattr(ann, "__origin__", None) is Literal:
            allowed = " Allowed: " + ", ".join(map(str, ann.__args__)) + "."
        rows.append((key, default, (field.description or "") + allowed))
        if sub is not None:
            rows.extend(describe_schema(sub, key + "."))
    return rows
