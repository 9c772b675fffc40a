"""Loading saved folders: dtype and device, and every broken folder refused with the component named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmdiff.pipelines import MMDiffImageToTextPipeline, MMDiffTextToImagePipeline, PipelineLoadError


def test_both_classes_load_one_folder_with_dtype_and_device(saved_pipe):
    for cls in (MMDiffTextToImagePipeline, MMDiffImageToTextPipeline):
        pipe = cls.from_pretrained(saved_pipe, torch_dtype=torch.float64).to("cpu")
        assert pipe.transformer.dtype == torch.float64 and pipe.vae.dtype == torch.float64
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe(torch.zeros(3, 16, 16), num_inference_steps=2).text) == 1
    t2i = MMDiffTextToImagePipeline.from_pretrained(saved_pipe, torch_dtype=torch.float64)
    t2i.set_progress_bar_config(disable=True)
    assert t2i("a red circle", num_inference_steps=2, output_type="latent").images.dtype == torch.float64


def _edit_config(folder, **changes):
    path = folder / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change,match",
    [({"depth": 3}, r"\d+ weights missing"), ({"depth": 1}, "unexpected weights"), ({"hidden_size": 64}, "shape")],
)
def test_config_that_does_not_match_the_weights_names_the_component(saved_pipe, change, match):
    _edit_config(saved_pipe, **change)
    with pytest.raises(PipelineLoadError, match=f"component 'transformer'.*does not match.*{match}"):
        MMDiffTextToImagePipeline.from_pretrained(saved_pipe)


def test_missing_component_and_missing_index(saved_pipe, tmp_path):
    shutil.rmtree(saved_pipe / "vae")
    with pytest.raises(PipelineLoadError, match="component 'vae'.*missing"):
        MMDiffImageToTextPipeline.from_pretrained(saved_pipe)
    with pytest.raises(FileNotFoundError, match="no pipeline folder"):
        MMDiffTextToImagePipeline.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineLoadError, match="model_index.json is missing"):
        MMDiffTextToImagePipeline.from_pretrained(tmp_path / "empty")


def test_truncated_and_missing_weights_name_the_component(saved_pipe):
    weights = saved_pipe / "vae" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineLoadError, match="component 'vae'.*truncated or corrupt"):
        MMDiffTextToImagePipeline.from_pretrained(saved_pipe)
    weights.unlink()
    with pytest.raises(PipelineLoadError, match="component 'vae': no .safetensors"):
        MMDiffTextToImagePipeline.from_pretrained(saved_pipe)


def test_pickle_weights_are_refused(saved_pipe, pipe):
    folder = saved_pipe / "transformer"
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    # a pickle that would run code if loaded: it must never be opened
    torch.save(pipe.transformer.state_dict(), folder / "diffusion_pytorch_model.bin")
    with pytest.raises(PipelineLoadError, match="component 'transformer': only pickle weights"):
        MMDiffTextToImagePipeline.from_pretrained(saved_pipe)
    with pytest.raises(PipelineLoadError, match="safetensors only"):
        MMDiffTextToImagePipeline.from_pretrained(saved_pipe, use_safetensors=False)
