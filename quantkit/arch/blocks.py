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
    quantized. roles: a linear's last name component -> its role. moe: the sparse MoE module, if any."""

    capture_groups: tuple[tuple[str, ...], ...]
    roles: dict[str, str]
    moe: str | None = None


_PROJ = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down"}  # fmt: skip

BLOCK_KINDS: dict[str, BlockKind] = {
    "dense": BlockKind(
        (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"),
            ("mlp.down_proj",),
        ),
        _PROJ,
    ),
    "moe": BlockKind(  # the router gate stays 16-bit
        (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.o_proj",),
            ("block_sparse_moe.experts.{E}.w1", "block_sparse_moe.experts.{E}.w3"),
            ("block_sparse_moe.experts.{E}.w2",),
        ),
        {**_PROJ, "w1": "gate", "w3": "up", "w2": "down"},
        moe="block_sparse_moe",
    ),
    "vision": BlockKind(
        (
            ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
            ("attention.o_proj",),
            ("feed_forward.gate_proj", "feed_forward.up_proj"),
            ("feed_forward.down_proj",),
        ),
        _PROJ,
    ),
}

# Which part of a model a tensor belongs to, by name prefix (native and HF names); anything else is "text".
PART_PREFIXES = (
    ("vision", ("vision_encoder.", "vision_tower.", "model.vision_tower.")),
    ("projector", ("vision_language_adapter.", "multi_modal_projector.", "model.multi_modal_projector.")),
)

# The vision tower, for --vision quantize: the modules before its layers, and where its layers are.
VISION_EMBED = ("vision_tower.patch_conv", "vision_tower.ln_pre")
VISION_LAYERS = "vision_tower.transformer.layers"


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
