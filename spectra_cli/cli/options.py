"""The command-line parameters every command shares, defined once, and the helpers that turn their parsed values
into the options classes of :mod:`spectra_cli.options` and ``flows/``.

A command declares a shared flag with an ``Annotated`` alias (``include: o.IncludeOpt = None``); where a flag
does not act yet for one command, the command says so in its help with the factory and a note
(``Annotated[o.Backend, o.backend_option("…")]``): the flag is accepted everywhere, its help is honest.

A command builds its options in one call::

    opts = o.build(AnalyzeOptions, o.selection(include, exclude, kinds, min_dim),
                   o.engine(device, precision, backend, max_memory, method), save=…)

:func:`build` is the one place where the options' validation (``XOptions.__post_init__``, which raises a
:class:`~spectra_cli.errors.SpectraError` naming the flag) becomes a usage error: exit 2 and that same line.
The CLI does not check those rules again; it only parses (sizes, lists, ``NAME=PATH``).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin, get_type_hints

import typer
import typer.core
import typer.models

from spectra_cli.checkpoint.naming import ROLES
from spectra_cli.errors import SpectraError

T = TypeVar("T")


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


# the choices of spectra_cli.options.PRECISIONS / BACKENDS / METHODS (a test keeps them equal)
class Precision(str, Enum):
    float32 = "float32"
    float64 = "float64"


class Method(str, Enum):
    auto = "auto"
    svd = "svd"
    gram = "gram"


class Backend(str, Enum):
    auto = "auto"
    numpy = "numpy"
    torch = "torch"


# ---- parsing (text → value); the rules on the values live in the options classes ------------------------

_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2,
          "G": 1024**3, "GB": 1024**3, "GIB": 1024**3, "T": 1024**4, "TB": 1024**4}  # fmt: skip


def parse_size(text: str) -> int:
    """'200MB', '1.5G', '4096' → bytes (binary units). Raises typer.BadParameter (exit 2) for text that is not a
    size; whether the size is allowed (positive) is :class:`~spectra_cli.options.ComputeOptions`' rule."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise typer.BadParameter(f"{text!r} is not a size; use e.g. 200MB, 2GB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def split_csv(values: list[str] | None) -> tuple[str, ...]:
    """Repeatable, comma-separated option values → a flat tuple."""
    out: list[str] = []
    for v in values or []:
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return tuple(out)


def numbers(values: list[str] | None, flag: str, example: str) -> tuple[float, ...]:
    """Repeatable, comma-separated numbers (``--epsilon 0.3,0.5``) → floats; text that is not a number exits 2."""
    raw = split_csv(values)
    try:
        return tuple(float(v) for v in raw)
    except ValueError:
        raise typer.BadParameter(f"{','.join(raw)}: expected numbers such as {example}", param_hint=flag) from None


def named_paths(items: list[str], param_hint: str, default_name: Callable[[Path], str] | None = None
                ) -> list[tuple[str, Path]]:  # fmt: skip
    """``PATH`` or ``NAME=PATH`` arguments → (name, path) pairs. A path that exists is never split at ``=``;
    an unnamed input is named ``default_name(path)`` (default: the argument as given)."""
    out: list[tuple[str, Path]] = []
    for item in items:
        if "=" in item and not Path(item).exists():
            name, _, path = item.partition("=")
            if not name or not path:
                raise typer.BadParameter(f"{item!r}: use PATH or NAME=PATH", param_hint=param_hint)
            out.append((name, Path(path)))
        else:
            out.append((default_name(Path(item)) if default_name else item, Path(item)))
    return out


# ---- help: metavars in one style, readable errors for choices ---------------------------------------------


def choice_parser(enum: type[Enum], flag: str) -> Callable[[Any], Enum]:
    """A typer ``parser`` for an Enum option: the member, or exit 2 with one line
    ``Error: --format yaml: choose one of table, json, csv, markdown``."""

    def parse(value: Any) -> Enum:
        if isinstance(value, enum):
            return value
        try:
            return enum(value)
        except ValueError:
            choices = ", ".join(str(m.value) for m in enum)
            from spectra_cli.cli.errors import error_line

            error_line(f"{flag} {value}: choose one of {choices}")  # a usage error: one line, exit 2
            raise typer.Exit(2) from None

    return parse


