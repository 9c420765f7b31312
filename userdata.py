"""
Your own text instead of the toy world: `python train.py --data FILE`.

The world's grammar does not apply to arbitrary text, so nothing here can say
whether a sample is "valid" (train.py reports validity as not measured). What
RLHF still needs is a notion of what a reader wants, so this file supplies a
documented, rule-based gold reward on any text, and the same simulated
annotators (world.annotator_prob) are built on it:

  gold_reward(text) = clip( tanh((n_pos - n_neg) / 3)
                            - 0.1 * max(0, n_exclaim - 1)
                            - 0.3 * n_repeated_sentences, -1, 1 )

where n_pos / n_neg count words of a small sentiment lexicon (below). Like the
world's gold reward, it pays for positive text and not for "!" beyond one, nor
for repeating a sentence; empty text scores -1. Annotators are still swayed by
"!", so the reward model's blind spot carries over.

The text is cut into passages of `passage_words` words (whitespace normalised);
each passage is a document ending in EOS. Prompts are the first words of
held-out passages, exactly as with the world's reviews.
"""
import math
import random
import re

POSITIVE = set("""good great excellent wonderful lovely love loved beautiful best better happy joy
delight delightful fine kind gentle brave bright glad pleasant sweet noble fair true warm hope
hopeful peace friend friends praise admire enjoy enjoyed brilliant superb perfect charming honest
grace graceful merry smile laugh rich strong wise""".split())
NEGATIVE = set("""bad worse worst awful terrible hate hated sad angry fear afraid cruel poor
ugly evil wrong pain painful death die dead dull boring weak foul false bitter cold dark grief
sorrow war enemy enemies curse cursed shame fool foolish wicked vile sick tired lonely hurt
fail failed""".split())


def read_text(path, min_chars):
    """The file's text, or ValueError with one line naming what is wrong with it."""
    try:
        raw = open(path, "rb").read()
    except FileNotFoundError:
        raise ValueError(f"--data {path}: no such file")
    except OSError as e:
        raise ValueError(f"--data {path}: cannot read ({e.strerror})")
    if not raw.strip():
        raise ValueError(f"--data {path}: the file is empty")
    if b"\x00" in raw:
        raise ValueError(f"--data {path}: looks binary (contains NUL bytes); give a text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {path}: not UTF-8 text (bad byte at offset {e.start})")
    if len(text) < min_chars:
        raise ValueError(f"--data {path}: only {len(text)} characters; need at least {min_chars} "
                         f"for training (a few pages of text)")
    return text


def n_exclaim(text):
    return text.count("!")


def gold_reward(text):
    """The rule-based gold reward on any string, in [-1, 1] (formula in the module docstring)."""
    words = re.findall(r"[a-z']+", text.lower())
    if not words:
        return -1.0
    n_pos = sum(w in POSITIVE for w in words)
    n_neg = sum(w in NEGATIVE for w in words)
    sentences = [s.strip().lower() for s in re.split(r"[.!?]+", text) if s.strip()]
    n_repeats = len(sentences) - len(set(sentences))
    r = math.tanh((n_pos - n_neg) / 3) - 0.1 * max(0, n_exclaim(text) - 1) - 0.3 * n_repeats
    return max(-1.0, min(1.0, r))


def build_datasets(path, seed=0, passage_words=24, n_eval_prompts=256, n_train_prompts=2000,
                   prompt_words=(2, 4), min_chars=2000):
    """The same dict as world.build_datasets, made from a user's text file:
    pretrain (passages), sft ((prompt, completion) pairs), train_prompts, eval_prompts,
    eval_references (the held-out passages the eval prompts were cut from)."""
    words = read_text(path, min_chars).split()
    passages = [" ".join(words[i:i + passage_words])
                for i in range(0, len(words) - passage_words + 1, passage_words)]
    if len(passages) < 20:
        raise ValueError(f"--data {path}: only {len(passages)} passages of {passage_words} words; "
                         f"need at least 20")
    rng = random.Random(seed)
    rng.shuffle(passages)
    # Hold out ~20% of passages (at most what the prompt sets need) for prompts.
    n_held = min(len(passages) // 5, n_eval_prompts + n_train_prompts)
    held, train = passages[:n_held], passages[n_held:]
    n_eval = min(n_eval_prompts, max(1, n_held // 2))

    def split(p):
        k = rng.randint(*prompt_words)
        w = p.split()
        return " ".join(w[:k]), " " + " ".join(w[k:])

    sft = [split(p) for p in train]
    return {"pretrain": train, "sft": sft,
            "eval_prompts": [split(p)[0] for p in held[:n_eval]],
            "eval_references": held[:n_eval],
            "train_prompts": [split(p)[0] for p in held[n_eval:]]
            or [split(p)[0] for p in train[:n_train_prompts]]}
