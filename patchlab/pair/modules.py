"""Parameter names -> module types and layer indices, across model families (for densities and diffs)."""

from __future__ import annotations

import re

from patchlab.pair.arch import ArchSpec

#: (pattern on a parameter name, module type), first match wins.
_MODULE_TYPES: list[tuple[re.Pattern, str]] = [(re.compile(p), t) for p, t in [
    (r"(embed_tokens|wte|wpe|embed_in|word_embeddings)\.", "embedding"),
    (r"(lm_head|embed_out)\.", "lm_head"),
    (r"\.(q_proj|query)\.", "attn_q"),
    (r"\.(k_proj|key)\.", "attn_k"),
    (r"\.(v_proj|value)\.", "attn_v"),
    (r"(c_attn|query_key_value|qkv_proj|Wqkv)\.", "attn_qkv"),
    (r"(self_attn\.o_proj|attn\.c_proj|attention\.dense|attn\.out_proj)\.", "attn_o"),
    (r"\.(gate_proj|w1)\.", "mlp_gate"),
    (r"\.(up_proj|c_fc|dense_h_to_4h|w3|fc1)\.", "mlp_up"),
    (r"\.(down_proj|mlp\.c_proj|dense_4h_to_h|w2|fc2)\.", "mlp_down"),
    (r"(norm|ln_\d|ln_f|layernorm|layer_norm)", "norm"),
]]

#: Display order of module types.
MODULE_ORDER = ["embedding", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "mlp_gate", "mlp_up", "mlp_down",
                "norm", "lm_head", "other"]

_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.")


def module_type(name: str) -> str:
    """The module type of a parameter name: embedding, attn_q/k/v/qkv/o, mlp_gate/up/down, norm, lm_head, other."""
    for pattern, kind in _MODULE_TYPES:
        if pattern.search(name):
            return kind
    return "other"


def layer_index(name: str, arch: ArchSpec | None = None) -> int | None:
    """The decoder layer a parameter belongs to (``None`` for embeddings, final norm, head).

    With ``arch``, only names under ``arch.layers`` count; without, the first ``.<int>.`` component is used.
    """
    if arch is not None:
        prefix = arch.layers + "."
        if not name.startswith(prefix):
            return None
        return int(name[len(prefix):].split(".", 1)[0])
    match = _LAYER.match(name)
    return int(match["index"]) if match else None
