"""Data: the built-in shapes dataset, folder conversion, webdataset loading and caption tokenizers.

Layout, from the ground up: ``images.py`` (image preparation), ``remote.py`` (http(s) shards with a read timeout and
retries), ``shards.py`` (shard lists, reading tars with bad records skipped and counted, record fields),
``writer.py`` (writing shards), ``latents.py`` (precomputed VAE latents), ``captions.py`` (caption policies),
``dataset.py`` (the batched training/evaluation stream), and the datasets and their policies on top: ``shapes.py``,
``folder.py`` and ``formats.py`` (imagefolder, CSV/TSV/JSONL, COCO captions, Hugging Face datasets), ``policies.py``.
"""

from mmdiff.data.captions import CaptionPolicy
from mmdiff.data.dataset import ShardDataset, collate_batch, make_dataloader
from mmdiff.data.folder import convert_folder
from mmdiff.data.images import prepare_image
from mmdiff.data.policies import TEXT_TASK_PHRASINGS, caption_policy
from mmdiff.data.remote import RemoteOptions, RemoteShardError
from mmdiff.data.shapes import (
    LeftFirstPolicy,
    parse_caption,
    render_scene,
    scene_from_attributes,
    write_shapes_shards,
)
from mmdiff.data.shards import SkipStats, expand_urls, iterate_records, read_captions
from mmdiff.data.tokenizer import (
    build_tokenizer,
    clip_bpe_tokenizer,
    decode_captions,
    encode_captions,
    ensure_special_tokens,
    load_tokenizer,
    train_word_level_tokenizer,
)
from mmdiff.data.writer import ShardSink, write_tar_shard

__all__ = [
    "TEXT_TASK_PHRASINGS",
    "CaptionPolicy",
    "LeftFirstPolicy",
    "RemoteOptions",
    "RemoteShardError",
    "ShardDataset",
    "ShardSink",
    "SkipStats",
    "build_tokenizer",
    "caption_policy",
    "clip_bpe_tokenizer",
    "collate_batch",
    "convert_folder",
    "decode_captions",
    "encode_captions",
    "ensure_special_tokens",
    "expand_urls",
    "iterate_records",
    "load_tokenizer",
    "make_dataloader",
    "parse_caption",
    "prepare_image",
    "read_captions",
    "render_scene",
    "scene_from_attributes",
    "train_word_level_tokenizer",
    "write_shapes_shards",
    "write_tar_shard",
]
