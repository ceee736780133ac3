"""Draft model (LlamaForCausalLMEagle3), the Eagle3 TTT forward + loss, attention masks, target head.

Submodules are imported on use (`torchspec.models.draft`, `.eagle3`, `.attention`, `.target_head`),
so importing this package stays cheap.
"""

from __future__ import annotations


def default_aux_layers(num_layers: int) -> list[int]:
    """Default aux-layer ids for an L-layer target: [1, L//2 - 1, L - 4].

    Our convention (= SGLang's): id k is the OUTPUT of decoder layer k (0-based), i.e.
    transformers `hidden_states[k + 1]`. vLLM counts the state ENTERING layer k: add 1 there.
    """
    if num_layers < 4:
        raise ValueError(f"default aux layers need a target with at least 4 layers, got {num_layers}; "
                         "set inference.aux_hidden_states_layers explicitly")
    return [1, num_layers // 2 - 1, num_layers - 4]


__all__ = ["default_aux_layers"]
