"""MMDiffTransformer2DModel: one cross-attention DiT for both directions between images and text.

The same blocks denoise either modality, chosen by the input: float latents (N, C, H, W) are the image task, integer
token ids (N, L) are the text task. Each stream cross-attends to a context sequence (text for images, image for text)
with a key padding mask; a learned null context stands in when the condition is dropped. The model returns raw
predictions only: noise processes, losses and guidance live in `mmdiff.diffusion` (docs/architecture.md, decision 3).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin

from .blocks import AbsorbedContext, BlockContext, CrossAttention, DiTBlock, EncoderBlock, FinalLayer, SelfAttention
from .cache import check_cache_config, register_blocks_for_cache
from .hooks import offload_entry_point, weights_under_hooks

TASK_IMAGE, TASK_TEXT = 0, 1
ADALN_MODES = ("per_block", "single")
MODALITIES = ("text", "image")
# one block's cross-attention cache for a fixed context (the model's `context_kv`): keys and values, or absorbed
ContextCache = tuple[torch.Tensor, torch.Tensor] | AbsorbedContext


def trim_padding(sequence: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing positions where `mask` (N, L) is False in every row from `sequence` (N, L, ...) and the mask;
    at least one position stays."""
    valid = mask.any(0).nonzero()
    length = int(valid.max()) + 1 if valid.numel() else 1
    if length == mask.shape[1]:
        return sequence, mask
    return sequence[:, :length], mask[:, :length]


def select_context_rows(cache: list[ContextCache], rows: torch.Tensor | slice) -> list[ContextCache]:
    """The rows `rows` (an index tensor or a slice) of a `context_kv` cache, in either of its forms."""
    return [
        AbsorbedContext(*(t[rows] for t in entry))
        if isinstance(entry, AbsorbedContext)
        else (entry[0][rows], entry[1][rows])
        for entry in cache
    ]


