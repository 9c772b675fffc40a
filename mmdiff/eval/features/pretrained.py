"""Pretrained feature spaces loaded from local files: open_clip and InceptionV3. Hub ids are fetched into local
folders before they get here (`mmdiff.eval.features.spaces.resolve_encoders`, with `mmdiff.hub.resolve_pretrained`).

- `OpenCLIPEncoder.from_local(source, checkpoint_path=None)`: an open_clip CLIP model. CLIP score and R-precision in
  its joint space are the figures papers report as "CLIP score"; FD in its image embeddings is "FD_CLIP".
- `InceptionEncoder.from_local(weights_file)`: torch-fidelity's InceptionV3 (the TF-FID port FID is reported with),
  2048-d pool features, so `metrics.frechet_distance` on them is FID as papers report it. A folder holding one
  .safetensors file (a hub snapshot) stands for that file.

Both implement the `EvalEncoder` protocol of `metrics.py`. Weights are safetensors, or a PyTorch file read with
`torch.load(weights_only=True)` (tensors and plain containers only: no code runs); unrestricted pickles are refused.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

TORCH_SUFFIXES = (".pt", ".pth", ".bin")  # read with torch.load(weights_only=True)
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's save_for_hf / Hugging Face hub layout
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def _existing(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _read_weights(path: Path) -> Any:
    """The contents of a .safetensors file, or of a PyTorch file read with weights_only=True and no fallback."""
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: weights must be {' or '.join(WEIGHT_SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # SafetensorError, UnpicklingError (weights_only refused an object), EOFError, ...
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: not a readable weights file ({type(err).__name__}: {first})") from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pt/.pth/.bin PyTorch file with weights_only=True (ValueError naming
    the file when it is neither, is damaged, or holds more than tensors)."""
    state = _read_weights(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: does not hold a state dict (a mapping of names to tensors)")
    return state


# ---------------------------------------------------------------- open_clip


def _builtin_name(source: str | os.PathLike) -> bool:
    """Whether `source` names one of open_clip's built-in architectures ("ViT-B-32") rather than a local path."""
    import open_clip

    return not Path(source).expanduser().exists() and open_clip.get_model_config(str(source)) is not None


def _open_clip_config(source: str | os.PathLike | dict[str, Any]) -> dict[str, Any] | None:
    """{"model_cfg": ..., "preprocess_cfg": ...} from a config dict / JSON file / folder, or None for a built-in
    model name. A bare model config (embed_dim, vision_cfg, text_cfg: open_clip's model_configs/*.json) is wrapped."""
    if isinstance(source, dict):
        config, where = source, "the open_clip config"
    else:
        path = Path(source).expanduser()
        if _builtin_name(source):
            return None
        if not path.exists() and not str(source).endswith(".json") and not {"/", os.sep} & set(str(source)):
            raise ValueError(
                f"{source!r} is neither a built-in open_clip model name (open_clip.list_models()) nor a config file "
                "or folder"
            )
        path = _existing(path / OPEN_CLIP_CONFIG if path.is_dir() else path, "open_clip config")
        try:
            config, where = json.loads(path.read_text()), str(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a JSON open_clip config ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where}: an open_clip config is a JSON object")
    config = config if "model_cfg" in config else {"model_cfg": config}
    if not isinstance(config["model_cfg"], dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(
        config["model_cfg"]
    ):
        raise ValueError(f"{where}: an open_clip model config needs embed_dim, vision_cfg and text_cfg")
    return config


def _folder_weights(folder: Path) -> Path:
    """The weights file of a model folder: open_clip_model.safetensors, else the first other .safetensors, else the
    first PyTorch file (sorted names). ValueError when there is none: open_clip would build a random model."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no weights file ({', '.join(WEIGHT_SUFFIXES)}) beside {OPEN_CLIP_CONFIG}")
    return sorted(files, key=lambda p: (p.name != OPEN_CLIP_WEIGHTS, p.suffix != ".safetensors"))[0]


class OpenCLIPEncoder:
    """An open_clip CLIP model as an evaluation feature space (batched, no grad, eval mode).

    image_features: image embeddings before normalisation (N, E); embed_images / embed_texts: L2-normalised (N, E).
    open_clip's own preprocessing resizes and centre-crops every image to the model's resolution (image_size None).
    """

    has_text = True
    image_size = None

    def __init__(self, model, preprocess, tokenizer, name: str, device: str = "cpu", batch_size: int = 64) -> None:
        self.model, self.preprocess, self.tokenizer = model.eval().to(device), preprocess, tokenizer
        self.name, self.device, self.batch_size = name, device, batch_size

    @classmethod
    def from_local(
        cls,
        source: str | os.PathLike | dict[str, Any],
        checkpoint_path: str | os.PathLike | None = None,
        device: str = "cpu",
        batch_size: int = 64,
    ) -> OpenCLIPEncoder:
        """Load from local files; nothing is downloaded here (a hub id is resolved to a folder by the caller).

        source: a model folder in open_clip's hub layout (`open_clip_config.json` + `open_clip_model.safetensors`),
        then checkpoint_path may be omitted; or, with checkpoint_path (a .safetensors, or a .pt/.pth/.bin read
        weights_only): a built-in architecture name ("ViT-B-32"), a config dict, or a config JSON file/folder (hub
        style with "model_cfg", or a bare model config as in open_clip's model_configs/).
        FileNotFoundError names a missing file or folder; ValueError names a file that is not a config or not a
        checkpoint of the model. A text tower from transformers (`hf_model_name`) or a SigLIP tokenizer is resolved by
        transformers: it must be a local folder or in the Hugging Face cache (run with HF_HUB_OFFLINE=1).
        """
        if isinstance(source, str | os.PathLike) and str(source).startswith(("hf-hub:", "local-dir:")):
            raise ValueError(
                f"{source}: open_clip's hub names would download past mmdiff's checks; give a local folder or file, "
                "or the hub id as org/name to --clip"
            )
        if checkpoint_path is None:
            if isinstance(source, dict) or _builtin_name(source):
                raise ValueError(f"{source}: give its weights file as checkpoint_path, or an open_clip model folder")
            folder = _existing(source, "open_clip model folder")
            if not folder.is_dir():
                raise ValueError(f"{source}: without checkpoint_path, give an open_clip model folder")
            config, checkpoint = _open_clip_config(folder), _folder_weights(folder)
        else:
            checkpoint = _existing(checkpoint_path, "open_clip checkpoint")
            if checkpoint.is_dir() or checkpoint.suffix not in WEIGHT_SUFFIXES:
                raise ValueError(f"{checkpoint}: an open_clip checkpoint must be a {' or '.join(WEIGHT_SUFFIXES)} file")
            config = _open_clip_config(source)
        if checkpoint.suffix != ".safetensors":
            # open_clip reads PyTorch files weights_only, but retries with a plain torch.load when that raises
            # TypeError (meant for old torch; before torch 2.6 the retry unpickles anything): read it here first, with
            # no retry, so that only files weights_only accepts reach open_clip
            _read_weights(checkpoint)
        if config is None:  # a built-in name: open_clip reads the file given as `pretrained` (weights_only)
            return cls._build(str(source), checkpoint, str(source), str(source), checkpoint, device, batch_size)
        label = "custom config" if isinstance(source, dict) else Path(source).stem  # folder or JSON file name
        # open_clip builds a custom config from a folder (`local-dir:`): one with the config and a link to the weights
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / OPEN_CLIP_CONFIG).write_text(json.dumps(config))
            link = Path(tmp) / f"open_clip_model{checkpoint.suffix}"
            try:
                link.symlink_to(checkpoint.resolve())
            except OSError:  # no symlinks (Windows without developer mode): a copy does as well
                shutil.copyfile(checkpoint, link)
            # a model folder may hold a transformers tokenizer beside its config: read it from there
            tokenizer_dir = source if not isinstance(source, dict) and Path(source).is_dir() else tmp
            return cls._build(
                f"local-dir:{tmp}", None, f"local-dir:{tokenizer_dir}", label, checkpoint, device, batch_size
            )

    @classmethod
    def _build(
        cls,
        model_name: str,
        pretrained: Path | None,
        tokenizer_name: str,
        label: str,
        checkpoint: Path,
        device: str,
        batch_size: int,
    ) -> OpenCLIPEncoder:
        """open_clip's model, preprocessing and tokenizer; `label` names the architecture in errors and reports."""
        import open_clip

        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=str(pretrained.resolve()) if pretrained else None,  # an absolute path is never a tag
                device=device,
                pretrained_image=False,  # never fetch tower weights: the checkpoint holds them all
                pretrained_text=False,
                weights_only=True,
            )
            tokenizer = open_clip.get_tokenizer(tokenizer_name)
        except Exception as err:  # RuntimeError (missing / unexpected keys, shapes), SafetensorError, Unpickling...
            first = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(
                f"{checkpoint}: not a valid checkpoint for {label} ({type(err).__name__}: {first})"
            ) from None
        return cls(model, preprocess, tokenizer, f"open_clip:{label} ({checkpoint})", device, batch_size)

    @torch.no_grad()
    def image_features(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """(N, E) float32 image embeddings before normalisation."""
        if not images:
            raise ValueError("open_clip image_features needs at least one image")
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start : start + self.batch_size]])
            out.append(self.model.encode_image(batch.to(self.device)).float().cpu())  # (B, E)
        return torch.cat(out)

    def embed_images(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """(N, E) L2-normalised image embeddings."""
        return torch.nn.functional.normalize(self.image_features(images), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(N, E) L2-normalised text embeddings (open_clip's tokenizer truncates at the context length)."""
        if not texts:
            raise ValueError("open_clip embed_texts needs at least one text")
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[start : start + self.batch_size]).to(self.device)  # (B, context_length)
            out.append(self.model.encode_text(tokens).float().cpu())  # (B, E)
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)


# ---------------------------------------------------------------- InceptionV3


def inception_weights_to_safetensors(weights_file: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Convert torch-fidelity's published `weights-inception-2015-12-05-6726825d.pth` (a plain state dict, read with
    weights_only=True) to a .safetensors file for `InceptionEncoder.from_local`."""
    from safetensors.torch import save_file

    state = load_weights(_existing(weights_file, "InceptionV3 weights file"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_file))
    return Path(out_file)


def _single_safetensors(folder: Path, what: str) -> Path:
    """The one .safetensors file of `folder` (a hub snapshot of a weights-only repo); ValueError otherwise."""
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        found = f"{len(files)} .safetensors files" if files else "no .safetensors file"
        raise ValueError(f"{folder}: {what} as a folder must hold exactly one .safetensors file, found {found}")
    return files[0]


class InceptionEncoder:
    """torch-fidelity's InceptionV3 (FID's feature extractor): 2048-d pool features of uint8 RGB images; no text side.

    Images go in as uint8 at their own size: the extractor resizes them to 299 x 299 itself, with TensorFlow 1's
    bilinear resampling, as the reference FID code does (image_size None).
    """

    has_text = False
    image_size = None

    def __init__(self, extractor: torch.nn.Module, name: str, device: str = "cpu", batch_size: int = 32) -> None:
        self.extractor, self.name, self.device, self.batch_size = extractor.eval().to(device), name, device, batch_size

    @classmethod
    def from_local(cls, weights_file: str | os.PathLike, device: str = "cpu", batch_size: int = 32) -> InceptionEncoder:
        """weights_file: .safetensors, or torch-fidelity's .pth (read with weights_only=True), or a folder (a hub
        snapshot) holding one .safetensors file. FileNotFoundError when it is missing, ValueError when it is not
        InceptionV3's weights."""
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = _existing(weights_file, "InceptionV3 weights file")
        if path.is_dir():
            path = _single_safetensors(path, "InceptionV3 weights")
        state = load_weights(path)
        # torch-fidelity's constructor reads its path argument with torch.load(weights_only=False), an unrestricted
        # pickle; it is handed the tensors read safely above, re-serialised in memory, instead of the user's file
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        try:
            extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], buffer)
        except RuntimeError as err:  # load_state_dict: missing or unexpected keys, wrong shapes
            raise ValueError(f"{path}: not InceptionV3 weights ({str(err).strip().splitlines()[0]})") from None
        return cls(extractor, f"InceptionV3 torch-fidelity ({path})", device, batch_size)

    @torch.no_grad()
    def image_features(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """(N, 2048) float32 pool features; each batch holds images of one size (nothing is resized here)."""
        out = []
        start = 0
        while start < len(images):
            size, end = images[start].size, start + 1
            while end < len(images) and end - start < self.batch_size and images[end].size == size:
                end += 1
            arrays = np.stack([np.asarray(im.convert("RGB")) for im in images[start:end]])  # (B, H, W, 3) uint8
            batch = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous().to(self.device)  # (B, 3, H, W)
            out.append(self.extractor(batch)[0].float().cpu())  # (B, 2048)
            start = end
        return torch.cat(out) if out else torch.zeros(0, 2048)

    def embed_images(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        raise ValueError("InceptionV3 has no text side: CLIP score and R-precision need an encoder with one")

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        raise ValueError("InceptionV3 has no text side: CLIP score and R-precision need an encoder with one")
