"""Shared test setup: offline, CPU, deterministic, small thread count."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def flow_folder(tmp_path_factory):
    """A tiny pixel-space toy flow base (SD3-style transformer) on disk."""
    from test_trainers_smoke import tiny_toy_flow_folder

    return tiny_toy_flow_folder(tmp_path_factory.mktemp("flow") / "flow")


@pytest.fixture
def chromium():
    """Debian's chromium, for the browser tests (arena page, report.html). The README's test command
    (`bash .ci/run`) installs it; a run without it fails here with the fix rather than skipping, so a missing browser
    can never hide a broken page."""
    import os
    import shutil

    path = "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: run `bash .ci/run` (it installs it as root) or "
                    "`apt-get update && apt-get install -y chromium`")
    return path
