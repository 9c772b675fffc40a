"""Which errors a command reports as its one `mmdiff CMD: error: ...` line and exit status 2, and that line.

Bad input and the project's own failures are one line; a programming error keeps its traceback, so that a bug is
never passed off as bad input.
"""

from __future__ import annotations

# The project's own RuntimeErrors that have no class of their own, by what their message says (mmdiff/data/
# dataset.py: every record of a worker's shards was bad; mmdiff/data/shapes.py: too few distinct scenes for the size
# asked for). Any other RuntimeError (torch's, a bug's) stays a traceback.
DATA_RUNTIME_ERRORS = ("found no valid sample in", "could only draw ")


def is_out_of_memory(err: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError (CUDA) and torch's CPU allocator's RuntimeError: a run or a load larger
    than this machine, which no code change fixes (torch is not imported here: the CLI starts without it)."""
    if isinstance(err, MemoryError) or any(kind.__name__ == "OutOfMemoryError" for kind in type(err).__mro__):
        return True
    return isinstance(err, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(err)


def is_input_error(err: BaseException) -> bool:
    """Whether `err` is bad input or a failure the project reports as one line: ValueError, TypeError and OSError
    (an --out under a file, a folder given as a file, no permission) and their kinds (mmdiff's ConfigError,
    PipelineLoadError, HubResolveError, ...), any exception class mmdiff defines itself (CheckpointError is a
    RuntimeError), running out of memory (`is_out_of_memory`), and the data loader's own RuntimeErrors. Anything
    else, AttributeError, KeyError, IndexError or torch's other RuntimeErrors, is a bug and keeps its traceback."""
    if isinstance(err, ValueError | TypeError | OSError) or is_out_of_memory(err):
        return True
    if any(kind.__module__.split(".")[0] == "mmdiff" for kind in type(err).__mro__):
        return True
    return type(err) is RuntimeError and any(marker in str(err) for marker in DATA_RUNTIME_ERRORS)


def error_line(err: BaseException) -> str:
    """The one line an error prints: its message's first line, or, for an error that crossed from a DataLoader worker
    (torch re-raises it with the worker's whole traceback as its message), the original error's own message."""
    message = str(err)
    if message.startswith("Caught ") and "Original Traceback" in message:
        last = next((line for line in reversed(message.splitlines()) if line.strip()), "")
        message = last.split(": ", 1)[1] if ": " in last else ""
    line = message.strip().splitlines()[0] if message.strip() else ""
    if is_out_of_memory(err):
        return f"out of memory: {line or 'an allocation failed'}"
    return line or type(err).__name__
