"""Community-pipeline entry point: DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipelines/mmdiff_text_to_image")."""

from mmdiff.pipelines.text_to_image import MMDiffTextToImagePipeline

__all__ = ["MMDiffTextToImagePipeline"]
