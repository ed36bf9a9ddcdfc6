"""What a person sees on the terminal: our lines and bars, and others' only on request.

By default stderr carries ``actclust: ...`` lines, our progress bars (see
:mod:`actclust.progress`) and warnings from other libraries that still call for
action. Messages we have already acted on are held back, and shown again with
``-v``:

- Ray's "Token authentication is enabled for this Ray cluster" warning: token
  authentication is what we want, so it stays on and only the message goes;
- matplotlib's "generated new fontManager" (its font cache, built once);
- Ray Train's "Failed to query Ray Train Controller actor state" from its placement
  group cleaner, in Ray's workers (through a worker setup hook, :func:`quiet_ray_worker`);
- Ray's core-worker line about Ray Train's PreemptionWatcher actor, which a worker
  writes to stderr outside Python logging (held back in the driver on its way to the
  terminal, :func:`hold_back_worker_lines`);
- the progress bars of transformers (GGUF conversion, weight loading), the
  Hugging Face hub and datasets, and Ray Tune's experiment tables: our own bars
  and lines report the stage instead.

``-v`` shows other libraries' info messages and our debug lines; ``-vv`` shows
everything at debug level.
"""

from __future__ import annotations

import logging
import os
import sys

from actclust.io.cache import default_cache_dir

OUR_LOGGER = "actclust"
# Loggers whose messages we have acted on, and the level that still gets through.
ACTED_ON = {
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "matplotlib.font_manager": logging.WARNING,
}
# Progress bars of other libraries, off unless asked for. Read by those libraries
# at import, and inherited by Ray workers started from this process.
# TQDM_DISABLE covers bars made with plain tqdm (transformers' GGUF conversion,
# Ray's); ours pass ``disable`` explicitly and are not affected.
QUIET_ENV = {
    "TQDM_DISABLE": "1",
    # Ray Tune's experiment box, "View detailed results here" and trial tables:
    # the legacy engine honours RunConfig(verbose=0); the new one prints them anyway.
    "RAY_AIR_NEW_OUTPUT": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    # Read by quiet_ray_worker in every Ray worker of our jobs.
    "ACTCLUST_QUIET_WORKERS": "1",
}
# Loggers inside Ray's own workers whose messages we have acted on. Ray Train's placement
# group cleaner asks the State API, which needs the dashboard that actclust does not start,
# whether the controller is alive, and warns each time it cannot tell: it only removes a
# crashed controller's placement group, and a crashed fit is rerun (it resumes) anyway.
WORKER_ACTED_ON = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
}

# Lines that Ray's workers write outside Python logging and that we have acted on. Ray
# Train's controller starts its PreemptionWatcher actor with max_restarts and arguments
# in the object store, and Ray's core worker warns that a restart could then fail
# (ray-project/ray#53727): a failed fit is rerun and resumes from its checkpoint anyway.
WORKER_LINES_ACTED_ON = ("Actor with class name: 'PreemptionWatcher'",)


def quiet_ray_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for our jobs: in each worker, hold back the
    messages of WORKER_ACTED_ON unless the command runs with ``-v``."""
    if os.environ.get("ACTCLUST_QUIET_WORKERS") == "1":
        for name, level in WORKER_ACTED_ON.items():
            logging.getLogger(name).setLevel(level)


def worker_runtime_env() -> dict:
    """The job-level runtime_env of ``ray.init``: the hook above and its switch."""
    return {"worker_process_setup_hook": "actclust.console.quiet_ray_worker",
            "env_vars": {"ACTCLUST_QUIET_WORKERS": os.environ.get("ACTCLUST_QUIET_WORKERS",
                                                                  "0")}}


def hold_back_worker_lines() -> None:
    """In the driver, after ``ray.init``: drop WORKER_LINES_ACTED_ON from the worker
    output Ray forwards to this terminal, unless the command runs with ``-v``. Ray hands
    each batch of forwarded lines to the handlers of one dispatcher; each is wrapped once."""
    if os.environ.get("ACTCLUST_QUIET_WORKERS") != "1":
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # a Ray without it: every line reaches the terminal, as with -v
        return
    for name, handler in list(dispatcher.handlers):
        if not getattr(handler, "holds_back_acted_on", False):
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, _without_acted_on(handler))


def _without_acted_on(handler):
    def forward(batch: dict) -> None:
        lines = [line for line in batch.get("lines", [])
                 if not any(marker in line for marker in WORKER_LINES_ACTED_ON)]
        if lines or not batch.get("lines"):
            handler({**batch, "lines": lines})

    forward.holds_back_acted_on = True
    return forward


class _Formatter(logging.Formatter):
    """``actclust: msg`` for ours, ``name: level: msg`` for everyone else's."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        ours = record.name == OUR_LOGGER or record.name.startswith(OUR_LOGGER + ".")
        level = "" if ours and record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        return f"{OUR_LOGGER if ours else record.name}: {level}{message}"


class _BarSafeHandler(logging.Handler):
    """Writes above any live progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a log line must never end the command
            self.handleError(record)


def configure(verbosity: int = 0) -> None:
    """Set up logging and third-party output for a command; safe to call again."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _BarSafeHandler)]:
        root.removeHandler(handler)
    handler = _BarSafeHandler()
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG))
    logging.getLogger(OUR_LOGGER).setLevel(logging.INFO if verbosity == 0 else logging.DEBUG)
    for name, level in ACTED_ON.items():
        logging.getLogger(name).setLevel(level if verbosity == 0 else logging.NOTSET)
    if verbosity == 0:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        _quiet_loaded_libraries()
    _matplotlib_cache()


def _quiet_loaded_libraries() -> None:
    """Turn off bars of libraries already imported (the variables act only at import)."""
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].utils.disable_progress_bars()


def _matplotlib_cache() -> None:
    """Give matplotlib a lasting cache when its own is not writable, so it neither
    rebuilds the font cache on every run nor warns about a temporary directory."""
    if os.environ.get("MPLCONFIGDIR"):
        return
    default = os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"),
                           "matplotlib")
    try:
        os.makedirs(default, exist_ok=True)
        if os.access(default, os.W_OK):
            return
    except OSError:
        pass
    os.environ["MPLCONFIGDIR"] = str(default_cache_dir() / "matplotlib")
