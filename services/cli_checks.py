"""What the command line checks before it acts: argument types, the image
grid's path, the ports a server will listen on, and the one line an
operator's mistake at start deserves. Each failure is ``error: ...`` on
stderr and exit status 1 (argparse's own types: its usage line and 2)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def positive(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds (a deadline of 0 or -1 failed every call)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def label_list(text: str) -> list[int]:
    """argparse type of --label: one class label or several, comma-separated (an empty item is refused:
    ``1,,2`` dropped it silently)."""
    items = [x.strip() for x in text.split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError(f"{text!r} names no label")
    if not all(items):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty label, e.g. 7 or 0,1,2")
    try:
        return [int(x) for x in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: labels are integers, e.g. 7 or 0,1,2") from None


def grid_path(path: Path) -> Path:
    """Where the image grid goes, checked before any image is generated."""
    if path.is_dir():
        fail(f"--output {str(path)!r} is a directory; name a .png file")
    if path.suffix.lower() != ".png":
        fail(f"--output {str(path)!r}: the grid is written as PNG; name a .png file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--output {str(path)!r}: cannot create its directory ({e.strerror or e})")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        fail(f"--output {str(path)!r}: not writable")
    return path


def startup_failure(e: BaseException) -> str | None:
    """The one line an operator's mistake at start deserves (a setting out of
    range, a file that is not there or not what it should be, a device
    missing); None for anything else, which keeps its traceback."""
    import yaml
    from pydantic import ValidationError

    from .checkpoint_files import CheckpointError
    from .core.devices import DeviceUnavailable
    from .errors import FailedPrecondition

    if isinstance(e, ValidationError):
        return "; ".join(": ".join(filter(None, (".".join(str(x) for x in err["loc"]),
                                                 err["msg"].removeprefix("Value error, ")))) for err in e.errors())
    if isinstance(e, yaml.YAMLError):
        return "not valid YAML: " + " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, (CheckpointError, DeviceUnavailable, FailedPrecondition, ValueError, FileNotFoundError)):
        return str(e)
    return None


def user_error(e: BaseException) -> str | None:
    """The one line a command's expected failure deserves: a status the
    server answered (``ArserveError``: TLS refused, not found, ...) or a
    checkpoint that is not there; None for anything else (a traceback)."""
    from arserve_client import ArserveError

    from .checkpoint_files import CheckpointError

    return str(e) if isinstance(e, (ArserveError, CheckpointError)) else None


def check_settings(settings) -> None:
    """What a server's settings name outside themselves, before any model
    loads or Ray starts: each text model's weights, each image model's
    checkpoints, and the environment variables behind env:NAME secrets.
    Raises what ``startup_failure`` turns into one line."""
    for model in settings.models:
        model.weights_path()
    settings.resolved_auth_token(), settings.resolved_redis_url(), settings.resolved_internal_secret()
    check_image_checkpoints(settings.image_models)


def check_image_checkpoints(models) -> None:
    """Every image model's checkpoints are there (the target's first: its
    draft is distilled from it), before the text model takes its seconds to load."""
    from .image.checkpoints import check_present

    for m in models:
        for ref in (m.checkpoint, m.draft_checkpoint):
            if ref:
                check_present(ref)


def check_ports(host: str, ports: dict[str, int | None]) -> None:
    """Fail at once, naming the flag, where a port cannot be listened on
    (taken, or the host unknown), rather than after the models load."""
    import socket

    taken: dict[int, str] = {}
    for flag, port in ports.items():
        if port is None:
            continue
        if not 0 <= port <= 65535:
            fail(f"{flag} {port}: a port is 0 (any free one) to 65535")
        if port == 0:
            continue
        if port in taken:
            fail(f"{flag} {port}: {taken[port]} uses that port too")
        taken[port] = flag
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as e:
            fail(f"--host {host!r}: {e.strerror}")
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: a listener still fails
            try:
                probe.bind(address)
            except OSError as e:
                fail(f"{flag} {port}: cannot listen on {host}:{port} ({e.strerror})")
