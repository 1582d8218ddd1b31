"""The bundled demo preference set, its tokenizer, and a check that a tiny model learns it.

    python -m po_ray.data.demo            # (re)write assets/tokenizer and assets/demo/pairs.jsonl
    python -m po_ray.data.demo --check    # train a tiny Llama with plain DPO, print reward accuracy

Three skills, a third of the pairs each. The chosen reply follows the instruction; the rejected one
breaks it in one specific way. The right reply always depends on the prompt (no constant reply
wins), and the deciding token follows the word it depends on (prompts end with their key word,
replies start with the answer). That is deliberate: a random-init 2-layer model learns such
next-token preferences from a few hundred DPO steps, while a preference that needs attention far
back (copying a list, remembering "up" vs "down") took thousands of steps in trials.

* topic    -- "name a fruit"          chosen is an item of that category, rejected one of another
* opposite -- "the opposite of hot"   chosen "cold"; rejected echoes "hot" or says an unrelated word
* count    -- "count on from six"     chosen "seven eight nine"; rejected repeats the start, skips
              numbers or counts down (number words, so each number is one token)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from po_ray.config import BUNDLED_DIR, DataConfig, ModelConfig
from po_ray.data.collate import collate
from po_ray.data.load import load_pairs
from po_ray.data.sources import DEMO_FILE
from po_ray.data.tokenizer import load_tokenizer, save_word_tokenizer

DEMO_SEED = 20240715
DEMO_PAIRS = 3000

# Six categories of six: with more items per category the topic skill needed well over 200 steps.
CATEGORIES = {
    "fruit": "apple banana cherry grape lemon mango".split(),
    "animal": "cat dog horse tiger lion rabbit".split(),
    "color": "red blue green yellow purple pink".split(),
    "city": "paris london rome tokyo berlin madrid".split(),
    "drink": "tea coffee milk water juice soda".split(),
    "instrument": "piano guitar violin drum flute harp".split(),
}
TOPIC_PROMPTS = ["name a {cat}", "tell me one {cat}", "what is your favourite {cat}", "suggest a {cat}",
                 "i would like a {cat}", "pick a {cat}"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("yes", "no"), ("good", "bad"), ("old", "new"),
             ("long", "short"), ("fast", "slow"), ("early", "late"), ("light", "dark"), ("open", "closed"),
             ("happy", "sad"), ("rich", "poor"), ("high", "low"), ("full", "empty"), ("hard", "soft"),
             ("left", "right"), ("first", "last"), ("wet", "dry"), ("day", "night")]
OPPOSITE_PROMPTS = ["what is the opposite of {word}", "the opposite of {word}", "give me the opposite of {word}",
                    "say the opposite of {word}"]
COUNT_PROMPTS = ["count on from {a}", "keep counting after {a}", "continue counting from {a}",
                 "what comes after {a}", "go on from {a}", "count up after {a}", "please count on from {a}",
                 "carry on counting from {a}"]
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
# Short tails keep replies varied without adding tokens after the answer whose log-ratios are noise.
TAILS = ["", " .", " !"]

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
    words |= {w for pair in OPPOSITES for w in pair}
    for template in TOPIC_PROMPTS + OPPOSITE_PROMPTS + COUNT_PROMPTS:
        words |= {w for w in template.split() if not w.startswith("{")}
    return sorted(words)


def topic_pair(rng: random.Random) -> dict:
    cat, other = rng.sample(sorted(CATEGORIES), 2)
    tail = rng.choice(TAILS)
    return {
        "prompt": rng.choice(TOPIC_PROMPTS).format(cat=cat),
        "chosen": rng.choice(CATEGORIES[cat]) + tail,
        "rejected": rng.choice(CATEGORIES[other]) + tail,
    }


def opposite_pair(rng: random.Random) -> dict:
    opposite = {a: b for a, b in OPPOSITES} | {b: a for a, b in OPPOSITES}
    word = rng.choice(sorted(opposite))
    if rng.random() < 0.5:
        wrong = word  # echoing the question: the typical failure
    else:
        wrong = rng.choice([w for w in sorted(opposite) if w not in (word, opposite[word])])
    tail = rng.choice(TAILS)
    return {
        "prompt": rng.choice(OPPOSITE_PROMPTS).format(word=word),
        "chosen": opposite[word] + tail,
        "rejected": wrong + tail,
    }


def count_pair(rng: random.Random) -> dict:
    length = rng.randint(2, 5)
    start = rng.randint(1, len(NUMBER_WORDS) - 3 * length - 1)  # room for a skip of 3 and for counting down
    right = [start + 1 + i for i in range(length)]
    mistake = rng.choice(["repeat", "skip", "down"])
    if mistake == "repeat":  # starts from the prompt's number instead of after it
        wrong = [start + i for i in range(length)]
    elif mistake == "skip":
        stride = rng.choice([2, 3])
        wrong = [start + stride * (i + 1) for i in range(length)]
    else:
        wrong = [n for n in range(start - 1, start - 1 - length, -1) if n >= 0]
    words = lambda ns: " ".join(NUMBER_WORDS[n] for n in ns)  # noqa: E731
    return {
        "prompt": rng.choice(COUNT_PROMPTS).format(a=NUMBER_WORDS[start]),
        "chosen": words(right),
        "rejected": words(wrong),
    }


SKILLS = {"topic": topic_pair, "opposite": opposite_pair, "count": count_pair}


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
    save_word_tokenizer(demo_words())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for pair in generate_pairs():
            f.write(json.dumps(pair) + "\n")


# ---------------------------------------------------------------------------------------------
# --check: does a tiny model learn the preference? (single process, plain PyTorch)

CHECK_STEPS = 200
TINY_LLAMA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "max_position_embeddings": 512}  # as po_ray.model builds tiny-llama


def completion_logps(model, batch: dict) -> torch.Tensor:
    """Summed completion log-probs: ``(2B, L)`` batch -> ``(2B,)``. Logits at t-1 score token t."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["input_ids"][:, 1:].unsqueeze(-1)
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(-1)


def dpo_margins(model, ref, batch: dict) -> torch.Tensor:
    """h = (policy - reference) log-ratio of chosen minus that of rejected, ``(B,)``."""
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

    from transformers import LlamaConfig, LlamaForCausalLM  # only the check needs a model

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
    # Linear decay to 0 at the last step, as optimizer.scheduler's default does in training.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1 - done / steps)
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
        schedule.step()
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
