"""Diffusers-style pipelines over one saved mmdiff folder."""

from .image_to_text import CaptionPipelineOutput, MMDiffImageToTextPipeline
from .schedulers import SCHEDULERS, swap_scheduler
from .text_to_image import MMDiffTextToImagePipeline

__all__ = [
    "CaptionPipelineOutput",
    "MMDiffImageToTextPipeline",
    "MMDiffTextToImagePipeline",
    "SCHEDULERS",
    "swap_scheduler",
]
