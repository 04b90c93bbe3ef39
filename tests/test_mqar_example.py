"""examples/mqar on the CPU: the task's generator, the SWA layer's mask, and the toy sweep end to end (the
command line, its JSON, resuming, the plot or the message that replaces it).

The toy's BLA layer (W 8, N = M 5, head dim 16, float32) is tests/test_nn.py's, so the two share kernels.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # examples/ is not installed: import it from the checkout
    sys.path.insert(0, str(REPO))

from examples.mqar import sweep
from examples.mqar.data import IGNORE, mqar_batch  # noqa: E402
from examples.mqar.model import _block_mask, sliding_window_attention  # noqa: E402
from examples.mqar.plot import best_accuracies  # noqa: E402
from examples.mqar.train import answers  # noqa: E402


def test_mqar_batch_follows_the_task():
    """Distinct keys in the lower half and distinct values in the upper half, as pairs at the start; each key
    queried once after them, its value the target there; no other target."""
    T, P, vocab = 40, 5, 30
    inputs, targets = mqar_batch(64, T, P, vocab, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (64, T) and inputs.dtype == torch.int64
    assert inputs.min() >= 0 and inputs.max() < vocab
    for row, target in zip(inputs.tolist(), targets.tolist()):
        keys, values = row[0 : 2 * P : 2], row[1 : 2 * P : 2]
        assert len(set(keys)) == P and max(keys) < vocab // 2
        assert len(set(values)) == P and min(values) >= vocab // 2
        answers = [t for t in range(T) if target[t] != IGNORE]
        assert len(answers) == P and all(t >= 2 * P and (t - 2 * P) % 2 == 0 for t in answers)
        assert sorted(row[t] for t in answers) == sorted(keys)
        assert all(target[t] == values[keys.index(row[t])] for t in answers)


def test_answers_are_the_targeted_positions_in_order():
    """``answers`` finds each row's P answer positions (ascending) and their values: the boolean mask's picks."""
    T, P = 40, 5
    _, targets = mqar_batch(16, T, P, 30, torch.Generator().manual_seed(2))
    positions, values = answers(dict(num_kv_pairs=P), targets)
    mask = targets != IGNORE
    assert positions.shape == values.shape == (16, P)
    assert torch.equal(positions, mask.nonzero()[:, 1].view(16, P))
    assert torch.equal(values, targets[mask].view(16, P))


def test_mqar_batch_queries_follow_a_power_law():
    """power_a = 0.01: the first query slot is taken far more often than the last (p ~ 1 / (g + 1)); power_a = 1:
    every slot about equally (4 keys in 28 slots: 1 / 7)."""
    first = {}
    for a in (0.01, 1.0):
        _, targets = mqar_batch(2000, 64, 4, 64, torch.Generator().manual_seed(1), power_a=a)
        answered = (targets != IGNORE).float().mean(0)
        first[a] = (answered[8].item(), answered[62].item())  # the first and the last query slot
    assert first[0.01][0] > 0.6 and first[0.01][1] < 0.1
    assert all(abs(x - 1 / 7) < 0.03 for x in first[1.0])


@pytest.mark.parametrize("args,name", [((16, 0, 32), "num_kv_pairs"), ((15, 4, 32), "seq_len"),
                                       ((64, 4, 7), "vocab_size")])  # fmt: skip
def test_mqar_batch_rejects_impossible_tasks(args, name):
    with pytest.raises(ValueError, match=name):
        mqar_batch(2, *args, torch.Generator())


@pytest.mark.parametrize("window", [1, 3, 40])
def test_sliding_window_mask_agrees_with_flex_attention(window):
    """The CPU path (SDPA with a [T, T] mask) and FlexAttention with the CUDA path's block mask (run eagerly on
    the CPU here) give the same output."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = torch.randn(3, 2, 2, 40, 16, generator=torch.Generator().manual_seed(2)).unbind(0)
    expected = sliding_window_attention(q, k, v, window)
    with warnings.catch_warnings():  # "called without torch.compile": the unfused eager form, fine at this size
        warnings.simplefilter("ignore", UserWarning)
        got = flex.flex_attention(q, k, v, block_mask=_block_mask(40, window, "cpu"))
    assert (got - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("short_conv", [False, True])
def test_sliding_window_layer_is_causal(short_conv):
    """Changing token t changes no output before t (with or without the short convolutions)."""
    from examples.mqar.model import SlidingWindowAttention

    layer = SlidingWindowAttention(32, 2, 4, short_conv=short_conv)
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[:, 7] += 1.0
    before, after = layer(x)[0], layer(changed)[0]
    assert torch.equal(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7], after[:, 7])


