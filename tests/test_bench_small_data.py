"""bench/bench_small_data.py's --reuse: an earlier run is taken only if it trained as its candidate now would."""
import dataclasses
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_accuracy  # noqa: E402
import bench_small_data  # noqa: E402

from nli.recipe import SMALL_DATA  # noqa: E402


def results_file(tmp_path, small_data_recipe):
    """A results file of one seed of the peer and small-data, small-data's run trained with `small_data_recipe`."""
    runs = {"peer": {"accuracy": 0.78}, "small-data": {"accuracy": 0.79, "recipe": small_data_recipe}}
    results = {"seeds": [0], "peer_recipe": bench_accuracy.PEER_RECIPE,
               "candidates": {name: {"runs": [run]} for name, run in runs.items()}}
    path = tmp_path / "bench_small_data.json"
    path.write_text(json.dumps(results))
    return str(path)


def as_recorded(recipe, **run_settings):
    """A recipe as a run's config.json records it (with where it ran), then as the benchmark keeps it."""
    recorded = {**dataclasses.asdict(recipe), "seed": 3, "out": "/tmp/run", "devices": "cpu", **run_settings}
    return bench_accuracy.training_settings(recorded)


def test_a_run_is_reused_only_if_it_trained_as_the_candidate_now_would(tmp_path):
    names = ["peer", "small-data"]
    same = results_file(tmp_path, as_recorded(SMALL_DATA, max_memory=123))  # where it ran does not count
    assert bench_small_data.recorded_runs(same, names)[0]["small-data"]["accuracy"] == 0.79
    # The recipe changed since (here: its rate), with the options the same: the seed runs again
    changed = results_file(tmp_path, as_recorded(dataclasses.replace(SMALL_DATA, lr=2e-4)))
    assert bench_small_data.recorded_runs(changed, names) == {}
    # A run from before runs recorded their recipe cannot be matched either
    unrecorded = results_file(tmp_path, None)
    assert bench_small_data.recorded_runs(unrecorded, names) == {}


def test_the_first_batches_rate_is_read_from_the_step_entries():
    steps = [{"kind": "step", "epoch": 1, "step": 10 * i, "ex_per_s": rate} for i, rate in enumerate(
        [20, 40, 60, 60, 60, 7], start=1)]  # the last entry of an epoch may cover fewer updates: dropped
    figures = bench_accuracy.first_batches(steps + [{"kind": "epoch", "epoch": 1}])
    assert abs(figures["first_batches_examples_per_sec"] - 2 / (1 / 20 + 1 / 40)) < 1e-9
    assert abs(figures["steady_examples_per_sec"] - 60) < 1e-9
