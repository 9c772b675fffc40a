"""Community-pipeline entry point: DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipelines/mmdiff_image_to_text")."""

from mmdiff.pipelines.image_to_text import MMDiffImageToTextPipeline
from mmdiff.pipelines.loading import keep_only_pipeline_class

# diffusers runs every local entry point in one shared module: drop a class another entry point left there
keep_only_pipeline_class(globals(), MMDiffImageToTextPipeline)

__all__ = ["MMDiffImageToTextPipeline"]
