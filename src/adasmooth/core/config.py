"""Typed, validated configuration: dataclasses filled from YAML/JSON mappings or CLI arguments.

Unknown keys are errors, values are checked against the field's annotation (int, float, bool, str,
Literal choices, lists, Optional), and each config class may add a ``validate()`` for ranges.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

__all__ = [
    "ConfigError",
    "option",
    "RunOptions",
    "CheckpointDataOptions",
    "DataLoadingOptions",
    "data_dir_option",
    "dataset_option",
    "force_dataset_option",
    "n_examples_option",
    "batch_size_option",
    "workers_option",
    "output_option",
    "rule_params_option",
    "from_mapping",
    "load_config_file",
    "merge_cli",
]


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    default_factory: Any = dataclasses.MISSING,
    short: str | None = None,
    metavar: str | None = None,
    cli: bool = True,
    registry: str | None = None,
    entry_params: str | None = None,
    help_from: str | None = None,
) -> Any:
    """A config field with its help text: the one declaration the command line is generated from.

    ``short`` adds a one-letter alias (``-o``); ``cli=False`` keeps a field out of the command line
    (library-only values such as ``model_kwargs`` still come from ``--config`` files). ``registry``
    ("package.module:NAME") names the registry whose entries the value is one of: ``--help`` lists
    them (the registry checks the value), so nothing is listed by hand. ``entry_params`` (same form)
    makes the field a mapping ``{entry: {parameter: value}}`` of the parameters that registry's entries
    declare (``info["params"]``, a dataclass): the command line gets ``--<entry>-<parameter>`` for each.
    ``help_from`` ("package.module:function") adds the function's text to the help, for what a
    registry's entries declare (``--data-dir`` lists each data set's files).
    """
    metadata = {"help": help, "short": short, "metavar": metavar, "cli": cli, "registry": registry,
                "entry_params": entry_params, "help_from": help_from}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# The options many commands share, declared once so that every command names and describes them alike.


@dataclasses.dataclass
class RunOptions:
    """Options of every run: configs inherit them (they come first in --help)."""

    seed: int = option(0, help="random seed: every random draw of the run derives from it")
    device: str = option("auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    progress: bool = option(True, help="show progress bars")


def data_dir_option() -> Any:
    return option(None, help="folder with the data files; none: $ADASMOOTH_DATA or ./data",
                  help_from="adasmooth.data:files_help")


def dataset_option(default: str | None = None) -> Any:
    text = "data set" + ("; none: the one the checkpoints record" if default is None else "")
    return option(default, help=text, registry="adasmooth.data:DATASETS")


def force_dataset_option() -> Any:
    return option(False, help="run on --dataset even though the checkpoints record another data set")


def n_examples_option(default: int | None) -> Any:
    return option(default, help="use the first N examples of the split (none: all)")


def batch_size_option(default: int) -> Any:
    return option(default, help="inputs per batch")


def workers_option() -> Any:
    return option(0, help="data-loading worker processes that decode image files (folder, imagenet; the other "
                          "data sets are in memory once loaded); 0: decode in the main process")


def check_workers(workers: int) -> None:
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")


def rule_params_option() -> Any:
    """The parameters of the mixing rules, as each rule declares them (``--nonlinear-s``, ...)."""
    return option(help="parameters of the mixing rules that declare some: {rule: {parameter: value}}",
                  default_factory=dict, entry_params="adasmooth.mixing:MIXING_RULES")


def output_option(default: str | None, what: str = "output path") -> Any:
    return option(default, help=what, short="-o")


@dataclasses.dataclass
class CheckpointDataOptions(RunOptions):
    """Options of runs on checkpoints: by default they use the data set the checkpoints record."""

    dataset: str | None = dataset_option()
    force_dataset: bool = force_dataset_option()
    data_dir: str | None = data_dir_option()


@dataclasses.dataclass
class DataLoadingOptions(RunOptions):
    """How a command that reads data loads it; its config inherits these next to the data options (a
    command only inherits them where it uses them: no option is silently ignored)."""

    workers: int = workers_option()

    def __post_init__(self) -> None:
        # here, not in validate(): every command's own validate() would have to remember to call it
        check_workers(self.workers)

T = TypeVar("T")




def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} matches none of {args}")
    if origin in (list, tuple) or tp in (list, tuple):  # bare `list` too
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:  # bare `dict` (e.g. model_kwargs) too
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        return Path(value)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    return value


def from_mapping(cls: type[T], data: dict[str, Any], where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and ill-typed values raise ConfigError."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return validated(cls(**kwargs), where)


def validated(obj: T, where: str) -> T:
    """``obj`` after its own ``validate()`` (if it has one), a ValueError becoming a ConfigError naming ``where``."""
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from err
    return obj


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping (YAML's safe loader: no code, no custom tags)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        # One clear message (the CLI prints ConfigError, not a traceback); safe_load also lands here
        # for tags that would build Python objects.
        raise ConfigError(f"config file {path} could not be parsed: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def merge_cli(cls: type[T], config_file: str | Path | None, cli_values: dict[str, Any]) -> T:
    """File values, overridden by CLI values that were given (not None); then validated."""
    data = load_config_file(config_file) if config_file else {}
    data.update({k: v for k, v in cli_values.items() if v is not None})
    return from_mapping(cls, data)