def toy_runs() -> set[tuple[str, int, int]]:
    """(method, W or N, seed) of the toy preset."""
    toy = sweep.TOY
    return {("swa", w, s) for w in toy["swa_windows"] for s in toy["seeds"]} | {
        ("bla", n, s) for n in toy["bla_resolutions"] for s in toy["seeds"]
    }


def run_id(run: dict) -> tuple[str, int, int]:
    method = run["config"]["method"]
    return method["name"], method["window" if method["name"] == "swa" else "resolution"], run["config"]["seed"]


def test_toy_sweep_end_to_end_and_resumes(tmp_path, capsys):
    """`python -m examples.mqar --toy` writes every run of the preset with accuracies in [0, 1]; run again, it
    trains nothing and leaves the JSON as it was; with one more seed, it trains only that seed's runs."""
    out = tmp_path / "toy.json"
    flags = ["--toy", "--device", "cpu", "--no-progress", "--out", str(out)]
    first = subprocess.run([sys.executable, "-m", "examples.mqar", *flags], cwd=REPO, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert sorted(map(run_id, runs)) == sorted(toy_runs())
    for run in runs:
        assert 0.0 <= run["result"]["accuracy"] <= 1.0 and math.isfinite(run["result"]["final_loss"])
        _, size, _ = run_id(run)
        assert run["state_floats"] == 2 * size * 16  # head_dim 16
        assert run["command"].endswith("-m examples.mqar " + " ".join(flags))
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in first.stdout
    else:
        assert out.with_suffix(".png").stat().st_size > 0

    written = out.read_bytes()
    sweep.main(flags)  # in this process: the same code as the command, without a second start-up
    assert "6 runs, 6 already in" in capsys.readouterr().out
    assert out.read_bytes() == written

    sweep.main([*flags, "--seeds", "0", "1", "2", "--swa-windows", "4", "--bla-resolutions"])
    assert "3 runs, 2 already in" in capsys.readouterr().out
    runs = json.loads(out.read_text())["runs"]
    assert sorted(map(run_id, runs)) == sorted(toy_runs() | {("swa", 4, 2)})


def test_sweeps_side_by_side_merge_and_plot_each_seed_at_its_best_learning_rate(tmp_path, capsys, monkeypatch):
    """Two toy sweeps at different learning rates into their own files (as gpu_sweep.sh's workers), merged:
    every run once, both learning rates reach the plot, which takes per method, state size and seed the best
    accuracy over learning rates."""
    flags = ["--toy", "--device", "cpu", "--no-progress", "--swa-windows", "4", "--bla-resolutions", "--seeds", "0"]
    parts = [tmp_path / "lr3e-3.json", tmp_path / "lr1e-2.json"]
    for path, lr in zip(parts, ["3e-3", "1e-2"]):
        sweep.main([*flags, "--lrs", lr, "--out", str(path)])
    plotted = []
    monkeypatch.setattr(sweep, "plot", lambda runs, path, label, title: plotted.append(runs))
    out = tmp_path / "all.json"
    sweep.main([*flags, "--out", str(out), "--merge", *map(str, parts), str(parts[0])])
    assert "2 runs in" in capsys.readouterr().out
    runs = json.loads(out.read_text())["runs"]
    assert sorted(run["config"]["training"]["lr"] for run in runs) == [3e-3, 1e-2]
    assert plotted == [runs]
    accuracies = [run["result"]["accuracy"] for run in runs]
    assert best_accuracies(runs, sweep.label) == {"SWA": {runs[0]["state_floats"]: [max(accuracies)]}}


@pytest.mark.parametrize("flags,message", [
    (["--d-model", "30", "--heads", "4"], "--d-model"),
    (["--seq-len", "6"], "seq_len"),
    (["--steps", "0"], "--steps"),
    (["--bla-slots", "many"], "--bla-slots"),
])  # fmt: skip
def test_bad_flags_are_named(flags, message, capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(["--toy", *flags])
    assert message in capsys.readouterr().err


def test_bad_layer_arguments_stop_the_sweep_before_any_run(tmp_path):
    """An even BLA resolution below the window: the layer's error, before the first run trains."""
    out = tmp_path / "toy.json"
    with pytest.raises(ValueError, match="resolution"):
        sweep.main(["--toy", "--no-progress", "--bla-resolutions", "5", "4", "--out", str(out)])
    assert not out.exists()


def test_list_specs_names_the_kernels_of_the_bla_runs(capsys):
    """--list-specs: KernelSpec fields of the toy's one BLA layer, at the training chunk length with the backward
    kernels and at the evaluation's with the forward's, no final-state kernel (the model asks for none); no run
    starts."""
    from bla_tvm.dispatch import phase_kernels
    from bla_tvm.layer import KernelSpec

    sweep.main(["--toy", "--list-specs"])
    specs = json.loads(capsys.readouterr().out)
    kernels = set()
    for fields in specs:
        spec = KernelSpec(**{k: v for k, v in fields.items() if k != "kernels"})
        assert (spec.window, spec.resolution, spec.num_slots, spec.head_k, spec.head_v) == (8, 5, 5, 16, 16)
        kernels |= set(fields["kernels"])
    assert set(phase_kernels(True, final_state=False)) == kernels and 1 <= len(specs) <= 2


def test_list_specs_names_the_tile_programs_of_bfloat16_runs(capsys):
    """With --dtype bfloat16 (autocast: the layer calls the op with bf16 q, k, v) the specs are bfloat16 at the
    tile programs' L = 64 and list the kernels that run there: the tile programs (what
    dispatch.implementations picks on CUDA), not the TE kernels they stand in for or absorb."""
    from bla_tvm.layer import KernelSpec
    from bla_tvm.tile_constants import TILE_CHUNK

    sweep.main(["--dtype", "bfloat16", "--swa-windows", "--bla-resolutions", "31", "63", "--bla-slots", "W",
                "--list-specs"])  # fmt: skip
    specs = json.loads(capsys.readouterr().out)
    assert [(f["resolution"], f["num_slots"]) for f in specs] == [(31, 256), (63, 256)]
    for fields in specs:
        spec = KernelSpec(**{k: v for k, v in fields.items() if k != "kernels"})
        assert (spec.dtype, spec.chunk_size, spec.head_k, spec.window) == ("bfloat16", TILE_CHUNK, 64, 256)
        assert fields["kernels"] == ["chunk_backward_tile", "chunk_output_tile", "state_scan_reverse_tile",
                                     "state_scan_tile"]  # fmt: skip


def test_swa_learns_a_small_mqar_on_the_cpu():
    """The trainer end to end on a task SWA must solve: with the whole sequence in its window (T 16, 2 pairs,
    vocabulary 32, 300 steps at lr 3e-3) it answers nearly every query; with W = 1 (each token sees only itself,
    so no key reaches its query) it stays near chance (1 / 16 values). A broken mask, misaligned targets or
    loss mask, or a model that cannot route a value to its query fails the first; a leak of later tokens the
    second. At the GPU sweep's size (vocabulary 8192, T 256, 16 pairs) SWA's recall appears only after a
    plateau at ln(vocab / 2) whose length grows with the vocabulary and shrinks with the learning rate."""
    from examples.mqar.train import train_run

    config = dict(
        task=dict(seq_len=16, num_kv_pairs=2, vocab_size=32, power_a=0.01),
        model=dict(d_model=32, layers=2, heads=2),
        training=dict(steps=300, batch_size=32, lr=3e-3, weight_decay=0.1, warmup=0.1, eval_examples=256,
                      dtype="float32"),
        seed=0,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend (seconds instead of tens on two cores)
    try:
        whole = train_run(dict(config, method=dict(name="swa", window=16, kernel="sdpa")), torch.device("cpu"), progress=False)
        alone = train_run(dict(config, method=dict(name="swa", window=1, kernel="sdpa")), torch.device("cpu"), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert whole["accuracy"] > 0.9, whole
    assert alone["accuracy"] < 0.2, alone
