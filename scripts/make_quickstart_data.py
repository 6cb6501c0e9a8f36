"""Write the bundled quickstart data set and its tokenizer under `data/quickstart/`.

Everything is generated from a fixed seed with no network, and the output is byte-identical
from run to run (a test regenerates it into a temp dir and compares it with the committed
files). The tasks are small, templated and regular, so that a tiny randomly initialized
model shows a clearly falling loss within ~100 CPU steps.

Usage:
    python scripts/make_quickstart_data.py [--out DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 1234
N_INSTRUCTION = 1500
N_CHAT = 50
N_TEXT = 50
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
MODEL_MAX_LENGTH = 512

# Renders each turn as "<|role|>\ncontent\n"; assistant turns end with EOS so a model learns
# to stop. Rendering is prefix-stable: appending a message never changes earlier text.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

WORDS = [
    "red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird",
    "cup", "hat", "box", "car", "bed", "pen", "map", "key", "egg", "owl",
    "sky", "sea", "hill", "rock", "leaf", "star", "rain", "snow", "wind", "fire",
]

# (singular, plural); a few irregular ones so the task is not a pure "+s" rule.
PLURALS = [
    ("cat", "cats"), ("dog", "dogs"), ("tree", "trees"), ("bird", "birds"), ("cup", "cups"),
    ("hat", "hats"), ("car", "cars"), ("bed", "beds"), ("pen", "pens"), ("map", "maps"),
    ("key", "keys"), ("egg", "eggs"), ("star", "stars"), ("hill", "hills"), ("rock", "rocks"),
    ("box", "boxes"), ("fox", "foxes"), ("bus", "buses"), ("dish", "dishes"),
    ("church", "churches"), ("baby", "babies"), ("city", "cities"), ("story", "stories"),
    ("leaf", "leaves"), ("wolf", "wolves"), ("knife", "knives"), ("child", "children"),
    ("mouse", "mice"), ("foot", "feet"), ("tooth", "teeth"), ("man", "men"),
    ("woman", "women"), ("sheep", "sheep"), ("fish", "fish"), ("goose", "geese"),
]

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
        "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
        "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

# Made-up creatures with fixed, consistent facts: (name, color, home, food).
CREATURES = [
    ("blorp", "green", "the cave", "moss"), ("zib", "blue", "the lake", "reeds"),
    ("quann", "red", "the hill", "berries"), ("toffit", "yellow", "the forest", "nuts"),
    ("murl", "purple", "the swamp", "flies"), ("snib", "orange", "the desert", "cactus"),
    ("plonk", "grey", "the mountain", "stones"), ("wex", "pink", "the meadow", "clover"),
    ("drell", "black", "the river", "fish"), ("fummo", "white", "the glacier", "snow"),
    ("garp", "brown", "the field", "grain"), ("hilda", "silver", "the moon", "dust"),
]


def spell(n: int) -> str:
    """English words for 0 <= n < 100, e.g. 42 -> "forty-two"."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] if ones == 0 else f"{TENS[tens]}-{ONES[ones]}"


def task_reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def task_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"Add {a} and {b}.", str(a + b)


def task_plural(rng: random.Random) -> tuple[str, str]:
    singular, plural = rng.choice(PLURALS)
    return f"What is the plural of {singular}?", plural


def task_spell(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 99)
    return f"Spell out {n}.", spell(n)


def task_next(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 98)
    return f"What number comes after {n}?", str(n + 1)


def task_fact(rng: random.Random) -> tuple[str, str]:
    name, color, home, food = rng.choice(CREATURES)
    kind = rng.randrange(3)
    if kind == 0:
        return f"What color is a {name}?", f"A {name} is {color}."
    if kind == 1:
        return f"Where does a {name} live?", f"A {name} lives in {home}."
    return f"What does a {name} eat?", f"A {name} eats {food}."


TASKS: list[Callable[[random.Random], tuple[str, str]]] = [
    task_reverse, task_add, task_plural, task_spell, task_next, task_fact,
]


def make_instruction_rows(rng: random.Random, n: int) -> list[dict[str, str]]:
    # The prompt ends with a newline: the instruction format concatenates prompt and
    # response as they are, so the separator lives in the data.
    rows = []
    for i in range(n):
        prompt, response = TASKS[i % len(TASKS)](rng)
        rows.append({"prompt": prompt + "\n", "response": response})
    rng.shuffle(rows)
    return rows


def make_chat_rows(rng: random.Random, n: int) -> list[dict[str, list[dict[str, str]]]]:
    rows = []
    for i in range(n):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": "You answer in as few words as you can."})
        for _ in range(1 + i % 2):  # one or two exchanges
            prompt, response = rng.choice(TASKS)(rng)
            messages.append({"role": "user", "content": prompt})
            messages.append({"role": "assistant", "content": response})
        rows.append({"messages": messages})
    return rows


def make_text_rows(rng: random.Random, n: int) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        name, color, home, food = rng.choice(CREATURES)
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        text = (f"The {name} is {color}. It lives in {home} and eats {food}. "
                f"One day it found {spell(a)} {rng.choice(PLURALS)[1]} and "
                f"{spell(b)} more, so it had {spell(a + b)}.")
        rows.append({"text": text})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def corpus(instruction: list[dict], chat: list[dict], text: list[dict]) -> list[str]:
    """The texts the tokenizer learns from, including the chat template's role markers."""
    out = [r["prompt"] + r["response"] for r in instruction]
    for r in chat:
        out.append("".join(f"<|{m['role']}|>\n{m['content']}\n" for m in r["messages"]))
    out.extend(r["text"] for r in text)
    # Every number, spelling, plural and fact once, so rare ones still get whole-word tokens
    # and the trainer has enough distinct pairs to fill the full vocabulary.
    out.extend(f"{n} {spell(n % 100)} {n + 1}" for n in range(1000))
    out.extend(f"{one} {many}" for one, many in PLURALS)
    out.extend(f"The {n} is {c}, lives in {h} and eats {f}." for n, c, h, f in CREATURES)
    return out


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE,
                    special_tokens: list[str] = SPECIAL_TOKENS):  # -> tokenizers.Tokenizer
    """Byte-level BPE with `special_tokens` at ids 0, 1, ...; encodes any byte string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_config(special_tokens: list[str] = SPECIAL_TOKENS,
                     chat_template: str | None = CHAT_TEMPLATE) -> dict:
    """The HF tokenizer config; special tokens are named by content, so any id order works."""
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(special_tokens)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "pad_token": "<pad>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def write_tokenizer(tok, out_dir: Path, config: dict | None = None) -> None:
    """Write tokenizer.json and tokenizer_config.json (default: `tokenizer_config()`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tokenizer_config() if config is None else config
    # Re-serialize with sorted keys and a trailing newline so the bytes do not depend on
    # the library's dict ordering.
    data = json.loads(tok.to_str())
    (out_dir / "tokenizer.json").write_text(
        json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2, sort_keys=True) + "\n",
        encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/quickstart", help="output directory")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    instruction = make_instruction_rows(rng, N_INSTRUCTION)
    chat = make_chat_rows(rng, N_CHAT)
    text = make_text_rows(rng, N_TEXT)
    write_jsonl(out / "train.jsonl", instruction)
    write_jsonl(out / "chat.jsonl", chat)
    write_jsonl(out / "text.jsonl", text)
    write_tokenizer(train_tokenizer(corpus(instruction, chat, text)), out / "tokenizer")
    print(f"wrote {len(instruction)} instruction, {len(chat)} chat, {len(text)} text rows "
          f"and a {VOCAB_SIZE}-token tokenizer to {out}")


if __name__ == "__main__":
    main()
