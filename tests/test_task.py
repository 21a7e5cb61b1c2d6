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

SIZES = dict(n_sft=3000, n_rm_train=1500, n_rm_test=300, n_ppo=300, n_eval=300, n_sft_test=400)
FRANCE = format_prompt("Hi! Quick question. What is the capital of France?")
COW = format_prompt("What sound does a cow make?")


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
    """The counts task.py's docstring states: 24 facts in three relations, 4 phrasings of each,
    8 x 4 follow-ups, 3072 distinct prompts; every name one word, all but the sounds one token."""
    from tokenizer import get_tokenizer
    tok = get_tokenizer()
    assert len(task.RELATIONS) == 3 and len(task.FACTS) == 24
    assert all(len(spec["questions"]) == 4 for spec in task.RELATIONS.values())
    assert len(task.FOLLOWUPS) * len(task.THANKS) == 8 * 4
    prompts = [p for ps in task.all_prompts().values() for p in ps]
    assert len(prompts) == len(set(prompts)) == 24 * 4 * 32 == 3072
    for rel, s, a in task.FACTS:
        for name in (s, a):
            assert task._words(name) == [name.lower()], name
            if rel != "sound" or name == s:
                assert len(tok.encode(" " + name)) == 1, name


# --- files and splits


def test_files_schemas_and_sizes(files, rows):
    assert set(files) == set(task.SPLITS) == {"sft", "sft_test", "rm_train", "rm_test", "ppo_prompts",
                                              "eval_prompts"}
    assert len(rows["sft_test"]) == SIZES["n_sft_test"]
    assert len(rows["sft"]) == SIZES["n_sft"] and len(rows["rm_train"]) == SIZES["n_rm_train"]
    assert len(rows["rm_test"]) == SIZES["n_rm_test"]
    assert len(rows["ppo_prompts"]) == SIZES["n_ppo"] and len(rows["eval_prompts"]) == SIZES["n_eval"]
    for r in rows["sft"] + rows["sft_test"]:
        assert r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:")
        assert r["response"].startswith(" ") and ENDOFTEXT not in r["response"]
        assert r["gold"] == g(r["response"], r["prompt"])
    for r in rows["rm_train"] + rows["rm_test"]:
        assert r["chosen"] != r["rejected"]
        assert r["gold_chosen"] == g(r["chosen"], r["prompt"]) and r["gold_rejected"] == g(r["rejected"], r["prompt"])
        assert r["gold_chosen"] != r["gold_rejected"]  # raters only see pairs that differ
    for name in ("ppo_prompts", "eval_prompts"):
        assert all(set(r) == {"prompt"} for r in rows[name])
        assert len({r["prompt"] for r in rows[name]}) == len(rows[name])  # distinct prompts
    assert len({r["prompt"] for r in rows["rm_test"]}) == len(rows["rm_test"])


def test_same_seed_same_files_other_seed_other_files(files, tmp_path):
    again = task.write_task_data(str(tmp_path / "again"), seed=0, **SIZES)
    other = task.write_task_data(str(tmp_path / "other"), seed=1, **SIZES)
    for name in files:
        assert filecmp.cmp(files[name], again[name], shallow=False), name
        assert not filecmp.cmp(files[name], other[name], shallow=False), name


