"""Frozen pretrained text encoders loaded from local folders, used as cross-attention context for text-to-image.

Three kinds, selected by name:

- ``"clip"``: a transformers ``CLIPTextModel`` and the tokenizer saved beside it;
- ``"t5"``: a transformers ``T5EncoderModel`` and its tokenizer;
- ``"open_clip"``: an open_clip text tower wrapped as ``OpenCLIPTextEncoder``, a diffusers model so that it is saved and
  loaded as a pipeline component. Without a tokenizer in its folder, the CLIP BPE tokenizer is used.

All of them return per-token hidden states ``(N, S, D_enc)`` through ``encode_with_frozen_encoder``; padding is passed
as an attention mask so the consumer can apply the same mask as its key padding mask.
"""

from __future__ import annotations

import inspect
import os
from functools import partial

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedModel, PreTrainedTokenizerBase, T5EncoderModel

from .hooks import input_device

FROZEN_ENCODER_KINDS = ("clip", "t5", "open_clip")
# Top-level names of the text tower's weights inside a full open_clip ``CLIP`` state dict.
_OPEN_CLIP_TEXT_KEYS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
# open_clip ``text_cfg`` entries about tokenization, pooled outputs or HF towers (rejected separately when set).
_OPEN_CLIP_IGNORED_CFG = (
    "hf_tokenizer_name",
    "tokenizer_mode",
    "tokenizer_kwargs",
    "output_tokens",
    "final_ln_after_pool",
    "hf_model_name",
    "hf_model_pretrained",
    "hf_proj_type",
    "hf_pooler_type",
)


