"""The pipeline as Python functions, one per CLI step (`acf-fast <step>` calls the same ones).

    from acf_fast import api
    data = api.synth("work/data")                                   # or your own files
    api.prepare(data["interactions"], data["features_h5"], "work/prep", n_train=40_000)
    api.train(data_dir="work/prep", out_dir="work/run", epochs=5)
    report = api.evaluate("work/run/best.pt", "work/prep", "work/eval")
    recs = api.recommend("work/run/best.pt", "work/prep", users=[0, 1], k=10)
    api.explain("work/run/best.pt", "work/prep", user=0, out="work/user0.png")
"""

from ..data.formats import read_evaluation, read_interactions, read_triplets
from ..data.sampling import prepare
from ..data.synth import SynthConfig, load_planted, synth
from ..evaluation.evaluate import evaluate
from ..model.acf import load_model
from ..training import TrainConfig, Trainer, train
from .demo import DemoConfig, planted_attention_ratio, run_demo
from .explain import explain
from .extract import extract
from .recommend import recommend

__all__ = ["DemoConfig", "SynthConfig", "TrainConfig", "Trainer", "evaluate", "explain", "extract",
           "load_model", "load_planted", "planted_attention_ratio", "prepare", "read_evaluation",
           "read_interactions", "read_triplets", "recommend", "run_demo", "synth", "train"]
