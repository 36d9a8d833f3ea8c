"""The metadata fuzzing's variants (``test_meta_fuzz.py``): each breaks one thing in a real run
folder, generated systematically (a table of values per manifest field, whole-file damage, the
file list, the set directory, the done marker, the final weights, the parts inside the files)
plus a seeded random batch.

A variant is ``(id, layout, mutation, expectation)``: layout ``running`` (two sets) or
``finished`` (+ done.json naming the newest and model.pt); the expectation says what status
and a relaunch must do (``test_meta_fuzz.STATUS``).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tests.unit.checkpoint._sets import CONFIG, Parts, resign, seeded, torch_file

SEED = 21
NEWEST, PREVIOUS = "step-000002", "step-000001"
FIELDS = ("format", "step", "world_size", "epoch", "consumed", "files", "config", "plan",
          "created_unix", "torch")
NAN, INF = float("nan"), float("inf")
#: What a hostile pickle would create if it ever ran.
PAYLOAD_MARK = Path("/tmp/largebatch-fuzz-payload-ran")
HOSTILE = b"cos\nsystem\n(S'touch /tmp/largebatch-fuzz-payload-ran'\ntR."


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


# ---- mutations ----------------------------------------------------------------------------------
def _manifest(run: Path) -> Path:
    return run / "checkpoints" / NEWEST / "manifest.json"


def _edit(fn: Callable[[dict], Any], file: str = "manifest") -> Callable[[Path], None]:
    """A mutation that loads the JSON, lets ``fn`` change it (or return a replacement), and
    writes it back (``json.dumps``: NaN and Infinity come out as their literals)."""
    def mutate(run: Path) -> None:
        path = _manifest(run) if file == "manifest" else run / "checkpoints" / "done.json"
        data = json.loads(path.read_text())
        out = fn(data)
        path.write_text(json.dumps(data if out is None else out))
    return mutate


def _set(key: str, value: Any, file: str = "manifest") -> Callable[[Path], None]:
    return _edit(lambda d: d.__setitem__(key, value), file)


def _drop(key: str, file: str = "manifest") -> Callable[[Path], None]:
    return _edit(lambda d: d.pop(key), file)


def _raw(data: bytes | Callable[[bytes], bytes], file: str = "manifest"
         ) -> Callable[[Path], None]:
    def mutate(run: Path) -> None:
        path = _manifest(run) if file == "manifest" else run / "checkpoints" / "done.json"
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)
    return mutate


def _replace_path(how: str, file: str = "manifest") -> Callable[[Path], None]:
    """The metadata file becomes something that is not a small regular file."""
    def mutate(run: Path) -> None:
        path = _manifest(run) if file == "manifest" else run / "checkpoints" / "done.json"
        path.unlink()
        if how == "directory":
            path.mkdir()
        elif how == "fifo":  # a reader that opens it would block forever
            os.mkfifo(path)
        elif how == "dev_zero":  # endless bytes
            path.symlink_to("/dev/zero")
        elif how == "loop":
            path.symlink_to(path.name)
        elif how == "huge":  # 33 MiB, sparse: refused by its size, never read
            with open(path, "wb") as fh:
                fh.truncate(33 << 20)
    return mutate


def _files(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    return _edit(lambda d: fn(d["files"]))


def _entry(name: str, key: str, value: Any) -> Callable[[Path], None]:
    return _files(lambda f: f[name].__setitem__(key, value))


def resigned_part(name: str, fn: Callable[[Any], Any]) -> Callable[[Path], None]:
    """Re-signed ``name`` of the newest set holding ``fn(what it held)``."""
    def mutate(run: Path) -> None:
        set_dir = run / "checkpoints" / NEWEST
        obj = torch.load(set_dir / name, weights_only=True)
        resign(set_dir, name, torch_file(fn(obj)))
    return mutate


def changed(obj: dict, **changes: Any) -> dict:
    out = dict(obj)
    for k, v in changes.items():
        if v is _DROP:
            out.pop(k)
        else:
            out[k] = v
    return out


_DROP = object()


# ---- the variants -------------------------------------------------------------------------------
# (id, layout, mutation, expectation); layout 'running' = two sets, 'finished' = + done.json
# and model.pt. Expectations: valid, corrupt (previous set), other_format, other_config,
# done_ignored (finished run not recognised: resumable from the newest), weights_bad (done
# marker fine, model.pt not), part_bad (the files verify, a part does not load: previous set),
# refused (one ConfigError line, nothing moved), random (status and find agree).
Variant = tuple[str, str, Callable[[Path], None], str]

_FULL_PLAN = {"global_size": 8, "micro_size": 8, "accum_steps": 1, "world_size": 1,
              "dataset_size": 80, "drop_last": True, "base_lr": 0.1, "scale_rule": "none",
              "base_batch": 8, "peak_lr": 0.1, "warmup_steps": 0, "max_global_size": None,
              "micro_auto": None, "lr_auto": None}
FIELD_VALUES: dict[str, dict[str, list[Any]]] = {
    "format": {"corrupt": [None, True, False, "2", 2.0, 0, -1, 2 ** 63, [], {}, "format"],
               "other_format": [1, 3, 999]},
    "step": {"corrupt": [None, True, "2", 2.5, 2.0, -1, 1, 3, 10 ** 13, 2 ** 63, -2 ** 63, NAN,
                         INF, [], {}, [2]]},
    "world_size": {"corrupt": ["1", -1, 0, 10 ** 9, 2 ** 63, 2 ** 20, 2, 1.0, True, None, NAN,
                               [], {}, [1], "1e9"]},
    "epoch": {"corrupt": [-1, "0", 1.5, None, True, 10 ** 13, NAN, []],
              "valid": [0, 7, 10 ** 6]},
    "consumed": {"corrupt": [-1, "0", 1.5, None, True, 10 ** 13, NAN, []],
                 "valid": [0, 3, 10 ** 9]},
    "created_unix": {"corrupt": [-1, "now", None, NAN, INF, True, [], {}],
                     "valid": [0, 1.5e9, 4102444800]},
    "torch": {"corrupt": [None, 1, "x" * 65, [], {}, True], "valid": ["", "2.14.1+cpu"]},
    "config": {"corrupt": [None, [], "x", 1, {}, True, _nested(40)],
               "valid": [CONFIG],
               "other_config": [{"optim": {"lr": 0.5}}, {"optim": {"lr": "0.1"}},
                                {"unrelated": 1}]},
    "plan": {"valid": [None, {"global_size": 8}, {}, _FULL_PLAN],
             "corrupt": [[], "x", 1, True, {"global_size": -1}, {"global_size": "8"},
                         {"global_size": 8.0}, {"world_size": 1},
                         changed(_FULL_PLAN, world_size=2), {"unknown": 1}, {"base_lr": NAN},
                         {"lr_auto": []}, {"drop_last": "yes"}, {"max_global_size": 0},
                         {"peak_lr": -1}, changed(_FULL_PLAN, micro_size=_DROP)]},
}
_SHA = "0123456789abcdef" * 4


def _field_variants() -> Iterator[Variant]:
    for key in FIELDS:
        yield f"manifest-missing-{key}", "running", _drop(key), "corrupt"
    for key, table in FIELD_VALUES.items():
        for outcome, values in table.items():
            for i, value in enumerate(values):
                yield f"manifest-{key}-{outcome}-{i}", "running", _set(key, value), outcome
    for i, extra in enumerate(({"extra": 1}, {"": 0}, {"__proto__": {}}, {"Step": 2})):
        yield f"manifest-extra-field-{i}", "running", _edit(lambda d, e=extra: d.update(e)), \
            "corrupt"


def _file_list_variants() -> Iterator[Variant]:
    t, r0 = "trainer.pt", "rank-00000.pt"
    wholes = [None, [], "x", {}]
    for i, value in enumerate(wholes):
        yield f"files-whole-{i}", "running", _set("files", value), "corrupt"
    edits = {
        "omit-rank": lambda f: f.pop(r0), "omit-trainer": lambda f: f.pop(t),
        "add-rank1": lambda f: f.__setitem__("rank-00001.pt", dict(f[r0])),
        "add-extra": lambda f: f.__setitem__("extra.pt", dict(f[r0])),
        "rename-traversal": lambda f: f.__setitem__("../trainer.pt", f.pop(t)),
        "rank-as-trainer": lambda f: (f.__setitem__("rank-00000.pt ", f.pop(r0))),
        "entry-not-object": lambda f: f.__setitem__(t, "abc"),
        "entry-no-sha": lambda f: f[t].pop("sha256"),
        "entry-no-bytes": lambda f: f[t].pop("bytes"),
        "entry-extra-key": lambda f: f[t].__setitem__("mode", 420),
    }
    for name, fn in edits.items():
        yield f"files-{name}", "running", _files(fn), "corrupt"
    for i, sha in enumerate(["", "abc", _SHA[:63], _SHA + "0", _SHA.upper(), "g" * 64, 123,
                             None, _SHA]):
        yield f"files-sha256-{i}", "running", _entry(t, "sha256", sha), "corrupt"
    for i, size in enumerate([-1, 0, "10", 1.5, 2 ** 63, None, True, 10 ** 7]):
        yield f"files-bytes-{i}", "running", _entry(r0, "bytes", size), "corrupt"


def _whole_file_variants(file: str, outcome: str) -> Iterator[Variant]:
    layout = "running" if file == "manifest" else "finished"
    raws: dict[str, Any] = {
        "empty": b"", "whitespace": b" \n\t", "truncated": lambda b: b[:len(b) // 2],
        "open-brace": b"{", "binary": bytes(seeded(SEED).randrange(256) for _ in range(256)),
        "bad-utf8": b"\xff\xfe{}", "bom": lambda b: b"\xef\xbb\xbf" + b,
        "array": b"[]", "string": b"\"step-000002\"", "number": b"2", "null": b"null",
        "true": b"true", "nested-lists": b"[" * 100_000 + b"]" * 100_000,
        "nested-objects": b"{\"a\":" * 100_000 + b"1" + b"}" * 100_000,
        "nan": b"NaN", "duplicate-key": lambda b: b.rstrip()[:-1] + b", \"step\": -1}",
    }
    for name, data in raws.items():
        yield f"{file}-raw-{name}", layout, _raw(data, file), outcome
    for how in ("directory", "fifo", "dev_zero", "loop", "huge"):
        yield f"{file}-is-{how}", layout, _replace_path(how, file), outcome
    gone = (lambda run: _manifest(run).unlink()) if file == "manifest" else \
        (lambda run: (run / "checkpoints" / "done.json").unlink())
    yield f"{file}-missing", layout, gone, outcome


def _set_dir_variants() -> Iterator[Variant]:
    def unlisted(run: Path) -> None:  # a world-2 set whose manifest was cut to world 1
        shutil.copy(run / "checkpoints" / NEWEST / "rank-00000.pt",
                    run / "checkpoints" / NEWEST / "rank-00001.pt")

    def rank_is_dir(run: Path) -> None:
        f = run / "checkpoints" / NEWEST / "rank-00000.pt"
        f.unlink()
        f.mkdir()

    def renamed(run: Path) -> None:
        (run / "checkpoints" / NEWEST).rename(run / "checkpoints" / "step-000005")

    def truncated(run: Path) -> None:
        f = run / "checkpoints" / NEWEST / "trainer.pt"
        f.write_bytes(f.read_bytes()[:100])

    for fn in (unlisted, rank_is_dir, renamed, truncated):
        yield f"setdir-{fn.__name__}", "running", fn, "corrupt"


def _done_variants() -> Iterator[Variant]:
    d = "done"
    for i, (key, value) in enumerate([(None, None), ("stop_reason", None),
                                      ("stop_reason", ""), ("summary", {})]):
        fn = (lambda run: None) if key is None else _set(key, value, d)
        yield f"done-valid-{i}", "finished", fn, "valid"
    for key in ("step", "set", "stop_reason", "summary"):
        yield f"done-missing-{key}", "finished", _drop(key, d), "done_ignored"
    bad = {"step": ["2", -1, 2.0, True, None, 10 ** 13, 3, 1, NAN],
           "set": ["", None, 1, "../step-000002", "step-2x", "STEP-000002", [], "step-000002/"],
           "stop_reason": [1, [], {}, "x" * 300, True],
           "summary": [None, [], "x", 1, _nested(40)]}
    for key, values in bad.items():
        for i, value in enumerate(values):
            yield f"done-{key}-{i}", "finished", _set(key, value, d), "done_ignored"
    for i, (step, name) in enumerate([(1, PREVIOUS), (3, "step-000003"),
                                      (2, "step-000002.1"), (2, "step-2")]):
        yield (f"done-names-other-{i}", "finished",
               _edit(lambda m, s=step, n=name: m.update(step=s, set=n), d), "done_ignored")
    for i, extra in enumerate(({"extra": 1}, {"set_": NEWEST})):
        yield f"done-extra-{i}", "finished", _edit(lambda m, e=extra: m.update(e), d), \
            "done_ignored"
    yield from _whole_file_variants("done", "done_ignored")
    yield "done-names-corrupt-manifest", "finished", _set("world_size", "1"), "corrupt"
    yield "done-names-altered-set", "finished", \
        lambda run: (run / "checkpoints" / NEWEST / "trainer.pt").write_bytes(b"x"), "corrupt"


def _weights_variants() -> Iterator[Variant]:
    def put(data: bytes | None, directory: bool = False) -> Callable[[Path], None]:
        def mutate(run: Path) -> None:
            path = run / "model.pt"
            path.unlink()
            if directory:
                path.mkdir()
            elif data is not None:
                path.write_bytes(data)
        return mutate

    good = torch_file({"model": Parts().model.state_dict()})
    cases = {"missing": put(None), "empty": put(b""), "truncated": put(good[:len(good) // 2]),
             "garbage": put(b"\x00" * 64), "directory": put(None, True),
             "hostile-pickle": put(HOSTILE),
             "model-is-tensor": put(torch_file({"model": torch.zeros(2)})),
             "no-model-key": put(torch_file({"weights": Parts().model.state_dict()})),
             "empty-dict": put(torch_file({})), "a-list": put(torch_file([1, 2]))}
    for name, fn in cases.items():
        yield f"weights-{name}", "finished", fn, "weights_bad"


def _part_variants() -> Iterator[Variant]:
    t, r0 = "trainer.pt", "rank-00000.pt"
    trainer = {"empty": lambda o: {}, "no-model": lambda o: changed(o, model=_DROP),
               "model-tensor": lambda o: changed(o, model=torch.zeros(2)),
               "model-list": lambda o: changed(o, model=[1]),
               "model-empty": lambda o: changed(o, model={}),
               "model-shape": lambda o: changed(o, model={"weight": torch.zeros(5, 5),
                                                          "bias": torch.zeros(5)}),
               "counter-type": lambda o: changed(o, counter={"step": "2"}),
               "shard-none": lambda o: changed(o, shard=None),
               "top-tensor": lambda o: torch.zeros(3), "top-list": lambda o: [o],
               "top-none": lambda o: None}
    for name, fn in trainer.items():
        yield f"part-trainer-{name}", "running", resigned_part(t, fn), "part_bad"
    rank = {"empty": lambda o: {}, "other-rank": lambda o: changed(o, rank=1),
            "other-step": lambda o: changed(o, step=1), "rng-tensor": lambda o: changed(
                o, rng=torch.zeros(2)), "rng-empty": lambda o: changed(o, rng={}),
            "no-shard": lambda o: changed(o, shard=_DROP),
            "shard-shape": lambda o: changed(o, shard={"w": torch.zeros(9)}),
            "shard-tensor": lambda o: changed(o, shard=torch.zeros(4))}
    for name, fn in rank.items():
        yield f"part-rank-{name}", "running", resigned_part(r0, fn), "part_bad"
    yield "part-hostile-pickle", "running", \
        lambda run: resign(run / "checkpoints" / NEWEST, t, HOSTILE), "refused"


def _random_variants(n: int = 40) -> Iterator[Variant]:
    """Seeded: replace one value anywhere in the manifest (or done marker) with garbage."""
    rng = seeded(SEED)
    pool = [None, True, -1, 0, 1, 2, 2 ** 63, 10 ** 9, 1.5, NAN, "", "1", "x" * 70, [], {},
            [1, 2], {"a": {"b": []}}, _SHA]

    def replace_random(data: dict, choice: Any, pick: int) -> None:
        paths = []
        stack: list[tuple[Any, list]] = [(data, [])]
        while stack:
            node, path = stack.pop()
            for k, v in (node.items() if isinstance(node, dict) else enumerate(node)):
                paths.append(path + [k])
                if isinstance(v, (dict, list)):
                    stack.append((v, path + [k]))
        target = paths[pick % len(paths)]
        node = data
        for k in target[:-1]:
            node = node[k]
        node[target[-1]] = choice

    for i in range(n):
        file = "manifest" if i < n * 3 // 4 else "done"
        choice, pick = rng.choice(pool), rng.randrange(10 ** 6)
        yield (f"random-{file}-{i}", "finished",
               _edit(lambda d, c=choice, p=pick: replace_random(d, c, p), file), "random")


def variants() -> list[Variant]:
    out = [*_field_variants(), *_file_list_variants(), *_whole_file_variants("manifest",
                                                                             "corrupt"),
           *_set_dir_variants(), *_done_variants(), *_weights_variants(), *_part_variants(),
           *_random_variants()]
    assert len({v[0] for v in out}) == len(out), "variant ids must be unique"
    return out


VARIANTS = variants()
