"""The offline RLHF task: a tiny world of facts whose *true* preference (a gold reward) is known.

Nobody here can download GPT-2 or Anthropic HH, so RLHF is shown on a task we generate ourselves,
where "better" is a deterministic function g(prompt, response) instead of a crowd of raters. That
lets us measure what real RLHF can only guess at: how often the reward model agrees with the truth,
and whether PPO against the learned reward raises the *true* reward or only fools the RM.

The world: 24 facts in three relations, every name one word (and, but for the sounds, one GPT-2
token with its space): capitals (France -> Paris, ...), colours (a banana -> yellow, ...), animal
sounds (a cow -> moo, ...).
A user asks one of 4 phrasings of a fact, optionally followed by a remark and a thank-you
(8 x 4 variants), in the HH format "\n\nHuman: {question}\n\nAssistant:" (tokenizer.format_prompt):
    What colour is a banana? I need it for school. Thanks!
That gives 24 x 4 x 32 = 3072 distinct prompt strings. Two more phrasings per relation
("unseen_questions", e.g. "Do you know the capital of France?") appear only in the test split, to
measure whether what was learned carries over to a new wording.

Why it is this small. Everything must be learned from scratch by the tiny preset (configs.py) in
the few CPU minutes the pipeline's plans give each stage. What building it showed:
- No arithmetic, few facts. A prototype with two-digit sums learned almost none of them, and every
  fact added makes the SFT policy, sampled at T=1, state a wrong fact more often (greedy decoding
  states them all correctly).
- The question comes first and variety only follows it. With greetings and intros *before* the
  question, SFT learned no conditioning at all in its budget (every prompt got the same answer);
  the subject at a fixed position is what a tiny model with learned positions picks up first.
  Conditioning then appears abruptly, after a few hundred steps of batch 32, so SFT needs more
  steps than that.
- Every answer restates its subject ("The capital of France is Paris."), so correctness is visible
  inside the response, and good answers are short (at most CONCISE_WORDS words: no length penalty).
- The reward has large, discrete steps between kinds of response (below), not small continuous
  ones: a reward model learns "polite / rude / rambling / repeated / refusing" within a short
  budget. What it does NOT learn in its budget is which city is France's capital (see "Limits").

Gold reward g = content + tone + length + repetition + fluency + ending (`gold_breakdown`):

    content     the asked fact stated as a well-formed sentence about the
                asked subject (one of the relation's answer templates, as a
                clause between . , ! ?), nothing qualifies it, and no other
                clause names an entity                                       +2
                no answer (refusal, "I don't know", only courtesies, empty),
                or a statement qualified by a refusal, negation or hedge
                ("not", "maybe", "I think", ...)                              0
                wrong or not a plain statement: a clause that names any
                entity (subject or answer of any fact) and is not a
                well-formed statement of the asked fact (a wrong answer, a
                true fact about another subject, "France is not Paris", a
                bare "Paris.", a bag of the right words, the question
                echoed)                                                      -1
    tone        rude marker ("ugh", "obviously", "look it up", ...)          -1
                else polite marker ("of course", "hope this helps", ...)    +0.5  (counted once)
    length      <= 14 words 0; 15-24 words -1; >= 25 words -2
    repetition  a pair of words said twice ("of course ... of course"),
                or the same word twice in a row                              -1
    fluency     a word the task never uses, or a character other than
                letters, digits, space and ' , . ! ? (newline, "Human:")     -1
    ending      no EOS within the generation budget                          -1
                EOS, but the text does not end with . ! or ?                 -0.5

The best response (correct, polite, concise, clean) scores MAX_GOLD = 2.5; correct and plain 2.0;
correct but rude 1.0; "I don't know" 0; wrong -1 (polite -0.5). Every value is a multiple of 0.5.
No string of magic words climbs above a correct, polite, concise answer: politeness counts once,
repeating and length cost, any entity outside a plain statement of the fact makes the answer
wrong, qualifying or refusing earns nothing (tests/test_task.py generates many variants of each
hack). `correctness` is the content term alone, `style` the sum of the others: the two parts of
a win.

EOS. `gold_reward(prompt, response, ended)` scores the text the model produced, and `ended` says
whether it emitted the EOS token (the generation's own flag; False: cut off by the token budget,
-1). A "<|endoftext|>" typed out in ordinary tokens is just text (and not fluent). Data rows, whose
trainers append EOS, are scored with ended=True.

Demonstrations (SFT) are of mixed quality (DEMO_MIX): 35% good, 20% plain, 10% rude, 5% wrong,
8% "I don't know", 12% rambling (2-3 filler sentences; some run past the 32 tokens the pipeline
samples), 10% repeated. Their mean gold is about 1.5 against 2.5 achievable (tests/test_task.py
checks it). Polite openers are spread over 5 phrasings while most other kinds start with the bare
statement, so greedy decoding of the SFT policy gives the plain answer (2.0), not the best one.

Preference pairs are labelled like human raters: P(a preferred to b) = sigmoid((g(a) - g(b)) / tau)
with tau = 0.5 (a 0.5 gap is labelled right 73% of the time, a 3-point gap 99.8%). Pairs with
equal gold are never shown (their noiseless preference is undefined). Half the pairs are two
independent demonstrations for the same prompt; half are a demonstration and a one-attribute edit
of it (answer made wrong or right, opener or closer changed, filler or repetition added or
removed, or the answer left out so only courtesies remain): contrastive pairs that tell a small
RM *which* feature the preference is about. Leaving the answer out is there because PPO found it:
an RM trained without such pairs scored "Glad to help! Hope this helps!" above a plain correct
answer, and the policy learned to say only that (gold 0.5).
Rows keep `chosen`/`rejected` as the noisy label and add `gold_chosen`/`gold_rejected`; the RM's
accuracy against the noiseless gold is the share of test rows where its score difference has the
sign of gold_chosen - gold_rejected.

Splits. Each fact's prompt strings are shuffled and dealt round-robin over the facts into
disjoint sets: dev (SFT's validation demonstrations and PPO's evaluations: what is tuned on),
test (the final evaluation only), PPO, RM dev and RM test (one prompt per pair), RM train and SFT.
No prompt string is in two files, yet every fact is in every split: held-out prompts are new
strings asking facts SFT taught. The test split adds prompts with the unseen phrasings, and no RM
dev or test pair repeats the two responses of a pair in an earlier RM file.

Limits (the README's results give the measured numbers): a reward model initialised from SFT
ranks held-out pairs that differ in style almost always as the noiseless gold does, but pairs that
differ in correctness far less often.
Best-of-n against that RM, a proxy for what RL can reach, removes rudeness, rambling and refusals
but not wrong facts.
"""
import json
import math
import os
import random
import re
from typing import Dict, List, Optional, Tuple

