"""Draft model (LlamaForCausalLMEagle3), the Eagle3 TTT forward + loss, attention masks, target head.

Submodules are imported on use (`torchspec.models.draft`, `.eagle3`, `.attention`, `.target_head`),
so importing this package stays cheap.

The aux-layer rule (default ids, their check, vLLM's numbering) lives with the other target facts in
`torchspec.config.target` (the config layer needs it too); it is re-exported here for existing callers.
"""

from __future__ import annotations

from torchspec.config.target import check_aux_layers, default_aux_layers, to_vllm_layer_ids

__all__ = ["check_aux_layers", "default_aux_layers", "to_vllm_layer_ids"]