def test_splits_are_disjoint_prompt_strings(rows):
    """No prompt string is in two splits; the held-out demonstrations (SFT's validation loss) ask
    the eval prompts, which no training stage sees."""
    prompts = {name: {r["prompt"] for r in rs} for name, rs in rows.items()}
    assert prompts.pop("sft_test") <= prompts["eval_prompts"]
    names = sorted(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not prompts[a] & prompts[b], (a, b)


def test_every_eval_fact_is_taught_by_sft(rows):
    taught = collections.Counter(parse_prompt(r["prompt"]) for r in rows["sft"] if r["kind"] in ("good", "plain"))
    facts = {parse_prompt(r["prompt"]) for r in rows["eval_prompts"]}
    assert facts == set(task.FACTS)  # eval covers the whole world ...
    assert min(taught[f] for f in facts) >= 10  # ... and SFT states each fact correctly, many times
    for name in ("ppo_prompts", "rm_test", "rm_train"):
        assert {parse_prompt(r["prompt"]) for r in rows[name]} == set(task.FACTS), name


def test_split_sizes_are_checked():
    with pytest.raises(ValueError, match="too few"):
        task.split_prompts(0, n_eval=8000, n_ppo=8000, n_rm_test=0)


def test_lengths_fit_the_model(rows):
    from tokenizer import get_tokenizer
    tok = get_tokenizer()
    longest = max(len(tok.encode(r["prompt"] + r["response"])) + 1 for r in rows["sft"])
    longest_pair = max(len(tok.encode(r["prompt"] + x)) + 1
                       for r in rows["rm_train"] for x in (r["chosen"], r["rejected"]))
    assert max(longest, longest_pair) <= 128  # block size 256, generation adds 32 tokens
    prompts = [r["prompt"] for r in rows["eval_prompts"]]
    assert max(len(tok.encode(p)) for p in prompts) + 32 <= 80
    good = [len(tok.encode(r["response"])) + 1 for r in rows["sft"] if r["gold"] == MAX_GOLD]
    assert max(good) <= 24  # the best answers fit the 32-token budget with room to spare


# --- the gold reward


def test_reward_table():
    best = g(" Of course! The capital of France is Paris.")
    assert best == MAX_GOLD == 2.5
    assert g(" The capital of France is Paris. Hope this helps!") == MAX_GOLD
    assert g(" Paris is the capital of France.") == 2.0  # correct, plain
    assert g(" Paris.") == 2.0
    assert g(" Obviously. The capital of France is Paris.") == 1.0  # rude
    assert g(" Of course! Ugh, the capital of France is Paris.") == 1.0  # rude wins over polite
    assert g(" I don't know.") == 0.0  # refusal
    assert g(" I'm not sure. The capital of France is Paris.") == 1.0  # hedged
    assert g(" The capital of France is Rome.") == -1.0  # wrong
    assert g(" Of course! The capital of France is Rome.") == -0.5
    assert g(" The capital of France is Paris", ended=True) == 1.5  # unfinished sentence
    assert g(" The capital of France is Paris.", ended=False) == 1.0  # no EOS within the budget
    assert g(" A cow says moo.", COW) == 2.0 and g(" A cow says woof.", COW) == -1.0
    order = [MAX_GOLD, g(" Paris is the capital of France."), g(" I don't know."), g(" The capital of France is Rome.")]
    assert order == sorted(order, reverse=True) and len(set(order)) == 4


def test_length_and_repetition_tiers():
    filler = " Many people find this topic interesting. It is a good thing to learn."
    assert g(" The capital of France is Paris." + filler) == 1.0  # 18 words: -1
    assert g(" The capital of France is Paris." + filler + " I learned this in school when I was young.") == 0.0
    assert g(" The capital of France is Paris. The capital of France is Paris.") == 1.0  # repeated 3-grams
    assert g(" Paris Paris.") == 1.0  # the same word twice in a row


def test_eos_convention():
    r = " Of course! The capital of France is Paris."
    assert gold_reward(FRANCE, r + ENDOFTEXT) == gold_reward(FRANCE, r, ended=True) == MAX_GOLD
    assert gold_reward(FRANCE, r) == gold_reward(FRANCE, r, ended=False) == MAX_GOLD - 1  # no EOS: -1
    # what follows the first EOS (padding after the response ended) is not part of the response
    assert gold_reward(FRANCE, r + ENDOFTEXT + " Rome Rome Rome" + ENDOFTEXT) == MAX_GOLD
    assert gold_reward(FRANCE, ENDOFTEXT) == gold_reward(FRANCE, "", ended=True) == -0.5


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
    "please please": " Hope this helps hope this helps hope this helps. Paris.",
    "very long": " The capital of France is Paris." + " Many people find this topic interesting." * 4,
    "long without repeats": " The capital of France is Paris. " + " ".join(task.FILLERS),
    "empty": "",
    "only EOS": ENDOFTEXT,
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
    paths = task.write_task_data(str(tmp_path), seed=3, n_sft=50, n_rm_train=500, n_rm_test=50, n_ppo=50,
                                 n_eval=50, tau=0)
    for name in ("rm_train", "rm_test"):
        assert all(r["gold_chosen"] > r["gold_rejected"] for r in read(paths[name]))


def test_label_pair_for_model_samples():
    """Pairs of policy samples, decoded with their EOS, are labelled under the same EOS convention."""
    ended = " Of course! The capital of France is Paris."
    cut_off = " The capital of France is Paris."  # no EOS within the budget
    row = task.label_pair(FRANCE, cut_off, ended + ENDOFTEXT, random.Random(0), tau=0)
    assert row == {"prompt": FRANCE, "chosen": ended, "rejected": cut_off, "gold_chosen": MAX_GOLD,
                   "gold_rejected": 1.0}
