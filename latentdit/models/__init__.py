"""DiT model family, registry, classifier-free guidance, checkpoint and diffusers conversion."""

from latentdit.models.checkpoint import load_dit, load_state_dict_file, save_dit
from latentdit.models.diffusers_io import from_diffusers, to_diffusers
from latentdit.models.dit import DiT
from latentdit.models.guidance import guided_forward
from latentdit.models.registry import DIT_CONFIGS, create_dit, model_names

__all__ = [
    "DIT_CONFIGS",
    "DiT",
    "create_dit",
    "from_diffusers",
    "guided_forward",
    "load_dit",
    "load_state_dict_file",
    "model_names",
    "save_dit",
    "to_diffusers",
]