class OpenCLIPTextEncoder(ModelMixin, ConfigMixin):
    """An open_clip text transformer (``open_clip.transformer.TextTransformer``) as a diffusers model.

    The configuration mirrors open_clip's ``text_cfg`` plus ``output_dim`` (the CLIP ``embed_dim``) and
    ``quick_gelu``; ``norm_eps`` and ``gelu_approximate`` flatten open_clip's ``norm_kwargs`` / ``act_kwargs``.
    Weights live under ``text.`` (the layout of open_clip's ``CustomTextCLIP``).
    """

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 512,
        heads: int = 8,
        layers: int = 12,
        mlp_ratio: float = 4.0,
        output_dim: int | None = 512,
        ls_init_value: float | None = None,
        quick_gelu: bool = False,
        gelu_approximate: str = "none",
        norm_eps: float = 1e-5,
        no_causal_mask: bool = False,
        pad_id: int = 0,
        eos_id: int = 2,
        pool_type: str = "argmax",
        proj_type: str = "linear",
        proj_bias: bool = False,
        block_type: str | None = None,
        qk_norm: bool = False,
        scaled_cosine_attn: bool = False,
        scale_heads: bool = False,
        scale_attn_inner: bool = False,
        scale_attn: bool = False,
        scale_fc: bool = False,
    ):
        super().__init__()
        # Imported here: open_clip pulls in torchvision and timm, too heavy for importing this module.
        from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer

        act_layer = QuickGELU if quick_gelu else partial(torch.nn.GELU, approximate=gelu_approximate)
        self.text = TextTransformer(
            context_length=context_length,
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            layers=layers,
            mlp_ratio=mlp_ratio,
            ls_init_value=ls_init_value,
            output_dim=output_dim,
            no_causal_mask=no_causal_mask,
            pad_id=pad_id,
            eos_id=eos_id,
            pool_type=pool_type,
            proj_type=proj_type,
            proj_bias=proj_bias,
            act_layer=act_layer,
            norm_layer=partial(LayerNorm, eps=norm_eps),
            block_type=block_type,
            qk_norm=qk_norm,
            scaled_cosine_attn=scaled_cosine_attn,
            scale_heads=scale_heads,
            scale_attn_inner=scale_attn_inner,
            scale_attn=scale_attn,
            scale_fc=scale_fc,
        )

    def _attention_bias(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask ``(N * heads, S, S)``: the causal mask (if any) plus masking of padded keys.

        Each query may always attend to itself, so a padded query never has an empty row (which would give NaNs).
        """
        n, s = attention_mask.shape
        bias = torch.zeros(n, 1, s, s, device=attention_mask.device, dtype=dtype)
        bias = bias.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
        bias = bias.masked_fill(torch.eye(s, dtype=torch.bool, device=bias.device), 0.0)
        if self.text.attn_mask is not None:
            bias = bias + self.text.attn_mask[:s, :s].to(device=bias.device, dtype=dtype)
        return bias.expand(n, self.config.heads, s, s).reshape(n * self.config.heads, s, s)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token features after ``ln_final`` (before pooling and projection).

        Args:
            input_ids: ``(N, S)`` token ids, ``S <= context_length``.
            attention_mask: ``(N, S)``, 1 for real tokens, 0 for padding; padded tokens are never attended to.

        Returns:
            ``(N, S, width)`` hidden states.
        """
        n, s = input_ids.shape
        if s > self.config.context_length:
            raise ValueError(f"sequence length {s} exceeds the encoder's context_length {self.config.context_length}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Tokenizers may give padding an id outside this vocabulary (an added pad token); its value is masked anyway.
        input_ids = input_ids.masked_fill(attention_mask == 0, self.config.pad_id)
        if int(input_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"token id {int(input_ids.max())} is outside the vocabulary ({self.config.vocab_size})")
        text = self.text
        cast_dtype = text.transformer.get_cast_dtype()
        x = text.token_embedding(input_ids).to(cast_dtype) + text.positional_embedding[:s].to(cast_dtype)
        x = text.transformer(x, attn_mask=self._attention_bias(attention_mask, x.dtype))
        return text.ln_final(x)

    @classmethod
    def from_open_clip_checkpoint(
        cls, model_config: dict, weights_path: str | os.PathLike, torch_dtype: torch.dtype | None = None
    ) -> OpenCLIPTextEncoder:
        """Build the text tower of an open_clip model and load its weights from a safetensors file.

        Args:
            model_config: the open_clip model config (``{"embed_dim", "quick_gelu"?, "text_cfg": {...}, ...}``).
            weights_path: safetensors state dict of the whole open_clip model (``CLIP`` layout with top-level
                ``token_embedding``/``transformer``/... keys, or ``CustomTextCLIP`` layout under ``text.``); vision
                weights are ignored.
        """
        weights_path = os.fspath(weights_path)
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"open_clip weights not found: {weights_path!r}")
        text_cfg = dict(model_config.get("text_cfg", {}))
        if text_cfg.get("hf_model_name"):
            raise ValueError("open_clip towers built on a Hugging Face model are not supported; load it as 'clip'/'t5'")
        if text_cfg.pop("embed_cls", False):
            raise ValueError("open_clip text towers with embed_cls (CoCa) are not supported")
        act_kwargs = text_cfg.pop("act_kwargs", None) or {}
        norm_kwargs = text_cfg.pop("norm_kwargs", None) or {}
        if set(act_kwargs) - {"approximate"} or set(norm_kwargs) - {"eps"}:
            raise ValueError(f"unsupported open_clip act_kwargs {act_kwargs} / norm_kwargs {norm_kwargs}")
        for key in _OPEN_CLIP_IGNORED_CFG:
            text_cfg.pop(key, None)
        unknown = set(text_cfg) - set(inspect.signature(cls.__init__).parameters)
        if unknown:
            raise ValueError(f"unsupported open_clip text_cfg entries: {sorted(unknown)}")
        encoder = cls(
            **text_cfg,
            output_dim=model_config.get("embed_dim", 512),
            quick_gelu=model_config.get("quick_gelu", False),
            gelu_approximate=act_kwargs.get("approximate", "none"),
            norm_eps=norm_kwargs.get("eps", 1e-5),
        )
        state = {}
        for key, value in load_file(weights_path).items():
            if key.startswith("text."):
                key = key[len("text.") :]
            elif key.split(".")[0] not in _OPEN_CLIP_TEXT_KEYS:
                continue
            if key != "attn_mask":  # the causal mask is rebuilt from the config, never loaded
                state[key] = value
        encoder.text.load_state_dict(state, strict=True)
        if torch_dtype is not None:
            encoder.to(torch_dtype)
        return encoder


def _has_file(folder: str, *names: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in names)


def _component_folder(path: str, subfolder: str, markers: tuple[str, ...]) -> str | None:
    """``path`` itself if it holds one of ``markers``, else ``path/subfolder`` (diffusers pipeline layout)."""
    for folder in (path, os.path.join(path, subfolder)):
        if _has_file(folder, *markers):
            return folder
    return None


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.eval()


def load_frozen_text_encoder(
    kind: str, path: str | os.PathLike, torch_dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
    """Load a pretrained text encoder and its tokenizer from a local folder, frozen (no grad, eval mode).

    ``path`` is either the model folder (``config.json`` + safetensors, tokenizer files beside it) or a diffusers
    pipeline folder with ``text_encoder/`` and ``tokenizer/`` subfolders.

    Returns:
        ``(encoder, tokenizer)``; the tokenizer is ``None`` only for ``"open_clip"`` without tokenizer files, in which
        case ``tokenize_for_frozen_encoder`` falls back to the CLIP BPE tokenizer.
    """
    if kind not in FROZEN_ENCODER_KINDS:
        raise ValueError(f"unknown frozen text encoder kind {kind!r}; valid kinds: {', '.join(FROZEN_ENCODER_KINDS)}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"text encoder folder not found: {path!r}")
    model_dir = _component_folder(path, "text_encoder", ("config.json",))
    if model_dir is None:
        raise FileNotFoundError(f"no config.json in {path!r} or its text_encoder/ subfolder")
    tokenizer_dir = _component_folder(path, "tokenizer", ("tokenizer.json", "tokenizer_config.json"))

    dtype_kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    if kind == "open_clip":
        dtype_kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        encoder = OpenCLIPTextEncoder.from_pretrained(model_dir, use_safetensors=True, **dtype_kwargs)
    else:
        model_cls = CLIPTextModel if kind == "clip" else T5EncoderModel
        encoder = model_cls.from_pretrained(model_dir, use_safetensors=True, **dtype_kwargs)
        if tokenizer_dir is None:
            raise FileNotFoundError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {path!r}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir is not None else None
    return _freeze(encoder), tokenizer


@torch.no_grad()
def encode_with_frozen_encoder(
    encoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Per-token hidden states of a frozen encoder, to be cross-attended with ``attention_mask`` as the key mask.

    Args:
        input_ids: ``(N, S)`` token ids.
        attention_mask: ``(N, S)``, 1 for real tokens and 0 for padding.

    Returns:
        ``(N, S, D_enc)`` last hidden states (for open_clip: the ``ln_final`` output before pooling), without grad.
    """
    device = input_device(encoder, input_ids)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if isinstance(encoder, OpenCLIPTextEncoder):
        return encoder(input_ids, attention_mask)
    if isinstance(encoder, PreTrainedModel):
        return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    raise TypeError(f"unsupported frozen text encoder {type(encoder).__name__}")


def frozen_encoder_dim(encoder: torch.nn.Module) -> int:
    """Width ``D_enc`` of the hidden states returned by ``encode_with_frozen_encoder``."""
    if isinstance(encoder, OpenCLIPTextEncoder):
        return int(encoder.config.width)
    config = getattr(encoder, "config", None)
    for name in ("hidden_size", "d_model"):
        if config is not None and hasattr(config, name):
            return int(getattr(config, name))
    raise TypeError(f"cannot tell the hidden size of {type(encoder).__name__}")