def _metavar(annotation: Any) -> str | None:
    """The metavar of a parameter of type ``annotation`` (typer's ``<bool>``, ``<int>``, ``<path>`` replaced)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        annotation = args[0]
    if get_origin(annotation) is list:
        inner = get_args(annotation)[0]
        return _metavar(inner) or "TEXT"
    if annotation is bool:
        return ""
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "[" + "|".join(str(m.value) for m in annotation) + "]"
    return {int: "N", float: "X", str: "TEXT", Path: "PATH"}.get(annotation)


def tidy_help(func: Callable[..., Any]) -> None:
    """Give every typer parameter of the command ``func`` a metavar in one style (flags none, choices
    ``[a|b|c]``, ``N``, ``X``, ``PATH``, ``TEXT``) where it sets none, and Enum options a parser whose bad value
    reads ``Error: --format yaml: choose one of …``. Called once per command by ``cli/app.py``."""
    target = inspect.unwrap(func)
    hints = get_type_hints(target, include_extras=True)
    # typer evaluates string annotations again (new typer.Option objects each time): keep these ones, in the
    # annotations dict the wrapper shares
    target.__annotations__.update(hints)
    for name, hint in hints.items():
        if get_origin(hint) is not Annotated:
            continue
        base, *extras = get_args(hint)
        for info in extras:
            if not isinstance(info, typer.models.ParameterInfo):
                continue
            if info.metavar is None and (mv := _metavar(base)) is not None:
                info.metavar = mv
            core = [a for a in get_args(base) if a is not type(None)] or [base]
            enum = core[0] if isinstance(core[0], type) and issubclass(core[0], Enum) else None
            if enum is not None and info.parser is None and isinstance(info, typer.models.OptionInfo):
                decls = [info.default, *(info.param_decls or ())]
                flags = [d for d in decls if isinstance(d, str) and d.startswith("--")]
                info.parser = choice_parser(enum, flags[0] if flags else f"--{name.replace('_', '-')}")


def help_paragraphs(lines: list[str], width: int = 94) -> str:
    """Method paragraphs for an epilog, wrapped with a hanging indent (typer would wrap them flush left)."""
    import textwrap

    return "\n\n".join(textwrap.fill(line, width, initial_indent="  ", subsequent_indent="    ") for line in lines)


class Command(typer.core.TyperCommand):
    """Every command's class (``app.command(cls=Command)``): a usage line without typer's braces
    (``spectra compare [OPTIONS] BASE TUNED...``), no type column for arguments (their help says what they are)
    and no ``<bool>`` after ``--help``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [p.replace("{", "").replace("}", "") for p in super().collect_usage_pieces(ctx)]
        return [p.replace("......", "...").replace("...]...", "]...") for p in pieces]

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for p in params:
            if isinstance(p, typer.core.TyperArgument):
                p.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
            elif "--help" in getattr(p, "opts", ()):
                p.metavar = ""
        return params


# ---- options classes from parsed values ------------------------------------------------------------------


def _value(x: Any) -> Any:
    return x.value if isinstance(x, Enum) else x


def selection(include: list[str] | None, exclude: list[str] | None, kinds: list[str] | None, min_dim: int = 1,
              split_fused: bool | None = None, roles: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """The keyword arguments of :class:`~spectra_cli.options.SelectionOptions` (+ ``split_fused`` for analyze)."""
    kw: dict[str, Any] = {"include": split_csv(include), "exclude": split_csv(exclude), "kinds": split_csv(kinds),
                          "min_dim": min_dim, "roles": split_csv(roles)}  # fmt: skip
    if split_fused is not None:
        kw["split_fused"] = split_fused
    return kw


def compute(device: str, precision: Precision | str, backend: Backend | str, max_memory: int | None
            ) -> dict[str, Any]:  # fmt: skip
    """The keyword arguments of :class:`~spectra_cli.options.ComputeOptions`."""
    return {
        "device": device,
        "precision": _value(precision),
        "backend": _value(backend),
        "max_memory": max_memory,
    }


def engine(device: str, precision: Precision | str, backend: Backend | str, max_memory: int | None,
           method: Method | str) -> dict[str, Any]:  # fmt: skip
    """The keyword arguments of :class:`~spectra_cli.options.EngineOptions` (the compute ones and ``--method``)."""
    return {**compute(device, precision, backend, max_memory), "method": _value(method)}


def build(cls: Callable[..., T], *parts: Mapping[str, Any], **kwargs: Any) -> T:
    """``cls(**parts…, **kwargs)``; a :class:`SpectraError` from the options' validation is a usage error: exit 2
    with the same one-line message (which names the flag)."""
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part)
    merged.update(kwargs)
    try:
        return cls(**merged)
    except SpectraError as e:
        raise typer.BadParameter(str(e)) from None


# ---- the shared parameters ----------------------------------------------------------------------------------


def _help(text: str, note: str) -> str:
    return f"{text} {note}".strip()


