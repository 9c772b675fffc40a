"""mmdiff: multimodal image-and-text diffusion with one shared DiT and classifier-free guidance both ways.

The classes a saved pipeline folder names in model_index.json ("mmdiff", ClassName) are exported here; do not move or
rename them once a checkpoint has shipped (a renamed class keeps its old name as an alias: `MMDiTModel`).
"""

import warnings

# importing diffusers' autoencoder on torch 2.4 without CUDA warns that a CUDA autocast is disabled: true and beside
# the point on a CPU machine (and a second line before every command's one-line error); silenced for the import only
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="User provided device_type of 'cuda', but CUDA is not available")
    from .diffusion.masked import MaskedDiffusionScheduler
    from .models.transformer import MMDiffTransformer2DModel, MMDiTModel
    from .pipelines import MMDiffImageToTextPipeline, MMDiffTextToImagePipeline

__version__ = "0.1.0"

__all__ = [
    "MMDiffTransformer2DModel",
    "MMDiTModel",
    "MaskedDiffusionScheduler",
    "MMDiffImageToTextPipeline",
    "MMDiffTextToImagePipeline",
]
