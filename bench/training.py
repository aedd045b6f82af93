"""On-device training benchmark: QAS, sparse update against its baselines, memory against the
paper (Fig. 10a) and PyTorch, and the engine's step time.

Run: .venv/bin/python -m bench.training qas|budgets|memory|torch|steps|all [--family DIR]
Needs a digits family (`tinyfleet train-supernet --data digits --out var/families/digits`)
and its contribution analysis (`tinyfleet contributions var/families/digits`) for qas,
budgets and steps. Anchors: "On-Device Training Under 256KB Memory" (Lin, Zhu et al., 2022):
Table 1 (int8 with QAS matches fp32, without it falls behind), Fig. 10a (STM32F746, 128x128:
MobileNetV2-w0.35 2939 / 335 / 141 kB and MCUNet-5FPS 3650 / 560 / 173 kB for full update /
sparse / sparse + reordering).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from firmware.data import Split, load_dataset, shifted
from firmware.frontend.builtin import build_graph, builtin_config
from firmware.int8.quantize import QuantizedGraph
from firmware.ir import Graph
from firmware.nas.family import load_family
from firmware.personalize import (
    analysis_arch,
    int8_samples,
    load_contributions,
    quantized_subnet,
)
from firmware.training.analysis.planner import best_gain, plan_scheme
from firmware.training.engine.blas import one_blas_thread
from firmware.training.engine.trainer import Precision, Trainer
from firmware.training.memory import BufferKind, StepModel
from firmware.training.positions import conv_layers
from firmware.training.samples import Samples
from firmware.training.scheme import ClassifierMode, SparseUpdateScheme, WeightUpdate

KIB = 1024
FAMILY = Path("var/families/digits")
VAR = Path("var")
PAPER_FIG10A = {"mobilenetv2-w0.35": (2939, 335, 141), "mcunet-5fps": (3650, 560, 173)}


@dataclass
class Bench:
    """The digits family's analysed subnet, int8, with both halves of the shifted digits:
    learning rates are tuned on the analysis half (held out), results come from the device
    half (trained on its train split, measured on its val + test splits)."""

    qgraph: QuantizedGraph
    train: Samples
    test: Samples
    tune_train: Samples
    tune_test: Samples
    contributions: object


def _both(split: object) -> Split:
    return Split(np.concatenate([split.val.images, split.test.images]),  # type: ignore[attr-defined]
                 np.concatenate([split.val.labels, split.test.labels]))  # type: ignore[attr-defined]


def load(family_dir: Path) -> Bench:
    """Everything the accuracy benchmarks share."""
    family, supernet = load_family(family_dir)
    dataset = load_dataset(family.data_source)
    qgraph = quantized_subnet(supernet, dataset, analysis_arch(family.space))
    device, held_out = shifted(dataset, "device"), shifted(dataset, "analysis")
    return Bench(qgraph, int8_samples(qgraph, device.train), int8_samples(qgraph, _both(device)),
                 int8_samples(qgraph, held_out.train), int8_samples(qgraph, _both(held_out)),
                 load_contributions(VAR, family))


def train_eval(b: Bench, scheme: SparseUpdateScheme, steps: int, seed: int,
               precision: Precision = Precision.INT8, tuning: bool = False
               ) -> tuple[float, float, float]:
    """(accuracy before, after, ms per step) of `steps` steps in a seeded order; on the
    analysis half with `tuning`, else on the device half."""
    trainer = Trainer(b.qgraph, scheme, precision=precision, check=False)
    start = trainer.resolved.region_start
    train_set, test_set = (b.tune_train, b.tune_test) if tuning else (b.train, b.test)
    if precision is Precision.FP32:
        # The fp32 baseline runs the float graph on the dequantized int8 inputs.
        train = [trainer.prefix(b.qgraph.input.dequantize(x), start)
                 for x in train_set.images]
        test = [trainer.prefix(b.qgraph.input.dequantize(x), start) for x in test_set.images]
    else:
        train, test = trainer.prefixes(train_set.images), trainer.prefixes(test_set.images)
    labels = list(test_set.labels)
    before = trainer.accuracy(test, labels)
    order = np.random.default_rng(seed).permutation(
        np.resize(np.arange(len(train_set)), steps))
    clock = time.perf_counter()
    for i in order:
        loss = trainer.step(None, int(train_set.labels[i]), train[i]).loss
        if not math.isfinite(loss):
            return before, float("nan"), 0.0
    ms = 1000 * (time.perf_counter() - clock) / steps
    return before, trainer.accuracy(test, labels), ms


RATES = (0.002, 0.005, 0.01, 0.02, 0.05)


def tuned_lr(b: Bench, scheme: SparseUpdateScheme, steps: int,
             precision: Precision = Precision.INT8) -> tuple[float, dict[float, float]]:
    """The learning rate of RATES with the best accuracy on the analysis half (seed 100)."""
    tried = {lr: train_eval(b, replace(scheme, lr=lr), steps, 100, precision, tuning=True)[1]
             for lr in RATES}
    best = max(tried, key=lambda r: (tried[r] if math.isfinite(tried[r]) else -1.0, -r))
    return best, tried


def last_blocks_scheme(graph: Graph, blocks_convs: int, classifier: ClassifierMode,
                       lr: float) -> SparseUpdateScheme:
    """Weights (all channels) and biases of the last `blocks_convs` convs."""
    convs = [layer.name for layer in conv_layers(graph)][-blocks_convs:]
    return SparseUpdateScheme(bias_layers=len(convs), classifier=classifier, lr=lr,
                              weights=tuple(WeightUpdate(n, 1.0) for n in convs))


def qas(b: Bench, steps: int, seeds: int) -> None:
    """QAS matters: one lr tuned for fp32, reused for int8 with and without QAS."""
    graph = b.qgraph.graph
    base = last_blocks_scheme(graph, 7, ClassifierMode.INT8, RATES[0])
    lr, tuned = tuned_lr(b, base, steps, Precision.FP32)
    print(f"scheme: {base.describe()}; {steps} steps, batch 1, plain SGD")
    print("lr tuned for fp32 on the held-out analysis half (seed 100): "
          + ", ".join(f"{r:g}: {a:.1%}" for r, a in tuned.items()) + f" -> {lr:g}")
    print()
    print("| run | seed 0 | seed 1 | seed 2 | mean | vs fp32 |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for name, scheme, precision in (
            ("fp32", replace(base, lr=lr), Precision.FP32),
            ("int8 + QAS", replace(base, lr=lr), Precision.INT8),
            ("int8, no QAS", replace(base, lr=lr, qas=False), Precision.INT8)):
        accs = [train_eval(b, scheme, steps, seed, precision)[1] for seed in range(seeds)]
        rows[name] = accs
        mean = statistics.fmean(accs)
        ref = statistics.fmean(rows["fp32"])
        print(f"| {name} | " + " | ".join(f"{a:.1%}" for a in accs)
              + f" | **{mean:.1%}** | {100 * (mean - ref):+.1f} pt |")
    before = train_eval(b, replace(base, lr=lr), 1, 0)[0]
    print(f"\nbefore fine-tuning (int8): {before:.1%}")


def budgets(b: Bench, steps: int, seeds: int) -> None:
    """Planned sparse schemes at 2-3 budgets beside the paper's baselines."""
    graph = b.qgraph.graph
    c = b.contributions
    lr = c.settings.lr  # type: ignore[attr-defined]
    convs = len(conv_layers(graph))
    model = StepModel(graph)
    full = last_blocks_scheme(graph, convs, ClassifierMode.FP32, lr)
    rows: list[tuple[str, SparseUpdateScheme]] = [
        ("classifier only", SparseUpdateScheme(lr=lr)),
        ("bias only, last 10 convs", SparseUpdateScheme(bias_layers=10, lr=lr)),
        ("full last 4 convs (W + b)", last_blocks_scheme(graph, 4, ClassifierMode.FP32, lr)),
        ("full last 10 convs (W + b)", last_blocks_scheme(graph, 10, ClassifierMode.FP32, lr)),
        ("full update (all layers)", full),
    ]
    full_bytes = model.peaks(full)[1]
    for share in (0.02, 0.05, 0.1):
        planned = plan_scheme(graph, c, int(share * full_bytes))  # type: ignore[arg-type]
        rows.append((f"planned, budget {share:.0%} of full ({share * full_bytes / KIB:.0f} kB)",
                     planned.scheme))
    print(f"{graph.name}, shifted digits (device half): {len(b.train)} training, "
          f"{len(b.test)} test samples; {steps} steps, batch 1, {seeds} seeds, each scheme at "
          f"its best lr of {', '.join(map(str, RATES))} on the held-out analysis half; "
          f"predicted best gain {best_gain(graph, c):+.1%}")  # type: ignore[arg-type]
    print()
    print("| scheme | training memory | of full | lr | accuracy after (mean) | gain | of full's "
          "gain | ms/step |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for name, scheme in rows:
        scheme = replace(scheme, lr=tuned_lr(b, scheme, steps)[0])
        runs = [train_eval(b, scheme, steps, seed) for seed in range(seeds)]
        before = runs[0][0]
        after = statistics.fmean(r[1] for r in runs)
        results.append((name, scheme, model.peaks(scheme)[1], before, after,
                        statistics.fmean(r[2] for r in runs)))
    full_gain = results[4][4] - results[4][3]
    for name, scheme, nbytes, before, after, ms in results:
        print(f"| {name}: {_short(scheme)} | {nbytes / KIB:.1f} kB | "
              f"{nbytes / full_bytes:.1%} | {scheme.lr:g} | {after:.1%} | "
              f"{100 * (after - before):+.1f} pt | {(after - before) / full_gain:.0%} | "
              f"{ms:.1f} |")
    print(f"\nbefore fine-tuning: {results[0][3]:.1%}")


def _short(scheme: SparseUpdateScheme) -> str:
    """A scheme in a table cell: classifier, bias depth, weights (a full update abridged)."""
    if len(scheme.weights) > 12:
        return f"all {len(scheme.weights)} convs' weights and biases, classifier"
    return scheme.describe()


def paper_schemes(graph: Graph) -> dict[str, SparseUpdateScheme]:
    """Full update and a paper-like sparse update (position-based, so comparable across
    networks): biases of the last 12 convs, weights of the last two blocks' 1x1 convs on
    1/4 (expand) and 1/2 (project) of their input channels, fp32 classifier."""
    names = [layer.name for layer in conv_layers(graph)]
    from firmware.training.positions import Position, Role
    from firmware.training.scheme import SchemeTemplate

    sparse = SchemeTemplate(12, ((Position(1, Role.PROJECT), 0.5),
                                 (Position(1, Role.EXPAND), 0.25),
                                 (Position(2, Role.PROJECT), 0.5),
                                 (Position(2, Role.EXPAND), 0.25))).instantiate(graph)
    full = SparseUpdateScheme(bias_layers=len(names),
                              weights=tuple(WeightUpdate(n, 1.0) for n in names))
    return {"full": full, "sparse": sparse}


def networks(classes: int) -> dict[str, Graph]:
    """The paper's networks at 128x128 (MobileNetV2-w0.35 with the zoo's 448-wide head)."""
    mbv2 = replace(builtin_config("mobilenetv2", 0.35, 128, classes), head_channels=448)
    return {
        "mobilenetv2-w0.35": build_graph(mbv2, with_weights=False),
        "mcunet-5fps": build_graph(builtin_config("mcunet-5fps", 1.0, 128, classes),
                                   with_weights=False),
        "proxylessnas-w0.3": build_graph(builtin_config("proxylessnas", 0.3, 128, classes),
                                         with_weights=False),
    }


def memory(classes: int) -> None:
    """Our training memory beside the paper's Fig. 10a."""
    print(f"128x128 input, {classes} classes, int8 activations, batch 1, inplace memory model")
    print()
    print("| network | inference peak | full update (one arena / training buffers) | sparse |"
          " sparse + reordering | of which fp32 masters / weight gradients at the peak |"
          " paper: full / sparse / sparse + reordering |")
    print("|---|---|---|---|---|---|---|")
    for name, graph in networks(classes).items():
        model = StepModel(graph)
        schemes = paper_schemes(graph)
        full = model.report(schemes["full"], reorder=False)
        sparse = model.report(schemes["sparse"], reorder=False)
        fast = model.report(schemes["sparse"], reorder=True)
        paper = PAPER_FIG10A.get(name)
        print(f"| {name} | {model.inference.peak_bytes / KIB:.0f} kB | "
              f"{full.step_peak_bytes / KIB:.0f} / {full.training_bytes / KIB:.0f} kB | "
              f"{sparse.step_peak_bytes / KIB:.0f} / {sparse.training_bytes / KIB:.0f} kB | "
              f"{fast.step_peak_bytes / KIB:.0f} / {fast.training_bytes / KIB:.0f} kB | "
              f"{fast.by_kind[BufferKind.MASTER] / KIB:.0f} / "
              f"{fast.by_kind[BufferKind.WEIGHT_GRAD] / KIB:.0f} kB | "
              + (f"{paper[0]} / {paper[1]} / {paper[2]} kB |" if paper else "- |"))
    print()
    for name, graph in networks(classes).items():
        s = paper_schemes(graph)["sparse"]
        print(f"{name} sparse scheme: {s.describe()}")


def _torch_config(name: str, classes: int) -> object:
    if name.startswith("mobilenetv2"):
        return replace(builtin_config("mobilenetv2", 0.35, 128, classes), head_channels=448)
    if name == "mcunet-5fps":
        return builtin_config("mcunet-5fps", 1.0, 128, classes)
    return builtin_config("proxylessnas", 0.3, 128, classes)


def torch_one(name: str, classes: int) -> None:
    """In a fresh process: one full fine-tuning step of `name` in PyTorch (batch 1, SGD),
    its RSS growth and its torch.profiler peak; prints one JSON line."""
    import json

    import torch
    from torch.profiler import ProfilerActivity, profile

    from firmware.nas.supernet import SubnetModule

    torch.set_num_threads(1)
    model = SubnetModule(_torch_config(name, classes)).train()  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(1, 3, 128, 128)
    y = torch.tensor([1])

    def step() -> None:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    gc.collect()
    rss_before = _rss_bytes()
    step()
    rss_growth = _rss_bytes() - rss_before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()),
                      "rss_growth": rss_growth, "profiler_peak": _profiler_peak(prof),
                      "rss_total": _rss_bytes()}))


