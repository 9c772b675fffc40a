"""`mmdiff generate / caption / sample-pairs / vary` in-process on a tiny saved pipeline, and pipeline bad inputs."""

from __future__ import annotations

import json

import PIL.Image
import pytest

from mmdiff.cli import main

PROMPTS = ["a small red circle above a large blue square", "there is a small green triangle"]


def test_generate_writes_pngs_index_and_grid(saved_pipe, tmp_path):
    out = tmp_path / "gen"
    args = ["generate", "--model", str(saved_pipe), "--out", str(out), "--quiet", "--steps", "2"]
    args += ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-images-per-prompt", "2", "--grid"]
    args += ["--scheduler", "dpm++", "--guidance-scale", "2.5", "--guidance-interval", "0.2", "0.9"]
    args += ["--guidance-rescale", "0.5", "--negative-prompt", "a large yellow circle", "--seed", "3"]
    assert main(args) == 0
    index = json.loads((out / "index.json").read_text())
    assert [r["prompt"] for r in index] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert all(PIL.Image.open(out / r["file"]).size == (16, 16) for r in index)
    grid = PIL.Image.open(out / "grid.png")
    assert grid.size == (2 * 128, 2 * 128)  # 2 prompts x 2 samples, small images upscaled to 128 px cells


def test_caption_template_tokens_and_text_output(saved_pipe, tmp_path, tokenizer):
    images = []
    for i, colour in enumerate(("red", "blue")):
        images.append(tmp_path / f"{i}.png")
        PIL.Image.new("RGBA", (20, 12), colour).save(images[-1])
    out = tmp_path / "caps.json"
    template = f"a {tokenizer.mask_token} circle"
    args = ["caption", "--model", str(saved_pipe), *map(str, images), "--template", template, "--quiet"]
    args += ["--out", str(out), "--tokens", "--remasking", "random", "--temperature", "0.5"]
    assert main(args) == 0
    records = json.loads(out.read_text())
    assert [r["file"] for r in records] == list(map(str, images))
    for record in records:
        words = record["caption"].split()
        assert len(words) == 3 and words[0] == "a" and words[2] == "circle" and len(record["confidences"]) == 12
    txt = tmp_path / "caps.txt"
    args = ["caption", "--model", str(saved_pipe), "--unconditional", "3", "--prompt", "a small", "--quiet"]
    assert main([*args, "--max-length", "6", "--steps", "2", "--out", str(txt)]) == 0
    lines = txt.read_text().splitlines()
    assert len(lines) == 3 and all(line.startswith("a small") for line in lines)


