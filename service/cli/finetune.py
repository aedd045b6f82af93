"""`tinyfleet finetune` (sparse on-device training of a model on your data, as a new model
version) and `tinyfleet contributions` (a model family's contribution analysis)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import click

from firmware.errors import FirmwareError
from service.cli.options import SIZE, kb
from service.cli.ui import progress_bar


def _var_dir() -> Path:
    from service.config import load_config

    return Path(load_config()["VAR_DIR"])


@click.command("finetune")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--data", "data", required=True,
              help="an .npz with x (N,H,W[,C]) and y, or a folder of class folders")
@click.option("--scheme", "scheme_path", type=click.Path(exists=True, dir_okay=False,
                                                         path_type=Path),
              help="a sparse-update scheme (JSON) to train with")
@click.option("--budget", type=SIZE, help="plan the scheme for this training memory instead")
@click.option("--contributions", "contributions_path",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="a contribution analysis for --budget (default: analyse on your data)")
@click.option("--epochs", type=click.FloatRange(0.01, 1000), default=1.0, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="learning rate with --budget (default: the one the analysis chose)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="directory for the new model version (must not exist)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def finetune(model: Path, data: str, scheme_path: Path | None, budget: int | None,
             contributions_path: Path | None, epochs: float, lr: float | None, seed: int,
             out_dir: Path, as_json: bool) -> None:
    """Fine-tune MODEL (.onnx or a version directory) on DATA with a sparse update."""
    from firmware.data import DataError, load_dataset
    from firmware.personalize import int8_samples, load_model, quick_contributions
    from firmware.training.analysis.contributions import Contributions
    from firmware.training.analysis.planner import plan_scheme
    from firmware.training.finetune import finetune as run_finetune
    from firmware.training.model_version import save_version
    from firmware.training.scheme import SparseUpdateScheme

    if (scheme_path is None) == (budget is None):
        raise click.UsageError("give either --scheme SCHEME.json or --budget SIZE")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise click.BadParameter(f"{out_dir} exists and is not empty; give a new directory",
                                 param_hint="--out")
    notes: list[str] = []
    try:
        dataset = load_dataset(data)
        qgraph, origin = load_model(model, dataset.train)
        train = int8_samples(qgraph, dataset.train)
        test = int8_samples(qgraph, dataset.test)
        if scheme_path is not None:
            from service.cli.training_report import load_scheme

            scheme = load_scheme(scheme_path)
        else:
            assert budget is not None
            if contributions_path is not None:
                contributions = Contributions.from_json(contributions_path.read_bytes())
            else:
                notes.append("no --contributions: analysed on a third of the training data")
                click.echo("analysing contributions on your data ...", err=True)
                contributions = quick_contributions(qgraph, train)
            base = None if lr is None else SparseUpdateScheme(lr=lr)
            scheme = plan_scheme(qgraph.graph, contributions, budget, base).scheme
        steps = max(1, round(epochs * len(train)))
        with progress_bar("fine-tuning", steps) as update:
            def progress(step: int, total: int, loss: float) -> None:
                update(step, total, label=f"fine-tuning, loss {loss:.3f}")

            result = run_finetune(qgraph, scheme, train, test, epochs, seed, progress=progress)
        metrics = {**result.metrics(), "data": dataset.source, "origin": origin}
        with tempfile.TemporaryDirectory(prefix=".finetune-",
                                         dir=out_dir.resolve().parent) as tmp:
            staged = Path(tmp) / "version"
            version = save_version(staged, result.trained, qgraph, model, scheme.to_dict(),
                                   metrics)
            (staged / "scheme.json").write_text(scheme.to_json())
            if out_dir.exists():
                out_dir.rmdir()
            shutil.move(str(staged), str(out_dir))
    except (FirmwareError, DataError) as exc:
        raise click.ClickException(str(exc)) from None
    doc: dict[str, Any] = {"version": version.id, "out": str(out_dir), "base": str(model),
                           "base_sha256": version.base_sha256, "changed": list(version.changed),
                           "scheme": scheme.to_dict(), **metrics, "notes": notes}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"{qgraph.graph.name} ({origin}) -> version {version.id} in {out_dir}")
    click.echo(f"  scheme: {scheme.describe()}")
    click.echo(f"  accuracy on {result.test_samples} test samples: "
               f"{result.accuracy_before:.1%} -> {result.accuracy_after:.1%} after "
               f"{result.steps} steps ({result.step_ms:.1f} ms/step here)")
    click.echo(f"  training memory: {kb(result.memory.training_bytes)} "
               f"(one arena for the whole step: {kb(result.memory.step_peak_bytes)})")
    click.echo(f"  changed layers: {', '.join(version.changed)}")
    click.echo(f"  compile it: tinyfleet compile {out_dir} --mcu MCU -o OUT")
    for note in notes:
        click.echo(f"note: {note}", err=True)


def contributions_table(doc: dict[str, Any]) -> str:
    """An analysis as text: accuracies, bias gains by depth, weight gains by position."""
    lines = [f"contributions of {doc['family']} version {doc['family_version']} "
             f"(subnet {doc['graph']}, {doc['train_samples']} training and "
             f"{doc['eval_samples']} held-out samples, {doc['settings']['steps']} steps per "
             f"run at lr {doc['settings']['lrs'][0]:g}, {doc['elapsed_s']:.0f} s)",
             f"  frozen model {doc['baseline_accuracy']:.1%}; classifier only "
             f"{doc['classifier_accuracy']:.1%}",
             "  biases of the last k convs: " + ", ".join(
                 f"k={b['layers']} {b['gain']:+.1%}" for b in doc["bias"])]
    by_pos: dict[str, list[str]] = {}
    for w in doc["weights"]:
        by_pos.setdefault(w["position"], []).append(
            f"r={w['ratio']:g} {w['gain']:+.1%}")
    for pos, parts in by_pos.items():
        lines.append(f"  weights {pos:<14} " + ", ".join(parts))
    return "\n".join(lines)


@click.command("contributions")
@click.argument("family_dir", metavar="FAMILY",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--blocks", type=click.IntRange(1, 50), default=3, show_default=True,
              help="analyse the last N blocks (and the head)")
@click.option("--steps", type=click.IntRange(1, 100_000), default=300, show_default=True,
              help="SGD steps (batch 1) per run")
@click.option("--lr", "lrs", type=click.FloatRange(min=0, min_open=True), multiple=True,
              help="learning rate(s) to try (default 0.005, 0.02, 0.05; the best is used)")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="processes running the analysis runs (same results for any count)")
@click.option("--force", is_flag=True, help="analyse again even if an analysis is stored")
@click.option("--json", "as_json", is_flag=True, help="print the analysis as JSON")
def contributions(family_dir: Path, blocks: int, steps: int, lrs: tuple[float, ...],
                  workers: int, force: bool, as_json: bool) -> None:
    """Analyse what each part of a sparse update is worth for a model FAMILY."""
    from firmware.nas.family import read_manifest
    from firmware.personalize import contributions_path

    try:
        family = read_manifest(family_dir)
    except FirmwareError as exc:
        raise click.ClickException(str(exc)) from None
    path = contributions_path(_var_dir(), family.version)
    if path.is_file() and not force:
        doc = json.loads(path.read_text())
        click.echo(f"stored analysis: {path} (--force to analyse again)", err=True)
    else:
        doc = run_contributions(family_dir, blocks, steps, lrs, workers).to_dict()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(contributions_table(doc))
        click.echo(f"  stored as {path}")


def run_contributions(family_dir: Path, blocks: int = 3, steps: int = 300,
                      lrs: tuple[float, ...] = (), workers: int = 2) -> Any:
    """Analyse a family with a progress bar on stderr and store the result."""
    from firmware.personalize import family_contributions, save_contributions
    from firmware.training.analysis.contributions import AnalysisSettings

    settings = (AnalysisSettings(blocks=blocks, steps=steps, lrs=tuple(sorted(lrs))) if lrs
                else AnalysisSettings(blocks=blocks, steps=steps))
    try:
        with progress_bar("contribution analysis", 1) as update:
            def progress(done: int, total: int, label: str) -> None:
                update(done, total, label=f"contribution analysis: {label}")

            found = family_contributions(family_dir, settings, progress, workers)
    except FirmwareError as exc:
        raise click.ClickException(str(exc)) from None
    save_contributions(_var_dir(), found)
    return found
