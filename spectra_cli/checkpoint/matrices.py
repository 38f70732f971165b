"""Which tensors of a checkpoint are weight matrices, and how each is viewed as out×in.

- 2-D floating tensors are matrices (``nn.Linear`` layout out×in; embeddings vocab×dim).
- Conv kernels (out, in, kh, kw) — and 3-D/5-D kernels whose name says conv — are reshaped to out×(in·k…).
- GPT-2 style ``Conv1D`` weights (stored in×out) are recognised and transposed.
- 1-D tensors, scalars and integer buffers are skipped (and listed as skipped, with the reason).
- Optionally, fused projections (``c_attn``, ``qkv_proj``, ``query_key_value``, ``W_pack``, ``gate_up_proj``)
  are split into their parts.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spectra_cli.checkpoint.naming import ROLES, matches_kind, parse_names
from spectra_cli.checkpoint.source import Checkpoint
from spectra_cli.checkpoint.tensors import DTYPE_NAMES, SUPPORTED_FLOATS, TensorInfo
from spectra_cli.errors import SelectionError

_CONV1D_NAMES = ("c_attn", "c_proj", "c_fc", "q_attn")
_FUSED = ("c_attn", "qkv_proj", "query_key_value", "W_pack", "gate_up_proj", "qkv")


@dataclass(frozen=True)
class MatrixSpec:
    """One matrix to analyse.

    ``shape`` is the logical out×in shape. ``stored_2d`` is the 2-D view of the stored tensor (conv kernels
    flattened); ``transposed`` says the logical matrix is its transpose (GPT-2 ``Conv1D``). ``part`` selects
    rows of the logical matrix for a split fused projection (a contiguous ``(start, stop)`` or an index array).
    """

    name: str
    tensor: TensorInfo
    shape: tuple[int, int]
    stored_2d: tuple[int, int]
    depth: int | None
    kind: str
    role: str
    transposed: bool = False
    part: tuple[int, int] | None = None
    part_index: tuple[int, ...] | None = field(default=None, repr=False)
    note: str = ""

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.tensor.dtype, self.tensor.dtype)

    @property
    def nbytes_stored(self) -> int:
        return self.params * self.tensor.itemsize


@dataclass(frozen=True)
class Skipped:
    name: str
    shape: tuple[int, ...]
    dtype: str
    reason: str


@dataclass(frozen=True)
class Selection:
    """Filters applied to the tensors of a checkpoint. Globs match tensor names (``fnmatch``); ``roles`` are
    values of :data:`~spectra_cli.checkpoint.naming.ROLES` (attention, mlp, embedding, …)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    min_dim: int = 1
    split_fused: bool = False
    roles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        bad = [r for r in self.roles if r not in ROLES]
        if bad:
            raise SelectionError(f"--roles {','.join(bad)}: not a role; choose from {', '.join(ROLES)}")

    @property
    def filters(self) -> list[str]:
        """The filters in force, as the flags that set them (``--kinds query,value``)."""
        what = []
        if self.include:
            what.append(f"--include {' '.join(self.include)}")
        if self.exclude:
            what.append(f"--exclude {' '.join(self.exclude)}")
        if self.kinds:
            what.append(f"--kinds {','.join(self.kinds)}")
        if self.roles:
            what.append(f"--roles {','.join(self.roles)}")
        if self.min_dim > 1:
            what.append(f"--min-dim {self.min_dim}")
        return what

    def accepts_role(self, role: str) -> bool:
        """The --roles rule (a matrix's role is known once its shape is: conv kernels become ``conv``)."""
        return not self.roles or role in self.roles

    def accepts_name(self, tensor_name: str, kind: str) -> bool:
        """The --include / --exclude / --kinds rule (``--min-dim`` is checked on shapes)."""
        if self.include and not any(fnmatch.fnmatchcase(tensor_name, g) for g in self.include):
            return False
        if any(fnmatch.fnmatchcase(tensor_name, g) for g in self.exclude):
            return False
        return not self.kinds or any(matches_kind(tensor_name, kind, k) for k in self.kinds)


