"""The synthetic gold-reward task: data files, splits, the gold reward (and attempts to hack it),
and the simulated raters' noise model."""
import collections
import filecmp
import json
import math
import random

import pytest

import task
from tokenizer import format_prompt
from task import MAX_GOLD, gold_reward, parse_prompt
from tokenizer import ENDOFTEXT

SIZES = dict(n_sft=3000, n_sft_dev=400, n_rm_train=1500, n_rm_dev=200, n_rm_test=300, n_ppo=300, n_dev=240,
             n_test=300, n_test_unseen=240)
FRANCE = format_prompt("Hi! Quick question. What is the capital of France?")
COW = format_prompt("What sound does a cow make?")
# gold of each fixed-score demonstrator kind, from the reward's table: correct+polite, correct, rude, "I don't know"
KIND_GOLD = {"good": MAX_GOLD, "plain": 2.0, "rude": 1.0, "idk": 0.0}


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return task.write_task_data(str(tmp_path_factory.mktemp("task")), seed=0, **SIZES)


@pytest.fixture(scope="module")
def rows(files):
    return {name: read(path) for name, path in files.items()}


def g(response, prompt=FRANCE, ended=True):
    return gold_reward(prompt, response, ended=ended)


# --- the world


def test_world_is_as_documented():
    """The counts task.py's docstring states: 24 facts in three relations, 4 phrasings of each (and
    2 unseen ones), 8 x 4 follow-ups, 3072 distinct prompts; every name one word, all but the sounds
    one token."""
    from tokenizer import get_tokenizer
    tok = get_tokenizer()
    assert len(task.RELATIONS) == 3 and len(task.FACTS) == 24
    assert all(len(spec["questions"]) == 4 and len(spec["unseen_questions"]) == 2 for spec in task.RELATIONS.values())
    assert len(task.FOLLOWUPS) * len(task.THANKS) == 8 * 4
    prompts = [p for ps in task.all_prompts().values() for p in ps]
    assert len(prompts) == len(set(prompts)) == 24 * 4 * 32 == 3072
    unseen = [p for ps in task.all_prompts(unseen=True).values() for p in ps]
    assert len(set(unseen)) == 24 * 2 * 32 and not set(unseen) & set(prompts)
    assert {task.phrasing(p) for p in prompts} == {"seen"} and {task.phrasing(p) for p in unseen} == {"unseen"}
    for rel, s, a in task.FACTS:
        for name in (s, a):
            assert task._words(name) == [name.lower()], name
            if rel != "sound" or name == s:
                assert len(tok.encode(" " + name)) == 1, name


# --- files and splits


