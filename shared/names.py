"""Names and limits that every layer shares, in a module that imports nothing heavy: a process that only reads
and uploads a package (a client reusing it in a round) then starts without diffusers, transformers or PEFT."""

from __future__ import annotations

TOKEN_LAYOUTS = ("block", "module")  # what a layer-wise token stands for (shared.edlora)
LAYOUT_SETTINGS = ("auto", *TOKEN_LAYOUTS)  # what training settings may ask for (shared.edlora.resolve_token_layout)
UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")  # LoRA targets (shared.lora)
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
MAX_SEED = 2**32 - 1  # the largest sampling seed (shared.sampling)
