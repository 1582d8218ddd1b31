"""`po-ray` command line: parse, build the config, call one function, print the outcome.

This is the only place that prints usage or exits with a status; everything below raises.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from po_ray.config import ConfigError, field_docs, find_config, load_config
from po_ray.tracking import redact_text


def resolve_config_path(name: str | None) -> Path | None:
    """A file path, or the name of a shipped config (`demo`, `command-r-35b-dpo`, …)."""
    return find_config(name) if name else None


def _overrides_help() -> str:
    return "key=value overrides with dotted keys, e.g. loss.beta=0.05 train.max_steps=200 (see docs/config.md)"


def cmd_train(args) -> int:
    from po_ray.launch import train

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    summary = train(cfg, resume=args.resume)
    print(format_train_summary(summary))
    return 0


def format_train_summary(s: dict) -> str:
    before, final = s.get("eval_before") or {}, s.get("final") or {}
    lines = ["", "=== po-ray: training finished ==="]
    for key, label in (("eval/rewards/accuracies", "held-out reward accuracy"),
                       ("eval/logps/accuracies", "held-out pairs where the policy prefers chosen"),
                       ("eval/loss", "held-out loss")):
        if key in final:
            was = f"{before[key]:.3f} -> " if key in before else ""
            lines.append(f"{label:48s} {was}{final[key]:.3f}")
    lines.append(f"{'run folder (checkpoints, ledger, summary)':48s} {s.get('run_dir')}")
    if s.get("model_dir"):
        lines.append(f"{'exported Hugging Face model':48s} {s['model_dir']}")
    if s.get("tracking_uri"):
        lines += _tracking_lines(s["tracking_uri"], s.get("mlflow_run_id"), 48)
    return "\n".join(lines)


def _tracking_lines(uri: str, run_id: str | None, width: int) -> list[str]:
    uri = redact_text(uri)  # a password in the URL or a token from the env stays off the screen
    lines = [f"{'MLflow tracking URI':{width}s} {uri}  (run {run_id})"]
    if uri.startswith("sqlite:"):
        lines.append(f"look at it with:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    return lines


def cmd_eval(args) -> int:
    from po_ray.eval.launch import evaluate_model

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    result = evaluate_model(cfg, args.model, out_dir=args.out)
    print(format_eval_result(result))
    return 0


# (metric, label, format) in the order format_eval_result prints them; other gen/ metrics follow.
EVAL_LINES = (
    ("gen/length_mean", "response length, mean (tokens)", "{:.2f}"),
    ("gen/length_median", "response length, median", "{:.1f}"),
    ("gen/length_p90", "response length, p90", "{:.1f}"),
    ("gen/length_hit_limit", "cut off at max_new_tokens (share)", "{:.3f}"),
    ("gen/ref_length_mean", "reference response length, mean", "{:.2f}"),
    ("gen/kl_per_sequence", "KL(policy || reference) per response", "{:.4f}"),
    ("gen/kl_per_token", "KL(policy || reference) per token", "{:.4f}"),
    ("gen/entropy", "entropy per token", "{:.4f}"),
    ("gen/topk_entropy", "top-k entropy per token", "{:.4f}"),
    ("gen/topk_mass", "top-k mass per token", "{:.4f}"),
    ("gen/repetition_rate", "repetition rate", "{:.4f}"),
    ("gen/reward_mean", "judge: policy reward, mean", "{:.4f}"),
    ("gen/ref_reward_mean", "judge: reference reward, mean", "{:.4f}"),
    ("gen/win_rate", "judge: policy win rate (ties 1/2)", "{:.3f}"),
)


def format_eval_result(r: dict) -> str:
    """`po-ray eval`'s result (eval.json) as labelled lines, each with its metric name for MLflow."""
    m = dict(r["metrics"])
    lines = ["", f"=== po-ray: {r['model']} against the reference {r['reference']} ==="]
    if "temperature" in r:
        kl_note = "KL from separate draws at temperature 1, top_p 1" if r.get("kl_from_separate_draws") else \
            "KL from these samples"
        lines.append(f"sampled at temperature {r['temperature']:g}, top_p {r['top_p']:g}; {kl_note}")
    labelled = [(key, label, fmt) for key, label, fmt in EVAL_LINES if key in m]
    labelled += [(key, key.removeprefix("gen/").replace("_", "-"), "{:.4f}") for key in m if key.startswith("gen/distinct_")]
    shown = {key for key, _, _ in labelled}
    labelled += [(key, key, "{:.4f}") for key in m if key not in shown]
    lines += [f"{label:40s} {fmt.format(m[key]):>10s}" + (f"  ({key})" if label != key else "")
              for key, label, fmt in labelled]
    lines.append(f"{'samples (' + str(r['num_samples']) + ')':40s} {r['samples_path']}")
    lines.append(f"{'metrics':40s} {Path(r['samples_path']).parent / 'eval.json'}")
    if r.get("tracking_uri"):
        lines += _tracking_lines(r["tracking_uri"], r.get("mlflow_run_id"), 40)
    return "\n".join(lines)


def cmd_validate_data(args) -> int:
    from po_ray.data import format_summary, load_tokenizer, validate_data_file

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    summary = validate_data_file(args.path, cfg.data, load_tokenizer(cfg.model), split=args.split)
    print(format_summary(summary))
    return 1 if summary["errors"] else 0


