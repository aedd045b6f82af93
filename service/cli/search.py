"""`tinyfleet train-supernet` and `tinyfleet search`: model families and per-MCU subnets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from firmware.targets import OtaLayout, TargetSpec
from service.cli.options import kb, resolve_target, target_options
from service.cli.ui import progress_bar

DEFAULT_RESOLUTIONS: dict[str, tuple[int, ...]] = {
    "digits": (24, 32, 40, 48),
    "shapes": (96, 128, 160),
    "user": (32, 48, 64),
}
DEFAULT_EPOCHS = {"digits": 12, "shapes": 4, "user": 12}
SEARCH_FORMAT = 2  # 2: memory holds the SRAM account (arena, scratch, static, stack)


def _resolutions(ctx: click.Context, param: click.Parameter,
                 value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(sorted({int(v) for v in value.split(",")}))
    except ValueError:
        raise click.BadParameter(f"{value!r}: use comma-separated sizes, e.g. 32,48,64") from None
    if not values or values[0] < 8 or values[-1] > 512:
        raise click.BadParameter(f"{value!r}: resolutions must lie in [8, 512]")
    return values


def _var_dir() -> Path:
    from service.config import load_config

    return Path(load_config()["VAR_DIR"])


@click.command("train-supernet")
@click.option("--data", "data", default="digits", show_default=True,
              help="digits | shapes | PATH (an .npz with x, y or a folder of class folders)")
@click.option("--epochs", type=click.IntRange(1, 10_000), default=None,
              help="total epochs (default: 12 for digits, 4 for shapes)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="family directory (default: var/families/DATA)")
@click.option("--resume", is_flag=True, help="continue from the family's checkpoint.pt")
@click.option("--space", "space_name", type=click.Choice(["compact", "mcunet"]),
              default="compact", show_default=True,
              help="compact: MCUNetV2 space at half base width (CPU-trainable); mcunet: full")
@click.option("--resolutions", callback=_resolutions, default=None,
              help="comma-separated input sizes (default per data set)")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--predictor-samples", type=click.IntRange(8, 10_000), default=60,
              show_default=True, help="subnets measured to fit the accuracy predictor")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--contributions/--no-contributions", "with_contributions", default=True,
              show_default=True,
              help="run the contribution analysis (on-device training) at the end")
@click.option("--json", "as_json", is_flag=True, help="print the family manifest as JSON")
def train_supernet(data: str, epochs: int | None, out_dir: Path | None, resume: bool,
                   space_name: str, resolutions: tuple[int, ...] | None, batch_size: int,
                   predictor_samples: int, seed: int, with_contributions: bool,
                   as_json: bool) -> None:
    """Train a weight-sharing supernet on DATA and write it as a model family."""
    import torch

    from firmware.data import DataError, load_dataset
    from firmware.nas.accuracy import sample_and_fit
    from firmware.nas.family import CHECKPOINT_NAME, save_family
    from firmware.nas.space import compact_space, mcunet_space
    from firmware.nas.supernet import Supernet
    from firmware.nas.train import TrainConfig, TrainError, TrainProgress, train_supernet

    try:
        dataset = load_dataset(data)
    except DataError as exc:
        raise click.ClickException(str(exc)) from None
    kind = dataset.name if dataset.name in DEFAULT_RESOLUTIONS else "user"
    res = resolutions or DEFAULT_RESOLUTIONS[kind]
    make = compact_space if space_name == "compact" else mcunet_space
    space = make(num_classes=len(dataset.classes), in_channels=dataset.channels,
                 resolutions=res, name=f"{dataset.name}-{space_name}")
    out = out_dir or _var_dir() / "families" / dataset.name
    config = TrainConfig(epochs=epochs or DEFAULT_EPOCHS[kind], batch_size=batch_size,
                         lr=0.05, seed=seed)
    torch.manual_seed(seed)
    supernet = Supernet(space)
    steps = config.epochs * -(-len(dataset.train) // batch_size)
    # The bar goes to stderr (stdout carries only results, the JSON document with --json).
    with progress_bar("training", steps) as update:
        done = 0

        def progress(p: TrainProgress) -> None:
            nonlocal done
            done += 1
            update(done, label=f"epoch {p.epoch}/{p.epochs} loss {p.loss:.3f}")

        try:
            summary = train_supernet(supernet, dataset, config, out / CHECKPOINT_NAME,
                                     resume, progress)
        except TrainError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"fitting the accuracy predictor on {predictor_samples + 2} subnets", err=True)
    predictor, measured = sample_and_fit(supernet, dataset, predictor_samples, seed)
    accs = [acc for _, acc in measured]
    metrics = {"largest_val_accuracy": accs[-2], "smallest_val_accuracy": accs[-1],
               "sampled_val_accuracy_mean": sum(accs[:-2]) / max(1, len(accs) - 2),
               "predictor_holdout_rank_corr": predictor.holdout_rank_corr}
    training = {**asdict(config), "elapsed_s": summary.elapsed_s,
                "resumed_from_epoch": summary.resumed_from_epoch}
    family = save_family(out, supernet, dataset.name, dataset, training, metrics, predictor)
    if with_contributions:
        from service.cli.finetune import run_contributions

        found = run_contributions(out)
        click.echo(f"contribution analysis in {found.elapsed_s:.0f} s: classifier only "
                   f"{found.classifier_accuracy:.1%} on the held-out shifted split", err=True)
    if as_json:
        click.echo(json.dumps(family.to_dict(), indent=2))
        return
    click.echo(f"model family {family.name} version {family.version} -> {out}")
    click.echo(f"  space {space.name}: resolutions {list(res)}, {len(dataset.classes)} classes")
    click.echo(f"  trained {config.epochs} epochs in {summary.elapsed_s:.0f} s "
               f"(resumed from epoch {summary.resumed_from_epoch})")
    click.echo(f"  val accuracy: largest {accs[-2]:.1%}, smallest {accs[-1]:.1%}; "
               f"predictor rank correlation {predictor.holdout_rank_corr:.2f}")


def hardware_class(target: TargetSpec, layout: OtaLayout, personalize: bool,
                   patches: bool) -> str:
    """The cache key of a hardware class: core, SRAM, slot, personalization, mode."""
    return (f"{target.cpu.value}-sram{target.sram_bytes}"
            f"-slot{target.slot_bytes(layout)}-{'pers' if personalize else 'infer'}"
            f"-{'patch' if patches else 'layer'}")


@click.command("search")
@click.argument("family_dir", metavar="FAMILY",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@target_options
@click.option("--ota-layout", "layout", type=click.Choice([x.value for x in OtaLayout]),
              default="ab", show_default=True, help="OTA layout: ab (two slots) or single")
@click.option("--no-patches", is_flag=True, help="layer-based inference only (for comparison)")
@click.option("--personalize", is_flag=True,
              help="reserve SRAM for on-device training and plan its sparse-update scheme")
@click.option("--train-gain", type=click.FloatRange(0.0, 1.0), default=0.9, show_default=True,
              help="with --personalize: reserve for the cheapest scheme predicted to reach this "
                   "share of the best sparse update's gain")
@click.option("--objective", type=click.Choice(["predicted", "measured"]),
              default="predicted", show_default=True)
@click.option("--population", type=click.IntRange(2, 10_000), default=48, show_default=True)
@click.option("--generations", type=click.IntRange(0, 10_000), default=15, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-cache", is_flag=True, help="search again even if a result is cached")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--export-onnx", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the chosen subnet (BN re-calibrated) as ONNX")
def search(family_dir: Path, mcu: str | None, sram: int | None, flash: int | None,
           cpu: str | None, layout: str, no_patches: bool, personalize: bool,
           train_gain: float, objective: str, population: int, generations: int, seed: int,
           no_cache: bool, as_json: bool, export_onnx: Path | None) -> None:
    """Find the subnet of FAMILY and its patch schedule that fit an MCU best."""
    from firmware.errors import DoesNotFitError, FirmwareError
    from firmware.nas.family import read_manifest
    from firmware.nas.search import Constraints, EvolutionSettings

    target = resolve_target(mcu, sram, flash, cpu)
    ota = OtaLayout(layout)
    term = contributions = None
    try:
        family = read_manifest(family_dir)
        if personalize:
            from firmware.personalize import load_contributions, training_term

            contributions = load_contributions(_var_dir(), family)
            term = training_term(family.space, contributions, train_gain)
        constraints = Constraints.for_target(
            target, ota, patches=not no_patches, personalize=personalize,
            **({} if term is None else {"training_memory": term,
                                        "overlay_bytes": term.overlay_bytes}))
    except FirmwareError as exc:
        raise click.ClickException(str(exc)) from None
    settings = EvolutionSettings(population=population, generations=generations,
                                 parents=max(1, population // 4), seed=seed)
    key: dict[str, Any] = {"format": SEARCH_FORMAT, "objective": objective,
                           "settings": asdict(settings)}
    if term is not None:
        key["training"] = {"template": term.template.to_dict(), "scheme": term.base.to_dict()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    cache = (_var_dir() / "cache" / "search" / family.version
             / f"{hardware_class(target, ota, personalize, not no_patches)}-{digest}.json")
    result: dict[str, Any] | None = None
    if cache.is_file() and not no_cache:
        result = json.loads(cache.read_text())
        result["cached"] = True
    supernet = dataset = None
    if result is None or export_onnx is not None:
        from firmware.data import load_dataset
        from firmware.nas.family import load_family

        try:
            family, supernet = load_family(family_dir)
            dataset = load_dataset(family.data_source)
        except FirmwareError as exc:
            raise click.ClickException(str(exc)) from None
    if result is None:
        from firmware.nas.specialize import ObjectiveKind, specialize

        assert supernet is not None and dataset is not None
        try:
            with progress_bar(f"searching for {target.name}", None):
                found = specialize(family, supernet, dataset, constraints, settings,
                                   ObjectiveKind(objective))
        except DoesNotFitError as exc:
            if as_json:
                click.echo(json.dumps({"error": str(exc), "target": target.name}))
            raise click.ClickException(str(exc)) from None
        result = {**found.to_dict(), "target": target.name, "cached": False}
        if term is not None and contributions is not None:
            try:
                result["personalization"] = personalization(result, term, contributions)
            except FirmwareError as exc:
                raise click.ClickException(str(exc)) from None
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(cache)
    if export_onnx is not None:
        _export(result, supernet, dataset, export_onnx)
        result["onnx"] = str(export_onnx)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(human_result(result, target, constraints.patches))


def personalization(result: dict[str, Any], term: Any, contributions: Any) -> dict[str, Any]:
    """The pick's sparse-update scheme, planned for the SRAM its inference account leaves."""
    from firmware.nas.specialize import config_from_dict
    from firmware.personalize import pick_scheme

    mem = result["memory"]
    inference = mem["sram_needed_bytes"] - mem["training_bytes"]
    split = mem.get("split_after") if mem.get("patches", 1) > 1 else None
    planned = pick_scheme(config_from_dict(result["config"]), term, contributions,
                          mem["sram_bytes"], inference, split,
                          mem["slot_bytes"] - mem["weights_bytes"] - mem["code_bytes"])
    return {
        "scheme": planned.scheme.to_dict(), "describe": planned.scheme.describe(),
        "predicted_gain": planned.predicted_gain, "training_bytes": planned.training_bytes,
        "training_budget_bytes": mem["sram_bytes"] - inference, "inference_bytes": inference,
        "reserved_training_bytes": mem["training_bytes"],
        "reference_template": term.template.to_dict(),
        "reference_predicted_gain": term.predicted_gain,
        "contributions": {"family_version": contributions.family_version,
                          "classifier_accuracy": contributions.classifier_accuracy},
    }


