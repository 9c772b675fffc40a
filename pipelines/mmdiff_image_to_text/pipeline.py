"""Community-pipeline entry point: DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipelines/mmdiff_image_to_text")."""

from mmdiff.pipelines.image_to_text import MMDiffImageToTextPipeline

__all__ = ["MMDiffImageToTextPipeline"]
