"""monai_ssl: semi-supervised medical image segmentation methods as MONAI bundles."""

__version__ = "0.1.0"