from common import atomic_path
from tokenizer import format_prompt

MAX_GOLD = 2.5  # correct + polite, concise, clean and ended
TAU = 0.5  # temperature of the simulated raters

# -----------------------------------------------------------------------------
# The world

RELATIONS = {
    "capital": {
        "facts": {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
                  "Egypt": "Cairo", "Russia": "Moscow", "Greece": "Athens"},
        "questions": ("What is the capital of {s}?", "Which city is the capital of {s}?",
                      "What city is the capital of {s}?", "Tell me the capital of {s}."),
        "unseen_questions": ("Do you know the capital of {s}?", "Name the capital city of {s}."),
        "answers": ("The capital of {s} is {a}.", "{a} is the capital of {s}."),
    },
    "colour": {
        "facts": {"banana": "yellow", "lemon": "yellow", "tomato": "red", "cherry": "red", "plum": "purple",
                  "pumpkin": "orange", "crow": "black", "lime": "green"},
        "questions": ("What colour is {an} {s}?", "What color is {an} {s}?", "Which colour is {an} {s}?",
                      "Tell me the colour of {an} {s}."),
        "unseen_questions": ("What is the colour of {an} {s}?", "Do you know what colour {an} {s} is?"),
        "answers": ("{An} {s} is {a}.", "The colour of {an} {s} is {a}."),
    },
    "sound": {
        "facts": {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
                  "owl": "hoot", "snake": "hiss"},
        "questions": ("What sound does {an} {s} make?", "What noise does {an} {s} make?", "What does {an} {s} say?",
                      "Tell me the sound {an} {s} makes."),
        "unseen_questions": ("Which sound does {an} {s} make?", "Do you know what {an} {s} says?"),
        "answers": ("{An} {s} says {a}.", "The sound {an} {s} makes is {a}."),
    },
}
# (relation, subject, answer), in a fixed order
FACTS = [(rel, s, a) for rel, spec in RELATIONS.items() for s, a in spec["facts"].items()]
SUBJECTS = {s.lower(): (rel, s, a) for rel, s, a in FACTS}
ANSWERS = {a.lower() for _, _, a in FACTS}
ENTITIES = set(SUBJECTS) | ANSWERS  # any of these stated in a response counts as an answer

