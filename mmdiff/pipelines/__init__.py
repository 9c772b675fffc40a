"""Diffusers-style pipelines over one saved mmdiff folder, and the modes that chain them."""

from .image_to_text import CaptionPipelineOutput, MMDiffImageToTextPipeline
from .loading import PipelineLoadError, check_pipeline_folder
from .modes import ImageCaptionOutput, as_image_to_text, as_text_to_image, infill_caption, sample_pairs, vary_image
from .schedulers import SCHEDULERS, swap_scheduler
from .text_to_image import GuidanceSweepOutput, MMDiffTextToImagePipeline

__all__ = [
    "CaptionPipelineOutput",
    "GuidanceSweepOutput",
    "ImageCaptionOutput",
    "MMDiffImageToTextPipeline",
    "MMDiffTextToImagePipeline",
    "PipelineLoadError",
    "SCHEDULERS",
    "as_image_to_text",
    "as_text_to_image",
    "check_pipeline_folder",
    "infill_caption",
    "sample_pairs",
    "swap_scheduler",
    "vary_image",
]
