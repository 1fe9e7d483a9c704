"""Networks not provided by MONAI."""

from .resnet_unet import ResNetUNet

__all__ = ["ResNetUNet"]