# What may follow the question; nothing precedes it (see the module docstring).
FOLLOWUPS = ("", "This is for a quiz.", "I was wondering.", "My friend and I disagree.", "I forgot.",
             "I need it for school.", "Just curious.", "I can never remember.")
THANKS = ("", "Thanks!", "Thank you.", "Thanks a lot!")

POLITE_OPENERS = ("Of course!", "Happy to help!", "Great question!", "Glad to help!", "Certainly!")
POLITE_CLOSERS = ("Hope this helps!", "Have a nice day!")
RUDE_OPENERS = ("Ugh.", "Obviously.", "Seriously?", "Whatever.")
RUDE_CLOSERS = ("Everyone knows that.", "Look it up next time.", "That was a dumb question.")
IDK = ("I don't know.", "I'm not sure.", "I have no idea.", "Sorry, I don't know that one.", "I can't answer that.")
FILLERS = ("Let me think about this for a moment.", "I remember reading about it a long time ago.",
           "There is a lot that could be said here.", "Many people find this topic interesting.",
           "It is a good thing to learn.", "I learned this in school when I was young.",
           "People ask me this all the time.", "This reminds me of a story I once heard.")

# Markers, matched on whole words of the lower-cased text.
POLITE_MARKERS = ("of course", "happy to help", "great question", "glad to help", "certainly", "hope this helps",
                  "have a nice day")
RUDE_MARKERS = ("ugh", "obviously", "seriously", "whatever", "everyone knows", "look it up", "dumb", "stupid")
REFUSAL_MARKERS = ("don't know", "not sure", "no idea", "can't answer")
# Words that negate or qualify a statement: with one, a stated fact is not asserted.
HEDGE_MARKERS = ("not", "no", "never", "isn't", "wasn't", "maybe", "perhaps", "probably", "possibly", "might",
                 "i think", "i guess", "i believe", "wrong", "false", "untrue")

# Demonstrator mix (the SFT data and the responses that RM pairs are made of).
DEMO_MIX = {"good": 0.35, "plain": 0.20, "rude": 0.10, "wrong": 0.05, "idk": 0.08, "ramble": 0.12, "repeat": 0.10}

# How the raters' pairs are made: the share that are a demonstration and a one-attribute edit of it
# (the rest: two independent demonstrations), and which attribute the edit changes. Held-out pairs
# (RM dev and test) always use PAIRS, so accuracies stay comparable; RM training may use its own
# recipe (TRAIN_PAIRS).
PAIRS = {"edited": 0.5, "edits": {"content": 1, "opener": 1, "closer": 1, "fillers": 1, "repeats": 1, "answer": 0}}
# RM training adds minimal contrasts in the fact alone: the same sentence with another answer
# (src/study_rm.py measures what each recipe buys on dev).
TRAIN_PAIRS = {"edited": 0.5, "edits": {**PAIRS["edits"], "answer": 3}}

CONCISE_WORDS = 14  # longest response with no length penalty
LONG_WORDS = 24  # longer than this: the larger length penalty
_WORD = re.compile(r"[a-z0-9']+")
_ALLOWED_CHARS = re.compile(r"[A-Za-z0-9' ,.!?]*")


def _words(text: str) -> List[str]:
    return _WORD.findall(text.lower())


def _article(s: str) -> str:
    return "an" if s[0].lower() in "aeiou" else "a"


