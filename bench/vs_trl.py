"""po_ray against TRL's DPOTrainer on the same work, side by side, on this machine.

    .venv/bin/python bench/vs_trl.py --quick --json bench_results.json
    .venv/bin/python bench/vs_trl.py --long --only trl po_ray_1w --set model.logprob_chunk_size=256

One run builds the data once (a 32k-word word-level tokenizer and synthetic preference pairs),
measures this machine's fp32 matmul peak, then runs each contender in its own subprocess so the
peak memory of its whole process tree (Ray's raylet, GCS and workers included) is its own:

  initial_weights (unmeasured, always first) po_ray's ZeRO-3-built starting weights, saved for TRL
  trl             TRL DPOTrainer, separate reference model, one process (no accelerate launcher)
  po_ray_1w       po_ray, default config (ZeRO-3, sharded reference), 1 Ray worker
  po_ray_2w       po_ray, 2 Ray workers under ZeRO-3 on gloo, same global batch
  po_ray_1w_pre   po_ray, 1 worker, reference.strategy=precomputed (reported separately)
  profile         one in-process po_ray step (same engines as the loop) under torch.profiler

All see the same model (a Llama built from config, random init, fixed seed: identical weights),
the same pairs in the same order, batch size, lengths, DPO β, AdamW and learning-rate schedule.
Step times come from when each step ends (TRL: a callback; po_ray: the run's ledger, polled),
over the steps after the warm-up. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as common  # noqa: E402

SCRIPT = Path(__file__).resolve()
LN2 = 0.6931471805599453


@dataclass(frozen=True)
class Spec:
    """Everything both trainers are given; the same for every contender of a run."""

    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    intermediate_size: int = 1408
    vocab_size: int = 32000
    batch_pairs: int = 8
    """Pairs per optimiser step (global: split over workers for po_ray_2w)."""
    prompt_words: tuple = (64, 64)
    """Inclusive range of prompt words (tokens without BOS). Fixed by default, as in the figures of
    docs/benchmarks.md (taken before a prompt-cut fix in data/encode.py that only changed prompts
    shorter than their room); the run checks the token ids agree with TRL's (tokens_identical)."""
    completion_words: tuple = (16, 128)
    """Inclusive range of words per completion (tokens without EOS)."""
    warmup_steps: int = 2
    measured_steps: int = 8
    lr: float = 1e-5
    beta: float = 0.1
    seed: int = 0

    @property
    def max_prompt_length(self) -> int:
        return self.prompt_words[1] + 1  # + BOS

    @property
    def max_completion_length(self) -> int:
        return self.completion_words[1] + 1  # + EOS

    @property
    def max_length(self) -> int:
        # Nothing is ever truncated: TRL (keeps the start) and po_ray (cuts the prompt) would differ.
        return self.max_prompt_length + self.max_completion_length

    @property
    def max_steps(self) -> int:
        return self.warmup_steps + self.measured_steps

    @property
    def num_pairs(self) -> int:
        return self.max_steps * self.batch_pairs  # one epoch, no pair seen twice

    def model_overrides(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": max(512, self.max_length),
        }


FULL = Spec()
QUICK = replace(FULL, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=704, batch_pairs=4,
                prompt_words=(24, 24), completion_words=(8, 56), warmup_steps=2, measured_steps=4)
# Longer sequences at the same model: activations and logits grow, the fixed costs (Ray's processes,
# weights, optimiser state) do not, so the memory ratio shows what it is once the work dominates.
LONG = replace(FULL, prompt_words=(128, 128), completion_words=(128, 384), measured_steps=6)
SPECS = {"full": FULL, "quick": QUICK, "long": LONG}


# ---- data: the same text for both trainers --------------------------------------------------------


def synthetic_words(count: int, seed: int) -> list[str]:
    """``count`` distinct 4-letter lower-case words (letters only: the tokenizer splits digits off)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(letters) for _ in range(4)))
    return sorted(words)


def build_tokenizer(out_dir: Path, vocab_size: int, seed: int):
    """The bundled word-level tokenizer's recipe over enough synthetic words for ``vocab_size`` tokens."""
    from po_ray.data.tokenizer import build_word_tokenizer

    base = len(build_word_tokenizer([]))
    tokenizer = build_word_tokenizer(synthetic_words(vocab_size - base, seed))
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, wanted {vocab_size}")
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def write_pairs(path: Path, spec: Spec, words: list[str]) -> None:
    """``num_pairs`` rows of plain ``{prompt, chosen, rejected}`` text with random lengths in range."""
    rng = random.Random(spec.seed + 1)

    def text(lo_hi: tuple) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(*lo_hi)))

    with path.open("w") as f:
        for _ in range(spec.num_pairs):
            # Completions start with a space: TRL tokenises prompt + completion as one string.
            row = {"prompt": text(spec.prompt_words), "chosen": " " + text(spec.completion_words),
                   "rejected": " " + text(spec.completion_words)}
            f.write(json.dumps(row) + "\n")


