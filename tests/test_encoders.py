"""Pretrained 2D encoders: exact key mappings, strict offline loads, ports checked end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from monai_ssl.networks import EncoderUNet, ResNetUNet
from monai_ssl.networks.encoders import (
    EfficientNetLite0,
    EfficientNetLite0Classifier,
    InputAdapter,
    ResNetEncoder,
    build_encoder,
    load_encoder_weights,
    packaged_efficientnet_lite0,
)

#: ImageNet class index of "military uniform" (Grace Hopper's portrait, the classic test image)
MILITARY_UNIFORM = 652


def torchvision_resnet_state(name: str = "resnet34", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under exactly the keys and shapes of torchvision's ``resnetXX().state_dict()``,
    written out from torchvision's architecture rules (not from monai_ssl's module)."""
    blocks = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}[name]
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def bn(prefix: str, c: int) -> None:
        state[f"{prefix}.weight"] = torch.rand(c, generator=g) + 0.5
        state[f"{prefix}.bias"] = torch.randn(c, generator=g)
        state[f"{prefix}.running_mean"] = torch.randn(c, generator=g)
        state[f"{prefix}.running_var"] = torch.rand(c, generator=g) + 0.5
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(7)

    state["conv1.weight"] = torch.randn(64, 3, 7, 7, generator=g)
    bn("bn1", 64)
    in_ch = 64
    for layer, (width, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(n):
            p = f"layer{layer}.{b}"
            stride = 2 if (b == 0 and layer > 1) else 1
            state[f"{p}.conv1.weight"] = torch.randn(width, in_ch if b == 0 else width, 3, 3, generator=g)
            bn(f"{p}.bn1", width)
            state[f"{p}.conv2.weight"] = torch.randn(width, width, 3, 3, generator=g)
            bn(f"{p}.bn2", width)
            if b == 0 and (stride != 1 or in_ch != width):
                state[f"{p}.downsample.0.weight"] = torch.randn(width, in_ch, 1, 1, generator=g)
                bn(f"{p}.downsample.1", width)
        in_ch = width
    state["fc.weight"] = torch.randn(1000, 512, generator=g)
    state["fc.bias"] = torch.randn(1000, generator=g)
    return state


def test_resnet34_loads_a_torchvision_state_dict_with_an_exact_key_mapping(tmp_path):
    state = torchvision_resnet_state("resnet34")
    path = tmp_path / "resnet34.pth"
    torch.save(state, path)
    net = EncoderUNet("resnet34", encoder_weights=str(path))
    own = net.encoder.state_dict()
    assert set(own) == set(state) - {"fc.weight", "fc.bias"}
    for key, value in own.items():
        assert torch.equal(value, state[key]), key


def test_resnet_weights_that_do_not_match_are_refused_naming_the_file_and_keys(tmp_path):
    state = torchvision_resnet_state("resnet34")
    del state["layer3.2.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"broken\.pth.*layer3\.2\.conv1\.weight.*extra\.weight"):
        EncoderUNet("resnet34", encoder_weights=str(path))
    torch.save(torchvision_resnet_state("resnet18"), path)
    with pytest.raises(ValueError, match="missing"):
        ResNetUNet(backbone="resnet34", encoder_weights=str(path))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        EncoderUNet("resnet34", encoder_weights=str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="no weights shipped"):
        EncoderUNet("resnet34", encoder_weights="pretrained")


def test_encoder_weights_are_loaded_without_unpickling_code(tmp_path):
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Evil()}, path)
    with pytest.raises(RuntimeError, match="evil.pth"):
        EncoderUNet("resnet34", encoder_weights=str(path))
    assert not marker.exists()


