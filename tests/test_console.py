"""Default output is ours only; other libraries' messages we have acted on come back with -v."""

import os
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, run_cli

# Each snippet makes one library emit its message, after console.configure(VERBOSITY).
SOURCES = {
    "ray token authentication notice and tune's experiment tables": (
        "import os, sys, ray\n"
        "from ray import tune\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False)\n"
        "print('auth mode', os.environ.get('RAY_AUTH_MODE'))\n"
        "tune.Tuner(lambda config: tune.report({'x': 1}), run_config=tune.RunConfig(\n"
        "    verbose=0, storage_path=sys.argv[1])).fit()\n"
        "ray.shutdown()\n",
        ("Token authentication is enabled", "View detailed results here")),
    "matplotlib font cache notice": (
        "import matplotlib.pyplot\n",
        "generated new fontManager"),
    "plain tqdm bar (as transformers' GGUF conversion)": (
        "from tqdm.auto import tqdm\n"
        "for _ in tqdm(range(3), desc='Converting and de-quantizing GGUF tensors...'): pass\n",
        "de-quantizing GGUF"),
    "transformers progress bar": (
        "from transformers.utils import logging as tl\n"
        "for _ in tl.tqdm(range(3), desc='Loading weights'): pass\n",
        "Loading weights"),
}


def _run_snippet(code: str, verbosity: int, tmp_path) -> subprocess.CompletedProcess:
    from actclust.console import QUIET_ENV

    dropped = {"RAY_ADDRESS", "RAY_AUTH_MODE", "MPLCONFIGDIR", *QUIET_ENV}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["MPLCONFIGDIR"] = str(tmp_path / f"mpl{verbosity}")  # empty: the font cache is rebuilt
    prelude = f"from actclust import console\nconsole.configure({verbosity})\n"
    argv = [sys.executable, "-c", prelude + code, str(tmp_path / f"tune{verbosity}")]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(REPO),
                          timeout=180)


@pytest.mark.parametrize("source", list(SOURCES))
def test_third_party_message_hidden_by_default_and_shown_with_v(source, tmp_path):
    code, markers = SOURCES[source]
    markers = (markers,) if isinstance(markers, str) else markers
    quiet = _run_snippet(code, 0, tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    loud = _run_snippet(code, 1, tmp_path)
    assert loud.returncode == 0, loud.stderr[-2000:]
    for marker in markers:
        assert marker not in quiet.stderr + quiet.stdout
        assert marker in loud.stderr + loud.stdout
    if "ray" in source:  # only the notice goes: token authentication stays on
        assert "auth mode token" in quiet.stdout and "auth mode token" in loud.stdout


def test_default_output_of_a_tiny_run_is_our_lines_only(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(dict(model="tiny:llama", corpus="embedded:pydoc", seq_len=64,
                                          max_tokens=64 * 8, eval_max_tokens=64 * 2, k=[4],
                                          theta=[0.5], workers=1)))
    env = {"MPLCONFIGDIR": str(tmp_path / "mpl")}  # a fresh font cache, as on a new machine
    saved = os.environ.pop("RAY_AUTH_MODE", None)
    try:
        proc = run_cli("run", "--config", str(config), "--out", str(tmp_path / "r"), env=env,
                       own_ray=True)  # a first run on a laptop: Ray starts here
    finally:
        if saved is not None:
            os.environ["RAY_AUTH_MODE"] = saved
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith("actclust: ")] == [], proc.stderr
    # Not a terminal: each stage ends with one line of its figures.
    for stage in ("extract: 512 tokens in", "cluster: 2 layers in",
                  "evaluate dense,oracle: 128 tokens in", "evaluate cluster: 128 tokens in"):
        assert sum(stage in line for line in lines) == 1, (stage, proc.stderr)
    assert any(line.startswith("actclust: report: ") for line in lines)


def test_ray_worker_line_we_acted_on_is_held_back_in_the_driver_and_shown_with_v(tmp_path):
    # A worker writes Ray core's PreemptionWatcher line to stderr, outside Python logging,
    # then a line of its own; the driver waits until its own line has been forwarded.
    code = (
        "import sys, threading, ray\n"
        "from ray._private.ray_logging import global_worker_stdstream_dispatcher\n"
        "from actclust.runtime.raycluster import init_ray\n"
        "init_ray(num_cpus=1)\n"
        "forwarded = threading.Event()\n"
        "global_worker_stdstream_dispatcher.add_handler('test', lambda batch: forwarded.set()\n"
        "    if any('line after it' in line for line in batch['lines']) else None)\n"
        "@ray.remote\n"
        "def speak():\n"
        "    print(\"core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: \"\n"
        "          \"'a9' has constructor arguments in the object store\", file=sys.stderr, flush=True)\n"
        "    print('line after it', file=sys.stderr, flush=True)\n"
        "ray.get(speak.remote())\n"
        "assert forwarded.wait(120), 'the worker lines never reached the driver'\n"
        "ray.shutdown()\n")
    quiet = _run_snippet(code, 0, tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    loud = _run_snippet(code, 1, tmp_path)
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "line after it" in quiet.stderr and "line after it" in loud.stderr
    assert "PreemptionWatcher" not in quiet.stderr
    assert "PreemptionWatcher" in loud.stderr