@dataclass
class PreparedContext:
    """Every block's cross-attention context for one forward, prepared outside the blocks (`forward` builds the plain
    one from a context; `mmdiff.conditioning.prepare_context` builds the fast ones: cached or absorbed K/V, null rows,
    repeated rows, for the classifier-free-guidance batch it owns).

    blocks: one `BlockContext` per block.
    repeat: (K,) indices into `sample` when the batch is `cat([sample[repeat], sample])`: `sample` holds only the
        distinct rows (a CFG batch repeats each row's latents and timestep for its unconditional twin), and what comes
        before the first block's cross-attention runs once per distinct row; `blocks[0].repeat` says where the rows
        are repeated.
    """

    blocks: list[BlockContext]
    repeat: torch.Tensor | None = None


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (N, D): sinusoidal features of `scale` t (DiT: 1000 t), then an MLP (DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t: (N,) -> (N, D) in `dtype`, the activations' dtype (not the weights': with layerwise casting they are
        stored in float8 and cast inside each layer's forward)."""
        freqs = get_timestep_embedding(t * self.scale, self.freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.mlp(freqs.to(dtype))


class MMDiffTransformer2DModel(ModelMixin, ConfigMixin, CacheMixin):
    """Shared DiT backbone with image and text heads, a joint text context encoder and an image context encoder.

    Args:
        sample_size: latent height/width the model is trained at (sets the positional embedding's base grid).
        in_channels: latent channels.
        patch_size: latent patch size.
        vocab_size: caption vocabulary (the tokenizer's length, mask and pad included).
        max_text_length: caption length L in tokens.
        hidden_size, depth, num_heads, mlp_ratio: backbone shape.
        text_encoder_depth: layers of the jointly trained text context encoder (shares the token embedding).
        image_encoder_depth: layers over the patch-embedded clean latents that form the image context.
        null_context_length: tokens in each learned null context.
        external_text_dim: width of a frozen pretrained text encoder's hidden states; when set, text contexts come
            from `encode_external_text` (a projection) instead of the joint encoder.
        adaln: "per_block" (DiT: every block maps the conditioning vector to its shift/scale/gate with its own
            linear) or "single" (PixArt-alpha: one shared linear, plus a learned (6, D) offset table per block),
            the default, as in the training config (`model.adaln`). A saved model without the key was trained before
            the option existed, per block, and loads so (`extract_init_dict`).
        interval_conditioning: also condition on an interval [r, t] (`forward(..., r_timestep=r)`): a MeanFlow
            model of the average velocity, which samples in one or a few steps (`mmdiff.diffusion.meanflow`).
        timestep_scale: t is embedded as sinusoids of `timestep_scale * t` (DiT: 1000). MeanFlow models take 1, as
            SiT and MeanFlow do: their target holds the model's own derivative in t, and features that turn 1000
            radians per unit of t make it large and training diverge (measured on a tiny model: at 1000 the loss
            grew from 2.2 to 6e4 in 25 steps, at 1 it fell to 1.1).
        guidance_embeds: the guidance scale w is a conditioning input (`forward(..., guidance=w)`), as FLUX.1-dev's
            `guidance_embeds`: a MeanFlow model trained on guided targets over a range of w (improved MeanFlow,
            arXiv 2512.02012) gives the guided prediction in one forward, with no unconditional rows; w = 1 (and
            None) is unguided.
    """

    _supports_gradient_checkpointing = True
    # layerwise casting (fp8 storage) leaves these in the compute dtype: embeddings, norms and the adaLN input
    # (precision-critical, as diffusers' own DiTs keep them)
    _skip_layerwise_casting_patterns = [
        "patch_embed",
        "image_context_embed",
        "token_embed",
        "norm",
        "t_embedder",
        "interval_embedder",
        "guidance_embedder",
    ]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 8,
        in_channels: int = 4,
        patch_size: int = 2,
        vocab_size: int = 64,
        max_text_length: int = 32,
        hidden_size: int = 256,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        text_encoder_depth: int = 2,
        image_encoder_depth: int = 1,
        null_context_length: int = 1,
        external_text_dim: int | None = None,
        adaln: str = "single",
        interval_conditioning: bool = False,
        timestep_scale: float = 1000.0,
        guidance_embeds: bool = False,
    ):
        super().__init__()
        if adaln not in ADALN_MODES:
            raise ValueError(f"adaln={adaln!r} is not one of {ADALN_MODES}")
        d, p = hidden_size, patch_size
        self.gradient_checkpointing = False
        self.t_embedder = TimestepEmbedder(d, scale=timestep_scale)
        # MeanFlow: the interval's length h = t - r, embedded like t and added to it (h = 0: the instantaneous velocity)
        self.interval_embedder = TimestepEmbedder(d, scale=timestep_scale) if interval_conditioning else None
        # embedded guidance: w - 1 (0 = unguided) embedded like t, at one radian per unit of w
        self.guidance_embedder = TimestepEmbedder(d, scale=1.0) if guidance_embeds else None
        self.task_embed = nn.Embedding(2, d)

        # noisy streams
        self.patch_embed = nn.Conv2d(in_channels, d, kernel_size=p, stride=p)
        self.token_embed = nn.Embedding(vocab_size, d)  # shared by the noisy text stream and the text encoder
        self.text_pos_embed = nn.Parameter(torch.zeros(1, max_text_length, d))

        # contexts
        self.context_text_pos_embed = nn.Parameter(torch.zeros(1, max_text_length, d))
        self.text_encoder_blocks = nn.ModuleList(
            EncoderBlock(d, num_heads, mlp_ratio) for _ in range(text_encoder_depth)
        )
        self.text_context_norm = nn.LayerNorm(d)
        self.external_text_proj = nn.Linear(external_text_dim, d) if external_text_dim else None
        self.image_context_embed = nn.Conv2d(in_channels, d, kernel_size=p, stride=p)
        self.image_encoder_blocks = nn.ModuleList(
            EncoderBlock(d, num_heads, mlp_ratio) for _ in range(image_encoder_depth)
        )
        self.image_context_norm = nn.LayerNorm(d)
        self.null_text_context = nn.Parameter(torch.zeros(null_context_length, d))
        self.null_image_context = nn.Parameter(torch.zeros(null_context_length, d))

        single = adaln == "single"
        self.adaLN_single = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d)) if single else None
        self.blocks = nn.ModuleList(DiTBlock(d, num_heads, mlp_ratio, adaln_single=single) for _ in range(depth))
        self.image_head = FinalLayer(d, p * p * in_channels)
        self.text_head = FinalLayer(d, vocab_size)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers fills a missing config key with the __init__ default; a saved model without `adaln` predates
        the option and was trained per block."""
        if "adaln" not in config_dict:
            config_dict = {**config_dict, "adaln": "per_block"}
        return super().extract_init_dict(config_dict, **kwargs)

    def enable_cache(self, config) -> None:
        """diffusers' step caching (`FirstBlockCacheConfig`, `TaylorSeerCacheConfig`) on `blocks`; see
        `mmdiff.models.cache` for what fits and docs/performance.md for the CFG rule. Sampling then goes through
        `GuidedModel`, which names each forward's row layout as the hooks' `cache_context`."""
        check_cache_config(config)
        register_blocks_for_cache()
        super().enable_cache(config)

    def set_attention_slice(self, slice_size: str | int | None) -> None:
        """Attention slicing, as diffusers' `pipe.enable_attention_slicing(slice_size)` sets it: "auto" computes half
        the heads of one row at a time, "max" one (row, head) pair, an int that many pairs, None turns it off.
        Self- and cross-attention in every block and context encoder; the absorbed cross-attention path (used only
        when its scores are smaller than the activations, heads x S < width) is not sliced."""
        heads = self.config.num_heads
        if slice_size == "auto":
            slice_size = max(heads // 2, 1)
        elif slice_size == "max":
            slice_size = 1
        elif slice_size is not None and (
            isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1
        ):
            raise ValueError(f"slice_size must be 'auto', 'max', a positive integer or None, got {slice_size!r}")
        for module in self.modules():
            if isinstance(module, SelfAttention | CrossAttention):
                module.slice_size = slice_size

    def initialize_weights(self) -> None:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        for conv in (self.patch_embed, self.image_context_embed):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        for param in (self.token_embed.weight, self.text_pos_embed, self.context_text_pos_embed):
            nn.init.normal_(param, std=0.02)
        for param in (self.null_text_context, self.null_image_context):
            nn.init.normal_(param, std=0.02)
        nn.init.normal_(self.task_embed.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.interval_embedder is not None:  # starts as a flow-matching model: the interval adds nothing
            nn.init.normal_(self.interval_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.interval_embedder.mlp[2].weight)
            nn.init.zeros_(self.interval_embedder.mlp[2].bias)
        if self.guidance_embedder is not None:  # starts unguided: a model fine-tuned from one without it is unchanged
            nn.init.normal_(self.guidance_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.guidance_embedder.mlp[2].weight)
            nn.init.zeros_(self.guidance_embedder.mlp[2].bias)
        # adaLN-Zero: every block starts as the identity and both heads predict zeros
        for linear in [block.adaLN_modulation[-1] for block in self.blocks if block.adaLN_modulation is not None] + (
            [self.adaLN_single[-1]] if self.adaLN_single is not None else []
        ):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        for head in (self.image_head, self.text_head):
            for layer in (head.adaLN_modulation[-1], head.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    # ---------------------------------------------------------------- contexts

    def _image_pos_embed(self, grid_h: int, grid_w: int, like: torch.Tensor) -> torch.Tensor:
        """Fixed 2D sin-cos embedding (1, h*w, D) for a patch grid, cached per shape/device/dtype."""
        key = (grid_h, grid_w, like.device, like.dtype)
        if key not in self._pos_cache:
            base = self.config.sample_size // self.config.patch_size
            pos = get_2d_sincos_pos_embed(
                self.config.hidden_size, (grid_h, grid_w), base_size=base, interpolation_scale=1.0, output_type="pt"
            )
            self._pos_cache[key] = pos.to(device=like.device, dtype=like.dtype)[None]
        return self._pos_cache[key]

    def _patchify(self, embed: nn.Conv2d, latents: torch.Tensor) -> torch.Tensor:
        x = embed(latents)  # (N, D, h, w)
        h, w = x.shape[-2:]
        # contiguous: a transposed view would pass its strides on through every residual add, and each LayerNorm
        # (forward and backward) would then copy its input
        x = x.flatten(2).transpose(1, 2).contiguous()  # (N, h*w, D)
        return x + self._image_pos_embed(h, w, x)

    @offload_entry_point
    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint text context encoder. input_ids: (N, L); attention_mask: (N, L), 1 on real tokens.

        Returns the context (N, L', D) and its key mask (N, L') bool, where L' <= L drops the trailing positions that
        are padding in every row (dynamic padding: exact, as masked keys get no attention weight, and it saves the
        encoder, the cross-attention K/V and the attention scores their share of padding).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        input_ids, mask = trim_padding(input_ids, attention_mask.bool())
        x = self.token_embed(input_ids) + self.context_text_pos_embed[:, : input_ids.shape[1]]
        for block in self.text_encoder_blocks:
            x = block(x, mask)
        return self.text_context_norm(x), mask

    @offload_entry_point
    def encode_external_text(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Project a frozen text encoder's hidden states (N, S, E) into context space (N, S', D), S' <= S without
        the trailing all-padding positions (see `encode_text`)."""
        if self.external_text_proj is None:
            raise ValueError("this model was built without external_text_dim; it has no frozen-encoder projection")
        hidden_states, mask = trim_padding(hidden_states, attention_mask.bool())
        return self.text_context_norm(self.external_text_proj(hidden_states)), mask

    @offload_entry_point
    def encode_image(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image context from clean scaled latents (N, C, H, W): (N, S, D) with S = H*W/p^2, and an all-True mask."""
        x = self._patchify(self.image_context_embed, latents)
        for block in self.image_encoder_blocks:
            x = block(x)
        x = self.image_context_norm(x)
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    @offload_entry_point
    def null_context(
        self, modality: str, batch_size: int, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned null context for `modality` ("text" or "image"), right-padded to `length` tokens.

        Returns (N, length, D) and its key mask (N, length).
        """
        if modality not in MODALITIES:
            raise ValueError(f"unknown context modality {modality!r}; expected one of {MODALITIES}")
        null = self.null_text_context if modality == "text" else self.null_image_context
        n_null = null.shape[0]
        length = max(length or n_null, n_null)
        context = null.new_zeros(batch_size, length, null.shape[1])
        context[:, :n_null] = null
        mask = torch.zeros(batch_size, length, dtype=torch.bool, device=null.device)
        mask[:, :n_null] = True
        return context, mask

    @offload_entry_point
    def drop_context(
        self, context: torch.Tensor, mask: torch.Tensor, drop_ids: torch.Tensor, modality: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the rows where `drop_ids` (N,) is True with the null context (condition dropout / CFG)."""
        null, null_mask = self.null_context(modality, context.shape[0], context.shape[1])
        if null.shape[1] > context.shape[1]:  # a context shorter than the null context: pad it
            pad = null.shape[1] - context.shape[1]
            context = torch.nn.functional.pad(context, (0, 0, 0, pad))
            mask = torch.nn.functional.pad(mask, (0, pad), value=False)
        keep = ~drop_ids.bool()
        context = torch.where(keep[:, None, None], context, null.to(context.dtype))
        return context, torch.where(keep[:, None], mask, null_mask)

    @offload_entry_point
    def context_kv(
        self, context: torch.Tensor, context_mask: torch.Tensor | None = None, absorb: bool | None = False
    ) -> list[ContextCache]:
        """Every block's cross-attention cache for a context (N, S, D); compute once per sampling call.

        absorb=False: keys and values, 2 x (N, H, S, d) per block; `forward` then needs the context's mask.
        absorb=True: an `AbsorbedContext` per block, the query and output projections folded into the keys and values
        with `context_mask` (N, S) folded in (exact up to rounding; fewer FLOPs per query when heads x S < width).
        absorb=None: absorb when that takes fewer FLOPs (`absorb_pays`) and the learned null contexts are one token long
        (a longer null context is merged with the keys and values, which needs them unabsorbed).
        """
        if absorb is None:
            absorb = self.absorb_pays(context.shape[1])
        if absorb:
            return [block.cross_attn.absorb(context, context_mask) for block in self.blocks]
        return [block.cross_attn.context_kv(context) for block in self.blocks]

    def absorb_pays(self, context_length: int, query_tokens: int | None = None) -> bool:
        """Whether an absorbed context (`AbsorbedContext`) takes fewer FLOPs than keys and values.

        Per query token, absorbed cross-attention costs 2 x heads x S x D multiply-adds against 2 x D^2 for the query
        and output projections. Folding costs 2 x S x D^2 per context row: nothing per step when the context is
        cached for a sampling call (`query_tokens=None`: absorb when heads x S < D), once per forward otherwise
        (`query_tokens=T`: absorb when S x (D + T x heads) < T x D). Never with a null context longer than one token,
        nor while offload or layerwise-casting hooks manage the weights (`weights_under_hooks`).
        """
        if self.null_text_context.shape[0] != 1 or self.null_image_context.shape[0] != 1:
            return False
        if weights_under_hooks(self):  # folding reads the projection weights outside their layers' forward
            return False
        heads, width = self.config.num_heads, self.config.hidden_size
        if query_tokens is None:
            return heads * context_length < width
        return context_length * (width + query_tokens * heads) < query_tokens * width

    @offload_entry_point
    def null_outputs(self, modality: str) -> list[torch.Tensor]:
        """What each block needs for rows on the null context of `modality`, fixed for fixed weights: compute it once per
        sampling call and hand it to `mmdiff.conditioning.prepare_context`.

        One-token null context: the block's cross-attention output (1, D), the same for every query. Longer: the
        block's null keys and values stacked, (2, 1, H, n_null, d), which `mmdiff.conditioning.prepare_context`
        prepends to the other rows' K/V.
        """
        if modality not in MODALITIES:
            raise ValueError(f"unknown context modality {modality!r}; expected one of {MODALITIES}")
        null = self.null_text_context if modality == "text" else self.null_image_context
        if null.shape[0] == 1:
            return [block.cross_attn.single_key_output(null) for block in self.blocks]
        return [torch.stack(block.cross_attn.context_kv(null[None])) for block in self.blocks]

    # ---------------------------------------------------------------- denoising

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        prepared: PreparedContext | None = None,
        r_timestep: torch.Tensor | float | None = None,
        guidance: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Raw prediction for one noisy stream.

        Args:
            sample: noisy latents (N, C, H, W) float -> image task, or partly masked token ids (N, L) int -> text task.
            timestep: noise level t in [0, 1], (N,) or a scalar.
            context: (N, S, D) cross-attention context (from `encode_text`/`encode_image`/`null_context`).
            context_mask: (N, S) bool key padding mask.
            prepared: the blocks' contexts prepared elsewhere (`PreparedContext`: cached K/V, a CFG batch), instead
                of `context` and `context_mask`.
            r_timestep: the interval's end r <= t, (N,) or a scalar, for a model with `interval_conditioning`
                (MeanFlow: the output is the average velocity over [r, t]); None means r = t, the instantaneous
                velocity. A model without interval conditioning ignores it.
            guidance: the guidance scale w, (N,) or a scalar, for a model with `guidance_embeds` (its guided
                prediction); None means w = 1, unguided. A model without guidance embeds ignores it.
        Returns:
            image task: (N, C, H, W) epsilon/v prediction; text task: (N, L, V) logits.
        """
        is_text = not torch.is_floating_point(sample)
        if is_text:
            x = self.token_embed(sample) + self.text_pos_embed[:, : sample.shape[1]]  # (N, L, D)
        else:
            x = self._patchify(self.patch_embed, sample)  # (N, T, D)
        if prepared is None:
            if context is None:
                raise ValueError("forward needs a context or a prepared context")
            absorb = self.absorb_pays(context.shape[1], x.shape[1])
            prepared = PreparedContext(
                [BlockContext(kv, context_mask) for kv in self.context_kv(context, context_mask, absorb)]
            )
        n = sample.shape[0]
        t = torch.as_tensor(timestep, device=x.device, dtype=torch.float32).reshape(-1).expand(n)
        task = torch.full((n,), TASK_TEXT if is_text else TASK_IMAGE, device=x.device, dtype=torch.long)
        cond = self.t_embedder(t, x.dtype) + self.task_embed(task)  # (N, D)
        if self.interval_embedder is not None:
            r = t if r_timestep is None else torch.as_tensor(r_timestep, device=x.device, dtype=torch.float32)
            cond = cond + self.interval_embedder(t - r.reshape(-1).expand(n), x.dtype)
        if self.guidance_embedder is not None:
            w = torch.ones_like(t) if guidance is None else torch.as_tensor(guidance, device=x.device).float()
            cond = cond + self.guidance_embedder(w.reshape(-1).expand(n) - 1.0, x.dtype)
        blocks = prepared.blocks
        if prepared.repeat is not None:  # the batch is cat([repeated rows, sample]); x follows in block 0
            cond = torch.cat([cond[prepared.repeat], cond])
            if self.is_cache_enabled:  # the cache hooks take a block's output minus its input, row by row
                x = torch.cat([x[prepared.repeat], x])
                blocks = [replace(blocks[0], repeat=None), *blocks[1:]]
        block_cond = self.adaLN_single(cond) if self.adaLN_single is not None else cond
        for block, block_context in zip(self.blocks, blocks, strict=True):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, block_cond, block_context)
            else:
                x = block(x, block_cond, block_context)
        if is_text:
            return self.text_head(x, cond)  # (N, L, V)
        return self._unpatchify(self.image_head(x, cond), sample.shape[-2], sample.shape[-1])

    def _unpatchify(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        p, c = self.config.patch_size, self.config.in_channels
        h, w = height // p, width // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)


# The class's name until 0.1: saved folders record it in model_index.json (["mmdiff.models.transformer", "MMDiTModel"],
# assets/shapes_small included) and in transformer/config.json, and load through this alias. ("MMDiT" is SD3's joint
# attention with per-modality weights; this model is a cross-attention DiT.)
MMDiTModel = MMDiffTransformer2DModel
