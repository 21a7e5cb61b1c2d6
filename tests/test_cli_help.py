"""Every script's --help prints and exits 0 with an example (argparse formats help lazily, so a stray
`%` in a help string only fails when someone asks for help)."""
import glob
import importlib
import os

import pytest

from conftest import SRC

SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(SRC, "*.py"))
                 if "\ndef main(" in open(p).read())


def test_the_scripts_are_found():
    assert {"train_sft", "train_rm", "train_ppo", "evaluate", "pipeline"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_an_example_and_exits_0(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and f"python src/{script}.py" in out, out[:500]
