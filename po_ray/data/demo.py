"""The bundled demo preference set, its tokenizer, and a check that a tiny model learns it.

    python -m po_ray.data.demo            # (re)write assets/tokenizer and assets/demo/pairs.jsonl
    python -m po_ray.data.demo --check    # train a tiny Llama with plain DPO and print reward accuracy

The task has three skills, a third of the pairs each. The chosen reply follows the instruction; the
rejected one breaks it in one specific way. Which reply is right always depends on the prompt (no
constant reply wins), but the deciding token sits right after the prompt's key word, so a 2-layer
model can learn the preference in a couple of hundred DPO steps:

* topic -- "name a fruit"        chosen starts with an item of that category, rejected with another's
* echo  -- "please repeat tiger" chosen says the word back, rejected says another word
* count -- "count down from six" chosen is "six five four three"; rejected skips a number, starts
           from the wrong one or goes the wrong way (number words, so each number is one token)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from po_ray.config import BUNDLED_DIR

DEMO_FILE = BUNDLED_DIR / "demo" / "pairs.jsonl"
DEMO_SEED = 20240715
DEMO_PAIRS = 3000

CATEGORIES = {
    "fruit": "apple banana cherry grape lemon mango melon peach pear plum".split(),
    "animal": "cat dog horse tiger lion rabbit mouse bear wolf fox".split(),
    "color": "red blue green yellow purple black white brown pink grey".split(),
    "city": "paris london rome tokyo berlin madrid cairo lima oslo delhi".split(),
    "drink": "tea coffee milk water juice soda wine beer cocoa lemonade".split(),
    "tool": "hammer saw drill wrench shovel rake axe chisel ladder pliers".split(),
    "sport": "tennis soccer golf rugby hockey boxing rowing cricket skiing cycling".split(),
    "instrument": "piano guitar violin drum flute harp trumpet cello banjo organ".split(),
}
# Prompts end with the key word (category, word to echo, start number) and replies start with the
# answer, so the deciding token follows the word it depends on.
TOPIC_PROMPTS = ["name a {cat}", "tell me one {cat}", "what is your favourite {cat}", "suggest a {cat}",
                 "i would like a {cat}", "pick a {cat}"]
TOPIC_REPLIES = ["{item} .", "{item} is a good choice .", "{item} would be my pick .", "{item} , because i like it .",
                 "{item} is great ."]
ECHO_PROMPTS = ["say {word}", "please repeat {word}", "echo the word {word}", "write {word}"]
ECHO_REPLIES = ["{word}", "{word} .", "{word} !", "{word} {word}"]
COUNT_PROMPTS = ["count {way} from {a}", "go {way} from {a}", "please count {way} from {a}"]
COUNT_LENGTH = 4
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()

# Everyday words so hand-written test sentences mostly avoid <unk>.
COMMON_WORDS = """
a about after again all also am an and any are as ask at back be because been before best big
but by can come could day did do does done down each even every few find first for from get give
go good great had has have he help her here him his how i if in into is it its just know last
let like little long look made make many may me more most much must my need new no not now of
off old on one only or other our out over own people please put right said same say see she
should show so some still such sure take tell than thank thanks that the their them then there
these they thing think this those time to too two up us use very want was way we well were what
when where which who why will with work would yes yet you your answer question reply human
assistant user system hello hi sorry okay ok number word words idea choice favourite suggest pick
try about repeat copy count list numbers going nice bad wrong true false small large hot cold
""".split()


def demo_words() -> list[str]:
    """Every word the demo data uses, plus the common ones: the bundled tokenizer's vocabulary."""
    words = set(COMMON_WORDS) | set(CATEGORIES) | set(NUMBER_WORDS)
    words |= {w for items in CATEGORIES.values() for w in items}
    words |= {"up", "down"}
    for template in TOPIC_PROMPTS + TOPIC_REPLIES + ECHO_PROMPTS + ECHO_REPLIES + COUNT_PROMPTS:
        words |= {w for w in template.split() if not w.startswith("{")}
    return sorted(words)


def topic_pair(rng: random.Random) -> dict:
    cat, other = rng.sample(sorted(CATEGORIES), 2)
    reply = rng.choice(TOPIC_REPLIES)
    return {
        "prompt": rng.choice(TOPIC_PROMPTS).format(cat=cat),
        "chosen": reply.format(item=rng.choice(CATEGORIES[cat])),
        "rejected": reply.format(item=rng.choice(CATEGORIES[other])),
    }


def echo_pair(rng: random.Random) -> dict:
    pool = sorted({w for items in CATEGORIES.values() for w in items} | set(CATEGORIES))
    word, other = rng.sample(pool, 2)
    reply = rng.choice(ECHO_REPLIES)
    return {
        "prompt": rng.choice(ECHO_PROMPTS).format(word=word),
        "chosen": reply.format(word=word),
        "rejected": reply.format(word=other),
    }


