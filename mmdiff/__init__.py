"""mmdiff: multimodal image-and-text diffusion with one shared DiT and classifier-free guidance both ways.

The classes a saved pipeline folder names in model_index.json ("mmdiff", ClassName) are exported here; do not move or
rename them once a checkpoint has shipped.
"""

from .diffusion.masked import MaskedDiffusionScheduler
from .models.transformer import MMDiTModel
from .pipelines import MMDiffImageToTextPipeline, MMDiffTextToImagePipeline

__version__ = "0.1.0"

__all__ = ["MMDiTModel", "MaskedDiffusionScheduler", "MMDiffImageToTextPipeline", "MMDiffTextToImagePipeline"]