def cmd_plan(args) -> int:
    from po_ray.plan import format_plan, parse_bytes, plan_memory, smallest_cluster, worker_count_note

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    memory = parse_bytes(args.gpu_memory)
    plan = plan_memory(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_bytes=memory)
    print(format_plan(plan))
    smallest = smallest_cluster(cfg, gpus_per_node=args.gpus_per_node, gpu_memory_bytes=memory)
    if smallest is None:
        print(f"\nno cluster of up to 64 nodes x {args.gpus_per_node} GPUs fits this config")
    else:
        print(f"\nsmallest cluster that fits: {smallest.nodes} node(s) x {smallest.gpus_per_node} GPUs")
        if note := worker_count_note(cfg, smallest.world_size):
            print(f"note: {note}")
    return 0 if plan.fits else 1


def cmd_sweep(args) -> int:
    from po_ray.sweep import run_study

    run_study(args.study, overrides=args.overrides, resume=args.resume)
    return 0


def cmd_report(args) -> int:
    from po_ray.sweep import report_study

    paths = report_study(args.study_dir)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def cmd_config_keys(args) -> int:
    from po_ray.config import Config, flatten, to_dict

    defaults = flatten(to_dict(Config()))
    if args.markdown:
        print("# Configuration keys\n\nGenerated by `po-ray config-keys --markdown`. Set them in a YAML section or "
              "as dotted `key=value` overrides.\n\n| key | default | meaning |\n|---|---|---|")
    for key, doc in field_docs().items():
        default = defaults.get(key, "")
        print(f"| `{key}` | `{default!r}` | {doc} |" if args.markdown else f"{key:42s} {doc} (default {default!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="po-ray",
        description="Distributed preference optimisation (DPO and family) on Ray Train + DeepSpeed ZeRO-3.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a policy (joins the cluster in RAY_ADDRESS, else starts a local Ray)")
    t.add_argument("--config", default="demo", help="YAML file or shipped config name (default: demo)")
    t.add_argument("--resume", action="store_true", help="continue run.name from its last checkpoint (required to exist)")
    t.add_argument("overrides", nargs="*", help=_overrides_help())
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="sample from an exported model and score it against the reference "
                                    "(length, KL, entropy, distinct-n, judge); writes eval.json and, with "
                                    "tracking on, the MLflow run <run name>-eval")
    e.add_argument("--model", required=True, help="Hugging Face model folder, e.g. <run folder>/model")
    e.add_argument("--config", default="demo", help="YAML file or shipped config name: data, reference, eval.* settings")
    e.add_argument("--out", default=None, help="output folder (default: <run.storage_path>/<run.name>/eval)")
    e.add_argument("overrides", nargs="*", help=_overrides_help())
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("validate-data", help="check a preference file without training; exit 1 on errors")
    v.add_argument("path", help=".jsonl/.json/.parquet file, save_to_disk folder, hub name, or demo")
    v.add_argument("--config", default=None, help="config whose data/model settings apply (default: built-in defaults)")
    v.add_argument("--split", default="train", help="split for hub / DatasetDict sources")
    v.add_argument("overrides", nargs="*", help=_overrides_help())
    v.set_defaults(func=cmd_validate_data)

    pl = sub.add_parser("plan", help="per-GPU memory plan under ZeRO-3 and the smallest cluster that fits")
    pl.add_argument("--config", required=True, help="YAML file or shipped config name")
    pl.add_argument("--nodes", type=int, required=True)
    pl.add_argument("--gpus-per-node", type=int, required=True)
    pl.add_argument("--gpu-memory", required=True, help="per GPU, e.g. 80GB or 141GiB")
    pl.add_argument("overrides", nargs="*", help=_overrides_help())
    pl.set_defaults(func=cmd_plan)

    s = sub.add_parser("sweep", help="run a Ray Tune robustness study (tune_spaces/*.yaml)")
    s.add_argument("--study", required=True, help="study YAML, e.g. tune_spaces/robustness-demo.yaml")
    s.add_argument("--resume", action="store_true", help="restore an interrupted study without re-running finished trials")
    s.add_argument("overrides", nargs="*", help="overrides of the base config for every trial")
    s.set_defaults(func=cmd_sweep)

    r = sub.add_parser("report", help="(re)write a study's report: Markdown, CSV and plots")
    r.add_argument("study_dir")
    r.set_defaults(func=cmd_report)

    k = sub.add_parser("config-keys", help="list every config key with its default and one-line doc")
    k.add_argument("--markdown", action="store_true", help="as the table in docs/config.md")
    k.set_defaults(func=cmd_config_keys)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(redact_text(f"po-ray: config error: {e}"), file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        # Data errors name file:row: field; loss-option errors name the key.
        print(redact_text(f"po-ray: error: {e}"), file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ not in ("WorkerGroupError", "ControllerError"):  # Ray Train's; not imported here
            raise
        # Ray Train's message is every worker's full traceback; lead with what went wrong.
        print(redact_text(f"po-ray: the Ray Train run failed: {_root_causes(e)}\n(full worker tracebacks above)"),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("po-ray: interrupted; `po-ray train --resume` (same run.name) continues from the last checkpoint",
              file=sys.stderr)
        return 130


def _root_causes(error: BaseException) -> str:
    """One line per distinct root exception of the failed workers (or of the controller)."""
    failures = getattr(error, "worker_failures", None) or {None: getattr(error, "controller_failure", error)}
    lines: dict[str, list] = {}
    for rank, exc in sorted(failures.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        while exc.__cause__ is not None:
            exc = exc.__cause__
        text = str(exc).strip().splitlines()
        # A task error's text is its traceback; the last line is "ExcType: message".
        lines.setdefault(text[-1] if text else type(exc).__name__, []).append(rank)
    return "; ".join(f"{msg} (rank {', '.join(map(str, ranks))})" if ranks != [None] else msg
                     for msg, ranks in lines.items())


if __name__ == "__main__":
    sys.exit(main())
