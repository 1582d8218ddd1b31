"""`po-ray` command line: parse, build the config, call one function, print the outcome.

This is the only place that prints usage or exits with a status; everything below raises.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from po_ray.config import ConfigError, field_docs, find_config, load_config


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
        lines.append(f"{'MLflow tracking URI':48s} {s['tracking_uri']}  (run {s.get('mlflow_run_id')})")
        if s["tracking_uri"].startswith("sqlite:"):
            lines.append(f"look at it with:  mlflow ui --backend-store-uri {s['tracking_uri']} --host 127.0.0.1 --port 5000")
    return "\n".join(lines)


def cmd_validate_data(args) -> int:
    from po_ray.data import format_summary, load_tokenizer, validate_data_file

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    summary = validate_data_file(args.path, cfg.data, load_tokenizer(cfg.model), split=args.split)
    print(format_summary(summary))
    return 1 if summary["errors"] else 0


def cmd_plan(args) -> int:
    from po_ray.plan import format_plan, parse_bytes, plan_memory, smallest_cluster

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    memory = parse_bytes(args.gpu_memory)
    plan = plan_memory(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_bytes=memory)
    print(format_plan(plan))
    smallest = smallest_cluster(cfg, gpus_per_node=args.gpus_per_node, gpu_memory_bytes=memory)
    if smallest is None:
        print(f"\nno cluster of up to 64 nodes x {args.gpus_per_node} GPUs fits this config")
    else:
        print(f"\nsmallest cluster that fits: {smallest.nodes} node(s) x {smallest.gpus_per_node} GPUs")
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
    for key, doc in field_docs().items():
        print(f"{key:42s} {doc}")
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

    k = sub.add_parser("config-keys", help="list every config key with its one-line doc")
    k.set_defaults(func=cmd_config_keys)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"po-ray: config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        # Data errors name file:row: field; loss-option errors name the key.
        print(f"po-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("po-ray: interrupted; `po-ray train --resume` (same run.name) continues from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
