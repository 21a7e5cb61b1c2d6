"""sample.py: it answers with the model it was given, in the HH format, stops at EOS, and refuses
what cannot answer. The models are tiny random GPT-2s saved as checkpoints by the tests."""
import shlex

import pytest
import torch
from conftest import randomize_

import sample
from checkpoints import save_model
from common import run_cli
from configs import EOS_ID, ModelConfig
from gpt import GPT, RewardModel
from tokenizer import get_tokenizer

CONFIG = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)
QUESTION = "What is the capital of France?"
HH_QUESTION = "\n\nHuman: What is the capital of France?\n\nAssistant:"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """(run directory, the model saved in it) of a tiny random 'SFT run'."""
    model = randomize_(GPT(CONFIG), seed=3).eval()
    run_dir = tmp_path_factory.mktemp("sft")
    save_model(model, str(run_dir / "final"), stage="sft")
    return str(run_dir), model


def own_greedy_tokens(model, prompt, max_new_tokens):
    """The tokens model.generate itself decodes greedily after `prompt` (EOS kept if emitted)."""
    ids = torch.tensor([get_tokenizer().encode(prompt, allow_special=False)])  # (1, Tp)
    out = model.generate(ids, max_new_tokens=max_new_tokens, temperature=0)
    Tp = out.prompt_len
    return out.tokens[0, Tp:][out.response_mask[0, Tp:].bool()].tolist()


@pytest.mark.parametrize("how", ["positional", "flag"])
def test_greedy_sample_is_the_models_own_greedy_answer_to_the_hh_prompt(sft_run, capsys, how):
    run_dir, model = sft_run
    source = [run_dir] if how == "positional" else ["--model", run_dir]
    sample.main([*source, "--prompt", QUESTION, "--temperature", "0", "--max-new-tokens", "12"])
    tokens = own_greedy_tokens(model, HH_QUESTION, 12)
    assert len(tokens) == 12 and EOS_ID not in tokens  # a full answer: the comparison below means something
    assert capsys.readouterr().out == HH_QUESTION + get_tokenizer().decode(tokens) + "\n"


def test_raw_prompt_is_continued_as_given(sft_run, capsys):
    run_dir, model = sft_run
    sample.main([run_dir, "--prompt", "Hello, my name is", "--raw", "--temperature", "0", "--max-new-tokens", "8"])
    expected = "Hello, my name is" + get_tokenizer().decode(own_greedy_tokens(model, "Hello, my name is", 8))
    assert capsys.readouterr().out == expected + "\n"


def test_answer_stops_at_eos(tmp_path, capsys):
    """A model whose every greedy token is EOS: the answer is empty, not a row of <|endoftext|>."""
    model = randomize_(GPT(CONFIG), seed=4).eval()
    with torch.no_grad():  # the final LayerNorm outputs a constant, its bias: the EOS embedding, scaled up
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(10 * model.wte.weight[EOS_ID])
    ids = torch.tensor([get_tokenizer().encode(HH_QUESTION, allow_special=False)])
    assert model.generate(ids, max_new_tokens=5, temperature=0, eos_id=None).tokens[0, -5:].tolist() == [EOS_ID] * 5
    save_model(model, str(tmp_path / "eos" / "final"), stage="ppo")
    sample.main([str(tmp_path / "eos"), "--prompt", QUESTION, "--temperature", "0", "--max-new-tokens", "5"])
    assert capsys.readouterr().out == HH_QUESTION + "\n"


def test_the_help_examples_without_placeholders_run(capsys):
    examples = [line.split("python src/sample.py", 1)[1] for line in sample.__doc__.splitlines()
                if "python src/sample.py" in line and "<" not in line]
    assert examples  # a fresh clone can run at least one example
    for example in examples:
        argv = shlex.split(example)
        sample.main(argv)
        assert capsys.readouterr().out.startswith(argv[argv.index("--prompt") + 1])


@pytest.mark.parametrize("case", ["reward model", "missing", "no prompt", "model and preset"])
def test_bad_input_is_one_line_exit_2(sft_run, tmp_path, capsys, case):
    run_dir, _ = sft_run
    if case == "reward model":
        save_model(randomize_(RewardModel(CONFIG)), str(tmp_path / "rm" / "final"), stage="rm")
        argv, needle = [str(tmp_path / "rm"), "--prompt", QUESTION], "reward model"
    elif case == "missing":
        argv, needle = [str(tmp_path / "missing"), "--prompt", QUESTION], str(tmp_path / "missing")
    elif case == "no prompt":
        argv, needle = [run_dir], "--prompt"
    else:
        argv, needle = [run_dir, "--preset", "nano", "--prompt", QUESTION], "--preset"
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: sample.main(argv))
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and needle in captured.err, captured.err