def _fill(template: str, s: str, a: str = "") -> str:
    an = _article(s)
    return template.format(s=s, a=a, an=an, An=an.capitalize())


def _vocabulary() -> set:
    """Every word this task's text ever uses: prompts, answers, markers, fillers."""
    texts = list(FOLLOWUPS + THANKS + POLITE_OPENERS + POLITE_CLOSERS + RUDE_OPENERS + RUDE_CLOSERS
                 + IDK + FILLERS + POLITE_MARKERS + RUDE_MARKERS + REFUSAL_MARKERS)
    for rel, s, a in FACTS:
        spec = RELATIONS[rel]
        texts += [_fill(t, s, a) for t in spec["questions"] + spec["unseen_questions"] + spec["answers"]]
    return {w for t in texts for w in _words(t)}


VOCAB = _vocabulary()


# -----------------------------------------------------------------------------
# The gold reward


def _has_any(words: List[str], phrases) -> bool:
    """Whether any of the phrases occurs in `words` as whole words."""
    joined = " " + " ".join(words) + " "
    return any(f" {phrase} " in joined for phrase in phrases)


_CLAUSE_END = re.compile(r"[.,!?]")


def statements(rel: str, s: str, a: str) -> set:
    """The well-formed statements of a fact, each as its words: what counts as asserting it."""
    return {tuple(_words(_fill(t, s, a))) for t in RELATIONS[rel]["answers"]}


def parse_prompt(prompt: str) -> Tuple[str, str, str]:
    """(relation, subject, answer) of the fact the last Human turn asks about."""
    turn = prompt.rsplit("Human:", 1)[-1].split("\n\nAssistant:", 1)[0]
    found = {w for w in _words(turn) if w in SUBJECTS}
    if len(found) != 1:
        raise ValueError(f"not a prompt of this task (asks about {sorted(found) or 'no known subject'}): {prompt!r}")
    return SUBJECTS[found.pop()]


def phrasing(prompt: str) -> str:
    """"seen" if the last Human turn asks with a question template the training files use,
    "unseen" if with one only the test split uses (UNSEEN_QUESTIONS)."""
    turn = prompt.rsplit("Human:", 1)[-1].split("\n\nAssistant:", 1)[0].strip()
    rel, s, _ = parse_prompt(prompt)
    return "unseen" if any(turn.startswith(_fill(q, s)) for q in RELATIONS[rel]["unseen_questions"]) else "seen"


def gold_breakdown(prompt: str, response: str, ended: bool) -> Dict[str, float]:
    """The gold reward's terms (see the module docstring's table); gold_reward is their sum.

    The response is the text the model produced and `ended` whether it emitted the EOS token; a
    "<|endoftext|>" typed out in ordinary characters is text like any other (and not fluent)."""
    rel, subject, answer = parse_prompt(prompt)
    words = _words(response)
    clauses = [tuple(_words(c)) for c in _CLAUSE_END.split(response)]
    asserted = statements(rel, subject, answer)
    # an entity outside a well-formed statement of the asked fact: a wrong fact, another subject,
    # a negated or hedged statement, a bare name, a bag of the right words, the question echoed
    stray = any(set(c) & ENTITIES for c in clauses if c not in asserted)
    qualified = _has_any(words, REFUSAL_MARKERS + HEDGE_MARKERS)
    if stray:
        content = -1.0
    elif any(c in asserted for c in clauses) and not qualified:
        content = 2.0
    else:
        content = 0.0
    if _has_any(words, RUDE_MARKERS):
        tone = -1.0
    elif _has_any(words, POLITE_MARKERS):
        tone = 0.5
    else:
        tone = 0.0
    length = 0.0 if len(words) <= CONCISE_WORDS else -1.0 if len(words) <= LONG_WORDS else -2.0
    pairs = list(zip(words, words[1:]))
    doubled = any(a == b for a, b in pairs)
    repetition = -1.0 if doubled or len(set(pairs)) < len(pairs) else 0.0
    clean = _ALLOWED_CHARS.fullmatch(response) and all(w in VOCAB for w in words)
    fluency = 0.0 if clean else -1.0
    if not ended:
        ending = -1.0
    else:
        ending = 0.0 if response.rstrip()[-1:] in (".", "!", "?") else -0.5
    return {"content": content, "tone": tone, "length": length, "repetition": repetition, "fluency": fluency,
            "ending": ending}


