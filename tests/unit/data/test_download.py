"""The real download path, offline: torchvision fetches MNIST from a mirror on 127.0.0.1.

The mirror serves the real ``.gz`` files (from the ``mnist_root`` fixture) and counts every
request. Under torchrun only local rank 0 may download: the server must see exactly the
requests of *one* torchvision download (measured by letting torchvision itself download once),
not two. A mirror that fails must end every rank with one line and exit code 2, quickly.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import http.server
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from tests.conftest import REPO, cli_env, free_port, run_torchrun

FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
TRAIN = ["train", "configs/mnist/mlp.yaml", "engine.name=ddp", "train.device=cpu",
         "batch.global_size=120", "batch.micro_size=60", "train.max_steps=3",
         "data.subset=1200", "data.test_subset=200", "log.progress=false"]


class _Mirror:
    """A threaded HTTP server over ``directory`` that counts the requested paths."""

    def __init__(self, directory: Path) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        lock = threading.Lock()
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def send_head(self):  # every GET and HEAD passes here once, whatever the outcome
                with lock:
                    mirror.requests[self.path.lstrip("/")] += 1
                return super().send_head()

            def log_message(self, fmt: str, *args: object) -> None:  # quiet
                pass

        handler = functools.partial(Handler, directory=str(directory))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[_Mirror]:
    """A running mirror of ``directory`` for the duration of the block."""
    mirror = _Mirror(directory)
    try:
        yield mirror
    finally:
        mirror.close()


def _torchvision_requests(url: str, mirror: _Mirror, root: Path) -> dict[str, int]:
    """Requests per file that one plain torchvision download makes (it probes, then fetches)."""
    from torchvision.datasets import MNIST
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MNIST, "mirrors", [url])
        with contextlib.suppress(RuntimeError):  # the failing mirror's case
            MNIST(root=str(root), train=False, download=True)
    seen = dict(mirror.requests)
    mirror.requests.clear()
    return seen


@pytest.fixture(scope="module")
def one_download(mnist_root: Path, tmp_path_factory) -> dict[str, int]:
    """The reference for a successful download: torchvision itself, once, in this process."""
    missing = [f for f in FILES if not (mnist_root / "MNIST" / "raw" / f).is_file()]
    if missing:  # a root unpacked by hand may lack them; torchvision's own download keeps them
        pytest.skip(f"the mirror serves the .gz files; {mnist_root}/MNIST/raw lacks {missing}")
    with serve(mnist_root / "MNIST" / "raw") as mirror:
        seen = _torchvision_requests(mirror.url, mirror, tmp_path_factory.mktemp("reference"))
    assert set(seen) == set(FILES), seen
    return seen


def _rank_errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("largebatch: error:")]


def test_two_ranks_download_once_from_a_local_mirror(tmp_path, mnist_root, one_download):
    raw = mnist_root / "MNIST" / "raw"
    root = tmp_path / "empty"  # does not exist yet: the download creates it
    with serve(raw) as mirror:
        proc = run_torchrun(2, *TRAIN, f"data.root={root}", f"data.mirror={mirror.url}",
                            f"log.out_dir={tmp_path / 'run'}", timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # One download's requests, not two: rank 1 waited for rank 0 instead of downloading too.
    assert dict(mirror.requests) == one_download, (mirror.requests, one_download)
    for name in FILES:
        got = root / "MNIST" / "raw" / name
        assert got.read_bytes() == (raw / name).read_bytes(), name
        # torchvision extracted it, and the run read the extracted file.
        assert got.with_suffix("").read_bytes() == (raw / name).with_suffix("").read_bytes()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"]) == (3, 2)


def _refused() -> str:
    return f"http://127.0.0.1:{free_port()}/"  # bound and released: nothing listens there


@pytest.mark.parametrize("kind", ["connection_refused", "http_404"])
def test_failed_download_is_one_line_on_every_rank(tmp_path, kind):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with contextlib.ExitStack() as stack:
        mirror: Optional[_Mirror] = None
        if kind == "http_404":
            mirror = stack.enter_context(serve(empty))
        url = mirror.url if mirror else _refused()
        reference = (_torchvision_requests(url, mirror, tmp_path / "reference")
                     if mirror else None)
        start = time.perf_counter()
        proc = run_torchrun(2, *TRAIN, f"data.root={tmp_path / 'root'}", f"data.mirror={url}",
                            f"log.out_dir={tmp_path / 'run'}", timeout=120)
        elapsed = time.perf_counter() - start
    errors = _rank_errors(proc.stderr)
    assert len(errors) == 2, proc.stderr[-4000:]
    assert all("MNIST download failed" in e and url in e for e in errors), errors
    # torchrun's agent reports each worker's exit code; ours is the CLI's 2 on both ranks.
    codes = dict(re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s+exitcode\s*: (\d+)",
                            proc.stderr))
    assert codes == {"0": "2", "1": "2"}, proc.stderr[-4000:]
    assert not re.search(r'File "[^"]*largebatch/', proc.stderr), proc.stderr[-4000:]
    if mirror is not None:  # only rank 0 asked: exactly what one torchvision attempt asks
        assert reference and dict(mirror.requests) == reference, (mirror.requests, reference)
    # No rank waited for a timeout (10 min): start-up (5-20 s on 2 busy cores), then the failure.
    assert elapsed < 90, elapsed


def _two_nodes(roots: tuple[Path, Path], args: list[str]) -> list[subprocess.CompletedProcess]:
    """Two processes as two one-rank nodes (LOCAL_RANK 0 on both), each with its own
    ``$LARGEBATCH_DATA_ROOT`` (the config names no root, so each node reads its own)."""
    port = str(free_port())
    procs = []
    for rank, root in enumerate(roots):
        env = cli_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, LARGEBATCH_DATA_ROOT=str(root))
        procs.append(subprocess.Popen([sys.executable, "-m", "largebatch", *args], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return done


@pytest.mark.parametrize("layout", ["shared_root", "node_local_roots"])
def test_one_download_per_filesystem_across_nodes(tmp_path, mnist_root, one_download, layout):
    """A root shared by the nodes is downloaded once (rank 0); node-local roots once each."""
    roots = ((tmp_path / "shared",) * 2 if layout == "shared_root"
             else (tmp_path / "node0", tmp_path / "node1"))
    with serve(mnist_root / "MNIST" / "raw") as mirror:
        procs = _two_nodes(roots, [*TRAIN, f"data.mirror={mirror.url}",
                                   f"log.out_dir={tmp_path / 'run'}"])
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-4000:]
    downloads = len(set(roots))
    assert dict(mirror.requests) == {f: n * downloads for f, n in one_download.items()}
    for root in set(roots):
        for name in FILES:
            got = root / "MNIST" / "raw" / name
            assert got.read_bytes() == (mnist_root / "MNIST" / "raw" / name).read_bytes()
