"""Tiny randomly initialised models of every architecture in the table, built from transformers configs (no
downloads), plus a byte-level tokenizer and a synthetic sharded checkpoint writer."""
from __future__ import annotations

import json
import os

import torch

VOCAB = 256

# The decoder-only causal LMs every release must prune (issue 10's matrix): dense, per-layer attention, MoE, SSM and
# hybrid stacks. Any other type transformers builds goes through the same code; these are the ones tested.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "gpt_neox", "mamba", "mamba2", "gemma", "gemma2",
               "gemma3_text", "phi", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss",
               "llama4_text", "olmo2", "granite", "cohere", "starcoder2", "falcon", "gptj", "bloom", "stablelm",
               "falcon_mamba", "jamba", "zamba2")
# ... and 22 more that worked without a change when first tried (2026-12): hybrids, linear attention, more MoE (DBRX,
# with 2-D fused experts, DeepSeek-V2 and -V4 and Gemma 4 need a few config fields set to build tiny: _PER_TYPE); RWKV
# after its (1, 1, hidden) time-mix vectors stopped counting as stacked expert matrices
MORE_TYPES = ("bamba", "falcon_h1", "nemotron_h", "granitemoehybrid", "qwen3_next", "olmoe", "phimoe", "jetmoe",
              "glm4_moe", "minimax", "cohere2", "recurrent_gemma", "lfm2", "ernie4_5_moe", "seed_oss", "smollm3",
              "exaone4", "dbrx", "deepseek_v2", "gemma4_text", "rwkv", "deepseek_v4")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text", "jamba", "nemotron_h",
             "granitemoehybrid", "qwen3_next", "olmoe", "phimoe", "jetmoe", "glm4_moe", "minimax", "ernie4_5_moe",
             "dbrx", "deepseek_v2", "gemma4_text", "deepseek_v4")

# Every config field that sets a size, shrunk where the model type has it; then the few per-type constraints.
_SHRINK = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               moe_intermediate_size=32, shared_expert_intermediate_size=64, num_local_experts=4, num_experts=4,
               n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
               first_k_dense_replace=1, max_position_embeddings=256, n_embd=64, n_head=4, n_inner=128, d_model=64,
               ffn_dim=128, word_embed_proj_dim=64, state_size=8, expand=2, mamba_d_state=8, mamba_expand=2,
               kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
               sliding_window=8, rotary_dim=8, ffn_hidden_size=128, mamba_dt_rank=8, time_step_rank=8,
               attention_head_dim=16, mamba_headdim=16, mamba_d_conv=4, n_mamba_heads=8, mamba_n_heads=8,
               num_heads=8, n_groups=1, mamba_n_groups=1,
               # hybrids' own names for their Mamba and shared-expert sizes (Falcon-H1, Nemotron-H, Granite-4.0-H,
               # Qwen3-Next): a default of 8192 inputs made one Cholesky take 25 s
               mamba_d_ssm=128, mamba_d_head=16, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=8,
               moe_shared_expert_intermediate_size=64, shared_intermediate_size=64, linear_key_head_dim=16,
               linear_value_head_dim=16)
_PER_TYPE = {
    "mamba2": dict(head_dim=16),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "deepseek_v3": dict(head_dim=8),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], hybrid_layer_ids=[1], num_mem_blocks=1),
    # sizes in nested configs, and fields whose default is None (the model cannot run with it)
    "dbrx": dict(d_model=64, n_heads=4, max_seq_len=256, attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=1e4),
                 ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2)),
    "deepseek_v2": dict(num_experts_per_tok=2, n_group=1, topk_group=1, head_dim=16),
    "deepseek_v4": dict(o_lora_rank=16),
    # per-layer head sizes (the last block, full attention, twice the others') and the optional MoE block beside the
    # dense MLP; a callable: the layout depends on the number of layers
    "gemma4_text": lambda layers: dict(
        head_dim=16, layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        per_layer_config={f"{layers - 1:02d}": {"head_dim": 32}}, hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=VOCAB, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=32),
}
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# kept for tests written against the first table of architectures
TINY = {t: {} for t in ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "gpt_neox", "mamba", "mamba2")}


def seed_from(rng: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=rng))


def _settable(config, key: str) -> bool:
    try:
        present = hasattr(config, key)
    except RuntimeError:  # a per-layer field read globally (Gemma 4's head_dim): set it in _PER_TYPE
        return False
    return present and not isinstance(getattr(type(config), key, None), property)


def tiny_config(model_type: str, layers: int = 2, **overrides):
    """The model type's default config with every size field shrunk (hidden 64, 4 heads, 4 experts, vocab 256)."""
    from transformers import AutoConfig
    base = AutoConfig.for_model(model_type)
    kw = {k: v for k, v in _SHRINK.items() if _settable(base, k) and getattr(base, k) is not None}
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        if _settable(base, k):
            kw[k] = layers
    for i, k in enumerate(_TOKEN_IDS):
        if getattr(base, k, None) is not None:
            kw[k] = i
    kinds = getattr(base, "layer_types", None)
    if kinds is not None and _settable(base, "layer_types"):
        distinct = list(dict.fromkeys(kinds))
        kw["layer_types"] = [distinct[i % len(distinct)] for i in range(layers)]
    extra = _PER_TYPE.get(model_type, {})
    kw.update(extra(layers) if callable(extra) else extra)
    kw.update(overrides)
    try:
        return AutoConfig.for_model(model_type, vocab_size=VOCAB, **kw)
    except AttributeError:  # layer_types maps onto a read-only property in some configs (Bamba, Falcon-H1)
        if "layer_types" in overrides or "layer_types" not in kw:
            raise
        del kw["layer_types"]
        return AutoConfig.for_model(model_type, vocab_size=VOCAB, **kw)


def tiny_model(model_type: str, rng: torch.Generator, layers: int = 2, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed_from(rng))
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, layers, **overrides))
    return model.to(dtype).eval()


def calibration(rng: torch.Generator, nsamples: int = 4, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (nsamples, seqlen), generator=rng)


def byte_tokenizer():
    """A byte-level tokenizer with exactly 256 tokens (one per byte), made offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_tiny_dir(model, path: str, tokenizer: bool = True, max_shard_size: str | None = None) -> str:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        byte_tokenizer().save_pretrained(path)
    return path


def write_synthetic_llama(path: str, *, hidden: int, intermediate: int, layers: int, vocab: int = VOCAB,
                          heads: int = 8, kv_heads: int = 4, seed: int = 0, dtype=torch.float32) -> int:
    """A Llama checkpoint written block by block (one shard per block) without ever building the model, so it can be
    much larger than the memory of the process that writes it. Returns its size in bytes."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads
    shapes = {
        "self_attn.q_proj.weight": (heads * head_dim, hidden), "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden), "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "mlp.gate_proj.weight": (intermediate, hidden), "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
    }
    weight_map, total = {}, 0
    for i in range(layers):
        tensors = {f"model.layers.{i}.{k}": (torch.randn(*s, generator=g) / s[1] ** 0.5).to(dtype)
                   for k, s in shapes.items()}
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        name = f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    rest = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).to(dtype),
            "model.norm.weight": torch.ones(hidden, dtype=dtype),
            "lm_head.weight": (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(dtype)}
    name = f"model-{layers + 1:05d}-of-{layers + 1:05d}.safetensors"
    save_file(rest, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in rest})
    total += sum(t.numel() * t.element_size() for t in rest.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
              "dtype": str(dtype).replace("torch.", "")}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return total


def dir_hash(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            p = os.path.join(root, name)
            h.update(os.path.relpath(p, path).encode())
            st = os.stat(p)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
