"""`mmdiff bench`: mmdiff against diffusers' PixArt at matched size (train, sample, caption, scaling)."""

from __future__ import annotations


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark against diffusers' PixArt at matched size (train, sample, caption)")
    bench.add_argument("--preset", default="cpu-small", choices=["cpu-small", "gpu-b2"])
    bench.add_argument("--out", default="bench.json", help="the JSON report")
    bench.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default: the preset's)")
    bench.add_argument("--warmup", type=int, default=None, help="untimed runs per contender first")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the preset's)")
    bench.add_argument("--device", default=None, help="override the preset's device (cpu | cuda | cuda:1)")
    bench.add_argument("--compile", action="store_true", help="torch.compile both contenders' transformers")
    bench.add_argument("--quick", action="store_true", help="a seconds-long smoke run with a tiny model (CI)")
    bench.add_argument(
        "--sections",
        nargs="+",
        choices=["train", "sample", "caption", "scaling", "equal_quality"],
        help="default: train, sample, caption, scaling (and equal_quality when --frontier is given)",
    )
    bench.add_argument(
        "--frontier", help="a scripts/frontier.py JSON: time its models at equal quality (the equal_quality section)"
    )


def run(args) -> int:
    from ..bench.run import SECTIONS, format_table, resolve_preset, run_bench

    preset = resolve_preset(args.preset, args.quick, args.repeats, args.warmup, args.threads, args.device)
    default = (*SECTIONS, "equal_quality") if args.frontier else SECTIONS
    sections = tuple(args.sections or default)
    report = run_bench(preset, args.out, sections, compile_models=args.compile, frontier=args.frontier)
    print(format_table(report))
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    return 0
