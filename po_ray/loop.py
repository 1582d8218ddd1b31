"""The per-worker training function: the whole recipe, top to bottom.

set up → data → engines (policy, reference) → resume → for each step:
batch → policy log-probs → reference log-probs → loss → backward/step → metrics (gathered) →
ledger → report (+ checkpoint) → evaluate; then export the model and write the run summary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import deepspeed
import ray.train
import torch
import torch.distributed as dist

from po_ray.checkpoint import export_hf_model, load_checkpoint, pick_complete, registered_checkpoints, save_checkpoint
from po_ray.config import Config, from_dict, to_dict
from po_ray.data import collate, load_pairs, load_tokenizer
from po_ray.engine import build_engine, run, split_pairs
from po_ray.eval.in_training import evaluate_generation, is_due
from po_ray.losses import PairLogps, build_loss
from po_ray.losses.registry import import_loss_plugins
from po_ray.metrics import finalize, pack, step_metrics
from po_ray.model import build_deepspeed_config, resolve_dtype
from po_ray.reference import (
    PrecomputedReference,
    ShardedReference,
    cache_key,
    free,
    load_cache,
    precompute,
    reference_model_config,
    resolve_strategy,
)
from po_ray.sampler import PairSampler, shard_evenly
from po_ray.tracking import redact, redact_text

RESUMES_FILE = "resumes.jsonl"
# Peak dense bf16 FLOP/s per device for the MFU estimate; unknown devices (and CPUs) get no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def train_loop_per_worker(loop_config: dict) -> None:
    # ---- set up --------------------------------------------------------------------------------
    cfg: Config = from_dict(Config, loop_config["config"], "<run config>")
    import_loss_plugins(cfg)
    run_dir = Path(loop_config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # sys.__stdout__: Ray Train's print patch would otherwise emit every line twice.
    say = partial(print, flush=True, file=sys.__stdout__) if rank == 0 else (lambda *a, **k: None)
    _quiet_worker_logs()
    use_gpu = cfg.scaling.use_gpu
    if use_gpu:
        torch.cuda.set_device(ctx.get_local_rank())
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    # Same seed on every rank: ZeRO-3 builds each shard from the same full initialisation.
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    dtype = resolve_dtype(cfg.model, use_gpu)
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")

    # ---- data ----------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model)
    train_pairs, eval_pairs, data_report = load_pairs(cfg.data, tokenizer, seed=cfg.train.seed)
    say(f"[po-ray] data: {len(train_pairs)} train / {len(eval_pairs)} eval pairs; skipped {data_report.skipped or 0}")
    collate_fn = partial(_collate_to, pad_token_id=tokenizer.pad_token_id, device=device)
    sampler = PairSampler(
        num_pairs=len(train_pairs),
        seed=cfg.train.seed,
        world_size=world,
        rank=rank,
        micro_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
    )

    # ---- engines: reference first, so a precomputed one is freed before the policy exists ------
    engine_args = dict(
        tokenizer=tokenizer, dtype=dtype, seed=cfg.train.seed, chunk_size=cfg.model.logprob_chunk_size, topk=cfg.metrics.topk
    )
    strategy = resolve_strategy(cfg)
    reference = None
    if strategy == "precomputed":
        cache_dir = Path(loop_config["reference_cache_dir"])
        key = cache_key(cfg, train_pairs, eval_pairs)
        tables = load_cache(cache_dir, key)
        if tables is None:
            say(f"[po-ray] reference: computing log-probs once for all pairs (cache {cache_dir / key})")
            ref_engine = _reference_engine(cfg, world, use_gpu, engine_args)
            precompute(ref_engine, {"train": train_pairs, "eval": eval_pairs}, collate_fn=collate_fn,
                       micro_batch_size=cfg.train.micro_batch_size, rank=rank, world_size=world,
                       cache_dir=cache_dir, key=key, progress=say)
            free(ref_engine)
            del ref_engine
            tables = load_cache(cache_dir, key)
        else:
            say(f"[po-ray] reference: reusing precomputed log-probs {cache_dir / key}")
        reference = PrecomputedReference(tables)
    elif strategy == "sharded":
        reference = ShardedReference(_reference_engine(cfg, world, use_gpu, engine_args))
    if loop_config.get("precompute_only"):
        return

    ds_config = build_deepspeed_config(cfg, world_size=world, use_gpu=use_gpu)
    policy_model, engine = build_engine(cfg.model, ds_config=ds_config, train=True, **engine_args)
    loss_fn = build_loss(cfg.loss)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in policy_model.parameters())
    # Under ZeRO-3 each rank holds only its partition (ds_tensor) of every parameter.
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in policy_model.parameters())
    param_fractions: list = [None] * world
    dist.all_gather_object(param_fractions, local / n_params)
    _write_text(run_dir / "pids" / f"rank{rank}", str(os.getpid()))  # lets fault tests kill a real worker

    # ---- resume --------------------------------------------------------------------------------
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as latest:
            # Ray Train hands over its latest; if a file of it is missing or truncated, take the
            # previous registered one (every rank decides alike: they read the same manifests).
            folder = pick_complete([Path(latest), *registered_checkpoints(run_dir)], warn=say)
            start_step = load_checkpoint(engine, folder, rank=rank, world_size=world)["step"]
        say(f"[po-ray] resumed from checkpoint at step {start_step}; next pair position {sampler.position(start_step)}")
        if rank == 0:  # the run's restart history, for the summary and for anyone auditing it
            with (run_dir / RESUMES_FILE).open("a") as f:
                f.write(json.dumps({"step": start_step, "time": time.time()}) + "\n")
    ledger = Ledger(run_dir / "ledger", rank, keep_through_step=start_step)
    tracker = _tracker(cfg, run_dir, loop_config) if rank == 0 else None
    if tracker and start_step == 0:
        tracker.log_params(to_dict(cfg))
    evaluate_now = partial(_evaluate, engine, reference, eval_pairs, cfg, collate_fn, rank, world, loss_fn, device)
    generate_now = partial(evaluate_generation, engine, reference, cfg=cfg, tokenizer=tokenizer, eval_pairs=eval_pairs,
                           engine_args=engine_args, rank=rank, world=world, device=device, run_dir=run_dir, tracker=tracker)

    if start_step == 0 and eval_pairs:
        before = evaluate_now()
        say(f"[po-ray] eval before training: {_short(before)}")
        _write_json(run_dir / "eval_before.json", before) if rank == 0 else None
        if tracker:
            tracker.log_metrics(before, step=0)

    # ---- train ---------------------------------------------------------------------------------
    engine.train()
    started, tokens_since, last_log = time.time(), 0.0, time.time()
    metrics: dict = {}
    skipped_steps = int(engine.skipped_steps)  # restored with the checkpoint
    for step in range(start_step, cfg.train.max_steps):
        step_sums: dict = {}
        step_pair_ids: list[int] = []
        non_finite_pairs: list[int] = []
        for micro in range(cfg.train.gradient_accumulation_steps):
            pairs = [train_pairs[i] for i in sampler.indices(step, micro)]
            batch = collate_fn(pairs)
            policy = run(engine, batch)  # policy log-probs (+ top-k stats)
            ref = reference.logps(batch, "train") if reference else (None, None)  # reference log-probs
            logps = _pair_logps(policy, ref, device)
            out = loss_fn(logps)  # loss
            non_finite_pairs += batch["pair_ids"][~torch.isfinite(out.losses.detach()).cpu()].tolist()
            engine.backward(out.losses.mean())  # backward (DeepSpeed scales by accumulation steps)
            _step(engine, device)  # optimiser step at the accumulation boundary; skipped on NaN/inf gradients
            _accumulate(step_sums, _metrics(out, policy, logps))
            step_pair_ids += batch["pair_ids"].tolist()
            tokens_since += float(batch["attention_mask"].sum())
        if engine.skipped_steps > skipped_steps or _any_rank(bool(non_finite_pairs), device):
            # A NaN/inf loss or gradient: DeepSpeed dropped this step's gradients, the weights are
            # untouched. Count it; past the limit, stop with the step and the pairs to look at.
            skipped_steps, where = _check_skipped(engine, skipped_steps, non_finite_pairs, step_pair_ids, step + 1,
                                                  cfg.train.max_skipped_steps)
            say(f"[po-ray] WARNING: {where}: step skipped ({skipped_steps}/{cfg.train.max_skipped_steps} allowed)")
            metrics = {}
            ledger.write(step + 1, step_pair_ids, None, skipped=True)
        else:
            metrics = _gather(step_sums, device)  # exact token/pair-weighted means over all ranks
            ledger.write(step + 1, step_pair_ids, metrics["loss"])

        now = time.time()
        tokens_per_s = _gather_scalar(tokens_since, device) / max(now - last_log, 1e-9)
        metrics.update(_throughput(tokens_per_s, n_params, world, use_gpu, reference is not None and strategy == "sharded"))
        metrics.update(step=step + 1, epoch=sampler.epoch_of(step + 1), lr=engine.get_lr()[0], skipped_steps=skipped_steps)
        tokens_since, last_log = 0.0, now

        done = step + 1 == cfg.train.max_steps
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 or done:
            if eval_pairs:
                metrics.update(evaluate_now())
                engine.train()
        if is_due(cfg, step + 1):  # samples from the policy: length, KL to the reference, entropy, judge
            metrics.update(generate_now(step=step + 1))
        if rank == 0 and ((step + 1) % cfg.train.log_every == 0 or done or step == start_step):
            say(_progress_line(metrics, step + 1, cfg.train.max_steps, started, start_step))
        if tracker:
            tracker.log_metrics(metrics, step=step + 1)
        if done or (cfg.checkpoint.every_steps and (step + 1) % cfg.checkpoint.every_steps == 0):
            state = {"pairs_consumed": sampler.position(step + 1), "config": redact(to_dict(cfg))}  # for people to read
            _report_with_checkpoint(engine, metrics, step + 1, rank, world, state)
        elif (step + 1) % cfg.train.report_every == 0:
            ray.train.report(metrics)

    # ---- export and summary --------------------------------------------------------------------
    model_dir = run_dir / "model"
    if cfg.checkpoint.export_model and start_step < cfg.train.max_steps:
        export_hf_model(engine, policy_model, tokenizer, model_dir, rank=rank)
        say(f"[po-ray] exported Hugging Face model to {model_dir}")
    if rank == 0:
        summary = {
            "steps": cfg.train.max_steps,
            "final": metrics,
            "eval_before": _read_json(run_dir / "eval_before.json"),
            "model_dir": str(model_dir) if model_dir.exists() else None,
            "run_dir": str(run_dir),
            "reference_strategy": strategy,
            "resumed_from_steps": [json.loads(ln)["step"] for ln in _read_lines(run_dir / RESUMES_FILE)],
            "param_fraction_per_rank": param_fractions,
            "tracking_uri": redact_text(tracker.tracking_uri) if tracker else None,  # the file is shared, secrets are not
            "mlflow_run_id": tracker.run_id if tracker else None,
        }
        _write_json(run_dir / "summary.json", summary)
        if tracker:
            tracker.log_dict(summary, "summary.json")
            tracker.set_tags({"model_dir": summary["model_dir"] or ""})
            tracker.end()
            if tracker.run_id:  # created late if the server was down at start: keep it for the next resume
                (run_dir / "mlflow_run_id").write_text(tracker.run_id)


# ---- helpers (detail only; the control flow is above) ---------------------------------------------


def _quiet_worker_logs() -> None:
    """Keep the progress line readable: DeepSpeed's calls into deprecated torch collectives warn on every
    step, and Ray Train logs each report's full metrics dict (from a logger named by its file path)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _reference_engine(cfg: Config, world: int, use_gpu: bool, engine_args: dict):
    """An inference-only ZeRO-3 engine of the reference model. Only its log-probs are ever used, so
    its forward skips the vocabulary-wide entropy / top-k statistics."""
    ds_config = build_deepspeed_config(cfg, world_size=world, use_gpu=use_gpu, for_reference=True)
    return build_engine(reference_model_config(cfg), ds_config=ds_config, train=False, signals=False, **engine_args)[1]