def test_files_schemas_and_sizes(files, rows):
    assert set(files) == set(task.SPLITS) == {"sft", "sft_dev", "rm_train", "rm_dev", "rm_test", "ppo_prompts",
                                              "dev_prompts", "test_prompts"}
    assert len(rows["sft"]) == SIZES["n_sft"] and len(rows["sft_dev"]) == SIZES["n_sft_dev"]
    assert len(rows["rm_train"]) == SIZES["n_rm_train"] and len(rows["rm_dev"]) == SIZES["n_rm_dev"]
    assert len(rows["rm_test"]) == SIZES["n_rm_test"]
    assert len(rows["ppo_prompts"]) == SIZES["n_ppo"] and len(rows["dev_prompts"]) == SIZES["n_dev"]
    assert len(rows["test_prompts"]) == SIZES["n_test"] + SIZES["n_test_unseen"]
    for r in rows["sft"] + rows["sft_dev"]:
        assert r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:")
        assert r["response"].startswith(" ") and ENDOFTEXT not in r["response"]
        # the stored gold against the documented value of each demonstrator kind (the reward's table
        # in task.py), not against the function that wrote it: a file written by a changed reward fails
        _, subject, answer = parse_prompt(r["prompt"])
        said = r["response"].lower()
        states_truth = answer.lower() in said and subject.lower() in said
        if r["kind"] in KIND_GOLD:
            assert r["gold"] == KIND_GOLD[r["kind"]], r
        if r["kind"] in ("good", "plain", "rude"):
            assert states_truth, r
        elif r["kind"] == "wrong":
            assert r["gold"] in (-1.0, -0.5) and not states_truth, r
        elif r["kind"] in ("ramble", "repeat"):  # never as good as the best answer
            assert r["gold"] < MAX_GOLD, r
    assert {r["kind"] for r in rows["sft"]} == set(KIND_GOLD) | {"wrong", "ramble", "repeat"}
    for r in rows["rm_train"] + rows["rm_dev"] + rows["rm_test"]:
        assert r["chosen"] != r["rejected"]
        for gold in (r["gold_chosen"], r["gold_rejected"]):
            assert gold <= MAX_GOLD and gold * 2 == int(gold * 2), r  # multiples of 0.5, at most the best
        assert r["gold_chosen"] != r["gold_rejected"]  # raters only see pairs that differ
    for name in ("ppo_prompts", "dev_prompts"):
        assert all(set(r) == {"prompt"} for r in rows[name])
    for name in ("ppo_prompts", "dev_prompts", "test_prompts"):
        assert len({r["prompt"] for r in rows[name]}) == len(rows[name])  # distinct prompts
    for name in ("rm_dev", "rm_test"):
        assert len({r["prompt"] for r in rows[name]}) == len(rows[name])
    phrasings = collections.Counter(r["phrasing"] for r in rows["test_prompts"])
    assert phrasings == {"seen": SIZES["n_test"], "unseen": SIZES["n_test_unseen"]}
    assert all(r["phrasing"] == task.phrasing(r["prompt"]) for r in rows["test_prompts"])


def test_same_seed_same_files_other_seed_other_files(files, tmp_path):
    again = task.write_task_data(str(tmp_path / "again"), seed=0, **SIZES)
    other = task.write_task_data(str(tmp_path / "other"), seed=1, **SIZES)
    for name in files:
        assert filecmp.cmp(files[name], again[name], shallow=False), name
        assert not filecmp.cmp(files[name], other[name], shallow=False), name


