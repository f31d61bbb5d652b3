import numpy as np
import torch
from PIL import Image

from mpae_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize,
    eval_transform,
    normalize,
    scale_keypoints,
    train_transform,
)


def _image(w, h, value=(200, 100, 50)):
    return Image.new("RGB", (w, h), value)


def test_train_transform_gives_square_normalised_tensor():
    torch.manual_seed(0)
    out = train_transform(56)(_image(90, 60))
    assert type(out) is torch.Tensor
    assert out.shape == (3, 56, 56) and out.dtype == torch.float32
    # the centre pixel (always inside the image after the small affine) is the normalised colour
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[:, 28, 28], expected, atol=1e-2)


def test_eval_transform_ignores_aspect_ratio():
    img = np.zeros((40, 100, 3), dtype=np.uint8)
    img[:, :50] = 255  # left half white
    out = eval_transform(20)(Image.fromarray(img))
    assert out.shape == (3, 20, 20)
    back = denormalize(out)
    assert back[:, :, :9].min() > 0.95 and back[:, :, 11:].max() < 0.05


def test_normalize_roundtrip():
    x = torch.rand(3, 5, 5)
    assert torch.allclose(denormalize(normalize(x)), x, atol=1e-6)


def test_scale_keypoints_by_hand():
    kp = np.array([[50.0, 20.0], [0.0, 0.0], [99.0, 39.0]])
    out = scale_keypoints(kp, width=100, height=40, image_size=224)
    expected = torch.tensor([[112.0, 112.0], [0.0, 0.0], [221.76, 218.4]])
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-4)


def test_input_transform_without_antialiasing_is_the_authors_squash():
    """``input_transform(S, antialias=False)`` = :func:`squash_resize` then the evaluation transform;
    on a shrunk noisy image it differs from the antialiased resize, which it equals by default."""
    import pickle

    from mpae_lightning.data.transforms import input_transform, squash_resize

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    plain = input_transform(28, antialias=False)
    assert torch.equal(plain(image), eval_transform(28)(squash_resize(image, 28)))
    assert torch.equal(input_transform(28)(image), eval_transform(28)(image))
    assert (plain(image) - input_transform(28)(image)).abs().mean() > 0.1  # antialiasing smooths the noise
    # DataLoader workers started with "spawn" receive the transform pickled
    assert torch.equal(pickle.loads(pickle.dumps(plain))(image), plain(image))
