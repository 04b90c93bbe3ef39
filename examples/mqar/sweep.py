"""The MQAR sweep: accuracy against state size per layer-head, for sliding-window attention (window W: 2 W
head_dim floats) and BLA (resolution N: 2 N head_dim floats), over several seeds and learning rates (the plot
shows each method at its best learning rate, per seed, as Zoology does).

    python -m examples.mqar --toy                       # seconds on a CPU
    python -m examples.mqar --device cuda               # the full sweep (defaults below)
    python -m examples.mqar --list-specs > specs.json   # its CUDA kernels, for `bla-tvm build --specs`

Writes the JSON of results after every run ({"runs": [{"config", "result", "state_floats", "device",
"compiled", "command"}, ...]}) and, at the end, the PNG beside it (``plot``). A run whose config is already in
the JSON is skipped, so an interrupted sweep resumes where it stopped and a sweep with other methods adds to
the same file; the PNG shows every run in the JSON with this sweep's task, model and training (any lr).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bla_tvm.dispatch import default_chunk_size, implementations, phase_kernels
from bla_tvm.layer import LayerSpec

from .data import check_task
from .model import num_slots, state_floats
from .plot import plot
from .train import build_model, train_run

#: the full sweep: the issue's setting (d_model 128, 2 layers, 2 heads of 64, T 256, 16 pairs, vocabulary 8192)
FULL = dict(
    d_model=128, layers=2, heads=2, seq_len=256, kv_pairs=16, vocab=8192, power_a=0.01, steps=4000, batch_size=64,
    lrs=[3e-3, 1e-3], weight_decay=0.1, warmup=0.1, eval_examples=1024, dtype="float32", seeds=[0, 1, 2],
    swa_windows=[16, 32, 64, 128, 256], bla_window=256, bla_resolutions=[15, 31, 63, 127], bla_slots="N",
    out="examples/mqar/results/mqar.json",
)  # fmt: skip
#: seconds on a CPU; the BLA layer (W 8, N = M 5, head dim 16) is tests/test_nn.py's, whose kernels it shares
TOY = dict(
    FULL, d_model=32, layers=1, heads=2, seq_len=16, kv_pairs=2, vocab=32, steps=12, batch_size=8, lrs=[3e-3],
    eval_examples=16, seeds=[0, 1], swa_windows=[4, 8], bla_window=8, bla_resolutions=[5],
    out="examples/mqar/results/toy.json",
)  # fmt: skip


def slots(value: str):
    """--bla-slots: "N" (M = N), "W" (M = W, the fine slot grid) or a number of slots."""
    if value in ("N", "W"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bla-slots must be N, W or an int, got {value!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.mqar", description=__doc__.split("\n\n")[0],
        epilog="In parentheses: the full sweep's default (--toy sets its own, listed in examples/mqar/sweep.py).",
    )  # fmt: skip
    parser.add_argument("--toy", action="store_true", help="the toy preset (seconds on a CPU); flags override it")
    add = parser.add_argument
    add("--d-model", type=int, help=f"model width ({FULL['d_model']})")
    add("--layers", type=int, help=f"blocks ({FULL['layers']})")
    add("--heads", type=int, help=f"attention heads; head_dim = d_model / heads ({FULL['heads']})")
    add("--seq-len", type=int, help=f"tokens per example ({FULL['seq_len']})")
    add("--kv-pairs", type=int, help=f"key-value pairs per example ({FULL['kv_pairs']})")
    add("--vocab", type=int, help=f"vocabulary: keys below vocab / 2, values above ({FULL['vocab']})")
    add("--power-a", type=float, help=f"power law of the query positions ({FULL['power_a']})")
    add("--steps", type=int, help=f"training steps per run ({FULL['steps']})")
    add("--batch-size", type=int, help=f"examples per step ({FULL['batch_size']})")
    add("--lrs", type=float, nargs="+", help=f"peak learning rates, each a run ({' '.join(map(str, FULL['lrs']))})")
    add("--weight-decay", type=float, help=f"AdamW weight decay ({FULL['weight_decay']})")
    add("--warmup", type=float, help=f"fraction of steps of linear warm-up ({FULL['warmup']})")
    add("--eval-examples", type=int, help=f"held-out examples for the accuracy ({FULL['eval_examples']})")
    add("--dtype", choices=["float32", "bfloat16"], help="float32, or bfloat16 autocast (float32)")
    add("--seeds", type=int, nargs="+", help=f"seeds per configuration ({FULL['seeds']})")
    add("--swa-windows", type=int, nargs="*", help=f"SWA windows W; none: no SWA runs ({FULL['swa_windows']})")
    add("--swa-kernel", choices=["sdpa", "flex"], default="sdpa",
        help="SWA through SDPA with a mask, or compiled FlexAttention (sdpa)")
    add("--swa-short-conv", action="store_true", help="SWA layers with the BLA layer's short convolutions")
    add("--bla-resolutions", type=int, nargs="*",
        help=f"BLA resolutions N (odd, or = window); none: no BLA runs ({FULL['bla_resolutions']})")
    add("--bla-window", type=int, help=f"BLA's window W ({FULL['bla_window']})")
    add("--bla-slots", type=slots, help="BLA's slots M: N, W or a number (N)")
    add("--bla-short-conv", action="store_true", help="BLA layers with short convolutions on q, k, v")
    add("--bla-feature-map", choices=["swish", "relu", "elu"], help="BLA's feature map on q and k (none)")
    add("--bla-output-gate", action="store_true", help="BLA layers with a swish output gate")
    add("--bla-norm", action="store_true", help="BLA layers with RMSNorm of each head's output")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (cuda if available)")
    add("--compile", action="store_true", help="train through torch.compile (not part of a run's config)")
    add("--out", type=Path, help="results JSON; the PNG is written beside it (examples/mqar/results/mqar.json, "
        "toy.json with --toy)")
    add("--no-progress", action="store_true", help="no progress bars")
    add("--deadline", type=float, help="a Unix time after which no run starts (the runs left stay pending: the "
        "next sweep resumes them); for a machine lent for a fixed time (examples/mqar/gpu_sweep.sh)")
    add("--merge", type=Path, nargs="+", metavar="JSON",
        help="add the runs of these results files (sweeps run side by side) to --out, plot, and run nothing")
    add("--list-specs", action="store_true",
        help="print the CUDA kernel specs the sweep's BLA runs load, as `bla-tvm build --specs` reads them, and exit")
    args = parser.parse_args(argv)
    preset = TOY if args.toy else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, Path(value) if name == "out" else value)
    for name in ("d_model", "layers", "heads", "steps", "batch_size", "eval_examples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.d_model % args.heads:
        parser.error(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")
    try:
        check_task(args.seq_len, args.kv_pairs, args.vocab)
    except ValueError as error:
        parser.error(str(error))
    return args


def run_configs(args: argparse.Namespace) -> list[dict]:
    """Every run of the sweep: every method for the first seed at the first learning rate, then at the next, ...,
    then the next seed; SWA first, in the order of the flags. A sweep cut short (the JSON is written after every
    run) still has whole curves."""
    shared = {
        "task": dict(seq_len=args.seq_len, num_kv_pairs=args.kv_pairs, vocab_size=args.vocab, power_a=args.power_a),
        "model": dict(d_model=args.d_model, layers=args.layers, heads=args.heads),
    }
    training = dict(steps=args.steps, batch_size=args.batch_size, weight_decay=args.weight_decay, warmup=args.warmup,
                    eval_examples=args.eval_examples, dtype=args.dtype)  # fmt: skip
    bla = dict(name="bla", window=args.bla_window, slots=args.bla_slots, short_conv=args.bla_short_conv,
               feature_map=args.bla_feature_map, output_gate=args.bla_output_gate, norm=args.bla_norm)  # fmt: skip
    swa = dict(name="swa", kernel=args.swa_kernel) | ({"short_conv": True} if args.swa_short_conv else {})
    methods = [dict(swa, window=w) for w in args.swa_windows]
    methods += [dict(bla, resolution=n) for n in args.bla_resolutions]
    return [dict(shared, training=dict(training, lr=lr), method=method, seed=seed)
            for seed in args.seeds for lr in args.lrs for method in methods]  # fmt: skip


def key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def setting(config: dict) -> str:
    """The key of a run's task, model and training but its learning rate: the runs one plot compares."""
    training = {name: value for name, value in config["training"].items() if name != "lr"}
    return key(dict(task=config["task"], model=config["model"], training=training))