def test_efficientnet_lite0_uses_every_shipped_tensor_and_its_batchnorm_statistics():
    path = packaged_efficientnet_lite0()
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    assert len(shipped) == 296
    _, encoder = build_encoder("efficientnet-lite0", 1, "pretrained")
    own = encoder.state_dict()
    head = {k for k in shipped if k.startswith(("_conv_head.", "_bn1.", "_fc."))}
    assert head == {"_conv_head.weight", "_fc.weight", "_fc.bias"} | {
        f"_bn1.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    assert set(own) == set(shipped) - head  # every other tensor is used, none is missing
    for key, value in own.items():
        assert torch.equal(value, shipped[key]), key
    assert sum(v.numel() for v in shipped.values() if v.dtype.is_floating_point) == 4_694_024
    bn = encoder._blocks[5]._bn1
    assert torch.equal(bn.running_mean, shipped["_blocks.5._bn1.running_mean"])
    assert torch.equal(bn.running_var, shipped["_blocks.5._bn1.running_var"])


def _grace_hopper() -> torch.Tensor:
    import matplotlib

    path = f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg"
    img = Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


def test_efficientnet_lite0_port_classifies_a_natural_image_like_imagenet():
    """The whole shipped file (head included) in the ported architecture recognises the uniform in
    Grace Hopper's portrait: a wrong padding, activation, block order or normalisation would not."""
    net = EfficientNetLite0Classifier().eval()
    load_encoder_weights(net, packaged_efficientnet_lite0())
    adapter, _ = build_encoder("efficientnet-lite0", 3, None)
    with torch.no_grad():
        probs = net.logits(adapter(_grace_hopper())).softmax(1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM
    assert float(probs[MILITARY_UNIFORM]) > 0.3
    random_net = EfficientNetLite0Classifier().eval()
    with torch.no_grad():
        random_features = EfficientNetLite0.forward(random_net, adapter(_grace_hopper()))[-1]
        features = EfficientNetLite0.forward(net, adapter(_grace_hopper()))[-1]
    assert not torch.allclose(features, random_features, atol=1e-2)


def test_input_adapter_replicates_grey_and_normalises():
    adapter = InputAdapter(1, 3, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    x = torch.rand(2, 1, 4, 4)
    out = adapter(x)
    assert out.shape == (2, 3, 4, 4)
    assert torch.allclose(out[:, 0], (x[:, 0] - 0.5) / 0.5)
    assert torch.allclose(out[:, 1], (x[:, 0] - 0.25) / 0.25)
    assert torch.allclose(out[:, 2], x[:, 0] / 2.0)
    assert adapter.state_dict() == {}  # the statistics follow the encoder choice, not the checkpoint
    with pytest.raises(ValueError, match="1 or 3 channels"):
        InputAdapter(2, 3, (0, 0, 0), (1, 1, 1))


@pytest.mark.parametrize("encoder", ["resnet18", "efficientnet-lite0"])
def test_encoder_unet_scripts_and_exports_at_batch_1_and_2(encoder):
    net = EncoderUNet(encoder, decoder_channels=(32, 16, 16, 8, 8)).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        eager = net(x)
    assert eager.shape == (2, 1, 64, 64)
    scripted = torch.jit.script(net)
    exported = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},)).module()
    for batch in (1, 2):
        with torch.no_grad():
            assert torch.allclose(scripted(x[:batch]), eager[:batch], atol=1e-5)
            assert torch.allclose(exported(x[:batch]), eager[:batch], atol=1e-5)


def test_resnet_encoder_features_have_the_documented_strides_and_channels():
    enc = ResNetEncoder("resnet18")
    feats = enc(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == list(enc.channels) == [64, 64, 128, 256, 512]
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]


@pytest.mark.slow
def test_litemedsam_encoder_loads_the_shipped_image_encoder_strictly_and_feeds_the_unet():
    from monai_ssl.foundation.litemedsam import load_litemedsam

    net = EncoderUNet("litemedsam", encoder_weights="pretrained", decoder_channels=(32, 16, 16, 8, 8)).eval()
    reference = load_litemedsam().image_encoder.state_dict()
    own = net.encoder.image_encoder.state_dict()
    assert set(own) == set(reference)
    for key, value in own.items():
        assert torch.equal(value, reference[key]), key
    x = torch.rand(1, 1, 256, 256)
    with torch.no_grad():
        feats = net.encoder(net.input_adapter(x))
        out = net(x)
    assert [f.shape[1] for f in feats] == list(net.encoder.channels) == [128, 160, 320, 320, 256]
    assert [f.shape[-1] for f in feats] == [128, 64, 64, 64, 64]
    assert out.shape == (1, 1, 256, 256)
    with pytest.raises(ValueError, match="256 x 256"):
        net(torch.rand(1, 1, 128, 128))
