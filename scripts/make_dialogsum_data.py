"""Write the bundled dialogue-summarization data set and its tokenizer under `data/dialogsum/`.

A small, synthetic stand-in for DialogSum: short speaker-tagged dialogues between two named
people (arranging a meeting, a delivery, booking an appointment, lending something, planning
a trip, reporting a problem), each paired with a one- or two-sentence reference summary. Every
dialogue is built from structured slots (WHO, WHAT, WHEN, WHERE) wrapped in filler turns, and
in some dialogues one speaker changes the time, day or place; the summary always states the
final values, so ROUGE against it measures whether a model read the dialogue.

Everything comes from a fixed seed with no network, and the output is byte-identical from run
to run (a test regenerates it into a temp dir and compares it with the committed files). The
vocabulary is small and regular, so a tiny randomly initialized model can learn the task on a
CPU in minutes.

Usage:
    python scripts/make_dialogsum_data.py [--out DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # so the sibling script imports when this file is loaded by path
    sys.path.insert(0, _HERE)

from make_quickstart_data import (  # noqa: E402
    tokenizer_config, train_tokenizer, write_jsonl, write_tokenizer,
)

SEED = 2024
N_TRAIN = 3000
N_EVAL = 200
CHANGE_RATE = 0.35  # share of dialogues in which a speaker changes the time, day or place
MAX_LINES = 9  # small talk and closing turns are only added while a dialogue stays this short
VOCAB_SIZE = 1024
# pad=0 and eos=1 follow T5 (pad doubles as the decoder start), so one tokenizer serves both
# a tiny T5 and a tiny decoder-only model.
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<s>"]

NAMES = [
    "Anna", "Tom", "Maria", "Jack", "Lucy", "Ben", "Emma", "Sam", "Sara", "Leo",
    "Mia", "Dan", "Nina", "Paul", "Kate", "Mark", "Julia", "Alex", "Eva", "Chris",
    "Lily", "Max", "Rosa", "Peter", "Zoe", "Hugo", "Ella", "Ivan", "Grace", "Omar",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MORNING = ["8 am", "9 am", "10 am", "11 am"]
AFTERNOON = ["1 pm", "2 pm", "3 pm", "4 pm", "5 pm", "6 pm"]
EVENING = ["5 pm", "6 pm", "7 pm", "8 pm"]
DAYTIME = MORNING + AFTERNOON


@dataclass(frozen=True)
class Slots:
    """The facts of one dialogue; day, time and place are the final (agreed) values."""

    scenario: str
    a: str  # the speaker who opens the dialogue
    b: str
    what: str
    day: str
    time: str
    place: str
    changed: str | None = None  # "time", "day" or "place" when a speaker changed it
    old: str | None = None  # the value before the change
    changer: str | None = None  # who asked for the change


@dataclass(frozen=True)
class Scenario:
    """A dialogue type: slot pools, the turns that state the plan, and summary templates.

    `whats` maps each WHAT to the places that fit it. `plans` are alternative exchanges
    (turns alternate a, b, a, ...) that state all slots; `summaries` use {a} {b} {what}
    {day} {time} {place}. `changes` lists the slots a speaker may change mid-dialogue.
    `chat` is False where the plans open with their own greeting.
    """

    name: str
    whats: dict[str, list[str]]
    times: list[str]
    plans: list[list[str]]
    summaries: list[str]
    changes: tuple[str, ...]
    chat: bool = True  # open with a greeting and maybe small talk (else the plan greets)


SCENARIOS = [
    Scenario(
        "meet",
        {"study for the exam": ["the library", "the cafe", "the school"],
         "play tennis": ["the park", "the sports club"],
         "watch a film": ["the cinema", "the film club"],
         "have lunch": ["the cafe", "the Blue Fish", "the Red Lion"],
         "have dinner": ["the Blue Fish", "the Red Lion", "the Green Olive"],
         "go for a run": ["the park", "the river"],
         "work on the project": ["the library", "the office", "the cafe"],
         "play chess": ["the cafe", "the chess club"],
         "go swimming": ["the pool", "the lake"]},
        DAYTIME + ["7 pm", "8 pm"],
        [["Do you want to {what} together?", "Sure! When and where?",
          "How about {day} at {time} at {place}?", "Great, {place} on {day} at {time}."],
         ["Are you free on {day} at {time}?", "Yes, I think so. Why?",
          "I want to {what}. Let's meet at {place}.", "Good idea, see you at {place}."],
         ["Let's {what} this week.", "OK. Is {day} good for you?",
          "{day} is fine. Shall we meet at {place} at {time}?", "Yes, {time} at {place} works."]],
        ["{a} and {b} will meet at {place} on {day} at {time} to {what}.",
         "{a} and {b} are going to {what} at {place} on {day} at {time}.",
         "On {day} at {time}, {a} and {b} will {what} at {place}."],
        ("time", "day", "place"),
    ),
    Scenario(
        "delivery",
        {"a new sofa": ["the flat", "the house"], "a desk lamp": ["the office", "the flat"],
         "a box of books": ["the school", "the office", "the flat"],
         "a washing machine": ["the flat", "the house"], "a new bed": ["the flat", "the house"],
         "a fridge": ["the house", "the cafe"], "a set of chairs": ["the office", "the school"]},
        DAYTIME,
        [["Hi {b}, I ordered {what} from your shop. When can you bring it?",
          "We can deliver it on {day} at {time}.", "Good. Please bring it to {place}.",
          "OK, {place} on {day} at {time}."],
         ["Hello {b}, is my order ready? It is {what}.", "Yes, it is. Where should we bring it?",
          "To {place}, please.", "We can be there on {day} at {time}.", "Perfect, thank you."],
         ["Hi {b}, when will {what} arrive?", "Our driver can come on {day}. Is {time} OK?",
          "Yes, {time} is fine. The address is {place}.", "Great, {place} it is."]],
        ["{b} will deliver {what} to {a} at {place} on {day} at {time}.",
         "{a} ordered {what}, and {b} will bring it to {place} on {day} at {time}.",
         "On {day} at {time}, {b} will bring {what} to {place} for {a}."],
        ("time", "day"),
        chat=False,
    ),
    Scenario(
        "appointment",
        {"a check-up": ["the clinic", "the health centre"], "a haircut": ["the hair salon"],
         "an eye test": ["the optician"], "a dental check-up": ["the dentist"],
         "a car service": ["the garage"], "a table for two": ["the Blue Fish", "the Red Lion"],
         "a table for four": ["the Green Olive", "the Red Lion"]},
        DAYTIME + ["7 pm"],
        [["Hello, is this {place}?", "Yes, this is {b}. How can I help?",
          "I would like to book {what}.", "Sure. We have a free slot on {day} at {time}.",
          "Perfect, I will take it."],
         ["Hi {b}, can I book {what} at {place}?", "Of course. What day?",
          "{day}, if possible.", "We can do {day} at {time}.", "Great, thank you."],
         ["Good morning, I need {what} at {place}.", "Let me check. {day} at {time}?",
          "Yes, {day} at {time} is good.", "Done. See you then."]],
        ["{a} booked {what} with {b} at {place} on {day} at {time}.",
         "{a} has {what} at {place} on {day} at {time}; {b} made the booking.",
         "{b} booked {what} for {a} at {place} on {day} at {time}."],
        ("time", "day"),
        chat=False,
    ),
    Scenario(
        "lend",
        {w: ["the cafe", "the office", "the station", "the gym", "the library"]
         for w in ["camera", "bike", "tent", "drill", "laptop", "guitar", "ladder", "car"]},
        DAYTIME,
        [["Could I borrow your {what} for the weekend?", "Sure. I will be at {place} on {day}.",
          "Great. What time?", "Come at {time}."],
         ["Do you still have that {what}?", "Yes, do you need it?",
          "Yes, just for a few days.", "OK, pick it up at {place} on {day} at {time}."],
         ["My {what} is broken. Can I use yours?", "Of course.",
          "Can I get it on {day} at {time}?", "Yes, meet me at {place}."]],
        ["{a} will borrow {b}'s {what} and pick it up at {place} on {day} at {time}.",
         "{b} will lend the {what} to {a}; they will meet at {place} on {day} at {time}.",
         "On {day} at {time}, {a} will get {b}'s {what} at {place}."],
        ("time", "day", "place"),
    ),
    Scenario(
        "trip",
        {w: ["the station", "the bus stop", "the main square", "the car park"]
         for w in ["the lake", "the mountains", "the seaside", "the old castle", "the zoo",
                   "the forest", "the big city"]},
        MORNING + ["1 pm", "2 pm"],
        [["Shall we go on a trip to {what}?", "Yes, I would love that! When?",
          "On {day}. Let's meet at {place} at {time}.", "OK, {place} at {time}."],
         ["I want to visit {what} on {day}. Do you want to come?", "Sure! Where do we meet?",
          "At {place}, at {time}.", "Great, see you at {place}."],
         ["Are you free on {day}?", "Yes, why?", "Let's take a trip to {what}.",
          "Good idea. Meet at {place} at {time}?", "Perfect."]],
        ["{a} and {b} will meet at {place} on {day} at {time} for a trip to {what}.",
         "{a} and {b} are going to {what} on {day} and will meet at {place} at {time}.",
         "On {day} at {time}, {a} and {b} will meet at {place} for a trip to {what}."],
        ("time", "day", "place"),
    ),
    Scenario(
        "repair",
        {w: ["the flat", "the office", "the shop", "the studio"]
         for w in ["the heating", "the sink", "the washing machine", "the shower", "the window",
                   "the door lock", "the fridge", "the printer"]},
        DAYTIME,
        [["I think {what} in {place} is broken.", "Oh no. I can come and fix it on {day}.",
          "Thank you. What time?", "At {time}.", "Great."],
         ["{b}, there is a problem with {what} in {place}.", "What is wrong with it?",
          "It does not work at all.", "I will come on {day} at {time} and fix it."],
         ["Can you help me with {what} in {place}? It stopped working.", "Sure. Is {day} OK?",
          "Yes. When?", "At {time}. I will bring my tools."]],
        ["{b} will come to {place} to fix {what} for {a} on {day} at {time}.",
         "{a} reported that {what} in {place} is broken; {b} will fix it on {day} at {time}.",
         "On {day} at {time}, {b} will fix {what} in {place} for {a}."],
        ("time", "day"),
    ),
]

GREETINGS = [
    ["Hi {b}!", "Hi {a}, how are you?"],
    ["Hello {b}.", "Hey {a}!"],
    ["Good morning, {b}.", "Morning, {a}! What's up?"],
    ["Hi {b}, do you have a minute?", "Sure, {a}."],
]
SMALL_TALK = [
    ["How was your weekend?", "Good, thanks. I stayed at home and read."],
    ["The weather is lovely today.", "Yes, finally some sun."],
    ["Did you see the game last night?", "Yes, what a match!"],
    ["How is your new job?", "Busy, but I like it."],
    ["Are you still tired?", "A little, but I am fine."],
    ["How is your sister?", "She is well, thanks for asking."],
    ["I had a long day.", "Me too. I need a rest."],
]
CLOSINGS = [
    ["See you then!", "See you, bye!"],
    ["Thanks a lot!", "You're welcome."],
    ["Great, talk soon.", "Bye!"],
    ["Perfect. Have a nice day.", "You too."],
]
CHANGE_TURNS = {
    "time": [["Oh wait, I can't make it at {old}. Can we do {new} instead?",
              "Sure, {new} is fine."],
             ["Actually, {old} does not work for me. How about {new}?",
              "No problem, let's say {new} then."]],
    "day": [["Wait, I just remembered I am busy on {old}. Can we move it to {new}?",
             "OK, {new} it is."],
            ["Sorry, {old} is bad for me. Is {new} OK?", "Yes, {new} works too."]],
    "place": [["Actually, {old} will be very busy. Let's go to {new} instead.",
               "Good idea, {new} then."],
              ["Can we meet at {new} instead of {old}?", "Sure, {new} is fine."]],
}
CHANGE_NOTES = ["{changer} asked to change the {changed}.", "{changer} changed the {changed}."]


def speak(turns: list[str], first: str, second: str, slots: dict[str, str]) -> list[str]:
    """Render alternating turns, `first` speaking first, as "Name: text" lines."""
    speakers = [first, second]
    return [f"{speakers[i % 2]}: {t.format(**slots)}" for i, t in enumerate(turns)]


def pick_other(rng: random.Random, pool: list[str], value: str) -> str:
    return rng.choice([v for v in pool if v != value])


def make_slots(rng: random.Random, sc: Scenario) -> tuple[Slots, dict[str, str]]:
    """Draw the slots; returns the final Slots and the values the plan turns first state."""
    a, b = rng.sample(NAMES, 2)
    what = rng.choice(sorted(sc.whats))
    places = sc.whats[what]
    stated = {"a": a, "b": b, "what": what, "day": rng.choice(DAYS),
              "time": rng.choice(sc.times), "place": rng.choice(places)}
    final = dict(stated)
    changed = old = changer = None
    if rng.random() < CHANGE_RATE:
        options = [c for c in sc.changes if c != "place" or len(places) > 1]
        changed = rng.choice(options)
        pool = {"time": sc.times, "day": DAYS, "place": places}[changed]
        old = stated[changed]
        final[changed] = pick_other(rng, pool, old)
        changer = rng.choice([a, b])
    slots = Slots(sc.name, a, b, what, final["day"], final["time"], final["place"],
                  changed, old, changer)
    return slots, stated


def make_dialogue(rng: random.Random, sc: Scenario, slots: Slots,
                  stated: dict[str, str]) -> str:
    """Greeting, maybe small talk, the plan, maybe a change of plan, maybe a closing."""
    a, b = slots.a, slots.b
    names = {"a": a, "b": b}
    greeting = speak(rng.choice(GREETINGS), a, b, names) if sc.chat else []
    body = speak(rng.choice(sc.plans), a, b, stated)
    if slots.changed:
        other = b if slots.changer == a else a
        new = getattr(slots, slots.changed)
        body += speak(rng.choice(CHANGE_TURNS[slots.changed]), slots.changer, other,
                      {"old": slots.old, "new": new})
    small_talk = []
    if sc.chat and rng.random() < 0.5 and len(greeting) + len(body) + 2 <= MAX_LINES:
        small_talk = speak(rng.choice(SMALL_TALK), *rng.sample([a, b], 2), names)
    lines = greeting + small_talk + body
    if rng.random() < 0.7 and len(lines) + 2 <= MAX_LINES:
        last = lines[-1].split(":")[0]
        lines += speak(rng.choice(CLOSINGS), b if last == a else a, last, names)
    return "\n".join(lines)


def make_summary(rng: random.Random, sc: Scenario, slots: Slots) -> str:
    values = {"a": slots.a, "b": slots.b, "what": slots.what, "day": slots.day,
              "time": slots.time, "place": slots.place}
    summary = rng.choice(sc.summaries).format(**values)
    if slots.changed and rng.random() < 0.5:
        note = rng.choice(CHANGE_NOTES)
        summary += " " + note.format(changer=slots.changer, changed=slots.changed)
    return summary


def make_example(rng: random.Random, sc: Scenario) -> tuple[dict[str, str], Slots]:
    """One row {"dialogue", "summary"} and the structured slots it was built from."""
    slots, stated = make_slots(rng, sc)
    dialogue = make_dialogue(rng, sc, slots, stated)
    return {"dialogue": dialogue, "summary": make_summary(rng, sc, slots)}, slots


def generate(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL):
    """(train, eval), each a list of (row, slots); no dialogue appears twice in either or both.

    Scenarios take turns, so every scenario has an equal share before the shuffle.
    """
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    examples = []
    i = 0
    while len(examples) < n_train + n_eval:
        row, slots = make_example(rng, SCENARIOS[i % len(SCENARIOS)])
        i += 1
        if row["dialogue"] not in seen:
            seen[row["dialogue"]] = None
            examples.append((row, slots))
    rng.shuffle(examples)
    return examples[:n_train], examples[n_train:]


def length_stats(tok, texts: list[str]) -> str:
    counts = [len(tok.encode(t).ids) for t in texts]
    return f"min {min(counts)} / median {statistics.median(counts):g} / max {max(counts)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/dialogsum", help="output directory")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, evaluation = generate(args.seed)
    train_rows = [row for row, _ in train]
    eval_rows = [row for row, _ in evaluation]
    write_jsonl(out / "train.jsonl", train_rows)
    write_jsonl(out / "eval.jsonl", eval_rows)
    # Learned from the train split only, so eval text never shapes the vocabulary.
    texts = [t for row in train_rows for t in (row["dialogue"], row["summary"])]
    tok = train_tokenizer(texts, VOCAB_SIZE, SPECIAL_TOKENS)
    write_tokenizer(tok, out / "tokenizer", tokenizer_config(SPECIAL_TOKENS, chat_template=None))
    changed = sum(s.changed is not None for _, s in train + evaluation)
    print(f"wrote {len(train_rows)} train and {len(eval_rows)} eval rows ({changed} with a "
          f"change of plan) and a {tok.get_vocab_size()}-token tokenizer to {out}")
    rows = train_rows + eval_rows
    print("dialogue tokens:", length_stats(tok, [r["dialogue"] for r in rows]))
    print("summary tokens: ", length_stats(tok, [r["summary"] for r in rows]))


if __name__ == "__main__":
    main()