IncludeOpt = Annotated[
    list[str] | None,
    typer.Option("--include", "-i", metavar="GLOB", help="Only tensors whose name matches this glob (repeatable).",
                 rich_help_panel="Selection"),
]  # fmt: skip
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option("--exclude", "-x", metavar="GLOB", help="Skip tensors whose name matches this glob (repeatable).",
                 rich_help_panel="Selection"),
]  # fmt: skip
KindsOpt = Annotated[
    list[str] | None,
    typer.Option("--kinds", "-k", metavar="KIND,…", help="Only these module kinds, PEFT-style, e.g. q_proj,v_proj or query,value.",
                 rich_help_panel="Selection"),
]  # fmt: skip
RolesOpt = Annotated[
    list[str] | None,
    typer.Option("--roles", metavar="ROLE,…", rich_help_panel="Selection",
                 help="Only matrices of these roles (the rows' role column): " + ", ".join(ROLES) + "."),
]  # fmt: skip
MinDimOpt = Annotated[
    int, typer.Option("--min-dim", metavar="N", help="Skip matrices whose smaller side is below N (N ≥ 1).",
                      rich_help_panel="Selection"),
]  # fmt: skip
SplitFusedOpt = Annotated[
    bool,
    typer.Option("--split-fused/--no-split-fused",
                 help="Split fused projections (c_attn, qkv_proj, query_key_value, W_pack, gate_up_proj) into parts.",
                 rich_help_panel="Selection"),
]  # fmt: skip


def device_option(note: str = "") -> Any:
    """``--device``; ``note`` says how this command uses it when that differs."""
    return typer.Option("--device", "-d", metavar="DEVICE", rich_help_panel="Compute",
                        help=_help("auto (CUDA when present), cpu, cuda or cuda:N.", note))  # fmt: skip


def precision_option(note: str = "") -> Any:
    return typer.Option("--precision", rich_help_panel="Compute",
                        help=_help("Compute precision (bf16/fp16 weights are upcast on the device).", note))  # fmt: skip


def backend_option(note: str = "") -> Any:
    return typer.Option("--backend", rich_help_panel="Compute",
                        help=_help("auto: NumPy on CPU (lean start-up), PyTorch on CUDA. torch forces PyTorch.", note))  # fmt: skip


def max_memory_option(note: str = "") -> Any:
    return typer.Option("--max-memory", "-M", parser=parse_size, metavar="SIZE", rich_help_panel="Compute",
                        show_default=False,
                        help=_help("Memory budget for weights in flight, e.g. 200MB or 2GB (default: 25% of free "
                                   "RAM, max 4GB; half the free GPU memory on CUDA).", note))  # fmt: skip


DeviceOpt = Annotated[str, device_option()]
PrecisionOpt = Annotated[Precision, precision_option()]
BackendOpt = Annotated[Backend, backend_option()]
MaxMemoryOpt = Annotated[int | None, max_memory_option()]
MethodOpt = Annotated[
    Method,
    typer.Option("--method", help="Singular values by exact svd, or by the float64 Gram route (faster on CPU); "
                 "auto: gram for float32, svd for float64.", rich_help_panel="Compute"),
]  # fmt: skip
FormatOpt = Annotated[
    Format, typer.Option("--format", "-f", help="Output format (data goes to stdout or --output).",
                         rich_help_panel="Output"),
]  # fmt: skip
OutputOpt = Annotated[
    Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write the output to this file instead of stdout.",
                              dir_okay=False, rich_help_panel="Output"),
]  # fmt: skip
PlotsOpt = Annotated[
    Path | None, typer.Option("--plots", metavar="DIR", help="Write PNG figures into this folder.", file_okay=False,
                              rich_help_panel="Output"),
]  # fmt: skip
ColumnsOpt = Annotated[
    list[str] | None,
    typer.Option("--columns", metavar="KEY,…", rich_help_panel="Output",
                 help="Table columns to show, by their key in the JSON rows (e.g. name,alpha,alpha_tail); "
                 "JSON, CSV and Markdown keep every column."),
]  # fmt: skip
WideOpt = Annotated[
    bool, typer.Option("--wide", help="Show every column in the table (default: a set that fits 100 columns).",
                       rich_help_panel="Output"),
]  # fmt: skip
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar and no warnings on stderr.",
                       rich_help_panel="Output"),
]  # fmt: skip
HtmlOpt = Annotated[
    Path | None,
    typer.Option("--html", metavar="FILE", dir_okay=False, rich_help_panel="Output",
                 help="Also write a self-contained HTML report (summary, sortable table, figures, provenance)."),
]  # fmt: skip
ForceOutOpt = Annotated[
    bool, typer.Option("--force", help="Replace an existing --out folder.", rich_help_panel="Output"),
]  # fmt: skip
