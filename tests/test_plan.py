"""The memory planner against hand-computed numbers, DeepSpeed's estimator and transformers' own models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from po_ray.config import load_config
from po_ray.plan import (
    format_plan,
    model_architecture,
    module_sizes,
    parse_bytes,
    plan_memory,
    smallest_cluster,
)

CONFIGS = Path(__file__).resolve().parents[1] / "po_ray" / "configs"
GiB = 2**30

# A Llama small enough to count by hand: hidden 64, 2 layers, 4 heads of 16, 2 KV heads (GQA),
# MLP 128, vocabulary 256, untied head.
SMALL_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "tie_word_embeddings": False,
}
# Parameters by hand:
#   embed_tokens                 256 × 64                          = 16 384
#   per layer: q_proj 64 × 64 = 4 096; k_proj, v_proj 64 × (2 × 16) = 2 048 each; o_proj 4 096
#              gate, up, down 64 × 128 = 8 192 each; two RMSNorms 64 each
#              4 096 + 2 × 2 048 + 4 096 + 3 × 8 192 + 2 × 64      = 36 992
#   2 layers                                                       = 73 984
#   final norm                                                     = 64
#   lm_head (untied)             64 × 256                          = 16 384
SMALL_PARAMS = 16_384 + 2 * 36_992 + 64 + 16_384
assert SMALL_PARAMS == 106_816


@pytest.fixture
def small_model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL_LLAMA))
    return tmp_path


def small_config(model_dir, *extra):
    """GPU bf16 ZeRO-3 run of SMALL_LLAMA with sizes chosen so the arithmetic below stays exact."""
    return load_config(None, [
        f"model.name_or_path={model_dir}",
        "model.dtype=bf16",
        "model.gradient_checkpointing=true",
        "model.attn_implementation=sdpa",
        "model.logprob_chunk_size=8",
        "data.max_prompt_length=16",
        "data.max_completion_length=16",
        "data.max_length=32",
        "train.micro_batch_size=2",
        "scaling.use_gpu=true",
        "deepspeed.stage=3",
        "deepspeed.reduce_bucket_size=1000",
        "deepspeed.stage3_prefetch_bucket_size=500",
        "deepspeed.stage3_param_persistence_threshold=0",
        "loss.name=dpo",
        "reference.strategy=sharded",
        *extra,
    ])


def test_small_model_by_hand(small_model_dir):
    cfg = small_config(small_model_dir)
    plan = plan_memory(cfg, nodes=1, gpus_per_node=4, gpu_memory_bytes=80 * 10**9)
    assert plan.n_params == SMALL_PARAMS
    assert plan.largest_layer_params == 16_384  # the embedding (and the lm_head) module
    # Every tensor divides by 4 GPUs, so each GPU holds 106 816 / 4 = 26 704 elements.
    per_gpu = 26_704
    assert plan.params_bytes == 2 * per_gpu == 53_408  # bf16
    assert plan.gradients_bytes == 2 * per_gpu == 53_408  # bf16
    assert plan.optimizer_bytes == 12 * per_gpu == 320_448  # fp32 master + Adam m + v
    # reduce bucket 2 B × 1000 + gathered embedding 4 B × 16 384 + prefetch bucket 2 B × 500
    assert plan.zero_buffers_bytes == 2_000 + 65_536 + 1_000 == 68_536
    assert plan.reference_bytes == 2 * per_gpu == 53_408  # sharded bf16 reference
    # 2 × 2 sequences × 32 tokens = 128 tokens. One layer saves per token
    # 4h + 3q + 3kv + 4i = 256 + 192 + 96 + 512 = 1 056 elements; with checkpointing a token keeps
    # its 2 layer inputs (2 × 64) plus one recomputed layer (2 × 1 056): 2 240 elements × 2 B.
    assert plan.activations_bytes == 128 * 2 * (2 * 64 + 2 * 1_056) == 573_440
    # chunk × vocab × (fp32 logits/gradient + its bf16 matmul output or gradient copy)
    assert plan.logprob_chunk_bytes == 8 * 256 * (4 + 2) == 12_288
    assert plan.headroom_bytes == 2 * GiB + 8 * 10**9  # 2 GiB + 10 % of 80 GB
    assert plan.total_bytes == 53_408 * 3 + 320_448 + 68_536 + 573_440 + 12_288 + 2 * GiB + 8 * 10**9
    assert plan.fits
    # DeepSpeed's estimator: 4 B × largest layer + 18 B × params / GPUs = 65 536 + 480 672.
    assert plan.deepspeed_model_states_bytes == 65_536 + 18 * SMALL_PARAMS // 4 == 546_208
    # Ours: params + gradients + optimiser + the same gathered layer; 2 B/param/GPU less.
    assert plan.model_states_bytes == 53_408 * 2 + 320_448 + 65_536 == 492_800
    assert plan.deepspeed_model_states_bytes - plan.model_states_bytes == 2 * per_gpu


def test_offload_precomputed_no_checkpointing_eager(small_model_dir):
    cfg = small_config(
        small_model_dir,
        "deepspeed.offload_optimizer=true",
        "reference.strategy=precomputed",
        "model.gradient_checkpointing=false",
        "model.attn_implementation=eager",
    )
    plan = plan_memory(cfg, nodes=2, gpus_per_node=2, gpu_memory_bytes=80 * 10**9)
    assert plan.params_bytes == 53_408  # 4 GPUs over 2 nodes: still 26 704 each, bf16 on the GPU
    assert plan.gradients_bytes == 0 and plan.optimizer_bytes == 0  # both offloaded with the optimiser
    assert plan.reference_bytes == 0
    # Eager attention adds scores + probabilities, 2 × 4 heads × 32 keys = 256 elements per token:
    # 1 056 + 256 = 1 312; without checkpointing all 2 layers keep them, plus one layer of gradients.
    assert plan.activations_bytes == 128 * 2 * (2 + 1) * 1_312 == 1_007_616
    # With the optimiser offloaded DeepSpeed counts 4 B × largest layer + 2 B × params / GPUs: as we do.
    assert plan.deepspeed_model_states_bytes == plan.model_states_bytes == 65_536 + 53_408


def test_padding_and_persistent_parameters(small_model_dir):
    cfg = small_config(small_model_dir, "deepspeed.stage3_param_persistence_threshold=64")
    plan = plan_memory(cfg, nodes=1, gpus_per_node=3, gpu_memory_bytes=80 * 10**9)
    # Over 3 GPUs each tensor rounds up: 16 384 -> 5 462 (embedding, lm_head), 4 096 -> 1 366,
    # 2 048 -> 683, 8 192 -> 2 731, 64 -> 22. Per layer 22 + 1 366 + 683 + 683 + 1 366 + 22 + 3 × 2 731
    # = 12 335; total 2 × 5 462 + 2 × 12 335 + 22 = 35 616 (not 106 816 / 3 = 35 605.3).
    assert plan.params_bytes == 2 * 35_616
    # The five 64-element norms (<= threshold) stay whole on every GPU, for policy and reference.
    assert plan.zero_buffers_bytes == 2_000 + 65_536 + 2 * (500 + 5 * 64)
    assert plan.reference_bytes == 2 * (35_616 + 5 * 64)


def test_fits_boundary(small_model_dir):
    cfg = small_config(small_model_dir)
    # Everything but the headroom is 1 134 936 B (the sum in test_small_model_by_hand) on 4 GPUs;
    # the total is 2 GiB + 1 134 936 + ⌊M / 10⌋, which equals M at M = 2 387 353 982
    # (2 147 483 648 + 1 134 936 = 2 148 618 584; 2 148 618 584 + 238 735 398 = 2 387 353 982).
    edge = 2_387_353_982
    at_edge = plan_memory(cfg, nodes=1, gpus_per_node=4, gpu_memory_bytes=edge)
    assert at_edge.total_bytes == edge and at_edge.fits
    below = plan_memory(cfg, nodes=1, gpus_per_node=4, gpu_memory_bytes=edge - 1)
    assert below.total_bytes == edge and not below.fits
    assert "does NOT fit" in format_plan(below) and "fits (0.00 GiB to spare)" in format_plan(at_edge)


def test_smallest_cluster_is_the_first_that_fits_and_totals_fall_with_nodes():
    cfg = load_config(CONFIGS / "command-r-35b-dpo.yaml")
    memory = parse_bytes("80GB")
    totals = [plan_memory(cfg, nodes=n, gpus_per_node=8, gpu_memory_bytes=memory).total_bytes for n in range(1, 9)]
    assert all(a >= b for a, b in zip(totals, totals[1:]))
    assert totals[0] > totals[-1]
    smallest = smallest_cluster(cfg, gpus_per_node=8, gpu_memory_bytes=memory)
    assert smallest is not None and smallest.fits and smallest.nodes == 2
    assert not plan_memory(cfg, nodes=1, gpus_per_node=8, gpu_memory_bytes=memory).fits
    # Smaller cards need more nodes, never fewer; too few allowed nodes gives None.
    smaller = smallest_cluster(cfg, gpus_per_node=8, gpu_memory_bytes=parse_bytes("40GB"))
    assert smaller is not None and smaller.nodes > smallest.nodes
    assert smallest_cluster(cfg, gpus_per_node=8, gpu_memory_bytes=memory, max_nodes=1) is None


@pytest.mark.parametrize("name", ["command-r-35b-dpo", "qwen2.5-32b-dpo"])
def test_shipped_35b_configs_fit_their_stated_cluster(name):
    path = CONFIGS / f"{name}.yaml"
    cfg = load_config(path)
    stated = re.search(
        r"po-ray plan --config (\S+) --nodes (\d+) --gpus-per-node (\d+) --gpu-memory (\S+)", path.read_text()
    )
    assert stated, f"{path} must state its `po-ray plan` line in the header comment"
    config_arg, nodes, gpus, memory = stated.groups()
    assert config_arg == name
    nodes, gpus = int(nodes), int(gpus)
    assert cfg.scaling.num_workers == nodes * gpus and cfg.scaling.use_gpu
    assert cfg.deepspeed.stage == 3 and cfg.model.dtype == "bf16" and cfg.model.gradient_checkpointing
    assert cfg.reference.strategy in ("sharded", "precomputed")
    plan = plan_memory(cfg, nodes=nodes, gpus_per_node=gpus, gpu_memory_bytes=parse_bytes(memory))
    assert plan.fits, format_plan(plan)
    assert plan.n_params > 30e9
    # DeepSpeed's larger 18 B/param figure must fit too.
    assert plan.total_bytes + plan.deepspeed_model_states_bytes - plan.model_states_bytes <= plan.gpu_memory_bytes


def test_bundled_35b_parameter_counts():
    # Command R: 40 layers × (4 × 8192² attention + 3 × 8192 × 22528 MLP + one 8192 LayerNorm)
    # + the tied 256 000 × 8192 embedding + the final norm.
    layer = 4 * 8192**2 + 3 * 8192 * 22528 + 8192
    command_r = load_config(None, ["model.name_or_path=CohereForAI/c4ai-command-r-v01"]).model
    sizes = module_sizes(model_architecture(command_r))
    assert sum(map(sum, (s for _, s in sizes))) == 40 * layer + 256_000 * 8192 + 8192 == 34_980_831_232
    # Qwen2.5-32B: GQA (40 query, 8 KV heads of 128), q/k/v biases, untied head.
    layer = (5120 * 5120 + 5120) + 2 * (5120 * 1024 + 1024) + 5120 * 5120 + 3 * 5120 * 27648 + 2 * 5120
    qwen = load_config(None, ["model.name_or_path=Qwen/Qwen2.5-32B-Instruct"]).model
    sizes = module_sizes(model_architecture(qwen))
    assert sum(map(sum, (s for _, s in sizes))) == 64 * layer + 5120 + 2 * 152_064 * 5120 == 32_763_876_352


def _meta_model_sizes(arch: dict) -> dict[str, tuple[int, ...]]:
    """Module name -> own parameter numels of the transformers model built on the meta device."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in arch.items() if k != "model_type"}
    config = AutoConfig.for_model(arch["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen, out = set(), {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            out[name] = tuple(p.numel() for p in own)
    return out


@pytest.mark.parametrize(
    "arch",
    [
        SMALL_LLAMA,
        {**SMALL_LLAMA, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
        {**SMALL_LLAMA, "model_type": "mistral"},
        {**SMALL_LLAMA, "model_type": "qwen2"},
        {**SMALL_LLAMA, "model_type": "qwen3", "head_dim": 32},
        {**SMALL_LLAMA, "model_type": "cohere", "use_qk_norm": True, "tie_word_embeddings": True},
    ],
    ids=["llama", "llama-biases-tied", "mistral", "qwen2", "qwen3", "cohere-qk-norm"],
)
def test_module_sizes_match_transformers(arch):
    assert dict(module_sizes(arch)) == _meta_model_sizes(arch)


@pytest.mark.parametrize("org_name", ["CohereForAI/c4ai-command-r-v01", "Qwen/Qwen2.5-32B-Instruct"])
def test_bundled_configs_match_transformers(org_name):
    arch = model_architecture(load_config(None, [f"model.name_or_path={org_name}"]).model)
    assert dict(module_sizes(arch)) == _meta_model_sizes(arch)


def test_tiny_llama_matches_the_model_it_builds():
    import torch

    from po_ray.data.tokenizer import load_tokenizer
    from po_ray.model.build import build_model

    cfg = load_config(CONFIGS / "demo.yaml")
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(
        cfg.model,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype=torch.float32,
        seed=0,
    )
    plan = plan_memory(cfg, nodes=1, gpus_per_node=2, gpu_memory_bytes=parse_bytes("8GiB"))
    assert plan.n_params == sum(p.numel() for p in model.parameters())
    assert plan.precision == "fp32"  # dtype auto on a CPU run
    assert plan.optimizer_bytes == 8 * (plan.params_bytes // 4)  # Adam m + v, no master copy


def test_model_architecture_sources(small_model_dir):
    local = load_config(None, [f"model.name_or_path={small_model_dir}", "model.config_overrides={num_hidden_layers: 3}"])
    arch = model_architecture(local.model)
    assert arch["hidden_size"] == 64 and arch["num_hidden_layers"] == 3  # override applied
    bundled = model_architecture(load_config(None, ["model.name_or_path=CohereForAI/c4ai-command-r-v01"]).model)
    assert bundled["logit_scale"] == 0.0625 and bundled["tie_word_embeddings"] is True
    unknown = load_config(None, ["model.name_or_path=no-such-org/no-such-model-xyz"]).model
    with pytest.raises(ValueError, match="no config.json found offline.*Qwen/Qwen2.5-32B-Instruct"):
        model_architecture(unknown)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        module_sizes({**SMALL_LLAMA, "model_type": "gpt2"})


def test_reference_strategy_follows_the_loss(small_model_dir):
    # auto: a reference-based loss gets a sharded reference, a reference-free one none at all.
    dpo = plan_memory(small_config(small_model_dir, "reference.strategy=auto"), nodes=1, gpus_per_node=4,
                      gpu_memory_bytes=80 * 10**9)
    assert dpo.reference_strategy == "sharded" and dpo.reference_bytes == 53_408
    simpo = plan_memory(small_config(small_model_dir, "reference.strategy=auto", "loss.name=simpo"), nodes=1,
                        gpus_per_node=4, gpu_memory_bytes=80 * 10**9)
    assert simpo.reference_strategy == "none" and simpo.reference_bytes == 0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("80GB", 80 * 10**9),
        ("80GiB", 80 * 2**30),
        ("81920MiB", 80 * 2**30),
        ("1.5TB", 1_500_000_000_000),
        (" 141 gib ", 141 * 2**30),
        ("512", 512),
        ("512B", 512),
        ("0.5KiB", 512),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "80XB", "80 G", "-5GB", "0GB", "1e3GB", "eighty", "80GB80"])
def test_parse_bytes_rejects_with_the_accepted_forms(text):
    with pytest.raises(ValueError, match=r"80GiB.*KiB, MiB, GiB, TiB"):
        parse_bytes(text)


def test_rows_split_the_zero_buffers_and_the_crosscheck_counts_the_first_four(small_model_dir):
    plan = plan_memory(small_config(small_model_dir), nodes=1, gpus_per_node=4, gpu_memory_bytes=80 * 10**9)
    # The 68 536 B of buffers (test_small_model_by_hand): 4 B × 16 384 gathered embedding, the rest
    # the 2 B × (1 000 + 500) buckets.
    assert plan.gathered_layer_bytes == 65_536
    assert plan.zero_buffers_bytes - plan.gathered_layer_bytes == 3_000
    assert plan.model_states_bytes == 53_408 + 53_408 + 320_448 + 65_536


def gib_rows(text: str) -> dict[str, float]:
    return {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^  (.+?)\s+(\d+\.\d\d)$", text, flags=re.M)}


def test_crosscheck_note_adds_up_the_rows_it_names():
    cfg = load_config(CONFIGS / "command-r-35b-dpo.yaml")
    text = format_plan(plan_memory(cfg, nodes=4, gpus_per_node=8, gpu_memory_bytes=parse_bytes("80GB")))
    # By hand: every Command R tensor divides by 32 GPUs, so each holds 34 980 831 232 / 32
    # = 1 093 150 976 elements: 2 B (weight) + 2 B (gradient) + 12 B (Adam, fp32 master) each,
    # 2.04 + 2.04 + 12.22 GiB; the gathered embedding is 4 B × 256 000 × 8192 = 7.81 GiB.
    # Together 25 879 023 616 B = 24.10 GiB.
    rows = gib_rows(text)
    assert rows["parameters (bf16, 1/32 each)"] == 2.04 and rows["gradients"] == 2.04
    assert rows["optimiser state (Adam, fp32 master)"] == 12.22
    assert rows["ZeRO-3 gathered largest layer (bf16 weight + gradient)"] == 7.81
    assert (16 * 1_093_150_976 + 4 * 256_000 * 8192) / GiB == pytest.approx(24.10, abs=0.005)
    assert ("where we count 24.10 GiB (parameters, gradients, optimiser state and the gathered largest layer)"
            in text)
    # The rows themselves, each rounded, add up to that within rounding.
    four = [rows[k] for k in ("parameters (bf16, 1/32 each)", "gradients", "optimiser state (Adam, fp32 master)",
                              "ZeRO-3 gathered largest layer (bf16 weight + gradient)")]
    assert sum(four) == pytest.approx(24.10, abs=0.02)
    assert sum(v for k, v in rows.items() if k != "total") == pytest.approx(rows["total"], abs=0.06)


def test_a_cluster_of_another_size_notes_the_workers_and_the_global_batch(small_model_dir):
    cfg = small_config(small_model_dir, "scaling.num_workers=8", "train.gradient_accumulation_steps=1")
    plan = plan_memory(cfg, nodes=1, gpus_per_node=4, gpu_memory_bytes=80 * 10**9)
    # 8 workers × 2 pairs × 1 step = 16 pairs per step configured; 4 GPUs give 4 × 2 × 1 = 8, and
    # 2 accumulation steps bring back 16.
    (note,) = [n for n in plan.notes if n.startswith("scaling.num_workers")]
    assert note == (
        "scaling.num_workers is 8, but 4 GPUs are 4 workers: run with scaling.num_workers=4. The global "
        "batch is then 4 workers × 2 pairs × 1 accumulation steps = 8 pairs per step, not 16; "
        "train.gradient_accumulation_steps=2 keeps 16."
    )
    assert f"note: {note}" in format_plan(plan)
    # 3 GPUs: 3 × 2 × 1 = 6 pairs; no whole number of accumulation steps gives 16 on 3 workers.
    three = plan_memory(cfg, nodes=1, gpus_per_node=3, gpu_memory_bytes=80 * 10**9)
    assert any(n.endswith("= 6 pairs per step, not 16.") for n in three.notes)
    # The configured count: no note.
    same = plan_memory(small_config(small_model_dir, "scaling.num_workers=4"), nodes=2, gpus_per_node=2,
                       gpu_memory_bytes=80 * 10**9)
    assert not [n for n in same.notes if n.startswith("scaling.num_workers")]


def test_plan_command_notes_the_smallest_clusters_batch(capsys):
    from po_ray.cli import main

    # Command R is configured for 32 workers × 2 pairs × 2 steps = 128 pairs; its smallest cluster,
    # 2 × 8 = 16 GPUs, gives 16 × 2 × 2 = 64, and 4 accumulation steps give 128 again.
    assert main(["plan", "--config", "command-r-35b-dpo", "--nodes", "4", "--gpus-per-node", "8",
                 "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    tail = out[out.index("smallest cluster that fits: 2 node(s) x 8 GPUs"):]
    assert "= 64 pairs per step, not 128; train.gradient_accumulation_steps=4 keeps 128." in tail
    assert "scaling.num_workers" not in out[: out.index("smallest cluster")]  # 4 × 8 is the configured 32
