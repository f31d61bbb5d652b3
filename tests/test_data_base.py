"""DataModule plumbing shared by all datasets, exercised on the synthetic DataModule."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mpae_lightning.data import (
    CelebADataModule,
    CUBDataModule,
    ImageFolderDataModule,
    ImageReadError,
    ImageRecord,
    ImageRecordDataset,
    PartImageNetDataModule,
    SyntheticPartsDataModule,
    load_rgb,
)
from mpae_lightning.data.samplers import EvalShardSampler, MiniGroupBatchSampler


def _fake_trainer(world_size, rank, use_distributed_sampler=False):
    connector = SimpleNamespace(use_distributed_sampler=use_distributed_sampler, is_distributed=world_size > 1)
    return SimpleNamespace(world_size=world_size, global_rank=rank, _accelerator_connector=connector)


def test_attributes_exist_before_setup(tmp_path):
    expected = {
        CUBDataModule: dict(image_size=448, mini_group=8, has_keypoints=True, has_masks=False, num_keypoints=15, num_mask_labels=0),
        CelebADataModule: dict(image_size=224, mini_group=8, has_keypoints=True, has_masks=False, num_keypoints=5, num_mask_labels=0),
        PartImageNetDataModule: dict(image_size=224, mini_group=64, has_keypoints=False, has_masks=True, num_keypoints=0, num_mask_labels=41),
        ImageFolderDataModule: dict(image_size=224, mini_group=8, has_keypoints=False, has_masks=False, num_keypoints=0, num_mask_labels=0),
    }
    for cls, attrs in expected.items():
        dm = cls(root=str(tmp_path / "nowhere"))  # nothing is read before setup
        for name, value in attrs.items():
            assert getattr(dm, name) == value, (cls.__name__, name)
        assert dm.batch_size == 64 and dm.mask_size == 128
    dm = SyntheticPartsDataModule()
    assert (dm.image_size, dm.mini_group, dm.batch_size) == (128, 8, 32)
    assert dm.has_keypoints and dm.has_masks and dm.num_keypoints == 6 and dm.num_mask_labels == 7


def test_splits_with_one_source_share_one_dataset(monkeypatch):
    """Evaluation splits that read the same data are built once (one listing, one file check)."""
    built = []
    original = SyntheticPartsDataModule.build_dataset

    def counting(self, split):
        built.append(split)
        return original(self, split)

    monkeypatch.setattr(SyntheticPartsDataModule, "build_dataset", counting)
    dm = SyntheticPartsDataModule(num_train=8, num_val=4, num_test=6, image_size=32)
    dm.setup()
    assert sorted(built) == ["test", "train", "val"]  # predict read the test split's object
    assert dm.predict_dataset is dm.test_dataset and dm.val_dataset is not dm.test_dataset
    assert len(dm.val_dataset) == 4
    for cls in (CUBDataModule, CelebADataModule, PartImageNetDataModule):
        module = cls(root="nowhere")
        assert [module.split_source(s) for s in ("train", "val", "test", "predict")] == ["train", "test", "test", "test"]
    folder = ImageFolderDataModule(root="nowhere")
    assert [folder.split_source(s) for s in ("train", "val", "test", "predict")] == ["train", "test", "test", "predict"]


def test_batch_size_must_be_multiple_of_a_smaller_mini_group():
    with pytest.raises(ValueError, match=r"batch_size \(20\) must be a multiple of mini_group \(8\)"):
        SyntheticPartsDataModule(batch_size=20, mini_group=8)
    # a mini-group >= the batch is one group per batch (torch.split semantics), as in the supplement's Table 7
    dm = SyntheticPartsDataModule(
        num_train=24, num_val=4, num_test=4, batch_size=4, mini_group=6, image_size=32, mask_size=16
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 6 and all(b["image"].shape[0] == 4 for b in loader)


def test_train_loader_batches_and_sharding():
    dm = SyntheticPartsDataModule(num_train=64, num_val=10, num_test=10, batch_size=16, mini_group=8, image_size=32, mask_size=16)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, MiniGroupBatchSampler)
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 3, 32, 32)
    # mask_seed: each image's patch-mask noise seed (from its place in the global batch)
    assert set(batch) == {"image", "index", "path", "label", "mask_seed"}

    seen = []
    for rank in range(2):
        dm.trainer = _fake_trainer(2, rank)
        sampler = dm.train_dataloader().batch_sampler
        assert (sampler.num_replicas, sampler.rank) == (2, rank)
        seen.extend(i for b in sampler for i in b)
    assert sorted(seen) == list(range(64))


def test_eval_loaders_shard_without_duplicates():
    dm = SyntheticPartsDataModule(num_train=16, num_val=11, num_test=11, eval_batch_size=4, image_size=32, mask_size=16)
    dm.setup()
    for hook in ("val_dataloader", "test_dataloader", "predict_dataloader"):
        indices = []
        for rank in range(3):
            dm.trainer = _fake_trainer(3, rank)
            loader = getattr(dm, hook)()
            assert isinstance(loader.sampler, EvalShardSampler)
            for batch in loader:
                indices.extend(batch["index"].tolist())
        assert sorted(indices) == list(range(11)), hook


def test_guard_against_lightning_distributed_sampler():
    dm = SyntheticPartsDataModule(num_train=32, batch_size=8, image_size=32, mask_size=16)
    dm.trainer = _fake_trainer(2, 0, use_distributed_sampler=True)
    for hook in ("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader"):
        with pytest.raises(RuntimeError, match="use_distributed_sampler: false"):
            getattr(dm, hook)()
    dm.trainer = _fake_trainer(1, 0, use_distributed_sampler=True)  # single process: nothing to replace
    dm.train_dataloader()


def test_trainer_fit_reshuffles_each_epoch():
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.epochs = {}

        def training_step(self, batch, batch_idx):
            self.epochs.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
            return (self.w * batch["image"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = SyntheticPartsDataModule(num_train=32, batch_size=8, mini_group=4, image_size=16, mask_size=16)
    model = Recorder()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    assert sorted(model.epochs[0]) == sorted(model.epochs[1]) == list(range(32))
    assert model.epochs[0] != model.epochs[1]
    assert trainer.train_dataloader.batch_sampler.epoch == 1


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "I;16", "1"])
def test_load_rgb_converts_modes(tmp_path, mode):
    rgb = Image.fromarray((np.random.default_rng(0).random((6, 7, 3)) * 255).astype(np.uint8))
    if mode == "I;16":
        img = Image.fromarray((np.arange(42).reshape(6, 7) * 1000).astype(np.uint16))
    else:
        img = rgb.convert(mode)
    ext = "jpg" if mode in ("L", "CMYK") else "png"
    if mode == "P":
        img.info["transparency"] = 0
    path = tmp_path / f"img.{ext}"
    img.save(path)
    out = load_rgb(str(path))
    assert out.mode == "RGB" and out.size == (7, 6)


def test_load_rgb_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_rgb(str(missing))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match=str(corrupt)):
        load_rgb(str(corrupt))
    truncated = tmp_path / "truncated.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "full.jpg")
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    with pytest.raises(ImageReadError, match=str(truncated)):
        load_rgb(str(truncated))


def test_guard_with_a_real_multi_process_trainer():
    import lightning.pytorch as pl

    dm = SyntheticPartsDataModule(num_train=32, num_test=8, batch_size=8, image_size=16, mask_size=16)
    common = dict(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False)
    dm.trainer = pl.Trainer(**common)  # default use_distributed_sampler=True
    with pytest.raises(RuntimeError, match="use_distributed_sampler: false"):
        dm.train_dataloader()
    dm.trainer = pl.Trainer(use_distributed_sampler=False, **common)
    sampler = dm.train_dataloader().batch_sampler
    assert (sampler.num_replicas, sampler.rank, len(sampler)) == (2, 0, 2)
    assert len(dm.test_dataloader().sampler) == 4


@pytest.mark.parametrize("orientation, size", [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))])
def test_exif_orientation_applied_and_keypoints_scaled_from_the_oriented_size(tmp_path, orientation, size):
    # cv2.imread (the authors' loader) applies a JPEG's EXIF orientation; PIL does not unless asked.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # stored left half red
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "oriented.jpg"
    Image.fromarray(stored).save(path, "JPEG", quality=95, exif=exif.tobytes())
    img = load_rgb(str(path))
    assert img.size == size
    shown = np.asarray(img).astype(int)
    red = shown[..., 0] > 128
    # where the stored left half ends up once displayed
    expected = {1: (slice(None), slice(0, 16)), 3: (slice(None), slice(24, 40)),
                6: (slice(0, 16), slice(None)), 8: (slice(24, 40), slice(None))}[orientation]
    assert red[expected].all() and red.sum() < 0.6 * red.size

    record = ImageRecord(path=str(path), keypoints=np.array([[10.0, 10.0], [20.0, 20.0]]))
    item = ImageRecordDataset([record], image_size=16)[0]
    width, height = size
    expected_kp = torch.tensor([[10.0 * 16 / width, 10.0 * 16 / height], [20.0 * 16 / width, 20.0 * 16 / height]])
    assert torch.allclose(item["keypoints"], expected_kp)
