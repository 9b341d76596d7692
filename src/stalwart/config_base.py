"""The machinery under `stalwart.config`'s tree, generic over it: sections that check their own
ranges and can be frozen, and the tree in and out (TOML files, `--section.field VALUE` flags,
TOML text, help).

Unknown keys are refused, values are converted to the field's type (`1e3` is a fine way to write
1000 on a command line) and checked against the field's `choices`; ranges are each section's
`validate`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # Python 3.11+; 3.10 reads TOML with tomli, the same parser
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from stalwart.errors import UserError


def _positive(flag: str, value: float, allow_zero: bool = False) -> None:
    bad = value < 0 if allow_zero else value <= 0
    if bad or (isinstance(value, float) and not math.isfinite(value)):
        need = "at least 0" if allow_zero else "positive"
        raise UserError(f"{flag} must be {need}, got {value}")


def _within(flag: str, value: float, interval: str) -> None:
    """`value` in `interval`, written as the message says it: '[0, 1)', '[0, 1]' or '(0, 1]'."""
    low_ok = value >= 0.0 if interval[0] == "[" else value > 0.0
    high_ok = value < 1.0 if interval[-1] == ")" else value <= 1.0
    if not (low_ok and high_ok):
        raise UserError(f"{flag} must be in {interval}, got {value}")


class Section:
    """What every section (and the root) shares: its own validation, and read-only once frozen.

    Assignment works while a config is being loaded; after `freeze(cfg)` it raises, so that no
    component can change what the others were built from. (A frozen dataclass would refuse the
    loader's own assignments too.)"""

    SECTION = ""  # the name in --SECTION.field (a class attribute, not a config field)
    _frozen = False

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            key = f"{self.SECTION}.{name}" if self.SECTION else name
            raise dataclasses.FrozenInstanceError(
                f"cannot set {key}: the config is read-only once validated; derive a changed "
                f"copy with stalwart.config.with_overrides(cfg, {{{key!r}: ...}})"
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if self._frozen:
            raise dataclasses.FrozenInstanceError(f"cannot delete {name}: the config is read-only")
        object.__delattr__(self, name)

    def validate(self) -> None:
        """Check this section's values (a section without constraints has nothing to check)."""

    def _check_positive(self, *names: str, allow_zero: bool = False) -> None:
        for name in names:
            _positive(f"--{self.SECTION}.{name}", getattr(self, name), allow_zero)

    def _check_within(self, interval: str, *names: str) -> None:
        for name in names:
            _within(f"--{self.SECTION}.{name}", getattr(self, name), interval)


def freeze(root: Any) -> Any:
    """Make a config tree read-only (every section and the root): an assignment raises
    dataclasses.FrozenInstanceError. Returns `root`; `stalwart.config.with_overrides` derives
    changed copies."""
    for f in dataclasses.fields(root):
        object.__setattr__(getattr(root, f.name), "_frozen", True)
    object.__setattr__(root, "_frozen", True)
    return root


# ----------------------------------------------------------------------------------------------
# Reading: TOML files and --section.field flags, converted to the fields' types.


@dataclass(frozen=True)
class FieldInfo:
    name: str
    type_cls: Any
    metadata: Any
    default: Any


def fields_of(cls: type) -> list[FieldInfo]:
    """A dataclass's fields with their resolved types and defaults."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(FieldInfo(f.name, hints[f.name], f.metadata, default))
    return out


def _convert(flag: str, value: Any, typ: Any) -> Any:
    """Convert a TOML value or a command-line string to the field's type, or explain."""
    is_union = typing.get_origin(typ) in (typing.Union, types.UnionType)
    options = typing.get_args(typ) if is_union else (typ,)
    for t in options:
        try:
            return _convert_one(value, t)
        except (ValueError, TypeError):
            continue
    names = " or ".join(getattr(t, "__name__", str(t)) for t in options)
    raise UserError(f"{flag} expects {names}, got {value!r}")


def _convert_one(value: Any, t: type) -> Any:
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(value)
    if t is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        if isinstance(value, str):
            return int(float(value)) if _is_int_like(value) else int(value)
        return int(value)
    if t is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    raise TypeError(t)


def _is_int_like(s: str) -> bool:
    """'1e3' is a fine way to write 1000 on a command line."""
    try:
        f = float(s)
    except ValueError:
        return False
    return f.is_integer() and ("e" in s.lower())


def set_field(root: Any, dotted: str, value: Any, flag: str) -> None:
    """Set `root.section.field` from a TOML value or a flag's string, converted and checked."""
    parts = dotted.split(".")
    secs = [f.name for f in dataclasses.fields(root)]
    if len(parts) != 2 or parts[0] not in secs:
        raise UserError(
            f"unknown option {flag}: options look like --section.field, sections are "
            + ", ".join(secs)
        )
    sec_name, name = parts
    section = getattr(root, sec_name)
    by_name = {f.name: f for f in fields_of(type(section))}
    if name not in by_name:
        raise UserError(f"unknown option {flag}: [{sec_name}] has " + ", ".join(sorted(by_name)))
    f = by_name[name]
    converted = _convert(flag, value, f.type_cls)
    choices = f.metadata.get("choices")
    if choices and converted not in choices:
        raise UserError(f"{flag} must be one of {', '.join(choices)}; got {converted!r}")
    setattr(section, name, converted)


def load_toml(root: Any, path: str | Path) -> None:
    """Set every `[section] field = value` of a TOML file on `root`."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"config file {path} not found: check --config") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e}): fix the file") from None
    for sec_name, body in tree.items():
        if not isinstance(body, dict):
            raise UserError(f"{path}: '{sec_name}' must be a [section] table")
        for name, value in body.items():
            set_field(root, f"{sec_name}.{name}", value, f"{path}: {sec_name}.{name}")


def _fields_by_type(root_cls: type | None) -> dict[str, Any]:
    if root_cls is None:
        return {}
    return {
        f"{sec.name}.{f.name}": f.type_cls
        for sec in fields_of(root_cls)
        for f in fields_of(sec.type_cls)
    }


def parse_overrides(argv: list[str], root_cls: type | None = None) -> list[tuple[str, str, str]]:
    """Turn ['--a.b', '1', '--c.d=x'] into [('a.b', '1', '--a.b'), ('c.d', 'x', '--c.d')].

    With the tree's class, boolean fields are flags too: a bare `--train.compile` (last, or
    followed by another option) means true, `--no-train.compile` false; `--train.compile false`
    still works."""
    types_ = _fields_by_type(root_cls)
    bools = {k for k, t in types_.items() if t is bool}
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options look like --section.field VALUE")
        key = arg[2:]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif key.startswith("no-") and key[3:] in bools:
            key, value = key[3:], "false"
            i += 1
        elif key.startswith("no-") and key[3:] in types_:
            raise UserError(f"unknown option {arg}: only booleans have a --no- form")
        elif key in bools and (nxt is None or nxt.startswith("--")):
            value = "true"
            i += 1
        else:
            if nxt is None:
                raise UserError(f"{arg} needs a value")
            value = nxt
            i += 2
        out.append((key, value, f"--{key}"))
    return out


# ----------------------------------------------------------------------------------------------
# Writing: the resolved tree as TOML, and the help of every field.


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if math.isnan(v):
            return "nan"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {v!r} to TOML")


def to_toml(root: Any) -> str:
    """The tree as TOML (tomllib reads; the stdlib has no writer)."""
    lines = []
    for sec_name, body in dataclasses.asdict(root).items():
        lines.append(f"[{sec_name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in body.items())
        lines.append("")
    return "\n".join(lines)


def _type_name(t: Any) -> str:
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in typing.get_args(t))
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(t, str(t))


def help_text(root_cls: type) -> str:
    """Every field, grouped by section, with its type, default, choices and help: the
    `--help` of every command that takes the config, and `stalwart config`."""
    lines = [
        "config fields (TOML: [section] name = value; command line: --section.name VALUE;",
        "booleans also as flags: --section.name for true, --no-section.name for false):",
    ]
    for sec in fields_of(root_cls):
        lines.append("")
        lines.append(f"[{sec.name}]")
        for f in fields_of(sec.type_cls):
            typ = _type_name(f.type_cls)
            choices = f.metadata.get("choices")
            typ = "|".join(choices) if choices else typ
            lines.append(f"  --{sec.name}.{f.name} {typ}  (default: {f.default!r})")
            lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)