def test_sample_pairs_and_vary(saved_pipe, tmp_path):
    out = tmp_path / "pairs"
    assert (
        main(
            [
                "sample-pairs",
                "--model",
                str(saved_pipe),
                "--out",
                str(out),
                "--num",
                "2",
                "--steps",
                "2",
                "--caption-steps",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert len(json.loads((out / "index.json").read_text())) == 2 and (out / "0001.png").is_file()
    source = tmp_path / "src.png"
    PIL.Image.new("L", (16, 16), 200).save(source)
    out = tmp_path / "vary"
    assert (
        main(
            [
                "vary",
                "--model",
                str(saved_pipe),
                str(source),
                "--out",
                str(out),
                "--num-variations",
                "3",
                "--steps",
                "2",
                "--quiet",
                "--grid",
            ]
        )
        == 0
    )
    index = json.loads((out / "index.json").read_text())
    assert len(index) == 3 and len({r["caption"] for r in index}) == 1 and (out / "grid.png").is_file()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["generate", "--prompt", "x", "--guidance-scale", "-1"], "guidance_scale"),
        (["generate", "--prompt", "x", "--steps", "0"], "num_inference_steps"),
        (["generate", "--prompt", "x", "--height", "18"], "height=18 cannot be produced"),
        (["generate", "--prompt", "x", "--scheduler", "lms"], "unknown scheduler"),
        (["caption", "--unconditional", "1", "--template", "a small circle"], "has no blank"),
        (["caption", "--unconditional", "1", "--max-length", "1", "--prompt", "a small"], "longer than max_length"),
        (["caption"], "give image files"),
    ],
)
def test_cli_bad_inputs_exit_2_with_a_message(saved_pipe, tmp_path, capsys, extra, message):
    assert main([*extra, "--model", str(saved_pipe), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_cli_names_the_broken_component(saved_pipe, tmp_path, capsys):
    (saved_pipe / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 10)
    assert main(["generate", "--model", str(saved_pipe), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    assert "component 'transformer'" in capsys.readouterr().err


def test_text_to_image_bad_inputs(pipe):
    cases = [
        ({"prompt": []}, ValueError, "empty list"),
        ({"prompt": ["a", 3]}, TypeError, "list of strings"),
        ({"guidance_scale": -0.5}, ValueError, "guidance_scale"),
        ({"guidance_scale": float("nan")}, ValueError, "guidance_scale"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps"),
        ({"num_inference_steps": 2.5}, ValueError, "num_inference_steps"),
        ({"height": 14}, ValueError, "height=14 cannot be produced"),
        ({"width": 0}, ValueError, "width=0 cannot be produced"),
        ({"num_images_per_prompt": 0}, ValueError, "num_images_per_prompt"),
        ({"guidance_rescale": 1.5}, ValueError, "guidance_rescale"),
        ({"guidance_interval": (0.5, 2.0)}, ValueError, "guidance_interval"),
        ({"output_type": "jpg"}, ValueError, "output_type"),
        ({"latents": __import__("torch").zeros(1, 4, 4, 4)}, ValueError, "latents must have shape"),
    ]
    for kwargs, error, match in cases:
        kwargs = {"prompt": "a red circle", "num_inference_steps": 1, **kwargs}
        with pytest.raises(error, match=match):
            pipe(**kwargs)


def test_unset_options_take_the_folders_sample_settings(saved_pipe, tmp_path):
    # the folder's sampling defaults (the pipeline's `sample_defaults` setting in model_index.json, written from the
    # training config's `sample:` section) are the default of every command and of both pipelines: a run without
    # --steps / --guidance-scale equals one that passes the folder's values, and differs from the library defaults
    import shutil

    from mmdiff.config import SampleConfig
    from mmdiff.pipelines import MMDiffImageToTextPipeline, MMDiffTextToImagePipeline

    folder = tmp_path / "with_settings"
    shutil.copytree(saved_pipe, folder)
    settings = {"num_inference_steps": 3, "guidance_scale": 1.5, "caption_steps": 4, "caption_guidance_scale": 1.0}
    index_path = folder / "model_index.json"
    index_path.write_text(json.dumps({**json.loads(index_path.read_text()), "sample_defaults": settings}))
    assert SampleConfig().guidance_scale != 1.5 and SampleConfig().num_inference_steps != 3

    def generate(name: str, *extra: str) -> list:
        out = tmp_path / name
        assert (
            main(["generate", "--model", str(folder), "--out", str(out), "--quiet", "--prompt", PROMPTS[0], *extra])
            == 0
        )
        return [PIL.Image.open(out / r["file"]).tobytes() for r in json.loads((out / "index.json").read_text())]

    unset = generate("unset")
    assert unset == generate("explicit", "--steps", "3", "--guidance-scale", "1.5")
    assert unset != generate("library", "--steps", "50", "--guidance-scale", "3.0")

    t2i = MMDiffTextToImagePipeline.from_pretrained(folder)
    assert t2i.sample_config == SampleConfig(**settings)
    i2t = MMDiffImageToTextPipeline.from_pretrained(folder)
    i2t.set_progress_bar_config(disable=True)
    image = PIL.Image.new("RGB", (16, 16), "red")
    calls = []
    # the schedule sampler takes caption_steps; K steps asked for select it
    i2t(image, sampler="schedule", callback_on_step_end=lambda pipe, i, t, tensors: calls.append(i) or tensors)
    assert len(calls) == 4  # caption_steps
    assert i2t(image, sampler="schedule").text == i2t(image, num_inference_steps=4, guidance_scale=1.0).text