def po_ray_overrides(spec: Spec, work: Path, *, name: str, workers: int, strategy: str,
                     extra: tuple = ()) -> list[str]:
    """po_ray's default config plus what makes the job the same as TRL's, then ``extra`` (``--set``).

    Off, as in the TRL run: MLflow tracking (TRL: report_to none), held-out evaluation, periodic
    checkpoints and the final model export (TRL: save_strategy no). One final checkpoint is still
    written after the last step, outside the measured steps.
    """
    return [
        f"model.tokenizer={work / 'tokenizer'}",
        f"model.config_overrides={json.dumps(spec.model_overrides())}",
        f"data.path={work / 'pairs.jsonl'}",
        "data.eval_fraction=0",
        f"data.max_prompt_length={spec.max_prompt_length}",
        f"data.max_completion_length={spec.max_completion_length}",
        f"data.max_length={spec.max_length}",
        "loss.name=dpo",
        f"loss.beta={spec.beta}",
        f"optimizer.lr={spec.lr}",
        "optimizer.warmup_steps=0",
        "optimizer.scheduler=linear",
        f"train.max_steps={spec.max_steps}",
        f"train.micro_batch_size={spec.batch_pairs // workers}",
        f"train.seed={spec.seed}",
        "train.eval_every=0",
        f"scaling.num_workers={workers}",
        # Both cores for the run either way: one 2-thread worker, or two 1-thread workers.
        f"scaling.cpus_per_worker={max(1, (os.cpu_count() or 2) // workers)}",
        f"reference.strategy={strategy}",
        f"reference.cache_dir={work / 'ref_cache' / name}",
        "checkpoint.every_steps=0",
        "checkpoint.export_model=false",
        "tracking.enabled=false",
        f"run.name={name}",
        f"run.storage_path={work / 'runs'}",
        *extra,
    ]


def po_ray_pairs(spec: Spec, work: Path, extra: tuple = ()):
    """po_ray's tokenised training pairs and the order its sampler feeds them (world-size independent)."""
    from po_ray.config import load_config
    from po_ray.data import load_pairs, load_tokenizer
    from po_ray.sampler import PairSampler

    cfg = load_config(None, po_ray_overrides(spec, work, name="x", workers=1, strategy="sharded", extra=extra))
    tokenizer = load_tokenizer(cfg.model)
    pairs, _, _ = load_pairs(cfg.data, tokenizer, seed=spec.seed)
    sampler = PairSampler(num_pairs=len(pairs), seed=spec.seed, world_size=1, rank=0,
                          micro_batch_size=spec.batch_pairs)
    order = [sampler.index_at(p) for p in range(spec.num_pairs)]
    return cfg, tokenizer, pairs, order


def batch_stats(rows: list[tuple[int, int]]) -> dict:
    """rows: (real tokens, completion tokens) of each sequence of one padded batch."""
    return {"lengths": [r for r, _ in rows], "completion_tokens": sum(c for _, c in rows)}


def pair_rows(pairs) -> list[tuple[int, int]]:
    """(real tokens, completion tokens) of the chosen rows then the rejected rows, as collated."""
    chosen = [(len(p.prompt_ids) + len(p.chosen_ids), len(p.chosen_ids)) for p in pairs]
    rejected = [(len(p.prompt_ids) + len(p.rejected_ids), len(p.rejected_ids)) for p in pairs]
    return chosen + rejected


# ---- contenders (each runs in its own subprocess) --------------------------------------------------


