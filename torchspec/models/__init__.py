"""Draft model (LlamaForCausalLMEagle3), the Eagle3 TTT forward + loss, attention masks, target head.

Submodules are imported on use (`torchspec.models.draft`, `.eagle3`, `.attention`, `.target_head`),
so importing this package stays cheap.
"""

from __future__ import annotations


def default_aux_layers(num_layers: int) -> list[int]:
    """Default aux-layer ids for an L-layer target: [1, L//2 - 1, L - 4].

    Our convention (= SGLang's): id k is the OUTPUT of decoder layer k (0-based), i.e.
    transformers `hidden_states[k + 1]`. vLLM counts the state ENTERING layer k: add 1 there.

    Servers collect aux states once per distinct id in ascending order (vLLM does), so the ids must
    be distinct and ascending. For small targets (L < 8, where the formula repeats or goes out of
    order) the three ids are spread evenly instead: [0, L//2 - 1, L - 2] when distinct, else [0, 1, 2].
    """
    if num_layers < 3:
        raise ValueError(f"default aux layers need a target with at least 3 layers, got {num_layers}; "
                         "set inference.aux_hidden_states_layers explicitly")
    for ids in ([1, num_layers // 2 - 1, num_layers - 4], [0, num_layers // 2 - 1, num_layers - 2], [0, 1, 2]):
        if ids[0] < ids[1] < ids[2]:
            return ids
    raise AssertionError("unreachable: [0, 1, 2] is ascending")


def to_vllm_layer_ids(aux_layers) -> list[int]:
    """Our aux id k (output of decoder layer k) -> vLLM's id k + 1 (the state entering layer k + 1): the one
    conversion at the vLLM boundary (the vllm engine, the export's `eagle_aux_hidden_state_layer_ids`)."""
    return [int(k) + 1 for k in aux_layers]


def check_aux_layers(layers, num_layers: int | None = None,
                     key: str = "inference.aux_hidden_states_layers") -> list[int]:
    """Validate aux-layer ids: 3 distinct, ascending decoder-layer ids (of this target, when its layer
    count is known). The one place this rule lives: engine, export and converter all call it."""
    ids = [int(k) for k in layers]
    top = num_layers if num_layers is not None else float("inf")
    if len(ids) != 3 or not 0 <= ids[0] < ids[1] < ids[2] < top:
        where = (f" in [0, {num_layers - 1}] for this {num_layers}-layer target" if num_layers is not None else "")
        raise ValueError(
            f"{key}={ids}: need 3 distinct, ascending aux layer ids{where} (id k = output of decoder layer k); "
            "servers gather aux states in ascending layer order, so any other order would not match at "
            "serving time")
    return ids


__all__ = ["check_aux_layers", "default_aux_layers"]