def _collate_to(pairs, *, pad_token_id: int, device) -> dict:
    return {k: v.to(device) for k, v in collate(pairs, pad_token_id).items()}


def _pair_logps(policy, ref, device) -> PairLogps:
    chosen, rejected = split_pairs(policy.logps)
    chosen_tokens, rejected_tokens = split_pairs(policy.tokens)
    ref_chosen, ref_rejected = (t.to(device) if t is not None else None for t in ref)
    return PairLogps(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens)


def _metrics(out, policy, logps: PairLogps) -> dict:
    chosen, rejected = (_half(policy, i) for i in (0, 1))
    m = step_metrics(loss_out=out, chosen=chosen, rejected=rejected,
                     ref_chosen_logps=logps.ref_chosen, ref_rejected_logps=logps.ref_rejected)
    # How often the policy itself prefers the chosen completion: meaningful before training too,
    # unlike reward accuracy, which is all ties while policy == reference.
    wins = (logps.chosen > logps.rejected).float().sum().detach()
    m["logps/accuracies"] = (wins, torch.tensor(float(logps.chosen.numel())))
    return m


class _Half:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _half(policy, index: int):
    pick = lambda t: split_pairs(t)[index].detach()  # noqa: E731
    return _Half(logps=pick(policy.logps), tokens=pick(policy.tokens), entropy_sum=pick(policy.entropy_sum),
                 topk_entropy_sum=pick(policy.topk_entropy_sum), topk_mass_sum=pick(policy.topk_mass_sum))


