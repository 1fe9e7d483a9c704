"""monai_ssl: semi-supervised medical image segmentation methods as MONAI bundles.

Importing the package imports its sub-packages, so a bundle config needs only
``"$import monai_ssl"`` to reach ``monai_ssl.data``, ``monai_ssl.engines`` and the rest.
"""

__version__ = "0.1.0"

from monai_ssl import bundle, data, engines, evaluation, handlers, inference, losses, methods, networks, pseudo  # noqa: E402

__all__ = [
    "bundle", "data", "engines", "evaluation", "handlers", "inference", "losses", "methods", "networks", "pseudo", "__version__",
]