def gold_reward(prompt: str, response: str, ended: bool) -> float:
    """The true reward of `response` to `prompt` (deterministic; at most MAX_GOLD): the text the
    model produced, and whether it emitted EOS (`ended`; data rows, whose trainers append EOS, are
    scored with ended=True)."""
    return sum(gold_breakdown(prompt, response, ended).values())


def correctness(prompt: str, response: str, ended: bool) -> float:
    """The content term alone: is the asked fact stated, and nothing wrong?"""
    return gold_breakdown(prompt, response, ended)["content"]


def style(prompt: str, response: str, ended: bool) -> float:
    """Every term but content: tone, length, repetition, fluency and ending."""
    terms = gold_breakdown(prompt, response, ended)
    return sum(v for k, v in terms.items() if k != "content")


# -----------------------------------------------------------------------------
# Simulated raters


def preference_probability(g_a: float, g_b: float, tau: float = TAU) -> float:
    """P(a preferred to b) = sigmoid((g_a - g_b) / tau); tau = 0 gives the noiseless preference."""
    if tau == 0:
        return 1.0 if g_a > g_b else 0.0 if g_a < g_b else 0.5
    x = (g_a - g_b) / tau
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def rater_prefers_a(g_a: float, g_b: float, rng: random.Random, tau: float = TAU) -> bool:
    """One simulated rater's noisy verdict."""
    return rng.random() < preference_probability(g_a, g_b, tau)


# -----------------------------------------------------------------------------
# The demonstrator: responses as parts, so a pair can differ in exactly one of them


def _correct_core(rng, rel, s, a):
    return _fill(rng.choice(RELATIONS[rel]["answers"]), s, a)


def _wrong_core(rng, rel, s, a):
    """A wrong answer: mostly a wrong entity of the right type; sometimes a true fact about another
    subject, or an entity of another type (both count as wrong)."""
    u = rng.random()
    if u < 0.7:
        wrong = rng.choice(sorted({b for r, _, b in FACTS if r == rel} - {a}))
        return _fill(rng.choice(RELATIONS[rel]["answers"]), s, wrong)
    if u < 0.85:
        _, s2, a2 = rng.choice([f for f in FACTS if f[0] == rel and f[1] != s])
        return _fill(rng.choice(RELATIONS[rel]["answers"]), s2, a2)
    other = rng.choice(sorted({b for r, _, b in FACTS if r != rel}))
    return _fill(rng.choice(RELATIONS[rel]["answers"]), s, other)


def _parts(rng: random.Random, fact, kind: str) -> dict:
    """A demonstration of `kind` as parts: opener, fillers before, core sentence x repeats,
    fillers after, closer."""
    p = {"opener": "", "before": [], "core": _correct_core(rng, *fact), "repeats": 1, "after": [], "closer": ""}
    if kind == "good":
        u = rng.random()
        if u < 0.7:
            p["opener"] = rng.choice(POLITE_OPENERS)
        elif u < 0.85:
            p["closer"] = rng.choice(POLITE_CLOSERS)
        else:
            p["opener"], p["closer"] = rng.choice(POLITE_OPENERS), rng.choice(POLITE_CLOSERS)
    elif kind == "rude":
        if rng.random() < 0.5:
            p["opener"] = rng.choice(RUDE_OPENERS)
        else:
            p["closer"] = rng.choice(RUDE_CLOSERS)
    elif kind == "wrong":
        p["core"] = _wrong_core(rng, *fact)
        if rng.random() < 0.4:
            p["opener"] = rng.choice(POLITE_OPENERS)
    elif kind == "idk":
        p["core"] = rng.choice(IDK)
    elif kind == "ramble":
        fillers = rng.sample(FILLERS, rng.randint(2, 3))
        k = rng.randint(0, len(fillers))
        p["before"], p["after"] = fillers[:k], fillers[k:]
        if rng.random() < 0.4:
            p["opener"] = rng.choice(POLITE_OPENERS)
    elif kind == "repeat":
        p["repeats"] = rng.randint(2, 3)
        if rng.random() < 0.3:
            p["opener"] = rng.choice(POLITE_OPENERS)
    elif kind != "plain":
        raise ValueError(f"unknown kind {kind!r}")
    return p


