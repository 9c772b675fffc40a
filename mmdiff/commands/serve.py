"""`mmdiff serve`: the web demo. The parser (`add_parser`) and the command (`run`), one of `mmdiff.commands`."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys

from .errors import error_line, is_input_error
from .sample import add_model_options, model_folder

AUTH_ENV = "MMDIFF_SERVE_AUTH"  # USER:PASSWORD, read when --auth is not given (argv is visible to every user in ps)


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
    serve.add_argument(
        "--auth",
        default=None,
        metavar="USER:PASSWORD",
        help=f"a login for the page (Gradio's auth); default: ${AUTH_ENV} when set, else no login",
    )


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """--auth USER:PASSWORD (or $MMDIFF_SERVE_AUTH when --auth is not given) as (user, password); None: no login."""
    source = "--auth"
    if value is None:
        value, source = os.environ.get(AUTH_ENV) or None, f"${AUTH_ENV}"
    if value is None:
        return None
    user, colon, password = value.partition(":")
    if not (colon and user.strip() and password):
        raise ValueError(f"{source} must be USER:PASSWORD, both non-empty (the password may hold ':')")
    return user.strip(), password


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (127.0.0.1, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


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
        auth = parse_auth(args.auth)
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
        address = launch(demo, args.host, args.port, auth=auth)
    except Exception as err:
        if not is_input_error(err):
            raise
        print(f"mmdiff serve: error: {error_line(err)}", file=sys.stderr)
        return 2
    print(f"mmdiff serve: {model.folder} on {model.device} at {address} (Ctrl-C stops)", flush=True)
    if auth is None and not is_loopback(args.host):
        print(
            f"mmdiff serve: note: the page has no login; anyone who can reach {args.host}:{args.port} can use it "
            f"(give --auth USER:PASSWORD or set {AUTH_ENV})",
            flush=True,
        )
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0
