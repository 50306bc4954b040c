"""End to end on the default synthetic data (smaller features): what ACF's learning identifies.

The claim: ACF learns the users' planted taste. The tutorial-protocol AUC, as a median
over three seeds (each seed draws its own dataset, triplets, initialisation and batch
order), clears AUC_BAR on the reference backend and on the cpu backend, the two backends
agree seed by seed, and a control shows the bar can fail: the same pipeline on the same
kind of data with the taste removed (every interaction ignores the planted concepts,
noise_rate = 1) stays well below it. So the bar measures learned taste, not popularity
or the protocol.

What is NOT claimed, and why: that component attention (beta) concentrates on the
planted cells *because of the users' taste*. In ACF the scored item enters through its
learned embedding; the features only enter through beta, which only shapes the item
attention alpha, which only reweights learned profile embeddings that carry the same
information. The ranking loss barely
depends on beta, so beta's end state is set by its initialisation, by the salience of the
planted cells (they are stronger than the background) and by float rounding, not by the
taste. Measured on this task (40k triplets x 4 epochs, lr 3e-2; seeds 0, 1, 2):
- beta frozen uniform reaches the same AUC (cpu 0.778 / 0.788 / 0.770 against 0.769 /
  0.789 / 0.768 with attention); so do alpha frozen uniform and the features cut out of
  alpha altogether (seed 0: 0.777 each); `test_auc_does_not_need_component_attention`
  keeps this in view;
- the planted-cell attention ratio flips between backends on the same seed (seed 0:
  reference 5.1x, cpu 0.00x; seed 2 at 30k x 3: 7.5x against 0.00x) and between CPUs
  (issue: Intel 4.1x, AMD EPYC 0.00x), while the AUC agrees to 0.007;
- the taste-free control, where the planted cells carry no signal at all, gets 5.2-6.6x;
- on data where the background cells are decoy objects as strong as the concepts (the
  planted cells then differ from the background only by the taste; an experiment, not in
  synth), the ratio lands at 0.3-2.2x, each seed alike with or without the taste; with
  longer training (20 epochs at 1e-2) weight decay flattens beta to exactly 1.00x.
A per-run "planted attention >= bar" assertion would therefore test luck; what holds is
that beta finds the salient object cells in most seeds, so that is asserted as a median
over the seeds on each backend (and on the taste-free control), as salience, not taste. Designing data on which the AUC bar *requires*
attention is not possible for this model: whatever the features tell alpha, the learned
profile embeddings tell it too.

One trained model (cpu, seed 0) also feeds the evaluate / recommend / explain checks.
The module trains 12 small models: about 2.5 minutes on 2 CPU cores, one thread each.
"""

import csv
import json
import statistics
import time

import numpy as np
import pytest
import torch

from acf_fast.data.formats import read_evaluation
from acf_fast.data.history import UserHistory
from acf_fast.data.sampling import prepare
from acf_fast.data.synth import load_planted, synth
from acf_fast.evaluation.evaluate import evaluate
from acf_fast.model.acf import load_model
from acf_fast.pipeline.cli import main as cli_main
from acf_fast.pipeline.demo import planted_attention_ratio
from acf_fast.pipeline.explain import explain
from acf_fast.pipeline.recommend import recommend
from acf_fast.training import TrainConfig, Trainer

SEEDS = (0, 1, 2)
BACKENDS = ("reference", "cpu")
# Measured medians (this task, seeds 0-2): 0.769-0.774 on both backends, per seed
# 0.767-0.789; taste-free control 0.531-0.554; beta forced uniform 0.770-0.788. The bar
# sits ~0.05 below the first and ~0.15 above the second.
AUC_BAR = 0.72
# component attention on the planted cells, relative to the uniform share (medians here:
# cpu 4.5x, taste-free control 6.5x; single seeds 0.00x-7.5x)
RATIO_BAR = 2.0
MAIN = ("cpu", 0, "taste")          # the run the evaluate / recommend / explain checks use