def _render(p: dict) -> str:
    pieces = [p["opener"], *p["before"], *[p["core"]] * p["repeats"], *p["after"], p["closer"]]
    return " " + " ".join(x for x in pieces if x)


def _edit(rng: random.Random, fact, p: dict, edits: Dict[str, float]) -> dict:
    """`p` with one attribute changed, drawn with weights `edits` (a contrastive partner for an RM pair)."""
    q = dict(p)
    what = rng.choices(list(edits), weights=list(edits.values()))[0]
    if what == "content":
        correct = p["core"] in [_fill(t, fact[1], fact[2]) for t in RELATIONS[fact[0]]["answers"]]
        u = rng.random()
        if not correct:
            q["core"] = _correct_core(rng, *fact)
        elif u < 0.6:
            q["core"] = _wrong_core(rng, *fact)
        elif u < 0.8:
            q["core"] = rng.choice(IDK)
        else:  # the answer left out: only courtesies remain (what a policy hacking tone would say)
            q["core"], q["repeats"] = "", 1
            if not (q["opener"] or q["closer"] or q["before"] or q["after"]):
                q["opener"] = rng.choice(POLITE_OPENERS)
    elif what == "answer":  # the same sentence with another answer: a contrast in the fact alone
        rel, subject, truth = fact
        others = sorted({b for r, _, b in FACTS if r == rel} - {truth})
        q["core"] = _correct_core(rng, *fact)  # a core that is not a statement about the subject: make it right
        for t in RELATIONS[rel]["answers"]:
            for b in [truth] + others:
                if p["core"] == _fill(t, subject, b):
                    q["core"] = _fill(t, subject, rng.choice(others) if b == truth else truth)
    elif what == "opener":
        q["opener"] = rng.choice(("",) + POLITE_OPENERS + RUDE_OPENERS)
    elif what == "closer":
        q["closer"] = rng.choice(("",) + POLITE_CLOSERS + RUDE_CLOSERS)
    elif what == "fillers":
        if p["before"] or p["after"]:
            q["before"], q["after"] = [], []
        else:
            q["after"] = rng.sample(FILLERS, rng.randint(1, 3))
    else:
        q["repeats"] = 1 if p["repeats"] > 1 else rng.randint(2, 3)
    return q


def demonstration(rng: random.Random, prompt: str, kind: Optional[str] = None) -> Tuple[str, str]:
    """(kind, response) drawn from the demonstrator for `prompt` (kind drawn from DEMO_MIX if None)."""
    if kind is None:
        kind = rng.choices(list(DEMO_MIX), weights=list(DEMO_MIX.values()))[0]
    return kind, _render(_parts(rng, parse_prompt(prompt), kind))


def response_pair(row: dict) -> frozenset:
    """The two responses of a preference row, unordered: what makes two pairs the same pair."""
    return frozenset((row["chosen"], row["rejected"]))


def preference_pair(rng: random.Random, prompt: str, tau: float = TAU, avoid: frozenset = frozenset(),
                    recipe: Optional[dict] = None) -> dict:
    """One labelled pair for `prompt`, made as `recipe` says (default PAIRS): two responses with
    different gold, the noisy rater's label as chosen/rejected, and both gold values (scored as
    ended: trainers append EOS). Pairs whose two responses are a pair in `avoid` are drawn again
    (held-out pairs must be new pairs)."""
    recipe = recipe or PAIRS
    fact = parse_prompt(prompt)
    for _ in range(1000):
        kind = rng.choices(list(DEMO_MIX), weights=list(DEMO_MIX.values()))[0]
        p = _parts(rng, fact, kind)
        if rng.random() < recipe["edited"]:
            other = _edit(rng, fact, p, recipe["edits"])
        else:
            other = _parts(rng, fact, rng.choices(list(DEMO_MIX), weights=list(DEMO_MIX.values()))[0])
        a, b = _render(p), _render(other)
        if gold_reward(prompt, a, True) != gold_reward(prompt, b, True) and frozenset((a, b)) not in avoid:
            return label_pair(prompt, a, b, rng, tau)
    raise RuntimeError(f"no new pair with different gold for {prompt!r}")  # pragma: no cover


