"""Writes the demo's task: 4-digit addition worked digit by digit, with a character-level tokenizer.

Each problem `3482+1759=` has a reference trajectory that adds the columns right to left. A
column is written `a+b+carry=` with its two-digit sum, then `|` and the digits of the result found
so far (the new digit in front of the previous ones, so the answer is built where it is read),
and the last column's result goes into the box:

    2+9+0=11|1;8+5+1=14|41;4+7+1=12|241;3+1+1=05|5241;\\boxed{5241}

A model that has not learned to carry rarely gets every column right, so GRPO's rewards are
sparse; the first ℓ tokens of the trajectory (whole columns, for ℓ at a column's end) are the
guidance, and every forced column leaves one fewer to get right. Files written beside this script:

    addition_train.jsonl    training problems (SFT warm start and RL)
    addition_heldout.jsonl  held-out problems, disjoint from training (no shared pair of operands,
                            in either order); evaluation only
    addition_tokenizer/     one token per printable ASCII character and newline, plus <eos> and
                            <pad>, in Hugging Face format (tokenizer.json + tokenizer_config.json)

    python experiments/data/make_addition.py   # rewrites all three, deterministically
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string

HERE = os.path.dirname(os.path.abspath(__file__))
EOS, PAD = "<eos>", "<pad>"


def trajectory(a: int, b: int, digits: int = 4) -> str:
    """The column-by-column sum of a + b (least significant column first), the result so far after
    each column, and the boxed answer."""
    steps, carry, result = [], 0, ""
    for column in range(digits):
        x, y = a // 10**column % 10, b // 10**column % 10
        total = x + y + carry
        carry = total // 10
        result = str(total % 10) + result
        shown = str(carry) + result if column == digits - 1 and carry else result  # the final carry
        steps.append(f"{x}+{y}+{total - x - y}={total:02d}|{shown};")
    return "".join(steps) + f"\\boxed{{{a + b}}}"


def record(a: int, b: int, split: str, index: int) -> dict:
    """One problem in the MATH layout the `math` data adapter reads."""
    return {"problem": f"{a}+{b}=", "solution": trajectory(a, b), "answer": str(a + b),
            "unique_id": f"addition/{split}/{index}"}


def operand_pairs(count: int, rng: random.Random, exclude: set) -> list[tuple[int, int]]:
    """`count` distinct pairs of 4-digit operands, none of which (in either order) is in `exclude`."""
    pairs: list[tuple[int, int]] = []
    seen = set(exclude)
    while len(pairs) < count:
        a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
        if (a, b) in seen:
            continue
        seen.update({(a, b), (b, a)})
        pairs.append((a, b))
    return pairs


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_char_tokenizer(directory: str) -> None:
    """A character-level tokenizer (tokenizers library), saved for transformers' AutoTokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = sorted(set(string.printable) - set("\t\r\x0b\x0c"))  # printable ASCII, space, \n
    vocab = {token: i for i, token in enumerate([EOS, PAD] + characters)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # characters join without spaces
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD)
    wrapped.save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=20000, help="training problems")
    parser.add_argument("--heldout", type=int, default=512, help="held-out problems")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    heldout = operand_pairs(args.heldout, rng, exclude=set())
    train = operand_pairs(args.train, rng, exclude={p for a, b in heldout for p in ((a, b), (b, a))})
    write_jsonl(os.path.join(HERE, "addition_heldout.jsonl"),
                [record(a, b, "heldout", i) for i, (a, b) in enumerate(heldout)])
    write_jsonl(os.path.join(HERE, "addition_train.jsonl"),
                [record(a, b, "train", i) for i, (a, b) in enumerate(train)])
    write_char_tokenizer(os.path.join(HERE, "addition_tokenizer"))
    print(f"wrote {len(train)} training and {len(heldout)} held-out problems and the tokenizer to {HERE}")


if __name__ == "__main__":
    main()
