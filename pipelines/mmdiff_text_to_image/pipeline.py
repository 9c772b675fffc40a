"""Community-pipeline entry point: DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipelines/mmdiff_text_to_image")."""

from mmdiff.pipelines.loading import keep_only_pipeline_class
from mmdiff.pipelines.text_to_image import MMDiffTextToImagePipeline

# diffusers runs every local entry point in one shared module: drop a class another entry point left there
keep_only_pipeline_class(globals(), MMDiffTextToImagePipeline)

__all__ = ["MMDiffTextToImagePipeline"]
