"""Data: the built-in shapes dataset, folder conversion, webdataset loading and caption tokenizers."""

from mmdiff.data.folder import convert_folder
from mmdiff.data.loader import (
    ShardDataset,
    SkipStats,
    collate_batch,
    expand_urls,
    iterate_records,
    make_dataloader,
    prepare_image,
    read_captions,
)
from mmdiff.data.shapes import parse_caption, render_scene, scene_from_attributes, write_shapes_shards
from mmdiff.data.tokenizer import (
    build_tokenizer,
    clip_bpe_tokenizer,
    decode_captions,
    encode_captions,
    ensure_special_tokens,
    load_tokenizer,
    train_word_level_tokenizer,
)

__all__ = [
    "ShardDataset",
    "SkipStats",
    "build_tokenizer",
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
]