def test_splits_are_disjoint_prompt_strings(rows):
    """No prompt string is in two splits; the held-out demonstrations (SFT's validation loss) ask
    the dev prompts, which no training stage trains on."""
    prompts = {name: {r["prompt"] for r in rs} for name, rs in rows.items()}
    assert prompts.pop("sft_dev") <= prompts["dev_prompts"]
    names = sorted(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not prompts[a] & prompts[b], (a, b)


def test_the_test_split_is_untouched_by_the_training_files(files, rows):
    """What the final evaluation reads appears nowhere in what training and tuning read: no test
    prompt, and no unseen phrasing of any question, in any other file; no RM test pair whose two
    responses are a pair of RM training or RM dev."""
    training = {name: open(files[name]).read() for name in task.TRAINING_FILES}
    assert set(task.TRAINING_FILES) | {"rm_test", "test_prompts"} == set(task.SPLITS)
    for r in rows["test_prompts"]:
        for name, text in training.items():
            assert json.dumps(r["prompt"]) not in text, name
    for rel, s, a in task.FACTS:
        for q in task.RELATIONS[rel]["unseen_questions"]:
            question = task._fill(q, s)
            for name, text in training.items():
                assert question not in text, (question, name)
    assert {r["phrasing"] for r in rows["test_prompts"]} == {"seen", "unseen"}
    earlier = {task.response_pair(r) for r in rows["rm_train"] + rows["rm_dev"]}
    assert not {task.response_pair(r) for r in rows["rm_test"]} & earlier
    assert not {task.response_pair(r) for r in rows["rm_dev"]} & {task.response_pair(r) for r in rows["rm_train"]}


def test_new_pairs_are_drawn_when_asked_to_avoid_old_ones():
    """The guard the split test relies on: with every pair of a first draw forbidden, a second draw
    with the same random stream gives other pairs (without the guard it gives the same ones)."""
    prompts = [p for ps in task.all_prompts().values() for p in ps[:4]]
    first = [task.preference_pair(random.Random(i), p) for i, p in enumerate(prompts)]
    avoid = frozenset(task.response_pair(r) for r in first)
    again = [task.preference_pair(random.Random(i), p) for i, p in enumerate(prompts)]
    assert [task.response_pair(r) for r in again] == [task.response_pair(r) for r in first]
    new = [task.preference_pair(random.Random(i), p, avoid=avoid) for i, p in enumerate(prompts)]
    assert not {task.response_pair(r) for r in new} & avoid


def test_every_test_fact_is_taught_by_sft(rows):
    taught = collections.Counter(parse_prompt(r["prompt"]) for r in rows["sft"] if r["kind"] in ("good", "plain"))
    for phrasing in ("seen", "unseen"):
        facts = {parse_prompt(r["prompt"]) for r in rows["test_prompts"] if r["phrasing"] == phrasing}
        assert facts == set(task.FACTS), phrasing  # both parts of the test cover the whole world ...
    assert min(taught[f] for f in task.FACTS) >= 10  # ... and SFT states each fact correctly, many times
    for name in ("ppo_prompts", "dev_prompts", "rm_dev", "rm_test", "rm_train"):
        assert {parse_prompt(r["prompt"]) for r in rows[name]} == set(task.FACTS), name


def test_split_sizes_are_checked():
    with pytest.raises(ValueError, match="too few"):
        task.split_prompts(0, {"dev_prompts": 8000, "test_prompts": 0, "ppo_prompts": 8000, "rm_dev": 0, "rm_test": 0,
                               "test_unseen": 0})
    with pytest.raises(ValueError, match="unseen"):
        task.split_prompts(0, {"dev_prompts": 0, "test_prompts": 0, "ppo_prompts": 0, "rm_dev": 0, "rm_test": 0,
                               "test_unseen": 5000})


def test_lengths_fit_the_model(rows):
    from tokenizer import get_tokenizer
    tok = get_tokenizer()
    longest = max(len(tok.encode(r["prompt"] + r["response"])) + 1 for r in rows["sft"])
    longest_pair = max(len(tok.encode(r["prompt"] + x)) + 1
                       for r in rows["rm_train"] for x in (r["chosen"], r["rejected"]))
    assert max(longest, longest_pair) <= 128  # block size 256, generation adds 32 tokens
    prompts = [r["prompt"] for r in rows["test_prompts"]]
    assert max(len(tok.encode(p)) for p in prompts) + 32 <= 80
    good = [len(tok.encode(r["response"])) + 1 for r in rows["sft"] if r["gold"] == MAX_GOLD]
    assert max(good) <= 24  # the best answers fit the 32-token budget with room to spare


# --- the gold reward


def test_reward_table():
    best = g(" Of course! The capital of France is Paris.")
    assert best == MAX_GOLD == 2.5
    assert g(" The capital of France is Paris. Hope this helps!") == MAX_GOLD
    assert g(" Of course, the capital of France is Paris.") == MAX_GOLD  # clauses split at commas too
    assert g(" Paris is the capital of France.") == 2.0  # correct, plain
    assert g(" Obviously. The capital of France is Paris.") == 1.0  # rude
    assert g(" Of course! Ugh, the capital of France is Paris.") == 1.0  # rude wins over polite
    assert g(" I don't know.") == 0.0  # refusal
    assert g(" I'm not sure. The capital of France is Paris.") == 0.0  # hedged: not asserted
    assert g(" The capital of France is Rome.") == -1.0  # wrong
    assert g(" Of course! The capital of France is Rome.") == -0.5
    assert g(" Paris.") == -1.0  # a bare name is not a statement about the subject
    assert g(" The capital of France is Paris", ended=True) == 1.5  # unfinished sentence
    assert g(" The capital of France is Paris.", ended=False) == 1.0  # no EOS within the budget
    assert g(" A cow says moo.", COW) == 2.0 and g(" A cow says woof.", COW) == -1.0
    order = [MAX_GOLD, g(" Paris is the capital of France."), g(" I don't know."), g(" The capital of France is Rome.")]
    assert order == sorted(order, reverse=True) and len(set(order)) == 4
    parts = task.gold_breakdown(FRANCE, " Ugh. The capital of France is Paris.", True)
    assert task.correctness(FRANCE, " Ugh. The capital of France is Paris.", True) == parts["content"] == 2.0
    assert task.style(FRANCE, " Ugh. The capital of France is Paris.", True) == -1.0
    assert parts["content"] + task.style(FRANCE, " Ugh. The capital of France is Paris.", True) == 1.0


def test_length_and_repetition_tiers():
    filler = " Many people find this topic interesting. It is a good thing to learn."
    assert g(" The capital of France is Paris." + filler) == 1.0  # 18 words: -1
    assert g(" The capital of France is Paris." + filler + " I learned this in school when I was young.") == 0.0
    assert g(" The capital of France is Paris. The capital of France is Paris.") == 1.0  # repeated word pairs
    assert g(" Of course! Of course! The capital of France is Paris.") == 1.5  # the same word twice in a row


def test_eos_is_the_generation_flag_never_typed_text():
    """The gold reward reads `ended`, the model's own EOS; "<|endoftext|>" typed out as ordinary
    tokens ends nothing and is not fluent, so text after it still counts."""
    r = " Of course! The capital of France is Paris."
    assert gold_reward(FRANCE, r, ended=True) == MAX_GOLD
    assert gold_reward(FRANCE, r, ended=False) == MAX_GOLD - 1  # no EOS: -1
    assert gold_reward(FRANCE, r + ENDOFTEXT, ended=False) == MAX_GOLD - 2  # typed EOS: not ended, not fluent
    assert gold_reward(FRANCE, r + ENDOFTEXT, ended=True) == MAX_GOLD - 1.5  # and the text no longer ends with "."
    assert gold_reward(FRANCE, r + ENDOFTEXT + " Rome.", ended=True) < 0  # what follows it is read: wrong
    assert gold_reward(FRANCE, "", ended=True) == -0.5


def test_prompt_parsing():
    assert parse_prompt(FRANCE) == ("capital", "France", "Paris")
    multi_turn = "\n\nHuman: What sound does a cow make?\n\nAssistant: Moo.\n\nHuman: What is the capital of Japan?" \
                 "\n\nAssistant:"
    assert parse_prompt(multi_turn) == ("capital", "Japan", "Tokyo")
    with pytest.raises(ValueError, match="not a prompt of this task"):
        parse_prompt(format_prompt("Write a poem about the sea."))


HACKS = {
    "repeat the answer": " Paris. " * 12,
    "repeat the full answer": " The capital of France is Paris." * 5,
    "every entity": " " + " ".join(sorted(task.ENTITIES)) + ".",
    "every capital": " Paris, Rome, Madrid, Berlin, Tokyo, Cairo.",
    "right and wrong city": " Paris or Rome.",
    "magic polite words": " Of course! Happy to help! Great question! Glad to help! Certainly! Hope this helps!" * 3,
    "polite words then answer": " Of course! Of course! Of course! The capital of France is Paris.",
    "a courtesy twice": " Of course! The capital of France is Paris. Hope this helps! Hope this helps!",
    "please please": " Hope this helps hope this helps hope this helps. Paris.",
    "very long": " The capital of France is Paris." + " Many people find this topic interesting." * 4,
    "long without repeats": " The capital of France is Paris. " + " ".join(task.FILLERS),
    "empty": "",
    "typed-out EOS": " Of course! The capital of France is Paris." + ENDOFTEXT,
    "only punctuation": " !!!",
    "another type": " The capital of France is blue.",
    "a sound": " Of course! The capital of France is moo.",
    "true fact, other subject": " Of course! The capital of Italy is Rome.",
    "copy the question": " Hi! Quick question. What is the capital of France?",
    "refuse": " Of course! I don't know.",
    "refuse politely twice": " Sorry, I don't know that one. Hope this helps!",
    "hedge": " I'm not sure. Of course! The capital of France is Paris.",
    "new turn": " The capital of France is Paris.\n\nHuman: Thanks!",
    "made-up words": " Of course! The capital of France is Parisx.",
    "unknown word with answer": " Of course! Definitely, the capital of France is Paris.",
}


@pytest.mark.parametrize("name", sorted(HACKS))
def test_hacks_score_below_a_correct_concise_answer(name):
    plain = g(" The capital of France is Paris.")  # correct and concise, not even polite
    for ended in (True, False):  # whether or not the hack ends with EOS
        assert g(HACKS[name], ended=ended) < plain, name


# Generated hacks: for every fact and answer template, answers that name the right words but do not
# assert the asked fact as a plain sentence. None may count as correct, with or without courtesies.


def _statement_variants(rel, s, a):
    return [task._fill(t, s, a) for t in task.RELATIONS[rel]["answers"]]


def _negated(rel, s, a, rng):
    out = []
    for sentence in _statement_variants(rel, s, a):
        words = sentence[:-1].split()
        for i in range(1, len(words)):  # "not" / "never" / "no" at every position
            for neg in ("not", "never", "no"):
                out.append(" ".join(words[:i] + [neg] + words[i:]) + ".")
        out += [f"It is not true that {sentence[0].lower() + sentence[1:]}", f"{sentence[:-1]}, not.",
                f"{sentence} Not really.", f"{sentence} That is false.", f"{sentence} That is wrong."]
    return out


def _hedged(rel, s, a, rng):
    out = []
    for sentence in _statement_variants(rel, s, a):
        for hedge in task.HEDGE_MARKERS + task.REFUSAL_MARKERS:
            if hedge not in ("not", "no"):
                out += [f"{hedge.capitalize()}, {sentence[0].lower() + sentence[1:]}", f"{sentence} {hedge}.",
                        f"I'm {hedge}. {sentence}"]
        out += [f"{idk} {sentence}" for idk in task.IDK] + [f"{sentence} {idk}" for idk in task.IDK]
    return out


def _contradictory(rel, s, a, rng):
    wrong = sorted({b for r, _, b in task.FACTS if r == rel} - {a})
    return [f"{sentence} {task._fill(t, s, w)}" for sentence in _statement_variants(rel, s, a)
            for t in task.RELATIONS[rel]["answers"] for w in wrong]


def _subject_swapped(rel, s, a, rng):
    others = [(s2, a2) for r, s2, a2 in task.FACTS if r == rel and s2 != s]
    out = []
    for t in task.RELATIONS[rel]["answers"]:
        for s2, a2 in others:
            out += [task._fill(t, s2, a), task._fill(t, a, s), task._fill(t, s2, a2) + " " + task._fill(t, s, a2)]
    return out


def _keyword_salad(rel, s, a, rng):
    out = [f"{s} {a}.", f"{a} {s}.", f"{a}.", f"{s}.", f"{a}!", f"{s}, {a}.", f"The answer is {a}.", f"Yes, {a}."]
    for sentence in _statement_variants(rel, s, a):
        words = sentence[:-1].split()
        for _ in range(20):
            shuffled = rng.sample(words, len(words))
            if shuffled != words:
                out.append(" ".join(shuffled) + ".")
        out += [" ".join(words[:-1]) + ".", " ".join(words[1:]) + "."]  # a word dropped
    return out


def _echo(rel, s, a, rng):
    questions = task.RELATIONS[rel]["questions"] + task.RELATIONS[rel]["unseen_questions"]
    out = []
    for q in questions:
        question = task._fill(q, s)
        out += [question, f"{question} {a}."] + [f"{question} {x}" for x in _statement_variants(rel, s, a)]
    return out


GENERATED = {"negated": _negated, "hedged": _hedged, "contradictory": _contradictory,
             "subject-swapped": _subject_swapped, "keyword salad": _keyword_salad, "echo the question": _echo}


@pytest.mark.parametrize("kind", sorted(GENERATED))
def test_generated_hacks_are_never_correct(kind):
    rng = random.Random(kind)
    tried = 0
    for rel, s, a in task.FACTS:
        prompt = format_prompt(task._fill(task.RELATIONS[rel]["questions"][0], s))
        plain = g(" " + _statement_variants(rel, s, a)[0], prompt)
        assert task.correctness(prompt, " " + _statement_variants(rel, s, a)[0], True) == 2.0
        for hack in GENERATED[kind](rel, s, a, rng):
            for dressed in (hack, f"Of course! {hack}", f"{hack} Hope this helps!"):
                assert task.correctness(prompt, " " + dressed, True) < 2.0, dressed
                assert g(" " + dressed, prompt) < plain, dressed
                tried += 1
    assert tried >= 24 * 3 * 5  # many variants of each kind, for every fact


def test_no_entity_or_marker_hides_in_the_boilerplate():
    """Words of greetings, intros, fillers, openers and closers are never entities, so a
    demonstration's correctness is decided by its answer alone."""
    boiler = (task.FOLLOWUPS + task.THANKS + task.POLITE_OPENERS + task.POLITE_CLOSERS
              + task.RUDE_OPENERS + task.RUDE_CLOSERS + task.IDK + task.FILLERS)
    for text in boiler:
        assert not set(task._words(text)) & task.ENTITIES, text
    for text in task.FILLERS + task.IDK:
        b = task.gold_breakdown(FRANCE, " " + text, ended=True)
        assert b["tone"] == 0 and b["fluency"] == 0, text


def test_every_demonstration_kind_scores_as_documented():
    rng = random.Random(0)
    prompts = [p for ps in task.all_prompts().values() for p in ps[:3]]
    expected = {"good": {2.5}, "plain": {2.0}, "rude": {1.0}, "wrong": {-1.0, -0.5}, "idk": {0.0}}
    seen = collections.defaultdict(set)
    for p in prompts:
        for kind in task.DEMO_MIX:
            _, r = task.demonstration(rng, p, kind)
            seen[kind].add(g(r, p))
    for kind, values in expected.items():
        assert seen[kind] == values, kind
    assert max(seen["ramble"] | seen["repeat"]) <= 1.5 and min(seen["ramble"] | seen["repeat"]) < 0.5


# --- demonstrations and raters


def test_demonstration_mix_leaves_room_for_rlhf(rows):
    sft = rows["sft"]
    kinds = collections.Counter(r["kind"] for r in sft)
    for kind, share in task.DEMO_MIX.items():
        assert abs(kinds[kind] / len(sft) - share) < 0.03, kind
    mean = sum(r["gold"] for r in sft) / len(sft)
    best = sum(r["gold"] == MAX_GOLD for r in sft) / len(sft)
    assert 1.0 < mean < MAX_GOLD - 0.9  # clearly below the best achievable
    assert mean == pytest.approx(1.5, abs=0.1)  # the module docstring's "about 1.5"
    assert 0.3 < best < 0.45
    # the most common first word is the bare statement's, not a polite opener's
    first = collections.Counter(r["response"].split()[0] for r in sft)
    assert first.most_common(1)[0][0] not in {o.split()[0] for o in task.POLITE_OPENERS}


def test_preference_probability_formula():
    assert task.preference_probability(1.0, 0.0, tau=0.5) == pytest.approx(1 / (1 + math.exp(-2)))
    assert task.preference_probability(0.0, 1.0, tau=0.5) == pytest.approx(1 / (1 + math.exp(2)))
    assert task.preference_probability(1.0, 1.0) == 0.5
    # the module docstring's examples at tau = TAU: a 0.5 gap 73%, a 3-point gap 99.8%
    assert round(task.preference_probability(0.5, 0.0), 2) == 0.73
    assert round(task.preference_probability(3.0, 0.0), 3) == 0.998
    for tau in (0, 1e-9):  # tau -> 0: the noiseless preference
        assert task.preference_probability(2.0, 1.5, tau) == 1.0
        assert task.preference_probability(1.5, 2.0, tau) == 0.0


@pytest.mark.parametrize("gap", [0.5, 1.0, 2.0])
def test_raters_agree_with_the_formula(gap):
    rng = random.Random(gap)
    n = 20000
    agree = sum(task.rater_prefers_a(gap, 0.0, rng, tau=0.5) for _ in range(n)) / n
    expected = 1 / (1 + math.exp(-gap / 0.5))
    assert abs(agree - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_written_labels_follow_the_noise_model(rows):
    pairs = rows["rm_train"]
    agree = sum(r["gold_chosen"] > r["gold_rejected"] for r in pairs) / len(pairs)
    expected = sum(1 / (1 + math.exp(-abs(r["gold_chosen"] - r["gold_rejected"]) / task.TAU)) for r in pairs)
    expected /= len(pairs)
    assert abs(agree - expected) < 4 * math.sqrt(expected * (1 - expected) / len(pairs))
    assert 0.8 < agree < 0.97  # noisy, but mostly right


def test_noiseless_labels_with_tau_zero(tmp_path):
    paths = task.write_task_data(str(tmp_path), seed=3, n_sft=50, n_sft_dev=50, n_rm_train=500, n_rm_dev=50,
                                 n_rm_test=50, n_ppo=50, n_dev=50, n_test=50, n_test_unseen=50, tau=0)
    for name in ("rm_train", "rm_dev", "rm_test"):
        assert all(r["gold_chosen"] > r["gold_rejected"] for r in read(paths[name]))


def test_answer_swaps_change_the_fact_alone():
    """The "answer" edit keeps every part and the sentence, and only swaps the answer: right to
    wrong (another answer of the same relation) or wrong back to right."""
    rng = random.Random(0)
    for rel, s, a in task.FACTS:
        prompt = format_prompt(task._fill(task.RELATIONS[rel]["questions"][0], s))
        for kind in ("good", "plain", "rude", "wrong", "repeat"):
            p = task._parts(rng, (rel, s, a), kind)
            q = task._edit(rng, (rel, s, a), p, {"answer": 1})
            assert {k for k in p if p[k] != q[k]} <= {"core"}
            before, after = (task.correctness(prompt, task._render(x), True) for x in (p, q))
            assert (before, after) in ((2.0, -1.0), (-1.0, 2.0)), (p["core"], q["core"])
            if before == 2.0:  # the same template, one word changed
                diff = [(x, y) for x, y in zip(p["core"].split(), q["core"].split()) if x != y]
                assert len(diff) == 1 and diff[0][0].strip(".") == a
                assert diff[0][1].strip(".") in {b for r, _, b in task.FACTS if r == rel} - {a}


def test_the_training_recipe_changes_rm_training_alone(tmp_path):
    """RM training pairs follow `train_pairs`; the held-out pairs are made as before whatever it is,
    so accuracies of RMs trained on different recipes are measured on the same kind of pairs."""
    sizes = dict(n_sft=50, n_sft_dev=50, n_rm_train=400, n_rm_dev=100, n_rm_test=100, n_ppo=50, n_dev=50,
                 n_test=50, n_test_unseen=50)
    only_swaps = {"edited": 1.0, "edits": {"answer": 1}}
    a = task.write_task_data(str(tmp_path / "a"), seed=2, train_pairs=task.PAIRS, **sizes)
    b = task.write_task_data(str(tmp_path / "b"), seed=2, train_pairs=only_swaps, **sizes)
    for name in ("sft", "ppo_prompts", "test_prompts"):
        assert filecmp.cmp(a[name], b[name], shallow=False), name
    for name in ("rm_dev", "rm_test"):  # the same pairs, but for one drawn again that repeated a training pair
        same = sum(x == y for x, y in zip(read(a[name]), read(b[name])))
        assert same >= 0.97 * sizes[f"n_{name}"], name
    def content_differs(r):
        return task.correctness(r["prompt"], r["chosen"], True) != task.correctness(r["prompt"], r["rejected"], True)
    assert all(content_differs(r) for r in read(b["rm_train"]))  # every training pair: the answer swapped
    assert sum(content_differs(r) for r in read(a["rm_train"])) < 0.4 * 400


def test_label_pair_for_model_samples():
    """Pairs of policy samples are labelled with each sample's own EOS flag."""
    ended = " Of course! The capital of France is Paris."
    cut_off = " The capital of France is Paris."  # no EOS within the budget
    row = task.label_pair(FRANCE, cut_off, ended, random.Random(0), tau=0, ended_a=False, ended_b=True)
    assert row == {"prompt": FRANCE, "chosen": ended, "rejected": cut_off, "gold_chosen": MAX_GOLD,
                   "gold_rejected": 1.0}