def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return json.load(f)["runs"]


def save(path: Path, runs: list[dict]) -> None:
    """Write the JSON atomically (a killed sweep leaves the previous file, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        json.dump({"runs": runs}, f, indent=1)
    os.replace(partial, path)


def merged(*files: list[dict]) -> list[dict]:
    """The runs of every file, in order, each config once (the first record of it)."""
    seen, runs = set(), []
    for run in (run for file in files for run in file):
        if key(run["config"]) not in seen:
            seen.add(key(run["config"]))
            runs.append(run)
    return runs


def label(run: dict) -> str:
    """What one line of the plot shows: SWA, or BLA with its window, slots and layer options."""
    method = run["config"]["method"]
    if method["name"] == "swa":
        name = "SWA" if method.get("kernel", "flex") == "sdpa" else "SWA (FlexAttention)"
        return name + (", short_conv" if method.get("short_conv") else "")
    options = [name for name in ("short_conv", "output_gate", "norm") if method[name]]
    options += [f"phi={method['feature_map']}"] if method["feature_map"] else []
    return f"BLA W={method['window']} M={method['slots']}" + "".join(f", {o}" for o in options)


def kernel_specs(configs: list[dict]) -> list[dict]:
    """The CUDA kernels the BLA runs of ``configs`` load, as KernelSpec fields with "kernels": per layer, the
    forward and backward kernels at the training chunk length and the forward's at the evaluation's (no grad),
    each the op's default (``dispatch.default_chunk_size``; no shipped tuning log has these layers). The kernels
    are those that run (``dispatch.implementations``: the tile programs for 16-bit inputs, which stand in for
    chunk_output, state_scan, chunk_backward and state_scan_reverse and absorb chunk_state and
    input_gradient_k/_v), without the final-state kernels: the model never asks for a final state."""
    cuda = torch.device("cuda")  # only its kind is read: no GPU needed
    specs = {}
    for config in configs:
        method, model = config["method"], config["model"]
        if method["name"] != "bla":
            continue
        head_dim = model["d_model"] // model["heads"]
        layer = LayerSpec(method["window"], method["resolution"], num_slots(method), head_dim, head_dim,
                          config["training"]["dtype"], 1)  # fmt: skip
        for backward in (True, False):
            chunk = default_chunk_size(cuda, layer, backward)
            runs = implementations(phase_kernels(backward, final_state=False), layer.kernel(chunk), cuda)
            spec = dict(layer.as_dict(), chunk_size=chunk)
            specs.setdefault(key(spec), (spec, set()))[1].update(runs.values())
    return [dict(spec, kernels=sorted(names)) for spec, names in specs.values()]


def main(argv=None) -> None:
    args = parse_args(argv)
    configs = run_configs(args)
    if args.list_specs:
        print(json.dumps(kernel_specs(configs), indent=1))
        return
    for config in configs:  # every layer's arguments are checked before the first run starts
        build_model(config)
    runs = load(args.out)
    if args.merge:
        runs = merged(runs, *map(load, args.merge))
        save(args.out, runs)
        print(f"{len(runs)} runs in {args.out}")
        return plot_sweep(args, runs)
    done = {key(run["config"]) for run in runs}
    pending = [config for config in configs if key(config) not in done]
    print(f"{len(configs)} runs, {len(configs) - len(pending)} already in {args.out}, {len(pending)} to do")
    device = torch.device(args.device)
    head_dim = args.d_model // args.heads
    command = shlex.join([Path(sys.executable).name, "-m", "examples.mqar", *(sys.argv[1:] if argv is None else argv)])
    for i, config in enumerate(pending):
        if args.deadline is not None and time.time() > args.deadline:
            print(f"deadline passed: {len(pending) - i} runs left for a later sweep (it resumes from {args.out})")
            break
        method = config["method"]
        size = f"W={method['window']}" if method["name"] == "swa" else f"N={method['resolution']}"
        description = f"[{i + 1}/{len(pending)}] {method['name']} {size} seed {config['seed']} lr {config['training']['lr']}"
        result = train_run(config, device, description, progress=not args.no_progress, compiled=args.compile)
        runs.append(dict(config=config, result=result, state_floats=state_floats(method, head_dim),
                         device=str(device), compiled=args.compile, command=command))  # fmt: skip
        save(args.out, runs)
        tqdm.write(f"{description}: accuracy {result['accuracy']:.3f} ({result['seconds']:.0f} s)")
    plot_sweep(args, runs)


def plot_sweep(args: argparse.Namespace, runs: list[dict]) -> None:
    """The PNG beside --out of the ``runs`` with this sweep's task, model and training (any learning rate)."""
    shared = {setting(config) for config in run_configs(args)}
    mine = [run for run in runs if setting(run["config"]) in shared]
    plot(mine, args.out.with_suffix(".png"), label, title=title(args))


def title(args: argparse.Namespace) -> str:
    return (f"MQAR: T={args.seq_len}, {args.kv_pairs} pairs, vocab {args.vocab}; d_model {args.d_model}, "
            f"layers {args.layers}, heads {args.heads};\n{args.steps} steps, best of lr {sorted(args.lrs)}")  # fmt: skip