_CONV1D_MODELS = {"gpt2", "openai-gpt", "gpt_bigcode", "imagegpt", "decision_transformer"}




def _is_gpt2_style(ckpt: Checkpoint) -> bool:
    """GPT-2 ``Conv1D`` layout: from config.json's model_type when there is one; otherwise from the names
    *and* the stored shape of ``c_attn`` (d×3d for Conv1D, 3d×d for a Linear such as Qwen-1's)."""
    if ckpt.config and "model_type" in ckpt.config:
        return ckpt.config["model_type"] in _CONV1D_MODELS
    for t in ckpt.tensors:
        if t.name.endswith("attn.c_attn.weight") and len(t.shape) == 2:
            return t.shape[1] == 3 * t.shape[0]
        if t.name.endswith("mlp.c_fc.weight") and len(t.shape) == 2:
            return t.shape[1] > t.shape[0]
    return False


def _conv1d(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _CONV1D_NAMES


def _fused_parts(
    spec: MatrixSpec, config: dict[str, Any] | None
) -> list[tuple[str, tuple[int, int] | None, tuple[int, ...] | None]]:
    """Split a fused projection's rows into named parts; empty when the layout cannot be determined."""
    leaf = spec.tensor.name.split(".")[-2] if "." in spec.tensor.name else ""
    out_dim = spec.shape[0]
    cfg = config or {}
    if leaf == "gate_up_proj":
        if out_dim % 2:
            return []
        h = out_dim // 2
        return [("gate", (0, h), None), ("up", (h, out_dim), None)]
    if leaf not in {"c_attn", "qkv_proj", "query_key_value", "W_pack", "qkv"}:
        return []
    n_heads = cfg.get("num_attention_heads") or cfg.get("n_head") or cfg.get("num_heads")
    n_kv = cfg.get("num_key_value_heads") or cfg.get("multi_query_group_num") or n_heads
    hidden = cfg.get("hidden_size") or cfg.get("n_embd")
    head_dim = cfg.get("head_dim") or (hidden // n_heads if hidden and n_heads else None)
    model_type = cfg.get("model_type", "")
    if leaf == "query_key_value" and model_type in {"gpt_neox", "bloom"}:
        if not (n_heads and head_dim) or n_heads * 3 * head_dim != out_dim:
            return []
        idx = np.arange(out_dim).reshape(n_heads, 3, head_dim)
        return [(p, None, tuple(int(i) for i in idx[:, j, :].ravel())) for j, p in enumerate("qkv")]
    if leaf == "query_key_value" and model_type not in {"falcon", "chatglm"}:
        return []
    if n_heads and head_dim and n_kv and (n_heads + 2 * n_kv) * head_dim == out_dim:
        q, kv = n_heads * head_dim, n_kv * head_dim
        return [("q", (0, q), None), ("k", (q, q + kv), None), ("v", (q + kv, out_dim), None)]
    if out_dim % 3 == 0 and leaf != "query_key_value":
        t = out_dim // 3
        return [("q", (0, t), None), ("k", (t, 2 * t), None), ("v", (2 * t, out_dim), None)]
    return []


def select_matrices(ckpt: Checkpoint, sel: Selection) -> tuple[list[MatrixSpec], list[Skipped]]:
    """The matrices of ``ckpt`` that pass the filters, in read order, and the tensors skipped (with reasons).
    Raises :class:`SelectionError` when none does."""
    specs, skipped = _select(ckpt, sel)
    if not specs:
        names = parse_names([t.name for t in ckpt.tensors])
        what = sel.filters
        hint = f" after filters ({'; '.join(what)})" if what else ""
        kinds = sorted({names[t.name].kind for t in ckpt.tensors if len(t.shape) >= 2 and t.is_float})[:12]
        raise SelectionError(
            f"{ckpt.path}: no weight matrices selected{hint}; {len(ckpt.tensors)} tensors in the checkpoint"
            + (f", kinds include: {', '.join(kinds)}" if kinds else "")
        )
    return specs, skipped


def count_excluded(ckpt: Checkpoint, sel: Selection, selected: int) -> int:
    """How many weight matrices of ``ckpt`` the filters of ``sel`` left out, given that ``selected`` passed
    (0 when no filter is set). Reads headers only."""
    if not sel.filters:
        return 0
    every, _ = _select(ckpt, Selection(split_fused=sel.split_fused))
    return max(len(every) - selected, 0)


def _select(ckpt: Checkpoint, sel: Selection) -> tuple[list[MatrixSpec], list[Skipped]]:
    gpt2 = _is_gpt2_style(ckpt)
    names = parse_names([t.name for t in ckpt.tensors])
    specs: list[MatrixSpec] = []
    skipped: list[Skipped] = []
    for t in ckpt.tensors:
        ni = names[t.name]
        if not sel.accepts_name(t.name, ni.kind):
            continue
        if not sel.accepts_role(ni.role) and not (ni.role == "other" and "conv" in sel.roles):
            continue  # (a tensor named "other" may still be a conv kernel: decided on its shape below)
        if not t.is_float:
            skipped.append(Skipped(t.name, t.shape, t.dtype, "not a floating-point tensor"))
            continue
        if t.dtype not in SUPPORTED_FLOATS:
            skipped.append(Skipped(t.name, t.shape, t.dtype, f"{t.dtype} weights are not supported yet"))
            continue
        nd = len(t.shape)
        note = ""
        transposed = False
        role = ni.role
        if nd < 2:
            skipped.append(Skipped(t.name, t.shape, t.dtype, "not a matrix (1-D or scalar)"))
            continue
        leaf = t.name.rsplit(".", 1)[-1]
        if leaf in {"bias", "masked_bias"} or (nd == 4 and t.shape[0] == 1 and t.shape[1] == 1):
            skipped.append(Skipped(t.name, t.shape, t.dtype, "a bias or attention-mask buffer, not a weight"))
            continue
        if nd == 2:
            stored = (t.shape[0], t.shape[1])
            if gpt2 and _conv1d(t.name):
                transposed = True
                note = f"Conv1D stored {t.shape[0]}×{t.shape[1]} (in×out), transposed"
        elif nd == 4 or (nd in (3, 5) and "conv" in t.name.lower()) or (nd == 4 and role == "embedding"):
            rest = t.numel // t.shape[0] if t.shape[0] else 0
            stored = (t.shape[0], rest)
            note = f"conv kernel {'×'.join(map(str, t.shape))} reshaped to {t.shape[0]}×{rest}"
            if role == "other":
                role = "conv"
        else:
            skipped.append(Skipped(t.name, t.shape, t.dtype, f"{nd}-D tensor that is not a conv kernel"))
            continue
        if not sel.accepts_role(role):
            continue
        shape = (stored[1], stored[0]) if transposed else stored
        if 0 in shape:
            skipped.append(Skipped(t.name, t.shape, t.dtype, "empty tensor"))
            continue
        base = MatrixSpec(
            name=t.name,
            tensor=t,
            shape=shape,
            stored_2d=stored,
            depth=ni.depth,
            kind=ni.kind,
            role=role,
            transposed=transposed,
            note=note,
        )
        parts = _fused_parts(base, ckpt.config) if sel.split_fused else []
        if not parts:
            if sel.split_fused and t.name.split(".")[-2:-1] and t.name.split(".")[-2] in _FUSED:
                why = "fused projection left whole: its layout could not be told from config.json"
                base = dataclasses.replace(base, note=f"{base.note}; {why}" if base.note else why)
            candidates = [base]
        else:
            candidates = []
            for pname, rng, idx in parts:
                rows = (rng[1] - rng[0]) if rng else len(idx or ())
                candidates.append(
                    MatrixSpec(
                        name=f"{t.name}[{pname}]",
                        tensor=t,
                        shape=(rows, shape[1]),
                        stored_2d=stored,
                        depth=ni.depth,
                        kind=f"{ni.kind}.{pname}",
                        role=role,
                        transposed=transposed,
                        part=rng,
                        part_index=idx,
                        note=(note + "; " if note else "") + f"part {pname} of a fused projection",
                    )
                )
        for c in candidates:
            if min(c.shape) < sel.min_dim:
                continue
            specs.append(c)
    return specs, skipped
