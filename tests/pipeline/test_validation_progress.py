"""End-of-epoch validation shows a progress bar (issue 18, item 2): over 500k triplets it ran
about 51 s without a sign of life."""

import json
import re

from acf_fast.pipeline.cli import main as cli_main
from tests.conftest import tiny_prepared_dataset


def test_validation_shows_a_bar_over_its_triplets(tmp_path, capsys):
    root = tiny_prepared_dataset(tmp_path)
    capsys.readouterr()
    assert cli_main(["train", str(root / "prep"), str(tmp_path / "run"), "--epochs", "1",
                     "--model-dim", "8", "--val-rank-samples", "32", "--backend", "reference"]) == 0
    err = capsys.readouterr().err
    totals = {int(t) for t in re.findall(r"validation:\s+\d+%\|[^|]*\|\s*\d+/(\d+)", err)}
    # every validation triplet's loss, then the 32 ranked against the catalogue
    n_val = json.loads((root / "prep" / "dataset.json").read_text())["n_validation_triplets"]
    assert totals == {n_val + 32}, err[-2000:]


def test_no_bar_when_progress_is_off(tmp_path, capsys):
    from acf_fast.training import train
    from tests.conftest import tiny_train_config

    root = tiny_prepared_dataset(tmp_path)
    capsys.readouterr()
    train(tiny_train_config(root, tmp_path / "run", epochs=1))
    assert "validation" not in capsys.readouterr().err
