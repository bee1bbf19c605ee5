"""The command line, generated from each command's config dataclass.

A config field declared with :func:`adasmooth.core.config.option` is the one declaration of an option:
its name gives the flag (``n_examples`` -> ``--n-examples``; a trailing underscore is dropped:
``lambda_`` -> ``--lambda``), its type the parser, its default what ``--help`` shows, its metadata the
help text. A nested dataclass field becomes a group of prefixed flags (``catrs.m`` -> ``--catrs-m``).

Types: int, float, str, Path; ``Literal[...]`` gives choices; ``bool`` gives ``--name`` when the default
is False and ``--no-name`` when it is True; lists take one or more values, each possibly
comma-separated (numbers also as ``start:stop:step``, stop included); an optional field (default
shown as ``none``) also takes ``none``. Values the user did not give stay unset, so that ``--config FILE`` values apply under
command-line ones (see :func:`config_from_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ..core.config import from_mapping, load_config_file

__all__ = ["add_config_options", "config_from_args", "parse_number_list", "flag_name"]

_NONE = "none"


class _ExplicitNone:
    """'none' on the command line: unlike an option left out, it sets the field to None."""

    def __repr__(self) -> str:
        return _NONE


EXPLICIT_NONE = _ExplicitNone()


def flag_name(field_name: str, prefix: str = "") -> str:
    return "--" + prefix + field_name.rstrip("_").replace("_", "-")


def parse_number_list(text: str, kind: type = float) -> list:
    """'0,0.25,0.5' or '0:1:0.1' (start:stop:step, stop included)."""
    text = text.strip()
    if ":" in text:
        try:
            start, stop, step = (float(t) for t in text.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not start:stop:step: {text!r}") from None
        if not step > 0 or not math.isfinite(start) or not math.isfinite(stop):
            raise argparse.ArgumentTypeError(f"start:stop:step needs finite bounds and step > 0: {text!r}")
        n = int(round((stop - start) / step))
        return [kind(round(start + i * step, 10)) for i in range(n + 1)]
    try:
        return [kind(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of {kind.__name__}s: {text!r}") from None


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(get_args(tp))
    return tp, False


def _scalar_parser(tp: Any, optional: bool):
    def parse(text: str):
        if optional and text.lower() == _NONE:
            return EXPLICIT_NONE
        if tp is bool:
            low = text.lower()
            if low in ("true", "yes", "1"):
                return True
            if low in ("false", "no", "0"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        if tp in (int, float):
            try:
                return tp(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {'an integer' if tp is int else 'a number'}, got {text!r}") from None
        if tp is Path:
            return Path(text)
        return text

    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value) if value else "empty"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _registry(ref: str):
    import importlib

    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _registry_names(f: dataclasses.Field) -> list[str] | None:
    """The entries of the registry an option names (``option(registry="package.module:NAME")``)."""
    ref = f.metadata.get("registry")
    return list(_registry(ref).names()) if ref else None


def _entry_params(f: dataclasses.Field) -> list[tuple[str, type, dict]]:
    """(entry name, parameter dataclass, entry info) of each entry of the registry that
    ``option(entry_params=...)`` names which declares parameters."""
    registry = _registry(f.metadata["entry_params"])
    return [(name, registry.info(name)["params"], registry.info(name)) for name in registry.names()
            if registry.info(name).get("params") is not None]


def _entry_prefix(name: str) -> str:
    return name.replace("_", "-") + "-"


def _help(f: dataclasses.Field, extra: str = "", shown_default: str | None = None) -> str:
    text = f.metadata.get("help")
    if not text:
        raise TypeError(f"config field {f.name!r} has no help text: declare it with adasmooth.core.config.option")
    names = _registry_names(f)
    if names is not None:
        head, sep, tail = text.partition(";")  # the names go right after what the option is
        text = f"{head}: {', '.join(names)}{sep}{tail}"
    if f.metadata.get("help_from"):
        text = f"{text}; {_registry(f.metadata['help_from'])()}"
    default = _default_of(f)
    # a help text that says what its default is already shows it once, not twice
    if "(default:" in text:
        return f"{text}{extra}".replace("%", "%%")
    shown = shown_default if shown_default is not None else _show(default)
    return f"{text}{extra} (default: {shown})".replace("%", "%%")


def _group_title(f: dataclasses.Field, tp: type, flag: str) -> str:
    """A group's title: the field's help text (plain words, unlike a class docstring's reST markup)."""
    text = f.metadata.get("help") or (tp.__doc__ or tp.__name__).strip().splitlines()[0]
    return f"{text.replace('``', '').rstrip('.')} ({flag}-*)"


def add_config_options(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                       group: Any = None) -> None:
    """Add one flag per CLI field of dataclass ``cls`` (recursing into nested dataclass fields)."""
    hints = get_type_hints(cls)
    target = group or parser
    for f in dataclasses.fields(cls):
        if not f.init or not f.metadata.get("cli", True):
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        dest = prefix.replace("-", "_") + f.name
        flag = flag_name(f.name, prefix)
        names = [flag] + ([f.metadata["short"]] if f.metadata.get("short") else [])
        if dataclasses.is_dataclass(tp):
            sub = parser.add_argument_group(_group_title(f, tp, flag))
            add_config_options(parser, tp, prefix=flag[2:] + "-", group=sub)
            continue
        if f.metadata.get("entry_params"):  # one group of flags per registry entry that declares parameters
            kind = _registry(f.metadata["entry_params"]).kind
            for name, params, info in _entry_params(f):
                label = f": {info['label']}" if info.get("label") else ""
                sub = parser.add_argument_group(f"parameters of {kind} {name}{label} (--{_entry_prefix(name)}*)")
                add_config_options(parser, params, prefix=prefix + _entry_prefix(name), group=sub)
            continue
        if tp is bool and not optional:
            if _default_of(f) is True:
                no_flag = "--" + prefix + "no-" + f.name.rstrip("_").replace("_", "-")
                target.add_argument(no_flag, dest=dest, action="store_const", const=False, default=None,
                                    help=_help(f, shown_default="on; this flag turns it off"))
            else:
                target.add_argument(*names, dest=dest, action="store_const", const=True, default=None,
                                    help=_help(f, shown_default="off"))
            continue
        origin = get_origin(tp)
        metavar = f.metadata.get("metavar") or f.name.rstrip("_").upper()
        kwargs: dict[str, Any] = {"dest": dest, "default": None, "metavar": metavar}
        if origin is Literal:
            choices = list(get_args(tp))
            kwargs["choices"] = choices + ([EXPLICIT_NONE] if optional else [])
            kwargs["type"] = _scalar_parser(str, optional)
            kwargs["metavar"] = f.metadata.get("metavar") or "{" + ",".join(str(c) for c in choices) + "}"
            target.add_argument(*names, help=_help(f), **kwargs)
            continue
        if origin in (list, tuple) or tp in (list, tuple):
            (item,) = get_args(tp)[:1] or (str,)
            item, _ = _unwrap_optional(item)
            if item in (int, float):
                kwargs["type"] = lambda text, kind=item: parse_number_list(text, kind)
            else:
                kwargs["type"] = lambda text: [t.strip() for t in text.split(",") if t.strip()]
            kwargs["nargs"] = "+"
            kwargs["action"] = _FlattenList
            target.add_argument(*names, help=_help(f, "; one or more, comma-separated allowed"), **kwargs)
            continue
        if origin is dict or tp is dict:
            raise TypeError(f"config field {f.name!r} is a mapping: declare it with option(..., cli=False)")
        kwargs["type"] = _scalar_parser(tp, optional)
        target.add_argument(*names, help=_help(f), **kwargs)


class _FlattenList(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        flat: list = []
        for v in values:
            flat.extend(v)
        setattr(namespace, self.dest, flat)


def _given_values(cls: type, args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init or not f.metadata.get("cli", True):
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            nested = _given_values(tp, args, prefix + f.name.rstrip("_") + "_")
            if nested:
                values[f.name] = nested
            continue
        if f.metadata.get("entry_params"):
            given = {}
            for name, params, _ in _entry_params(f):
                nested = _given_values(params, args, prefix + _entry_prefix(name).replace("-", "_"))
                if nested:
                    given[name] = nested
            if given:
                values[f.name] = given
            continue
        dest = prefix + f.name
        value = getattr(args, dest, None)
        if value is not None:
            values[f.name] = None if value is EXPLICIT_NONE else value
    return values


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_args(cls: type, args: argparse.Namespace, config_file: str | Path | None = None):
    """The config: ``--config FILE`` values, overridden by the options given on the command line."""
    data = load_config_file(config_file) if config_file else {}
    return from_mapping(cls, _merge(data, _given_values(cls, args)))
