"""`mmdiff data shapes | folder | latents`: write webdataset shards."""

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
    else:
        from ..data.folder import convert_folder

        stats = convert_folder(args.src, args.out, shard_size=args.shard_size)
    print(json.dumps(stats, indent=1, default=str))
    return 0
