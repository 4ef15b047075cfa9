"""Training of a small KL-f8 ``AutoencoderKL`` on any image data, on the shared training machinery of
:mod:`latentdit.engine`: the images (:mod:`.data`), the networks (:mod:`.networks`), the losses
(:mod:`.losses`), one step and its checkpoints (:mod:`.trainer`), the run (:mod:`.loop`), the export and
its model card (:mod:`.export`, :mod:`.card`)."""

from latentdit.vae.training.loop import train_vae

__all__ = ["train_vae"]
