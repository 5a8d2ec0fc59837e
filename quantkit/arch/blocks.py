"""What the quantizer knows about a layer, as data: per block kind the capture order of its linears, the role of
each linear (what measurement's candidates give bits to), where its experts live, and its sub-blocks.

A layer module says which kind it is (`layer.kind`) and runs its halves as `layer.attn_block(x, ctx)` and
`layer.mlp_block(h)`; nothing in quant/ names a module of a particular architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

# Roles and the block they belong to; the roles measurement spends extra bits on first (as in ExLlamaV2's tables).
BLOCK_ROLES = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
SENSITIVE = {"attn": ("v", "o"), "mlp": ("down",)}
# Roles that read one input, which loaders fuse (vLLM's qkv_proj and gate_up_proj): --bpw gives them one setting.
SHARED_INPUT = {"attn": ("q", "k", "v"), "mlp": ("gate", "up")}
EXPERTS = "experts"  # experts are `<moe>.experts.{E}.<linear>`: `{E}` in a capture group expands to each expert


@dataclass(frozen=True)
class BlockKind:
    """One kind of layer. capture_groups: linears (names relative to the layer) in quantization order; linears in
    one group share their input and are solved together, each group captured after the previous ones were
    quantized. roles: a linear's last name component -> its role. moe: the sparse MoE module, if any, and
    moe_aliases the other names loaders give it. fused: (module, its linears, the one module the runtime and
    loaders such as vLLM join them into)."""

    capture_groups: tuple[tuple[str, ...], ...]
    roles: dict[str, str]
    moe: str | None = None
    moe_aliases: tuple[str, ...] = ()
    fused: tuple[tuple[str, tuple[str, ...], str], ...] = ()


BLOCK_KINDS: dict[str, BlockKind] = {}  # filled by the architecture families (arch/mistral.py), by kind name
# Which part of a model a tensor belongs to, by name prefix (native and HF names); anything else is "text".
PART_PREFIXES: list[tuple[str, tuple[str, ...]]] = []
VISION: dict[str, object] = {}  # embed: the vision tower's modules before its layers; layers: where its layers are


def register_kinds(kinds: dict[str, BlockKind], parts=(), vision_embed=(), vision_layers: str | None = None) -> None:
    """An architecture family's layer kinds, tensor-name parts and vision-tower modules (see arch/mistral.py)."""
    BLOCK_KINDS.update(kinds)
    PART_PREFIXES.extend(parts)
    if vision_layers is not None:
        VISION.update(embed=tuple(vision_embed), layers=vision_layers)


def vision_embed() -> tuple[str, ...]:
    """The vision tower's modules that run before its layers (patch conv, pre-norm), for --vision quantize."""
    return VISION["embed"]


def vision_layers() -> str:
    """The module path of the vision tower's layer list."""
    return VISION["layers"]


def fused_names() -> dict[frozenset[str], str]:
    """Linears a loader fuses into one module, by their leaf names: {q/k/v: qkv_proj, gate/up: gate_up_proj}."""
    return {frozenset(parts): target for kind in BLOCK_KINDS.values() for _, parts, target in kind.fused}


def moe_modules() -> tuple[str, ...]:
    """Every name the sparse MoE module goes by (ours and the loaders'), for rules that must match all of them."""
    names = (n for kind in BLOCK_KINDS.values() if kind.moe for n in (*kind.moe_aliases, kind.moe))
    return tuple(dict.fromkeys(names))


def block_kind(layer) -> BlockKind:
    """The BlockKind of a layer module (its `kind` attribute)."""
    return BLOCK_KINDS[layer.kind]


def role_of(name: str) -> str:
    """The role of a linear from its name (relative or absolute): `layers.3.mlp.down_proj` -> down."""
    leaf = name.rpartition(".")[2]
    for kind in BLOCK_KINDS.values():
        if leaf in kind.roles:
            return kind.roles[leaf]
    raise KeyError(f"no role is declared for linear {name!r} (quantkit.arch.blocks.BLOCK_KINDS)")


def block_of(name: str) -> str:
    """attn or mlp: the block a linear belongs to."""
    return "attn" if role_of(name) in BLOCK_ROLES["attn"] else "mlp"


def expert_index(name: str) -> int | None:
    """The expert a linear belongs to (`...experts.5.w1` -> 5), None outside MoE experts."""
    parts = name.split(".")
    return int(parts[parts.index(EXPERTS) + 1]) if EXPERTS in parts else None


def tensor_part(name: str) -> str:
    """text, vision or projector."""
    for part, prefixes in PART_PREFIXES:
        if name.startswith(prefixes):
            return part
    return "text"