class Lab:
    """Datasets and trained runs, built on first use and kept for the module."""

    def __init__(self, root):
        self.root = root
        self.data, self.runs = {}, {}

    def dataset(self, seed: int, variant: str):
        key = (seed, variant)
        if key not in self.data:
            root = self.root / f"{variant}{seed}"
            control = dict(noise_rate=1.0) if variant == "taste_free" else {}   # else the defaults
            s = synth(root / "data", feature_dim=32, seed=seed, progress=False, images=key == MAIN[1:],
                      **control)
            prepare(s["interactions"], s["features_h5"], root / "prep", n_train=40_000,
                    n_validation=1_000, seed=seed, progress=False)
            self.data[key] = (root, s)
        return self.data[key]

    def run(self, backend: str, seed: int, variant: str = "taste"):
        """variant: taste (the default data), taste_free (control data) or uniform_beta
        (default data, component attention frozen uniform)."""
        key = (backend, seed, variant)
        if key in self.runs:
            return self.runs[key]
        root, s = self.dataset(seed, "taste_free" if variant == "taste_free" else "taste")
        out = self.root / f"run_{backend}_{seed}_{variant}"
        t0 = time.perf_counter()
        trainer = Trainer(TrainConfig(data_dir=str(root / "prep"), out_dir=str(out), epochs=4,
                                      model_dim=32, lr=3e-2, patience=0, backend=backend, seed=seed,
                                      val_rank_samples=256, progress=False))
        if variant == "uniform_beta":      # constant component logits: beta = 1/49 everywhere
            w = trainer.model.user_model.feats.w
            for p in (w.weight, w.bias):
                p.data.zero_()
                p.requires_grad_(False)
        trainer.fit()
        seconds = time.perf_counter() - t0
        main = key == MAIN
        report = evaluate(out / "last.pt", root / "prep", root / "eval" if main else None,
                          backend=backend, progress=False, print_table=False, plot=main)
        model = load_model(out / "last.pt", s["features_h5"], backend, "cpu")
        groups = read_evaluation(root / "prep" / "naive-user-evaluation.csv")
        ratio = planted_attention_ratio(model, groups, load_planted(s["planted"])["planted_cells"])
        self.runs[key] = dict(root=root, synth=s, run=out, report=report, seconds=seconds,
                              auc=report["metrics"]["tutorial"]["AUC"], ratio=ratio)
        print(f"\n  {variant:12s} {backend:9s} seed {seed}: tutorial AUC {self.runs[key]['auc']:.4f}, "
              f"planted-cell attention {ratio:5.2f}x uniform, trained in {seconds:.0f} s",
              end="")
        return self.runs[key]

    def median_auc(self, backend: str, variant: str = "taste") -> float:
        return statistics.median(self.run(backend, s, variant)["auc"] for s in SEEDS)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # small model: one thread is faster and steadier on 2 busy cores
    try:
        yield Lab(tmp_path_factory.mktemp("learn"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(lab):
    r = lab.run(*MAIN)
    return r["root"], r["synth"], r["run"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_auc_median_over_seeds(lab, backend):
    aucs = [lab.run(backend, s)["auc"] for s in SEEDS]
    assert statistics.median(aucs) >= AUC_BAR, f"{backend}: AUC per seed {aucs}"


def test_backends_agree_seed_by_seed(lab):
    for s in SEEDS:
        ref, cpu = lab.run("reference", s)["auc"], lab.run("cpu", s)["auc"]
        assert abs(ref - cpu) <= 0.02, f"seed {s}: reference AUC {ref:.4f}, cpu {cpu:.4f}"


def test_auc_bar_fails_without_the_taste_signal(lab):
    """The control: the same pipeline on data whose interactions ignore the planted concepts."""
    aucs = [lab.run("cpu", s, "taste_free")["auc"] for s in SEEDS]
    assert statistics.median(aucs) < AUC_BAR - 0.08, f"taste-free AUC per seed {aucs}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_component_attention_finds_the_object_cells(lab, backend):
    """What beta does learn: to concentrate on the planted object cells, which are stronger
    than the background (salience, not taste: the taste-free control shows the same). One
    seed can collapse onto a background cell (0.00x seen on cpu seed 0, and on an AMD CPU
    where an Intel one gave 4.1x), so the claim is the median over the seeds, on each
    backend, and on the control data too."""
    ratios = [lab.run(backend, s)["ratio"] for s in SEEDS]
    assert statistics.median(ratios) >= RATIO_BAR, f"{backend}: planted-cell ratio per seed {ratios}"
    if backend == "cpu":
        control = [lab.run("cpu", s, "taste_free")["ratio"] for s in SEEDS]
        assert statistics.median(control) >= RATIO_BAR, f"taste-free ratio per seed {control}"


def test_auc_does_not_need_component_attention(lab):
    """Why attention is not asserted as learned taste: with beta frozen uniform the model reaches
    the bar just as well (see the module docstring). If this ever fails, the data or the
    model has made attention necessary, and an attention claim can be identified again."""
    uniform = [lab.run("cpu", s, "uniform_beta")["auc"] for s in SEEDS]
    full = lab.median_auc("cpu")
    assert statistics.median(uniform) >= AUC_BAR, f"beta uniform: AUC per seed {uniform}"
    assert abs(statistics.median(uniform) - full) <= 0.03, (uniform, full)


def test_evaluation_files(trained):
    root, _, _ = trained
    report = json.loads((root / "eval" / "metrics.json").read_text())
    for protocol in ("tutorial", "standard"):
        for name in ("AUC", "RR", "R@20", "P@20", "nDCG@20", "R@100", "P@100", "nDCG@100", "R@200"):
            assert 0.0 <= report["metrics"][protocol][name] <= 1.0
    rows = list(csv.DictReader(open(root / "eval" / "metrics.csv")))
    assert [r["protocol"] for r in rows] == ["tutorial", "standard"]
    assert (root / "eval" / "metrics_by_history_size.png").stat().st_size > 1000
    assert report["table"].splitlines()[0].split() == ["AUC", "RR", "R@20", "P@20", "nDCG@20",
                                                       "R@100", "P@100", "nDCG@100"]


def test_evaluation_memory_block_does_not_change_results(trained):
    root, _, run = trained
    a = evaluate(run / "last.pt", root / "prep", progress=False, print_table=False)
    b = evaluate(run / "last.pt", root / "prep", progress=False, print_table=False,
                 memory_mb=0.05)                       # a few users per block
    for p in a["metrics"]:
        for k, v in a["metrics"][p].items():
            assert b["metrics"][p][k] == pytest.approx(v, abs=1e-12)


def test_recommend_excludes_consumed(trained, tmp_path):
    root, _, run = trained
    hist = UserHistory.load(root / "prep" / "history.npz")
    recs = recommend(run / "last.pt", root / "prep", users="0,5,7", k=15, out=tmp_path / "r.json")
    for u, items in recs.items():
        ids = [i for i, _ in items]
        assert len(ids) == 15 and len(set(ids)) == 15
        assert not set(np.asarray(ids) + 1) & set(hist.consumed_of(u).tolist())
        scores = [s for _, s in items]
        assert scores == sorted(scores, reverse=True)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [r["user_id"] for r in saved["recommendations"]] == [0, 5, 7]
    recommend(run / "last.pt", root / "prep", users=None, k=5, out=tmp_path / "all.csv")
    rows = list(csv.DictReader(open(tmp_path / "all.csv")))
    assert len(rows) == 5 * hist.n_users
    with_consumed = recommend(run / "last.pt", root / "prep", users=[0], k=400,
                              exclude_consumed=False)
    assert len(with_consumed[0]) == 400


def test_explain_with_images_and_grid(trained, tmp_path):
    root, s, run = trained
    hist = UserHistory.load(root / "prep" / "history.npz")
    user = next(u for u in range(hist.n_users) if len(hist.train_of(u)) >= 9)
    e = explain(run / "last.pt", root / "prep", user, tmp_path / "img.png",
                images_dir=s["images"], planted=s["planted"])
    assert (tmp_path / "img.png").stat().st_size > 5000
    assert len(e["alpha"]) == 9 and abs(sum(e["alpha"]) - 1) < 1e-5
    assert all(abs(sum(b) - 1) < 1e-5 and len(b) == 49 for b in e["beta"])
    assert len(e["top_k"]) == 10
    g = explain(run / "last.pt", root / "prep", user, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 5000 and g["top_k"] == e["top_k"]
    assert json.loads((tmp_path / "grid.json").read_text())["user"] == user


def test_cli_round_trip(trained, tmp_path, capsys):
    root, _, run = trained
    ckpt = str(run / "best.pt")
    assert cli_main(["evaluate", ckpt, str(root / "prep"), "--protocol", "tutorial", "--no-plot",
                     "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "ACF (tutorial)" in out and (tmp_path / "ev" / "metrics.json").exists()
    assert cli_main(["recommend", ckpt, str(root / "prep"), "--users", "1,2", "-k", "3"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert set(recs) == {"1", "2"} and all(len(v) == 3 for v in recs.values())
    assert cli_main(["explain", ckpt, str(root / "prep"), "--user", "3", "--out",
                     str(tmp_path / "e.png")]) == 0
    assert (tmp_path / "e.png").exists()
