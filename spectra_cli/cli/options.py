"""Options shared by every command, defined once (Annotated aliases) and reused."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


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


_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2,
          "G": 1024**3, "GB": 1024**3, "GIB": 1024**3, "T": 1024**4, "TB": 1024**4}  # fmt: skip


def parse_size(text: str) -> int:
    """'200MB', '1.5G', '4096' → bytes (binary units). Raises typer.BadParameter (exit 2) otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise typer.BadParameter(f"{text!r} is not a size; use e.g. 200MB, 2GB or a number of bytes")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise typer.BadParameter("the memory budget must be positive")
    return value


def split_csv(values: list[str] | None) -> tuple[str, ...]:
    """Repeatable, comma-separated option values → a flat tuple."""
    out: list[str] = []
    for v in values or []:
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return tuple(out)


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
MinDimOpt = Annotated[
    int, typer.Option("--min-dim", min=1, metavar="N", help="Skip matrices whose smaller side is below this.",
                      rich_help_panel="Selection"),
]  # fmt: skip
SplitFusedOpt = Annotated[
    bool,
    typer.Option("--split-fused/--no-split-fused",
                 help="Split fused projections (c_attn, qkv_proj, query_key_value, W_pack, gate_up_proj) into parts.",
                 rich_help_panel="Selection"),
]  # fmt: skip
DeviceOpt = Annotated[
    str, typer.Option("--device", "-d", metavar="DEVICE", help="auto (CUDA when present), cpu, cuda or cuda:N.",
                      rich_help_panel="Compute"),
]  # fmt: skip
PrecisionOpt = Annotated[
    Precision, typer.Option("--precision", help="Compute precision (bf16/fp16 weights are upcast on the device).",
                            rich_help_panel="Compute"),
]  # fmt: skip
MethodOpt = Annotated[
    Method,
    typer.Option("--method", help="Singular values by exact svd, or by the float64 Gram route (faster on CPU); "
                 "auto: gram for float32, svd for float64.", rich_help_panel="Compute"),
]  # fmt: skip
BackendOpt = Annotated[
    Backend,
    typer.Option("--backend", help="auto: NumPy on CPU (lean start-up), PyTorch on CUDA. torch forces PyTorch.",
                 rich_help_panel="Compute"),
]  # fmt: skip
MaxMemoryOpt = Annotated[
    int | None,
    typer.Option("--max-memory", "-M", parser=parse_size, metavar="SIZE",
                 help="Memory budget for weights in flight, e.g. 200MB or 2GB (default: 25% of free RAM, "
                 "max 4GB; half the free GPU memory on CUDA).", rich_help_panel="Compute", show_default=False),
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