def label_pair(prompt: str, response_a: str, response_b: str, rng: random.Random, tau: float = TAU,
               ended_a: bool = True, ended_b: bool = True) -> dict:
    """A simulated rater's row for two responses to `prompt` (e.g. two samples of a policy, with
    whether each emitted EOS): {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"}."""
    a, b = response_a, response_b
    g_a, g_b = gold_reward(prompt, a, ended_a), gold_reward(prompt, b, ended_b)
    if not rater_prefers_a(g_a, g_b, rng, tau):
        a, b, g_a, g_b = b, a, g_b, g_a
    return {"prompt": prompt, "chosen": a, "rejected": b, "gold_chosen": g_a, "gold_rejected": g_b}


# -----------------------------------------------------------------------------
# Prompts and splits


def all_prompts(unseen: bool = False) -> Dict[Tuple[str, str, str], List[str]]:
    """Every prompt string, grouped by fact, in a fixed order: with the question templates of the
    training files, or (unseen=True) with the templates only the test split uses."""
    out = {}
    for fact in FACTS:
        rel, s, a = fact
        questions = RELATIONS[rel]["unseen_questions" if unseen else "questions"]
        out[fact] = [format_prompt(" ".join(x for x in (_fill(q, s), f, t) if x))
                     for q in questions for f in FOLLOWUPS for t in THANKS]
    return out


# The files write_task_data writes (also the names `synthetic:NAME` accepts, see dataset.py).
# dev: what training validates on and what anything is tuned on; test: the final evaluation only.
SPLITS = ("sft", "sft_dev", "rm_train", "rm_dev", "rm_test", "ppo_prompts", "dev_prompts", "test_prompts")
TRAINING_FILES = ("sft", "sft_dev", "rm_train", "rm_dev", "ppo_prompts", "dev_prompts")  # never "test"
_POOLS = ("dev_prompts", "test_prompts", "ppo_prompts", "rm_dev", "rm_test")  # held-out pools, sized exactly


def _dealt(rng: random.Random, by_fact: Dict[tuple, List[str]]) -> List[str]:
    """Each fact's prompts shuffled, then dealt round-robin over the facts: any prefix covers the
    facts evenly."""
    groups = []
    for prompts in by_fact.values():
        prompts = list(prompts)
        rng.shuffle(prompts)
        groups.append(prompts)
    return [g[i] for i in range(len(groups[0])) for g in groups]


def split_prompts(seed: int, sizes: Dict[str, int]) -> Dict[str, List[str]]:
    """Disjoint prompt pools, each covering all the facts evenly. The pools of _POOLS get exactly
    sizes[name] prompts with the training templates (RM dev/test: one prompt per pair), "test_unseen"
    sizes["test_unseen"] prompts with the unseen ones; RM train and SFT share the rest half and half."""
    rng = random.Random(f"task-split-{seed}")
    dealt = _dealt(rng, all_prompts())
    need = sum(sizes[name] for name in _POOLS)
    if need > len(dealt) - 2 * len(FACTS):
        raise ValueError(f"the held-out pools need {need} prompts, which leaves too few of the {len(dealt)} "
                         f"for RM training and SFT")
    pools, start = {}, 0
    for name in _POOLS:
        pools[name], start = dealt[start:start + sizes[name]], start + sizes[name]
    rest = dealt[start:]
    half = len(rest) // 2 // len(FACTS) * len(FACTS)  # whole rounds, so both pools cover every fact
    pools["rm_train"], pools["sft"] = rest[:half], rest[half:]
    unseen = _dealt(rng, all_prompts(unseen=True))
    if sizes["test_unseen"] > len(unseen):
        raise ValueError(f"only {len(unseen)} prompts have an unseen phrasing")
    pools["test_unseen"] = unseen[:sizes["test_unseen"]]
    return pools