def count_pair(rng: random.Random) -> dict:
    step = rng.choice([1, -1])
    lowest, highest = (0, len(NUMBER_WORDS) - COUNT_LENGTH) if step == 1 else (COUNT_LENGTH - 1, len(NUMBER_WORDS) - 1)
    start = rng.randint(lowest, highest)
    right = [start + step * i for i in range(COUNT_LENGTH)]
    mistake = rng.choice(["skip", "start", "direction"])
    if mistake == "skip":  # jumps over one number
        at = rng.randrange(1, COUNT_LENGTH)
        wrong = right[:at] + [n + step for n in right[at:]]
    elif mistake == "start":  # counts correctly, from the wrong number
        other = rng.choice([n for n in range(lowest, highest + 1) if n != start])
        wrong = [other + step * i for i in range(COUNT_LENGTH)]
    else:  # right start, wrong way
        wrong = [start - step * i for i in range(COUNT_LENGTH)]
    if not all(0 <= n < len(NUMBER_WORDS) for n in wrong):
        return count_pair(rng)  # ran off the number words; draw again
    words = lambda ns: " ".join(NUMBER_WORDS[n] for n in ns)  # noqa: E731
    way = "up" if step == 1 else "down"
    return {
        "prompt": rng.choice(COUNT_PROMPTS).format(way=way, a=NUMBER_WORDS[start]),
        "chosen": words(right),
        "rejected": words(wrong),
    }


SKILLS = {"topic": topic_pair, "echo": echo_pair, "count": count_pair}


def generate_pairs(n: int = DEMO_PAIRS, seed: int = DEMO_SEED) -> list[dict]:
    """``n`` distinct pairs, skills in turn; the same ``seed`` gives the same list."""
    rng = random.Random(seed)
    makers = list(SKILLS.items())
    pairs, seen = [], set()
    for _ in range(100 * n):  # bounded: a too-small task space must fail, not spin
        if len(pairs) == n:
            return pairs
        skill, make = makers[len(pairs) % len(makers)]
        pair = make(rng)
        key = (pair["prompt"], pair["chosen"], pair["rejected"])
        if key in seen:  # exact duplicates would leak between the train and held-out splits
            continue
        seen.add(key)
        pairs.append({**pair, "skill": skill})
    raise RuntimeError(f"could not draw {n} distinct demo pairs; the task space is too small")


def write_demo(path: Path = DEMO_FILE) -> None:
    """Write the bundled tokenizer and the demo pairs (deterministic)."""
    from po_ray.data.tokenizer import save_word_tokenizer

    save_word_tokenizer(demo_words())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for pair in generate_pairs():
            f.write(json.dumps(pair) + "\n")


# ---------------------------------------------------------------------------------------------
# --check: does a tiny model learn the preference? (single process, plain PyTorch)

CHECK_STEPS = 200
TINY_LLAMA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "intermediate_size": 128, "max_position_embeddings": 64}


def completion_logps(model, batch: dict) -> "torch.Tensor":  # noqa: F821
    """Summed completion log-probs: ``(2B, L)`` batch -> ``(2B,)``. Logits at t-1 score token t."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["input_ids"][:, 1:].unsqueeze(-1)
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(-1)


def dpo_margins(model, ref, batch: dict) -> "torch.Tensor":  # noqa: F821
    """h = (policy - reference) log-ratio of chosen minus that of rejected, ``(B,)``."""
    import torch

    logps = completion_logps(model, batch)
    with torch.no_grad():
        ref_logps = completion_logps(ref, batch)
    ratios = logps - ref_logps
    half = ratios.shape[0] // 2
    return ratios[:half] - ratios[half:]


def run_check(steps: int = CHECK_STEPS, seed: int = 0, pairs_per_step: int = 8, lr: float = 1e-3,
              beta: float = 0.1, eval_every: int = 50, path: Path = DEMO_FILE,
              eval_fraction: float = 0.1) -> dict[int, dict[str, float]]:
    """Train a random-init 2-layer Llama on the demo with plain DPO; print held-out reward accuracy.

    Returns ``{step: {"all": acc, skill: acc, ...}}``. Reward accuracy is the share of held-out
    pairs with margin h > 0 (ties at step 0 count as wrong, so it starts at 0).
    """
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from po_ray.config import DataConfig, ModelConfig
    from po_ray.data import collate, load_pairs, load_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(ModelConfig())
    train, held_out, _ = load_pairs(DataConfig(path=str(path), eval_fraction=eval_fraction), tokenizer, seed)
    with open(path, encoding="utf-8") as f:
        skills = [json.loads(line)["skill"] for line in f]
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA)
    model = LlamaForCausalLM(config)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            margins = torch.cat([dpo_margins(model, ref, collate(held_out[i:i + 64], tokenizer.pad_token_id))
                                 for i in range(0, len(held_out), 64)])
        model.train()
        correct = (margins > 0).tolist()
        by_skill = {"all": sum(correct) / len(correct)}
        for skill in sorted(set(skills)):
            hits = [c for c, p in zip(correct, held_out) if skills[p.pair_id] == skill]
            by_skill[skill] = sum(hits) / len(hits)
        return by_skill

    history = {0: evaluate()}
    order: list = []
    for step in range(1, steps + 1):
        if len(order) < pairs_per_step:
            order += rng.sample(train, len(train))
        batch, order = order[:pairs_per_step], order[pairs_per_step:]
        margins = dpo_margins(model, ref, collate(batch, tokenizer.pad_token_id))
        loss = -torch.nn.functional.logsigmoid(beta * margins).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            history[step] = evaluate()
            print(f"step {step:4d}  loss {loss.item():.3f}  held-out reward accuracy "
                  + "  ".join(f"{k} {v:.2f}" for k, v in history[step].items()), flush=True)
    return history


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m po_ray.data.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="train a tiny Llama with DPO and report accuracy")
    parser.add_argument("--steps", type=int, default=CHECK_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.check:
        run_check(steps=args.steps, seed=args.seed)
    else:
        write_demo()
        print(f"wrote {DEMO_FILE} and the tokenizer in {BUNDLED_DIR / 'tokenizer'}")


if __name__ == "__main__":
    main()
