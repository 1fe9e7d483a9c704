"""Networks not provided by MONAI."""

from .dual_3d import DualNetwork3D, DualTrainForward, ResNetSeg3D, VNet3D
from .resnet_unet import ResNetUNet

__all__ = ["DualNetwork3D", "DualTrainForward", "ResNetSeg3D", "ResNetUNet", "VNet3D"]