def _accumulate(total: dict, new: dict) -> None:
    for name, (s, c) in new.items():
        s, c = s.detach().double().cpu(), torch.as_tensor(c).double().cpu()
        if name in total:
            total[name] = (total[name][0] + s, total[name][1] + c)
        else:
            total[name] = (s, c)


def _gather(sums: dict, device) -> dict[str, float]:
    names, packed = pack(sums)
    packed = packed.to(device=device, dtype=torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return finalize(names, packed.cpu())


def _gather_scalar(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def _any_rank(flag: bool, device) -> bool:
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _step(engine, device) -> None:
    """engine.step(), skipping the update at an accumulation boundary whose gradients are NaN/inf on
    any rank where DeepSpeed would apply it (collective).

    DeepSpeed skips such a step (no update, no LR step, ``engine.skipped_steps`` + 1) when its
    optimiser reports ``overflow``: its ZeRO 1-3, fp16 and bf16 optimisers check the gradient norm.
    ZeRO stage 0 in fp32 steps the plain torch optimiser, which has no such check, so po_ray checks
    the gradients itself and makes the optimiser report the overflow.
    """
    optimizer = engine.optimizer
    if hasattr(optimizer, "overflow") or not engine.is_gradient_accumulation_boundary():
        engine.step()
        return
    if not _any_rank(has_non_finite_grad(engine.module.parameters()), device):
        engine.step()
        return
    optimizer.step = lambda *args, **kwargs: None  # instance attributes over the class's, for this step only
    optimizer.overflow = True
    try:
        engine.step()  # clears the gradients, counts the skip, leaves weights, moments and LR alone
    finally:
        del optimizer.step, optimizer.overflow


def has_non_finite_grad(parameters) -> bool:
    """Whether any parameter's gradient holds a NaN or inf (parameters without gradients are skipped)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def non_finite_message(step: int, loss_pairs: list[int], step_pairs: list[int]) -> str:
    """Where a skipped step went wrong: the pairs whose loss was NaN/inf, else (a finite loss whose
    gradient was not) every pair of the step. sweep.py reads "non-finite {loss|gradient} at step N"."""
    if loss_pairs:
        return f"non-finite loss at step {step} (pairs {sorted(loss_pairs)})"
    return f"non-finite gradient at step {step} (the step's pairs {sorted(step_pairs)})"


def _check_skipped(engine, skipped_before: int, non_finite_pairs: list[int], step_pair_ids: list[int], step: int,
                   limit: int) -> tuple[int, str]:
    """The new count of skipped steps after a step with a NaN/inf loss or gradient, and what went wrong
    (collective: every rank's pairs).

    Raises when the update was applied anyway (the optimiser reported no overflow), or when the count
    passes ``limit``: either way before the weights can reach a checkpoint.
    """
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (non_finite_pairs, step_pair_ids))
    where = non_finite_message(step, [p for loss_pairs, _ in gathered for p in loss_pairs],
                               [p for _, step_pairs in gathered for p in step_pairs])
    if engine.skipped_steps == skipped_before:
        raise FloatingPointError(f"{where}, and the update was applied anyway (the optimiser reported no "
                                 "overflow); stopping before it reaches a checkpoint.")
    if engine.skipped_steps > limit:
        raise FloatingPointError(
            f"{where}: {engine.skipped_steps} steps skipped, more than train.max_skipped_steps={limit}; "
            "no update was applied. Lower optimizer.lr, raise loss.beta, or check those pairs."
        )
    return int(engine.skipped_steps), where


def _throughput(tokens_per_s: float, n_params: int, world: int, use_gpu: bool, live_reference: bool) -> dict:
    out = {"throughput/tokens_per_s": tokens_per_s}
    peak = next((v for k, v in PEAK_FLOPS.items() if use_gpu and k in torch.cuda.get_device_name()), None)
    if peak:
        # 6N FLOPs/token for forward+backward of the policy, 2N for a live reference forward.
        flops_per_token = (6 + (2 if live_reference else 0)) * n_params
        out["throughput/mfu"] = flops_per_token * tokens_per_s / (peak * world)
    return out


def _evaluate(engine, reference, eval_pairs, cfg: Config, collate_fn, rank, world, loss_fn, device) -> dict[str, float]:
    """Held-out loss, reward accuracy and margins, each rank on its own share of the pairs."""
    engine.eval()
    mine = shard_evenly(eval_pairs, world, rank)
    b = cfg.train.micro_batch_size
    n_batches = -(-len(eval_pairs) // (world * b))
    if cfg.train.eval_batches:
        n_batches = min(n_batches, cfg.train.eval_batches)
    sums: dict = {}
    with torch.no_grad():
        for i in range(n_batches):
            chunk = mine[i * b : (i + 1) * b]
            # Every rank runs the same number of forwards (ZeRO-3 gathers are collective).
            batch = collate_fn(chunk or eval_pairs[:1])
            policy = run(engine, batch)
            ref = reference.logps(batch, "eval") if reference else (None, None)
            logps = _pair_logps(policy, ref, device)
            if chunk:
                _accumulate(sums, _metrics(loss_fn(logps), policy, logps))
    return {f"eval/{k}": v for k, v in _gather(sums, device).items()}


def _report_with_checkpoint(engine, metrics: dict, step: int, rank: int, world: int, state: dict) -> None:
    folder = Path(tempfile.mkdtemp(prefix=f"po_ray_ckpt_{step}_"))
    try:
        save_checkpoint(engine, folder, step=step, rank=rank, world_size=world, state=state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Ledger:
    """Which pairs each optimiser step trained on, per rank: the record behind 'none skipped, none repeated'.

    On resume from step s, entries after s (trained but rolled back by the restore) are dropped.
    """

    def __init__(self, folder: Path, rank: int, keep_through_step: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank{rank}.jsonl"
        kept = []
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= keep_through_step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, step: int, pair_ids: list[int], loss: float | None, skipped: bool = False) -> None:
        row = {"step": step, "pair_ids": pair_ids, "loss": loss} | ({"skipped": True} if skipped else {})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def _tracker(cfg: Config, run_dir: Path, loop_config: dict):
    if not loop_config.get("tracking_uri"):
        return None
    from po_ray.tracking import Tracker

    id_file = run_dir / "mlflow_run_id"
    tracker = Tracker(
        loop_config["tracking_uri"],
        cfg.tracking.experiment_name,
        cfg.tracking.run_name or loop_config.get("trial_name") or cfg.run.name,
        run_id=id_file.read_text().strip() if id_file.exists() else None,
        parent_run_id=loop_config.get("parent_run_id"),
        tags=loop_config.get("tags") or {},
        fallback_dir=run_dir,
    )
    run_id = tracker.start()
    if run_id:
        id_file.write_text(run_id)
    return tracker


def _progress_line(m: dict, step: int, total: int, started: float, start_step: int) -> str:
    elapsed = time.time() - started
    done = step - start_step
    eta = elapsed / done * (total - step) if done else math.nan
    parts = [
        f"[po-ray] step {step}/{total} ({100 * step / total:.0f}%)",
        f"loss {m.get('loss', math.nan):.4f}",
        f"reward acc {m.get('rewards/accuracies', math.nan):.2f}",
        f"topk_entropy {m.get('topk_entropy', math.nan):.3f}",
        f"{m.get('throughput/tokens_per_s', 0):.0f} tok/s",
        f"ETA {_duration(eta)}",
    ]
    if "eval/loss" in m:
        parts.insert(3, f"eval acc {m.get('eval/rewards/accuracies', math.nan):.2f}")
    return " | ".join(parts)


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _short(m: dict) -> str:
    keys = ("eval/loss", "eval/rewards/accuracies", "eval/logps/accuracies")
    return ", ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    tmp.replace(path)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
