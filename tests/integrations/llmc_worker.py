"""Runs inside .venv-peers (llm-compressor installed; pyprune from the checkout on PYTHONPATH) for
tests/integrations/test_llmcompressor.py. On a tiny random Llama (float32) and fixed calibration ids:

1. ``pyprune.prune_model`` (the API) with the joint method, 2:4 (and 50% unstructured);
2. llm-compressor's ``oneshot`` with ``JointPruningModifier`` (same settings) alone, and the perplexities of both
   pruned models and the dense one on other fixed ids;
3. ``oneshot`` with ``JointPruningModifier`` then a ``QuantizationModifier`` for each scheme in --schemes, each saved
   compressed with ``save_pretrained`` and loaded back with transformers.

Writes <out>/result.pt: the calibration ids; the decoder blocks' Linear weights after 1 and 2 (both sparsities), the
logits after 2 and the perplexities; the modifier's per-module results; per scheme the saved quantized weights dequantized (weight * scale, read from
the safetensors file), the Linear weights and the logits of the model transformers loaded from the output directory.

    PYTHONPATH=. .venv-peers/bin/python tests/integrations/llmc_worker.py --out DIR [--schemes W8A8,FP8_DYNAMIC]
"""
from __future__ import annotations

import argparse
import copy
import glob
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYERS = r"re:model\.layers\.\d+$"


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float().eval()


def linear_weights(model) -> dict:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}


def loader(ids):
    # batch_size=None: each item is one batch, in order (as benchmarks/_peers_worker.py feeds llm-compressor)
    return torch.utils.data.DataLoader([{"input_ids": row[None, :].clone()} for row in ids], batch_size=None)


def saved_dequantized(path: str) -> dict:
    """``<name>.weight`` (times ``<name>.weight_scale`` where present) in float32, from the saved safetensors."""
    from safetensors.torch import load_file
    tensors = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        tensors.update(load_file(f))
    out = {}
    for k, w in tensors.items():
        if not k.endswith(".weight") or not k.startswith("model.layers."):
            continue
        base = k[:-len(".weight")]
        scale = tensors.get(f"{base}.weight_scale")
        w32 = w.to(torch.float32)
        out[base] = w32 * scale.to(torch.float32) if scale is not None else w32
        out[base + ":dtype"] = str(w.dtype)
    return out


def perplexity(model, ids) -> float:
    with torch.no_grad():
        return float(torch.exp(torch.stack([model(row[None], labels=row[None]).loss for row in ids]).mean()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schemes", default="W8A8,FP8_DYNAMIC")
    p.add_argument("--method", default="joint")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    import pyprune
    from pyprune.integrations.llmcompressor import JointPruningModifier
    from tests.models.tiny import byte_tokenizer
    tok = byte_tokenizer()  # oneshot wants a processor with a dataset; the ids are fed as they are

    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, 256, (4, 32), generator=g)
    dense_dir = os.path.join(args.out, "dense")
    tiny_llama(args.seed).save_pretrained(dense_dir)
    tok.save_pretrained(dense_dir)

    def load(path=dense_dir):  # oneshot reads the model's config and processor from its directory
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    dense = load()
    result = {"ids": ids}

    api = copy.deepcopy(dense)
    pyprune.prune_model(api, ids, pyprune.PruneConfig(method=args.method, sparsity="2:4"))
    result["api"] = linear_weights(api)

    def modifier():
        return JointPruningModifier(method=args.method, sparsity=0.5, mask_structure="2:4", targets=[LAYERS])

    model = load()
    mod = modifier()
    oneshot(model=model, dataset=loader(ids), recipe=[mod], num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], pipeline="sequential", processor=tok)
    result["modifier"] = linear_weights(model)
    with torch.no_grad():
        result["modifier_logits"] = model(ids[:1]).logits
    result["modifier_results"] = dict(mod.results)

    # perplexity on other fixed ids: the two pruned models against each other (and the dense one for scale)
    held = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(args.seed + 2))
    result["ppl"] = {k: perplexity(m, held) for k, m in (("dense", dense), ("api", api), ("modifier", model))}

    # unstructured 50%: the fraction path (mask_structure left at llm-compressor's "0:0")
    api_u = copy.deepcopy(dense)
    pyprune.prune_model(api_u, ids, pyprune.PruneConfig(method=args.method, sparsity=0.5))
    model = load()
    oneshot(model=model, dataset=loader(ids), recipe=[JointPruningModifier(method=args.method, sparsity=0.5,
                                                                           targets=[LAYERS])],
            num_calibration_samples=len(ids), max_seq_length=ids.shape[1], pipeline="sequential", processor=tok)
    result["unstructured"] = {"api": linear_weights(api_u), "modifier": linear_weights(model)}

    # registered by the import: a recipe written as YAML text finds it by name
    from llmcompressor.recipe import Recipe
    recipe = Recipe.create_instance(
        "prune_stage:\n  pruning_modifiers:\n    JointPruningModifier:\n      sparsity: 0.5\n"
        "      mask_structure: '2:4'\n      targets: ['re:model\\.layers\\.\\d+$']\n")
    result["yaml_modifiers"] = [type(m).__name__ for m in recipe.modifiers]

    result["schemes"] = {}
    for scheme in [s for s in args.schemes.split(",") if s]:
        model = load()
        out_dir = os.path.join(args.out, scheme)
        recipe = [modifier(), QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])]
        oneshot(model=model, dataset=loader(ids), recipe=recipe, num_calibration_samples=len(ids),
                max_seq_length=ids.shape[1], pipeline="sequential", processor=tok)
        model.save_pretrained(out_dir, save_compressed=True)
        entry = {"saved": saved_dequantized(out_dir)}
        loaded = load(out_dir)
        with torch.no_grad():
            entry["logits"] = loaded(ids[:1]).logits
        entry["loaded"] = linear_weights(loaded)
        entry["loaded_class"] = type(loaded.model.layers[0].self_attn.q_proj).__name__
        result["schemes"][scheme] = entry
    torch.save(result, os.path.join(args.out, "result.pt.tmp"))
    os.replace(os.path.join(args.out, "result.pt.tmp"), os.path.join(args.out, "result.pt"))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