def torch_memory(classes: int) -> None:
    """PyTorch's own full fine-tuning at batch 1 beside our model of the same networks."""
    import json
    import subprocess
    import sys

    print("| network | parameters | torch.profiler peak of one step | RSS growth of the first "
          "step (process RSS) | ours: full update (one arena) | ours: sparse + reordering "
          "(one arena) | profiler peak / ours sparse |")
    print("|---|---|---|---|---|---|---|")
    for name, graph in networks(classes).items():
        out = subprocess.run([sys.executable, "-m", "bench.training", "torch-one", "--net", name,
                              "--classes", str(classes)], check=True, capture_output=True,
                             text=True).stdout
        doc = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
        m = StepModel(graph)
        schemes = paper_schemes(graph)
        full = m.report(schemes["full"], reorder=False).step_peak_bytes
        fast = m.report(schemes["sparse"], reorder=True).step_peak_bytes
        print(f"| {name} | {doc['params'] / 1e6:.2f} M | {doc['profiler_peak'] / KIB:,.0f} kB | "
              f"{doc['rss_growth'] / KIB:,.0f} kB ({doc['rss_total'] / 2**20:,.0f} MB) | "
              f"{full / KIB:,.0f} kB | {fast / KIB:,.0f} kB | "
              f"{doc['profiler_peak'] / fast:,.0f}x |")


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _profiler_peak(prof: object) -> int:
    """Peak of the running sum of every op's own (self) CPU allocations, in start order."""
    events = sorted((evt.time_range.start, evt.self_cpu_memory_usage)
                    for evt in prof.profiler.function_events  # type: ignore[attr-defined]
                    if evt.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def steps(b: Bench | None, classes: int) -> None:
    """Per-step training time of the engine here (full steps, arena checked)."""
    print("| network | scheme | full step (forward from the input) | step from cached frozen "
          "prefix |")
    print("|---|---|---|---|")
    cases: list[tuple[str, QuantizedGraph, SparseUpdateScheme, np.ndarray]] = []
    if b is not None:
        plan = plan_scheme(b.qgraph.graph, b.contributions, 32 * KIB)  # type: ignore[arg-type]
        cases.append((b.qgraph.graph.name, b.qgraph, plan.scheme, b.train.images))
    from firmware.int8.quantize import quantize_graph

    graph = build_graph(builtin_config("mcunet-5fps", 1.0, 128, classes), seed=0)
    rng = np.random.default_rng(0)
    q = quantize_graph(graph, rng.standard_normal((4, 3, 128, 128)).astype(np.float32))
    images = np.ascontiguousarray(q.input.quantize(
        rng.standard_normal((6, 3, 128, 128)).astype(np.float32)).transpose(0, 2, 3, 1))
    cases.append(("mcunet-5fps r128", q, paper_schemes(graph)["sparse"], images))
    for name, qgraph, scheme, imgs in cases:
        trainer = Trainer(qgraph, scheme)
        clock = time.perf_counter()
        for i in range(3):
            trainer.step(imgs[i], 1)
        full = (time.perf_counter() - clock) / 3
        caches = trainer.prefixes(imgs[:6])
        clock = time.perf_counter()
        for i in range(6):
            trainer.step(None, 1, caches[i])
        cached = (time.perf_counter() - clock) / 6
        print(f"| {name} | {scheme.describe()} | {1000 * full:.0f} ms | {1000 * cached:.1f} ms |")


def main() -> None:
    """Print the rows of BENCHMARKS.md's "Training" section."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["qas", "budgets", "memory", "torch", "steps", "all",
                                         "torch-one"])
    parser.add_argument("--net", default="mcunet-5fps", help="torch-one: the network")
    parser.add_argument("--family", type=Path, default=FAMILY)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    if args.what == "torch-one":
        torch_one(args.net, args.classes)
        return
    with one_blas_thread():
        run(args)


def run(args: argparse.Namespace) -> None:
    """The benchmarks `args.what` names."""
    b = None
    if args.what in ("qas", "budgets", "steps", "all"):
        b = load(args.family)
    if args.what in ("memory", "all"):
        memory(args.classes)
    if args.what in ("torch", "all"):
        torch_memory(args.classes)
    if args.what in ("qas", "all"):
        assert b is not None
        qas(b, args.steps, args.seeds)
    if args.what in ("budgets", "all"):
        assert b is not None
        budgets(b, args.steps, args.seeds)
    if args.what in ("steps", "all"):
        steps(b, args.classes)


if __name__ == "__main__":
    main()
