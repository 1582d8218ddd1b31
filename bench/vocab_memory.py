"""Peak memory of the log-prob step against vocabulary size: po_ray's chunked path vs a naive one.

    .venv/bin/python bench/vocab_memory.py --plot docs/benchmarks_vocab.png --json vocab.json

At a fixed number of completion tokens and hidden size, for vocabularies of 32k, 128k and 256k,
one step is forward + backward through the LM head and the log-prob gather:

  chunked   po_ray.model.completion_logps (chunks of model.logprob_chunk_size positions, nothing of
            size (tokens, vocab) kept for backward, with the top-k statistics), as the trainer runs it
  naive     logits = head(h); log_softmax over the whole (tokens, vocab); gather; backward

Each case runs in a fresh subprocess; its extra peak is the process's peak resident set
(ru_maxrss) during the step minus the peak before it (model, inputs and libraries).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as common  # noqa: E402

VOCABS = (32_000, 128_000, 256_000)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def one_case(path: str, vocab: int, tokens: int, hidden: int, chunk_size: int, seed: int = 0) -> dict:
    """Run one log-prob step in this process and return its peak memory figures."""
    import torch

    from po_ray.model import completion_logps
    from po_ray.model.logprobs import Head

    torch.manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    # One row: position 0 is the prompt, positions 1..tokens are completion tokens.
    hidden_states = torch.randn(1, tokens + 1, hidden, requires_grad=True)
    input_ids = torch.randint(0, vocab, (1, tokens + 1))
    completion_mask = torch.ones(1, tokens + 1, dtype=torch.bool)
    completion_mask[:, 0] = False
    before = peak_rss_bytes()
    if path == "chunked":
        out = completion_logps(hidden_states, Head(head.weight), input_ids, completion_mask, chunk_size=chunk_size,
                               topk=10)
        logps = out.logps
    else:
        logits = head(hidden_states[:, :-1]).float()
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        logps = token_logps.sum(-1)
    logps.sum().backward()
    after = peak_rss_bytes()
    return {"path": path, "vocab": vocab, "tokens": tokens, "hidden": hidden, "chunk_size": chunk_size,
            "peak_before_bytes": before, "peak_bytes": after, "step_extra_bytes": after - before,
            "logits_fp32_bytes": tokens * vocab * 4, "logps_sum": float(logps.sum())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="completion tokens in the step")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[1024, 256],
                        help="po_ray's model.logprob_chunk_size values to run (1024 is the default)")
    parser.add_argument("--vocabs", type=int, nargs="*", default=list(VOCABS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="write a PNG of extra peak memory against vocabulary")
    parser.add_argument("--case", nargs=2, metavar=("PATH", "VOCAB"), help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)

    if args.case:
        print(json.dumps(one_case(args.case[0], int(args.case[1]), args.tokens, args.hidden, args.chunk_sizes[0])))
        return 0

    env = {**__import__("os").environ, **common.QUIET_ENV}
    rows = []
    for vocab in args.vocabs:
        for path, chunk in [("chunked", c) for c in args.chunk_sizes] + [("naive", 0)]:
            cmd = [sys.executable, __file__, "--case", path, str(vocab), "--tokens", str(args.tokens),
                   "--hidden", str(args.hidden), "--chunk-sizes", str(chunk)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"[vocab] {path} @ {vocab}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                return 1
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"[vocab] {path:>7} {chunk or '':>5} vocab {vocab:>7}: step extra peak {r['step_extra_bytes'] / 2**20:8.0f} MiB "
                  f"(full fp32 logits would be {r['logits_fp32_bytes'] / 2**20:.0f} MiB)", flush=True)

    mib = 2**20
    cols = [f"chunked {c} MiB" for c in args.chunk_sizes]
    table = ["| vocab | " + " | ".join(cols) + " | naive MiB | chunked ÷ naive | (tokens, vocab) fp32 MiB |",
             "|---" * (len(cols) + 4) + "|"]
    by = {(r["path"], r["chunk_size"] if r["path"] == "chunked" else 0, r["vocab"]): r for r in rows}
    for vocab in args.vocabs:
        n = by["naive", 0, vocab]
        chunked = [by["chunked", c, vocab]["step_extra_bytes"] for c in args.chunk_sizes]
        table.append(f"| {vocab:,} | " + " | ".join(f"{b / mib:.0f}" for b in chunked)
                     + f" | {n['step_extra_bytes'] / mib:.0f} | "
                     + " / ".join(f"{b / n['step_extra_bytes']:.2f}" for b in chunked)
                     + f" | {n['logits_fp32_bytes'] / mib:.0f} |")
    print("\n".join(table))
    # The chunked and naive paths compute the same sum: a check that the comparison is like for like.
    agree = all(abs(by["chunked", c, v]["logps_sum"] - by["naive", 0, v]["logps_sum"])
                <= 1e-4 * abs(by["naive", 0, v]["logps_sum"]) for v in args.vocabs for c in args.chunk_sizes)
    report = {"machine": common.machine_info(), "tokens": args.tokens, "hidden": args.hidden,
              "chunk_sizes": args.chunk_sizes, "rows": rows, "logps_agree": agree}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(rows, args, args.plot)
    summary = {"logps_agree": agree, **{
        f"ratio_{v}_chunk{c}": by["chunked", c, v]["step_extra_bytes"] / by["naive", 0, v]["step_extra_bytes"]
        for v in args.vocabs for c in args.chunk_sizes}}
    print(json.dumps(summary))
    return 0


def plot(rows: list[dict], args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for path, chunk, marker in [("chunked", c, "o") for c in args.chunk_sizes] + [("naive", 0, "s")]:
        pts = sorted((r["vocab"], r["step_extra_bytes"] / 2**20) for r in rows
                     if r["path"] == path and (path == "naive" or r["chunk_size"] == chunk))
        label = f"po_ray chunked ({chunk} tokens/chunk)" if chunk else "naive log_softmax + gather"
        ax.plot([v / 1000 for v, _ in pts], [m for _, m in pts], marker=marker, label=label)
    ax.set_xlabel("vocabulary (thousands)")
    ax.set_ylabel("extra peak RSS of the step (MiB)")
    ax.set_title(f"log-prob step, {args.tokens} tokens, hidden {args.hidden}, CPU fp32")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
