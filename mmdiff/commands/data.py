"""`mmdiff data shapes | folder | imagefolder | table | coco | hf | latents`: write webdataset shards."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="write webdataset shards").add_subparsers(dest="data_cmd", required=True)
    shapes = data.add_parser("shapes", help="generate the built-in shapes dataset (train/ and val/ shards)")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--num", type=int, default=20000, help="total images, train + val")
    shapes.add_argument("--image-size", type=int, default=32)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--val-fraction", type=float, default=0.1)
    shapes.add_argument("--shard-size", type=int, default=1000)
    folder = data.add_parser("folder", help="convert a folder of images with same-named .txt captions to shards")
    folder.add_argument("--src", required=True)
    folder.add_argument("--out", required=True)
    folder.add_argument("--shard-size", type=int, default=1000)
    imagefolder = data.add_parser(
        "imagefolder",
        help="convert a Hugging Face imagefolder (metadata.jsonl / metadata.csv with file_name) to shards",
    )
    imagefolder.add_argument("--src", required=True, help="the folder holding metadata.jsonl or metadata.csv")
    table = data.add_parser("table", help="convert a CSV / TSV / JSONL of image path + caption to shards")
    table.add_argument("--src", required=True, help="a .csv, .tsv or .jsonl file; paths relative to its folder")
    coco = data.add_parser("coco", help="convert COCO captions (captions_*.json + images) to shards, all captions kept")
    coco.add_argument("--captions", required=True, help="the captions_*.json file (images + annotations)")
    coco.add_argument("--images", required=True, help="the folder its file_name entries are relative to")
    hf = data.add_parser("hf", help="convert a Hugging Face dataset (save_to_disk folder or parquet) to shards")
    hf.add_argument("--src", required=True, help="a save_to_disk folder, a .parquet file or a folder of them")
    hf.add_argument("--split", default=None, help="the split of a DatasetDict (default: train, or its only one)")
    for parser in (imagefolder, table, coco, hf):
        parser.add_argument("--out", required=True)
        parser.add_argument("--shard-size", type=int, default=1000)
    for parser in (imagefolder, table, hf):
        parser.add_argument("--caption-column", default=None, help="default: the first of 'text', 'caption' present")
    for parser in (table, hf):
        parser.add_argument(
            "--image-column", default=None, help="default: the first of 'image', 'file_name', 'image_path', 'path'"
        )
    latents = data.add_parser("latents", help="encode image shards once into VAE-latent shards (data.latent_shards)")
    latents.add_argument("--shards", required=True, help="image shards: a folder, brace pattern, glob or comma list")
    latents.add_argument(
        "--vae", required=True, help="the training VAE: an AutoencoderKL folder, one with vae/, or a hub id (org/name)"
    )
    latents.add_argument("--out", required=True)
    latents.add_argument("--image-size", type=int, default=32, help="the training data.image_size")
    latents.add_argument("--batch-size", type=int, default=64)
    latents.add_argument("--shard-size", type=int, default=None, help="records per shard (default: one per input)")
    latents.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage type")
    latents.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda when available)")


def run(args) -> int:
    if args.data_cmd == "shapes":
        from ..data.shapes import write_shapes_shards

        stats = write_shapes_shards(args.out, args.num, args.image_size, args.seed, args.val_fraction, args.shard_size)
    elif args.data_cmd == "latents":
        from ..data.latents import encode_shards_to_latents

        stats = encode_shards_to_latents(
            args.shards, args.vae, args.out, args.image_size, args.batch_size, args.shard_size, args.device, args.dtype
        )
    elif args.data_cmd in ("imagefolder", "table", "coco", "hf"):
        stats = _convert_format(args)
    else:
        from ..data.folder import convert_folder

        stats = convert_folder(args.src, args.out, shard_size=args.shard_size)
    print(json.dumps(stats, indent=1, default=str))
    return 0


def _convert_format(args) -> dict:
    from ..data import formats

    common = {"shard_size": args.shard_size}
    if args.data_cmd == "imagefolder":
        return formats.convert_imagefolder(args.src, args.out, args.caption_column, **common)
    if args.data_cmd == "table":
        return formats.convert_table(args.src, args.out, args.image_column, args.caption_column, **common)
    if args.data_cmd == "coco":
        return formats.convert_coco(args.captions, args.images, args.out, **common)
    return formats.convert_hf_dataset(args.src, args.out, args.image_column, args.caption_column, args.split, **common)
