"""bench/bench_profile.py: MXNet's profile of a real training step, its operators grouped by kind, and its table."""
import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_profile  # noqa: E402
import results_table  # noqa: E402

OPTIMIZER = "optimizer (Adam updates, weight decay, gradient norm, zeroing)"
TINY = {"what": "a tiny BERT", "label": "tiny", "checkpoint": False, "batch_size": 16, "steps": 2, "lr": 1e-4,
        "head_dropout": 0.1, "vocab_size": None,
        "config": dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=4, num_blks=1, dropout=0.1, max_len=512,
                       activation="gelu", embedding_norm=True)}

# What the step runs besides the kinds' arithmetic: reshapes, copies, casts and fills, the accuracy's argmax, equal
# and sum, the loss's scaling, the engine's own bookkeeping. Their time is small on every workload profiled.
KNOWN_OTHER = {"Cast", "CopyCPU2CPU", "DeleteVariable", "Flatten", "SetValueOp", "WaitForVar", "_backward_copy",
               "_backward_mul_scalar", "_backward_reshape", "_contrib_arange_like", "_np_reshape", "_np_sum",
               "_npi_argmax", "_npi_equal", "_npi_full_like", "_npi_multiply_scalar", "_npi_zeros", "_npx_reshape",
               "repeat", "sum", "_copy", "_np_copy"}


@pytest.mark.parametrize("op,kind", [
    ("_backward_FullyConnected", "matrix products (dense layers)"), ("batch_dot", "attention: batched products"),
    ("_np_transpose", "attention: head split/merge transposes"), ("_backward_LayerNorm", "layer norm"),
    ("_backward_npi_broadcast_add", "adds (residuals, broadcasts, gradient sums)"),
    ("_backward_LeakyReLU", "GELU / activation"), ("_adamw_update", OPTIMIZER),
    ("multi_sum_sq", OPTIMIZER), ("adam_update", OPTIMIZER), ("dot", OPTIMIZER), ("_mul_scalar", OPTIMIZER),
    ("sqrt", OPTIMIZER), ("_minimum_scalar", OPTIMIZER), ("broadcast_mul", OPTIMIZER),
    ("_np_dot", "matrix products (dense layers)"), ("_backward_mul_scalar", bench_profile.OTHER), ("ResourceNativeRandomSetSeed", "dropout (masks, and seeding them per batch)"),
    ("CopyCPU2CPU", bench_profile.OTHER)])
def test_operators_are_counted_under_their_kind(op, kind):
    assert bench_profile.kind_of(op) == kind


def test_a_real_step_is_profiled_and_its_time_is_all_accounted_for():
    side = bench_profile.summarize([bench_profile.profile_side(TINY, TINY["steps"]) for _ in range(2)])
    kinds = bench_profile.by_kind(side)
    assert side["steps"] == 4 and side["examples"] == 64 and side["rounds"] == 2
    ran = ("matrix products (dense layers)", "attention: batched products", "layer norm", "GELU / activation",
           "dropout (masks, and seeding them per batch)", OPTIMIZER)  # the step's forward, backward and update
    for kind in ran:
        assert kinds[kind]["ms_per_step"] > 0, kind
    assert sum(k["ms_per_step"] for k in kinds.values()) == pytest.approx(side["profiled_ms_per_step"])
    assert sum(k["share"] for k in kinds.values()) == pytest.approx(1.0)
    unknown = {op for op in side["operators_ms"] if bench_profile.kind_of(op) == bench_profile.OTHER} - KNOWN_OTHER
    assert not unknown, f"operators of no kind: add them to bench_profile.KINDS (or to KNOWN_OTHER): {sorted(unknown)}"


def test_the_profile_table_shows_each_kind_before_and_after_from_the_results_file(tmp_path, monkeypatch):
    def side(layer_norm_ms, step_ms):
        outside_ms = step_ms - layer_norm_ms
        by_kind = {"layer norm": {"ms_per_step": layer_norm_ms, "share": layer_norm_ms / step_ms},
                   bench_profile.OUTSIDE: {"ms_per_step": outside_ms, "share": outside_ms / step_ms}}
        return {"by_kind": by_kind, "steps": 3, "profiled_ms_per_step": step_ms, "unprofiled_ms_per_step": step_ms - 1,
                "first_pass_ms_per_step": 2 * step_ms, "unprofiled_ms_per_step_per_round": [step_ms - 2, step_ms],
                "unprofiled_examples_per_sec": 32000 / (step_ms - 1), "padded_tokens_per_step": 5 * step_ms}
    results = {"command": "OMP_NUM_THREADS=2 nice -n -5 python bench/bench_profile.py --before 8f7eb64",
               "before_commit": "8f7eb649803b19dcde4d087c304aa9b7471320b5",
               "workloads": {"minilm": {"label": "all-MiniLM-L6-v2, batch 32", "before": side(40.0, 200.0),
                                        "after": side(30.0, 150.0)}},
               "machine": {"cpu": "Some CPU; avx2", "OMP_NUM_THREADS": "2", "niceness": -5,
                           "load_average_1min_before_after": [1.0, 2.0]}}
    (tmp_path / results_table.PROFILE).parent.mkdir(parents=True)
    (tmp_path / results_table.PROFILE).write_text(json.dumps(results))
    monkeypatch.setattr(results_table, "ROOT", str(tmp_path))
    table = results_table.render_profile()
    assert "| kind | all-MiniLM-L6-v2, batch 32, before | all-MiniLM-L6-v2, batch 32, after |" in table
    assert "| layer norm | 40.0 ms (20.0%) | 30.0 ms (20.0%) |" in table
    assert f"| {bench_profile.OUTSIDE} | 160.0 ms (80.0%) | 120.0 ms (80.0%) |" in table
    assert "| **the step, not profiled** | 199.0 ms | 149.0 ms |" in table
    assert "| **the step in the first pass (each new shape planned), not profiled** | 400.0 ms | 300.0 ms |" in table
    assert "| the step, not profiled, round by round (the machine's load) | 198, 200 ms | 148, 150 ms |" in table
    assert "| tokens per step, padding included | 1,000 | 750 |" in table
    assert "before: commit 8f7eb64" in table and "niceness -5" in table
    assert "`OMP_NUM_THREADS=2 nice -n -5 python bench/bench_profile.py --before 8f7eb64`" in table
