"""docs/FACE.md's "From training to deployment", executed line by line as written: synthetic
identities as files -> .bin and RecordIO -> train -> export -> embed -> eval, each step's
output checked (the exported ONNX model against torch, the embeddings against the .bin's
count, the evaluation against the figures the run itself logged)."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import REPO, cli_env


def walkthrough() -> list[list[str]]:
    """The commands between the doc's walkthrough markers."""
    text = (REPO / "docs" / "FACE.md").read_text()
    block = re.search(r"<!-- walkthrough -->\s*```bash\n(.*?)```\s*<!-- /walkthrough -->", text,
                      re.S)
    assert block, "docs/FACE.md lost its walkthrough block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]


def test_the_documented_walk_runs_and_every_step_leaves_what_it_says(tmp_path: Path) -> None:
    (tmp_path / "configs" / "face").mkdir(parents=True)
    shutil.copy(REPO / "configs" / "face" / "walkthrough.yaml", tmp_path / "configs" / "face")
    commands = walkthrough()
    assert [c[:2] for c in commands] == [["largebatch", w] for w in (
        "synth-faces", "make-bin", "convert", "train", "export", "embed", "eval")]
    for command in commands:  # as a user types them, from an empty folder
        proc = subprocess.run([sys.executable, "-m", "largebatch", *command[1:]], cwd=tmp_path,
                              env=cli_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-2000:])
    walk = tmp_path / "walk"
    assert len(list((walk / "faces" / "train").glob("*/*.png"))) == 160
    assert (walk / "rec" / "train.rec").stat().st_size > 0
    summary = json.loads((walk / "run" / "summary.json").read_text())
    assert summary["steps"] == 12 * 160 // 32 and summary["stop_reason"] == "epochs"
    sidecar = json.loads((walk / "run" / "export" / "backbone.json").read_text())
    assert sidecar["model"]["embedding_size"] == 64
    assert sidecar["input"]["shape"] == ["batch", 3, 112, 112]
    emb = np.load(walk / "emb.npy")
    assert emb.shape == (120, 64)  # 60 pairs, 2 images each
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    report = json.loads((walk / "eval" / "eval.json").read_text())
    last = [json.loads(line) for line in (walk / "run" / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "eval"][-1]
    figures = report["sets"]["synth"]["metrics"]
    assert figures["synth_acc"] == last["synth_acc"]
    assert figures["synth_std"] == last["synth_std"]
    assert figures["synth_tar_at_far_1e-3"] is None and last["synth_tar_at_far_1e-3"] is None