def contender_trl(spec: Spec, work: Path, extra: tuple = (), *, precompute: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from po_ray.config import ModelConfig
    from po_ray.model import build_model

    cfg, tokenizer, pairs, order = po_ray_pairs(spec, work, extra)
    rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    # po_ray's pair_id is the row position; TRL reads the rows in po_ray's sampler order.
    dataset = Dataset.from_list([rows[pairs[i].pair_id] for i in order])

    from safetensors.torch import load_file

    initial = load_file(str(work / "initial_weights.safetensors"))

    def model():
        built = build_model(ModelConfig(config_overrides=spec.model_overrides()), vocab_size=len(tokenizer),
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, dtype=torch.float32, seed=spec.seed)
        built.load_state_dict(initial)  # po_ray's exact starting weights (see contender_initial_weights)
        return built

    record: dict = {"step_end_times": [], "losses": [], "batches": []}

    class Timing(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            record["step_end_times"].append(time.time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                record["losses"].append(float(logs["loss"]))

    class InOrder(DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    args = DPOConfig(
        output_dir=str(work / "runs" / "trl"),
        per_device_train_batch_size=spec.batch_pairs,
        max_steps=spec.max_steps,
        learning_rate=spec.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=spec.beta,
        loss_type=["sigmoid"],
        max_length=spec.max_length,
        precompute_ref_log_probs=precompute,
        # TRL's defaults for a GPU (bf16, gradient checkpointing) off: po_ray trains fp32 on CPU without.
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=spec.seed,
    )
    started = time.time()
    trainer = InOrder(model=model(), ref_model=None if precompute else model(), args=args,
                      train_dataset=dataset, processing_class=tokenizer, callbacks=[Timing()])
    collate = trainer.data_collator

    def recording_collator(examples):
        batch = collate(examples)
        real = batch["attention_mask"].sum(1).tolist()
        completion = batch["completion_mask"].sum(1).tolist()
        record["batches"].append(batch_stats(list(zip(real, completion))))
        return batch

    trainer.data_collator = recording_collator
    # The same token ids as po_ray's, pair for pair, or the comparison is off.
    trl_ids = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
    ours = [(list(pairs[i].prompt_ids), list(pairs[i].chosen_ids), list(pairs[i].rejected_ids)) for i in order]
    record["tokens_identical"] = trl_ids == ours
    record["setup_s"] = time.time() - started
    trainer.train()
    record["batches"] = record["batches"][: spec.max_steps]
    record["threads"] = torch.get_num_threads()
    return record


def contender_initial_weights(spec: Spec, work: Path, extra: tuple = ()) -> dict:
    """Write the weights po_ray starts from, for TRL to start from too.

    po_ray builds its model under ZeRO-3 (deepspeed.zero.Init), which draws the same seeded random
    init in a different order than a plain build: same distribution, different numbers. Run
    unmeasured, before TRL, so that TRL's process holds nothing but its own training.
    """
    import deepspeed
    import torch
    from safetensors.torch import save_file

    from po_ray.model import build_deepspeed_config, build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")
    cfg, tokenizer, _, _ = po_ray_pairs(spec, work, extra)
    deepspeed.init_distributed(dist_backend="gloo")
    model = build_model(cfg.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        dtype=torch.float32, seed=spec.seed,
                        ds_config=build_deepspeed_config(cfg, world_size=1, use_gpu=False))
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        state = {name: p.data.detach().clone().contiguous() for name, p in params.items()}
    save_file(state, str(work / "initial_weights.safetensors"))
    return {"tensors": len(state)}


def contender_po_ray(spec: Spec, work: Path, extra: tuple = (), *, workers: int, strategy: str, name: str) -> dict:
    from po_ray.config import load_config
    from po_ray.launch import train

    cfg = load_config(None, po_ray_overrides(spec, work, name=name, workers=workers, strategy=strategy, extra=extra))
    ledger = work / "runs" / name / "ledger" / "rank0.jsonl"
    end_times: list[float] = []
    done = threading.Event()

    def watch() -> None:
        # The ledger gets one line per finished step; note when each appears (10 ms resolution).
        seen = 0
        while not done.is_set():
            try:
                lines = ledger.read_text().splitlines() if ledger.exists() else []
            except OSError:
                lines = []
            now = time.time()
            if len(lines) < seen:  # the loop re-creates the ledger at start
                seen, end_times[:] = 0, []
            end_times.extend(now for _ in range(len(lines) - seen))
            seen = len(lines)
            done.wait(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    started = time.time()
    watcher.start()
    train(cfg)
    done.set()
    watcher.join()

    _, _, pairs, _ = po_ray_pairs(spec, work, extra)
    by_id = {p.pair_id: p for p in pairs}
    steps: dict[int, dict] = {}
    for rank in range(workers):
        for line in (ledger.parent / f"rank{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            rows = pair_rows([by_id[i] for i in entry["pair_ids"]])
            step = steps.setdefault(entry["step"], {"lengths": [], "completion_tokens": 0, "loss": entry["loss"],
                                                    "rank_lengths": []})
            step["rank_lengths"].append([r for r, _ in rows])
            step["lengths"] += [r for r, _ in rows]
            step["completion_tokens"] += sum(c for _, c in rows)
    ordered = [steps[s] for s in sorted(steps)]
    return {
        "step_end_times": end_times[: spec.max_steps],
        "losses": [s["loss"] for s in ordered],
        # Each rank pads its own micro-batch: padding is counted per rank.
        "batches": [{"lengths": s["lengths"], "rank_lengths": s["rank_lengths"],
                     "completion_tokens": s["completion_tokens"]} for s in ordered],
        "first_step_s": end_times[0] - started if end_times else None,
    }


def contender_profile(spec: Spec, work: Path, extra: tuple = (), steps: int = 3) -> dict:
    """A po_ray step in one process, through the loop's own pieces (engines, run, reference, loss),
    DeepSpeed ZeRO-3 on a 1-rank gloo group, under torch.profiler: where a step's CPU time goes."""
    import deepspeed
    import torch
    from torch.profiler import ProfilerActivity, profile

    from po_ray.engine import build_engine, run
    from po_ray.loop import _collate_to, _pair_logps, _reference_engine
    from po_ray.losses import build_loss
    from po_ray.model import build_deepspeed_config, resolve_dtype
    from po_ray.reference import ShardedReference

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")
    cfg, tokenizer, pairs, order = po_ray_pairs(spec, work, extra)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(spec.seed)
    dtype = resolve_dtype(cfg.model, False)
    engine_args = dict(tokenizer=tokenizer, dtype=dtype, seed=spec.seed, chunk_size=cfg.model.logprob_chunk_size,
                       topk=cfg.metrics.topk)
    reference = ShardedReference(_reference_engine(cfg, 1, False, engine_args))
    _, engine = build_engine(cfg.model, ds_config=build_deepspeed_config(cfg, world_size=1, use_gpu=False),
                             train=True, **engine_args)
    loss_fn = build_loss(cfg.loss)
    engine.train()
    b = spec.batch_pairs

    def step(i: int) -> None:
        batch = _collate_to([pairs[j] for j in order[i * b:(i + 1) * b]], pad_token_id=tokenizer.pad_token_id,
                            device=torch.device("cpu"))
        policy = run(engine, batch)
        logps = _pair_logps(policy, reference.logps(batch, "train"), torch.device("cpu"))
        engine.backward(loss_fn(logps).losses.mean())
        engine.step()

    for i in range(spec.warmup_steps):
        step(i)
    times = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(spec.warmup_steps, spec.warmup_steps + steps):
            t = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps} for e in events[:5]]
    return {"top_ops": top, "profiled_step_s": times, "threads": torch.get_num_threads()}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONTENDERS = {
    "initial_weights": contender_initial_weights,
    "trl": contender_trl,
    "po_ray_1w": lambda spec, work, extra: contender_po_ray(spec, work, extra, workers=1, strategy="sharded",
                                                            name="po_ray_1w"),
    "po_ray_2w": lambda spec, work, extra: contender_po_ray(spec, work, extra, workers=2, strategy="sharded",
                                                            name="po_ray_2w"),
    "po_ray_1w_pre": lambda spec, work, extra: contender_po_ray(spec, work, extra, workers=1, strategy="precomputed",
                                                                name="po_ray_1w_pre"),
    "profile": contender_profile,
}


# ---- summary ---------------------------------------------------------------------------------------


def param_split(spec: Spec) -> tuple[int, int]:
    """(decoder-body matmul parameters, LM-head parameters) of the benchmark model (embedding excluded)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from po_ray.model.build import TINY_LLAMA

    config = LlamaConfig(**{**TINY_LLAMA, **spec.model_overrides()}, vocab_size=spec.vocab_size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return total - head - embed, head


def summarise(name: str, record: dict, tree: common.TreeRun, spec: Spec, *, peak_flops: float,
              body: int, head: int, live_reference: bool) -> dict:
    """Figures of one contender over its measured steps (those after the warm-up)."""
    warm, end = spec.warmup_steps, spec.max_steps
    durations = common.step_durations(record["step_end_times"], warm)
    measured = record["batches"][warm:end]
    completion = sum(b["completion_tokens"] for b in measured)
    real = sum(sum(b["lengths"]) for b in measured)
    seconds = sum(durations)
    flops = sum(common.dpo_step_flops(body_params=body, head_params=head, real_tokens=sum(b["lengths"]),
                                      completion_tokens=b["completion_tokens"], live_reference=live_reference)
                for b in measured)
    padded_batches = [lengths for b in record["batches"][:end] for lengths in b.get("rank_lengths", [b["lengths"]])]
    return {
        "name": name,
        "completion_tokens_per_s": completion / seconds,
        "tokens_per_s": real / seconds,
        "step_s_median": common.median(durations),
        "step_s": durations,
        "mfu": common.mfu(flops / seconds, peak_flops),
        "padding_fraction": common.padding_fraction(padded_batches),
        "peak_rss_bytes": tree.peak_rss_bytes,
        "peak_pss_bytes": tree.peak_pss_bytes,
        "peak_single_rss_bytes": tree.peak_single_rss_bytes,
        "peak_pss_by_process": tree.peak_breakdown,
        "wall_s": tree.wall_s,
        "losses": record["losses"][:end],
    }


def ratios(results: dict) -> dict:
    """The headline ratios, po_ray ÷ TRL (tokens/s: higher is better; memory: lower is better)."""
    trl, ours = results["trl"], results["po_ray_1w"]
    out = {
        "tokens_per_s_ratio": ours["completion_tokens_per_s"] / trl["completion_tokens_per_s"],
        "peak_rss_ratio": ours["peak_rss_bytes"] / trl["peak_rss_bytes"],
        "peak_pss_ratio": ours["peak_pss_bytes"] / trl["peak_pss_bytes"],
        "worker_rss_ratio": ours["peak_single_rss_bytes"] / trl["peak_single_rss_bytes"],
    }
    if "po_ray_2w" in results:
        out["tokens_per_s_ratio_2w"] = results["po_ray_2w"]["completion_tokens_per_s"] / trl["completion_tokens_per_s"]
        out["peak_rss_ratio_2w"] = results["po_ray_2w"]["peak_rss_bytes"] / trl["peak_rss_bytes"]
    if "po_ray_1w_pre" in results:
        out["precomputed_step_time_saving"] = 1 - results["po_ray_1w_pre"]["step_s_median"] / ours["step_s_median"]
    return out


def markdown(report: dict) -> str:
    """The results as the Markdown tables pasted into docs/benchmarks.md."""
    gib = 2**30
    rows = ["| contender | completion tok/s | tokens/s | step s (median) | MFU | padded | peak RSS tree GiB | "
            "peak PSS tree GiB | largest process GiB | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"].values():
        rows.append(f"| {r['name']} | {r['completion_tokens_per_s']:.0f} | {r['tokens_per_s']:.0f} | "
                    f"{r['step_s_median']:.3f} | {100 * r['mfu']:.1f}% | {100 * r['padding_fraction']:.1f}% | "
                    f"{r['peak_rss_bytes'] / gib:.2f} | {r['peak_pss_bytes'] / gib:.2f} | "
                    f"{r['peak_single_rss_bytes'] / gib:.2f} | {r['wall_s']:.0f} |")
    res = report["results"]
    loss_rows = ["| step | TRL loss | po_ray 1 worker loss | po_ray 2 workers loss |", "|---|---|---|---|"]
    trl_l, one, two = (res.get(k, {}).get("losses", []) for k in ("trl", "po_ray_1w", "po_ray_2w"))
    for i in range(min(5, len(trl_l), len(one))):
        loss_rows.append(f"| {i + 1} | {trl_l[i]:.6f} | {one[i]:.6f} | "
                         f"{two[i]:.6f} |" if i < len(two) else f"| {i + 1} | {trl_l[i]:.6f} | {one[i]:.6f} | |")
    ops = ["| op | self CPU ms / step | share |", "|---|---|---|"]
    for op in report.get("profile", {}).get("top_ops", []):
        ops.append(f"| `{op['op']}` | {op['self_cpu_ms_per_step']:.1f} | {100 * op['share']:.1f}% |")
    ratio_lines = [f"- `{k}`: {v:.3f}" for k, v in report["ratios"].items()]
    procs = ["| po_ray_1w process at peak | PSS MiB |", "|---|---|"]
    for proc_name, pss in res.get("po_ray_1w", {}).get("peak_pss_by_process", [])[:8]:
        procs.append(f"| `{proc_name}` | {pss / 2**20:.0f} |")
    return "\n\n".join(["\n".join(t) for t in (rows, loss_rows, ops, procs, ratio_lines)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small model, few steps: under 5 minutes on 2 CPU cores")
    size.add_argument("--long", action="store_true",
                      help="the full-size model on 2-4x longer sequences (prompt 128, completions 128-384 words)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a po_ray config override for every po_ray contender (repeatable), e.g. "
                             "--set model.logprob_chunk_size=256")
    parser.add_argument("--json", type=Path, help="write the full results here")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "po_ray_bench" / "vs_trl",
                        help="data, logs and runs (wiped of earlier runs first)")
    parser.add_argument("--only", nargs="*", choices=list(CONTENDERS), help="run only these contenders")
    parser.add_argument("--contender", choices=list(CONTENDERS), help=argparse.SUPPRESS)  # internal: child mode
    args = parser.parse_args(argv)
    size_name = "quick" if args.quick else "long" if args.long else "full"
    spec = SPECS[size_name]
    extra = tuple(args.overrides)
    work = args.workdir.resolve()

    if args.contender:  # child: run one contender, write its record
        record = CONTENDERS[args.contender](spec, work, extra)
        (work / "results").mkdir(exist_ok=True)
        (work / "results" / f"{args.contender}.json").write_text(json.dumps(record))
        return 0

    started = time.time()
    work.mkdir(parents=True, exist_ok=True)
    (work / "results").mkdir(exist_ok=True)
    import shutil

    for stale in ("runs", "ref_cache"):
        shutil.rmtree(work / stale, ignore_errors=True)
    tokenizer = build_tokenizer(work / "tokenizer", spec.vocab_size, spec.seed)
    words = [w for w in tokenizer.get_vocab() if len(w) == 4 and w.isalpha()]
    write_pairs(work / "pairs.jsonl", spec, sorted(words))
    machine = common.machine_info()
    peak = common.measure_matmul_flops()
    print(f"[bench] {machine['cpu']}, {machine['cores']} cores; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    body, head = param_split(spec)

    env = {**os.environ, **common.QUIET_ENV}
    results, records = {}, {}
    # initial_weights always runs, first: TRL starts from its weights, and it is the first DeepSpeed
    # process, so the one-off JIT build of DeepSpeed's CPU ops lands in it, not in a measured peak.
    names = ["initial_weights", *[n for n in (args.only or CONTENDERS) if n != "initial_weights"]]
    child_args = [f"--{size_name}"] if size_name != "full" else []
    child_args += [f"--set={o}" for o in extra]
    for name in names:
        cmd = common.self_command(SCRIPT, "--contender", name, "--workdir", str(work), *child_args)
        tree = common.run_tree(cmd, env=env, log_path=work / "logs" / f"{name}.log")
        if tree.returncode != 0:
            print(f"[bench] {name} failed (exit {tree.returncode}); log {work / 'logs' / (name + '.log')}:\n"
                  f"{tree.log_tail}", file=sys.stderr)
            return 1
        records[name] = json.loads((work / "results" / f"{name}.json").read_text())
        if name in ("profile", "initial_weights"):
            continue
        results[name] = summarise(name, records[name], tree, spec, peak_flops=peak, body=body, head=head,
                                  live_reference=not name.endswith("_pre"))
        r = results[name]
        print(f"[bench] {name}: {r['completion_tokens_per_s']:.0f} completion tok/s, step {r['step_s_median']:.3f} s, "
              f"peak tree RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, wall {tree.wall_s:.0f} s", flush=True)

    report = {
        "quick": args.quick,
        "size": size_name,
        "overrides": list(extra),
        "spec": asdict(spec),
        "machine": machine,
        "matmul_peak_flops": peak,
        "params": {"body": body, "lm_head": head},
        "results": results,
        "profile": records.get("profile", {}),
        "tokens_identical": records.get("trl", {}).get("tokens_identical"),
        "ratios": ratios(results) if {"trl", "po_ray_1w"} <= results.keys() else {},
        "total_s": time.time() - started,
    }
    if report["tokens_identical"] is False:
        print("[bench] WARNING: TRL and po_ray tokenised the pairs differently; the comparison is not like for like",
              file=sys.stderr)
    print(markdown(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    headline = {k: report[k] for k in ("quick", "size", "tokens_identical", "total_s")}
    headline.update(report["ratios"])
    headline["first_losses"] = {k: results[k]["losses"][:3] for k in results}
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
