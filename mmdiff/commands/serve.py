"""`mmdiff serve`: the web demo. The parser (`add_parser`) and the command (`run`), one of `mmdiff.commands`."""

from __future__ import annotations

import errno
import os
import socket
import sys

from .sample import add_model_options, model_folder


def add_parser(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="a web demo in the browser (Gradio): text -> image, guidance sweep, image -> text"
    )
    add_model_options(serve, required=False, default="the shipped assets/shapes_small")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda when available)")
    serve.add_argument(
        "--samples", default=None, help="shards whose first 16 images the page offers (default: the held-out sample)"
    )


def check_port(host: str, port: int) -> None:
    """A ValueError when the server could not listen on host:port (in use, not allowed, no such address)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port} is out of range: give 1..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(f"--host {host!r} is not an address of this machine ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as err:
            reason = "is already in use" if err.errno == errno.EADDRINUSE else f"cannot be used ({err.strerror})"
            raise ValueError(f"port {port} on {host} {reason}; choose another with --port") from None


def _default_samples() -> str | None:
    from ..paths import VAL_SAMPLE, find_repo_file

    try:
        return str(find_repo_file(VAL_SAMPLE))
    except FileNotFoundError:
        return None


def run(args) -> int:
    """Load the model once, start the page, print its address and serve until Ctrl-C. Bad options, a folder that
    does not load or a busy port are one `mmdiff serve: error: ...` line and status 2."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        check_port(args.host, args.port)  # before the model loads: a busy port fails in a moment
        from ..paths import SHIPPED_MODEL, find_repo_file

        folder = model_folder(args) or find_repo_file(SHIPPED_MODEL)
        samples = args.samples or _default_samples()
        from ..pipelines import check_pipeline_folder
        from ..serve.app import build_app, launch
        from ..serve.handlers import load_model

        check_pipeline_folder(folder)  # a bad folder is the one error line, before anything is printed
        print(f"mmdiff serve: loading {folder} ...", flush=True)
        model = load_model(folder, args.device, samples)
        demo = build_app(model)
        address = launch(demo, args.host, args.port)
    except (ValueError, OSError, TypeError) as err:
        print(f"mmdiff serve: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    print(f"mmdiff serve: {model.folder} on {model.device} at {address} (Ctrl-C stops)", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0