def _balanced_sample(rng: random.Random, pool: List[str], n: int) -> List[str]:
    """n prompts from `pool` (with replacement), the facts used in turn so each is asked as often."""
    by_fact = {}
    for p in pool:
        by_fact.setdefault(parse_prompt(p), []).append(p)
    facts = list(by_fact)
    return [rng.choice(by_fact[facts[i % len(facts)]]) for i in range(n)]


def _write_jsonl(path: str, rows) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_task_data(out_dir: str, seed: int = 0, n_sft: int = 20000, n_sft_dev: int = 1000,
                    n_rm_train: int = 10000, n_rm_dev: int = 500, n_rm_test: int = 500, n_ppo: int = 600,
                    n_dev: int = 240, n_test: int = 400, n_test_unseen: int = 240,
                    tau: float = TAU, train_pairs: Optional[dict] = None) -> Dict[str, str]:
    """Write the task's files (SPLITS) into `out_dir`; returns {name: path} (schemas in
    docs/INTERFACES.md).

    sft.jsonl: {"prompt", "response", "kind", "gold"}; sft_dev.jsonl: the same, held-out
    demonstrations for the dev prompts (SFT's validation loss); rm_*.jsonl: {"prompt", "chosen",
    "rejected", "gold_chosen", "gold_rejected"} with chosen/rejected the noisy rater label, and no
    dev or test pair is a pair (the same two responses) of an earlier file; ppo_prompts.jsonl and
    dev_prompts.jsonl: {"prompt"}; test_prompts.jsonl: {"prompt", "phrasing"}, n_test prompts asked
    with the training templates ("seen") and n_test_unseen with templates no other file uses
    ("unseen"), mixed. RM training pairs are made by the recipe `train_pairs` (default TRAIN_PAIRS),
    held-out pairs always by PAIRS. Deterministic in (seed, sizes, tau, recipe)."""
    sizes = {"dev_prompts": n_dev, "test_prompts": n_test, "ppo_prompts": n_ppo, "rm_dev": n_rm_dev,
             "rm_test": n_rm_test, "test_unseen": n_test_unseen}
    pools = split_prompts(seed, sizes)
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name + ".jsonl") for name in SPLITS}

    for name, pool, n in (("sft", "sft", n_sft), ("sft_dev", "dev_prompts", n_sft_dev)):
        rng = random.Random(f"task-{name}-{seed}")
        demos = []
        for prompt in _balanced_sample(rng, pools[pool], n):
            kind, response = demonstration(rng, prompt)
            demos.append({"prompt": prompt, "response": response, "kind": kind,
                          "gold": gold_reward(prompt, response, ended=True)})
        rng.shuffle(demos)
        _write_jsonl(paths[name], demos)

    rng = random.Random(f"task-rm-train-{seed}")
    prompts = _balanced_sample(rng, pools["rm_train"], n_rm_train)
    rng.shuffle(prompts)
    rows = [preference_pair(rng, p, tau, recipe=train_pairs or TRAIN_PAIRS) for p in prompts]
    _write_jsonl(paths["rm_train"], rows)
    seen = {response_pair(r) for r in rows}
    for name in ("rm_dev", "rm_test"):  # one random stream per pair: a pair drawn again changes no other
        rows = []
        for i, p in enumerate(pools[name]):
            rows.append(preference_pair(random.Random(f"task-{name.replace('_', '-')}-{seed}-{i}"), p, tau, avoid=seen))
            seen.add(response_pair(rows[-1]))
        _write_jsonl(paths[name], rows)

    for name in ("ppo_prompts", "dev_prompts"):
        _write_jsonl(paths[name], [{"prompt": p} for p in pools[name]])
    rng = random.Random(f"task-test-{seed}")
    test = [{"prompt": p, "phrasing": "seen"} for p in pools["test_prompts"]]
    test += [{"prompt": p, "phrasing": "unseen"} for p in pools["test_unseen"]]
    rng.shuffle(test)
    _write_jsonl(paths["test_prompts"], test)
    return paths
