"""Networks not provided by MONAI."""

from .dual_3d import DualNetwork3D, DualTrainForward, ResNetSeg3D, VNet3D
from .encoders import ENCODERS, build_encoder
from .resnet_unet import EncoderUNet, ResNetUNet

__all__ = ["DualNetwork3D", "DualTrainForward", "ENCODERS", "EncoderUNet", "ResNetSeg3D", "ResNetUNet", "VNet3D", "build_encoder"]
