"""Sandwich training: learning happens, checkpoint + resume equals one run, bad resumes fail."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from firmware.nas.accuracy import fit_predictor, measure
from firmware.nas.family import FamilyError, load_family, read_manifest, save_family
from firmware.nas.space import Arch
from firmware.nas.supernet import Supernet
from firmware.nas.train import TrainConfig, TrainError, TrainProgress, train_supernet
from tests.firmware.tiny_family import EVAL, TRAIN, small_digits, tiny_predictor, tiny_space
from tests.firmware.tiny_family import trained_tiny as trained

pytestmark = pytest.mark.unit


def test_trained_subnets_beat_chance_by_far() -> None:
    supernet, data = trained()
    space = supernet.space
    for arch in (space.largest(), space.smallest()):
        assert measure(supernet, data, arch, "val", EVAL) > 0.5  # chance is 0.1


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    data = small_digits()
    config = dataclasses.replace(TRAIN, epochs=2, batch_size=64)
    torch.manual_seed(0)
    straight = Supernet(tiny_space())
    train_supernet(straight, data, config)
    torch.manual_seed(0)
    resumed = Supernet(tiny_space())
    ckpt = tmp_path / "ckpt.pt"
    train_supernet(resumed, data, config, ckpt, stop_after_epochs=1)
    fresh = Supernet(tiny_space())  # other random init: everything must come from the file
    seen: list[TrainProgress] = []
    summary = train_supernet(fresh, data, config, ckpt, resume=True, progress=seen.append)
    assert summary.resumed_from_epoch == 1
    assert [p.epoch for p in seen] == [2] * seen[0].steps_per_epoch
    for (name, a), b in zip(straight.state_dict().items(), fresh.state_dict().values(),
                            strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_resume_refuses_other_settings_or_space(tmp_path: Path) -> None:
    data = small_digits()
    ckpt = tmp_path / "ckpt.pt"
    config = dataclasses.replace(TRAIN, epochs=1, batch_size=200)
    train_supernet(Supernet(tiny_space()), data, config, ckpt)
    with pytest.raises(TrainError, match=r"lr 0\.05 != 0\.2"):
        train_supernet(Supernet(tiny_space()), data, dataclasses.replace(config, lr=0.2),
                       ckpt, resume=True)
    other = dataclasses.replace(tiny_space(), name="other")
    with pytest.raises(TrainError, match="space 'tiny'"):
        train_supernet(Supernet(other), data, config, ckpt, resume=True)
    with pytest.raises(TrainError, match="epochs"):
        TrainConfig(epochs=0)


def test_family_round_trips_and_detects_changed_weights(tmp_path: Path) -> None:
    supernet, data = trained()
    family = save_family(tmp_path, supernet, "tiny", data, {"epochs": 3}, {"x": 1.0},
                         tiny_predictor())
    loaded, net = load_family(tmp_path)
    assert loaded == family and len(family.version) == 16
    arch = supernet.space.smallest()
    x = torch.randn(2, 1, arch.resolution, arch.resolution)
    with torch.no_grad():
        assert torch.equal(net(x, arch), supernet.eval()(x, arch))
    (tmp_path / "supernet.pt").write_bytes(b"tampered")
    with pytest.raises(FamilyError, match="does not match"):
        load_family(tmp_path)
    with pytest.raises(FamilyError, match=r"no family\.json"):
        read_manifest(tmp_path / "nowhere")


def test_predictor_ranks_subnets_of_a_linear_truth() -> None:
    space = tiny_space()
    import random

    rng = random.Random(0)
    archs: list[Arch] = [space.sample(rng) for _ in range(60)]
    # Accuracy that grows with resolution, width and depth, plus noise.
    truth = [0.5 + 0.1 * (a.resolution == 16) + 0.2 * (a.width == 1.0) + 0.05 * sum(a.depths)
             + rng.gauss(0, 0.01) for a in archs]
    predictor = fit_predictor(space, archs, truth)
    assert predictor.holdout_rank_corr > 0.8
    assert (predictor.predict(space, space.largest())
            > predictor.predict(space, space.smallest()))