def _export(result: dict[str, Any], supernet: Any, dataset: Any, path: Path) -> None:
    from firmware.nas.space import Arch
    from firmware.nas.specialize import export_subnet
    from firmware.nas.supernet import export_onnx

    module = export_subnet(supernet, dataset, Arch.from_dict(result["arch"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(module, path)


def sram_parts(account: dict[str, int]) -> str:
    """An SRAM account dict as 'arena 12.0 kB + scratch 1.3 kB + ... = 14.3 kB'."""
    parts = ["arena", "scratch", "static", "stack"]
    if account.get("training_bytes"):
        parts.append("training")
    return (" + ".join(f"{name} {kb(account[f'{name}_bytes'])}" for name in parts)
            + f" = {kb(account['total_bytes'])}")


def human_result(result: dict[str, Any], target: TargetSpec, patches: bool) -> str:
    """The search result as text: network, schedule, accuracy, memory."""
    mem = result["memory"]
    arch = result["arch"]
    cfg = result["config"]
    sched = result["schedule"]
    lines = [
        f"{result['config']['name']} for {target.name} "
        f"({'joint patch search' if patches else 'layer-based only'}"
        f"{', cached' if result.get('cached') else ''})",
        f"  network: {arch['resolution']}x{arch['resolution']} input, width {arch['width']:g}, "
        f"depths {arch['depths']}, {len(cfg['blocks'])} blocks, "
        f"kernels {[b['kernel'] for b in cfg['blocks']]}, "
        f"expand {[b['expand_ratio'] for b in cfg['blocks']]}",
        "  schedule: " + ("layer-based" if sched["patches"] == 1 else
                          f"{sched['patches']}x{sched['patches']} patches until "
                          f"{sched['split_after']}, input patch {sched['input_patch'][0]}"),
        f"  accuracy: val {result['val_accuracy']:.1%}, test {result['test_accuracy']:.1%} "
        f"({result['objective']} objective score {result['score']:.3f})",
        f"  SRAM: {kb(mem['sram_needed_bytes'])} of {kb(mem['sram_bytes'])}: "
        + sram_parts(mem["sram"]),
        f"    activation peak {kb(mem['peak_bytes'])} at {mem['peak_layer']} (layer-based "
        f"{kb(mem['layer_peak_bytes'])})",
        f"  Flash: {kb(mem['flash_bytes'])} of a {kb(mem['slot_bytes'])} slot "
        f"(weights {kb(mem['weights_bytes'])}, code {kb(mem['code_bytes'])})",
        f"  MACs: {mem['macs'] / 1e6:.2f} M ({mem['mac_overhead']:+.1%} patch recompute)",
        f"  search: {result['search']['evaluated']} subnets planned, "
        f"{result['search']['feasible']} fit, {result['search']['total_s']:.1f} s",
    ]
    if "personalization" in result:
        p = result["personalization"]
        lines += [
            f"  on-device training: {p['describe']}",
            f"    predicted gain {p['predicted_gain']:+.1%} on the held-out shifted split; "
            f"training memory {kb(p['training_bytes'])} of the {kb(p['training_budget_bytes'])}"
            f" the inference account leaves (reserved in the search: "
            f"{kb(p['reserved_training_bytes'])})",
            f"    accounts: inference {kb(p['inference_bytes'])} + training "
            f"{kb(p['training_bytes'])} = {kb(p['inference_bytes'] + p['training_bytes'])} of "
            f"{kb(mem['sram_bytes'])} SRAM",
        ]
    if "onnx" in result:
        lines.append(f"  ONNX: {result['onnx']}")
    return "\n".join(lines)
