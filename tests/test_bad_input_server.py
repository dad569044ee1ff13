"""Bad input to the server-side verbs (fuse, pull, registry), including a hostile file store and a
hostile registry: each is one clean `error:` line, exit 2, nothing written anywhere (tests/badinput.py)."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import socket
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from protos import mixshow_pb2 as pb
from protos import mixshow_pb2_grpc as pb_grpc
from shared.checkpoints import LATEST, MANIFEST, publish
from shared.storage import open_store
from tests.badinput import assert_clean_error

# ---------------------------------------------------------------------------------------------- fuse


def _copy(pkg: Path, sandbox: Path, name: str | None = None) -> Path:
    dest = sandbox / (name or pkg.name)
    shutil.copytree(pkg, dest)
    return dest


def _rewrite_json(pkg: Path, **changes) -> None:
    data = json.loads((pkg / "concept.json").read_text())
    data.update(changes)
    (pkg / "concept.json").write_text(json.dumps(data))


def _rewrite_weights(pkg: Path, change) -> None:
    tensors = load_file(str(pkg / "edlora.safetensors"))
    change(tensors)
    save_file(tensors, str(pkg / "edlora.safetensors"), metadata={"format": "mixshow-edlora", "format_version": "1"})


def _nan_in_lora(tensors):
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")


def _nudge_lora(tensors):
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key] + 1e-3


FUSE_CASES = {
    # id: (how to spoil the sandboxed copies (pkgs list), extra flags, expected text)
    "package folder missing": (lambda p: shutil.rmtree(p[0]), [], "is not a folder"),
    "lam nan": (None, ["--lam", "nan"], "--lam"),
    "lam inf": (None, ["--lam", "inf"], "--lam"),
    "lam negative": (None, ["--lam", "-1"], "--lam"),
    "preserve too many": (None, ["--preserve", "99"], "there are 8"),
    "preserve negative": (None, ["--preserve", "-2"], "--preserve"),
    "unknown method": (None, ["--method", "median"], "--method"),
    "prompt file missing": (None, ["--preserve-prompts", "{tmp}/none.txt"], "is not a file"),
    "prompt file not utf-8": (lambda p: (p[0].parent / "p.txt").write_bytes(b"a dog\n\xff\xfe"),
                              ["--preserve-prompts", "{tmp}/p.txt"], "not UTF-8"),
    "prompt file of comments": (lambda p: (p[0].parent / "p.txt").write_text("# nothing\n\n"),
                                ["--preserve-prompts", "{tmp}/p.txt"], "holds no prompt"),
    "prompt too long": (lambda p: (p[0].parent / "p.txt").write_text("a dog\n" + "x" * 1001 + "\n"),
                        ["--preserve-prompts", "{tmp}/p.txt"], "prompt 2 is longer"),
    "preserve more than the file": (lambda p: (p[0].parent / "p.txt").write_text("a dog\na cat\n"),
                                    ["--preserve-prompts", "{tmp}/p.txt", "--preserve", "3"], "there are 2"),
    "unknown kv rows": (None, ["--kv-rows", "some"], "--kv-rows"),
    "nan in a lora tensor": (lambda p: _rewrite_weights(p[0], _nan_in_lora), [], "NaN or Inf"),
    "stats of other weights": (lambda p: _rewrite_weights(p[0], _nudge_lora), [], "other weights"),
    "concept.json not utf-8": (lambda p: (p[0] / "concept.json").write_bytes(b"\xff\xfe{]"), [], "not UTF-8"),
    "concept.json broken json": (lambda p: (p[0] / "concept.json").write_text('{"name": '), [], "not valid JSON"),
    "concept.json NaN literal": (lambda p: _rewrite_json(p[0], alpha=float("nan")), [], "not valid JSON"),
    "concept.json rank as text": (lambda p: _rewrite_json(p[0], rank="4"), [], "'rank' is str"),
    "concept.json words not a list": (lambda p: _rewrite_json(p[0], words="<a1>"), [], "'words' is str"),
    "weights not safetensors": (lambda p: (p[0] / "edlora.safetensors").write_bytes(b"\x08" * 64), [],
                                "cannot be read as safetensors"),
    "stats info not json": (lambda p: _spoil_stats_info(p[0]), [], "not valid JSON"),
    "two packages with one name": (lambda p: _rewrite_json(p[1], name=json.loads(
        (p[0] / "concept.json").read_text())["name"]), [], "two concepts are named"),
}


def _spoil_stats_info(pkg: Path) -> None:
    from safetensors import safe_open

    path = pkg / "stats.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["info"] = "{not json"
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("case", list(FUSE_CASES))
def test_fuse_bad_input(case, tiny_base, three_packages, tmp_path, monkeypatch, capsys):
    spoil, flags, expect = FUSE_CASES[case]
    pkgs = [_copy(p, tmp_path) for p in three_packages[:2]]
    if spoil:
        spoil(pkgs)
    args = ["fuse", "--base", tiny_base, *[a for p in pkgs for a in ("--concept", p)], "--out", tmp_path / "fused",
            *[flag.replace("{tmp}", str(pkgs[0].parent)) for flag in flags]]
    assert_clean_error(args, tmp_path, expect, monkeypatch, capsys, out=tmp_path / "fused")


def test_fuse_from_a_damaged_fusion_state(tiny_base, fused_three, three_packages, tmp_path, monkeypatch, capsys):
    folder = _copy(fused_three["gradient"], tmp_path, "fused-a")
    state = folder / "fusion_state.safetensors"
    state.write_bytes(state.read_bytes()[:500])
    args = ["fuse", "--from", folder, "--remove", "green-triangle", "--out", tmp_path / "fused-b"]
    assert_clean_error(args, tmp_path, "fusion state", monkeypatch, capsys, out=tmp_path / "fused-b")


def test_fuse_from_a_fusion_state_with_a_dotted_concept_name(tiny_base, fused_three, tmp_path, monkeypatch, capsys):
    """A concept name the fuser would never write ('a.b') is refused when the state is read: the state's file
    names are <kind>.<concept>.<module>, so such a name would make one concept's terms another's."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = _copy(fused_three["gradient"], tmp_path, "fused-a")
    state = folder / "fusion_state.safetensors"
    with safe_open(str(state), framework="pt") as f:
        meta = f.metadata()
    entries = json.loads(meta["concepts"])
    entries[0]["name"] = "red.circle"
    save_file(load_file(str(state)), str(state), metadata={**meta, "concepts": json.dumps(entries)})
    args = ["fuse", "--from", folder, "--remove", "green-triangle", "--out", tmp_path / "fused-b"]
    assert_clean_error(args, tmp_path, "concept list is malformed", monkeypatch, capsys, out=tmp_path / "fused-b")


# ------------------------------------------------------------------------------------ hostile file store


def _small_fused_folder(root: Path) -> Path:
    """A folder `publish` accepts: a concepts.json and one payload file."""
    folder = root / "fused-src"
    folder.mkdir()
    (folder / "concepts.json").write_text(json.dumps({"method": "gradient", "n_layers": 4, "base_fingerprint": "0" * 64,
                                                      "concepts": [], "base": "none"}))
    (folder / "payload.bin").write_bytes(b"fused weights")
    return folder


def _hostile_version(store, entries: list[pb.FileEntry], version: str = "v0002") -> None:
    """Publish a manifest written by an attacker with write access to the store."""
    manifest = pb.FusedManifest(version=version, base_fingerprint="0" * 64, method="gradient", files=entries)
    store.put_bytes(f"fused/{version}/{MANIFEST}", manifest.SerializeToString())
    store.put_bytes(LATEST, version.encode())


def _entry(store, key: str, data: bytes) -> pb.FileEntry:
    return pb.FileEntry(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def _concepts_entry(store, version="v0002") -> pb.FileEntry:
    data = (b'{"method": "gradient", "n_layers": 4, "base_fingerprint": "' + b"0" * 64 + b'", "concepts": []}')
    store.put_bytes(f"fused/{version}/concepts.json", data)
    return _entry(store, f"fused/{version}/concepts.json", data)


def _traversal(store, root: Path):
    payload = b"attacker bytes"
    (root / "x").mkdir(exist_ok=True)
    store.put_bytes("fused/v0002/payload.bin", payload)
    return [_concepts_entry(store), _entry(store, "fused/v0002/../../../x/secret.txt", payload)]


STORE_CASES = {
    "traversal key": (_traversal, "not a plain relative path"),
    "absolute key": (lambda s, r: [_concepts_entry(s), pb.FileEntry(key="/etc/hostname", size=1, sha256="0" * 64)],
                     "is not inside"),
    "key of another version": (lambda s, r: [_concepts_entry(s), _entry(s, "fused/v0001/payload.bin",
                                                                        b"fused weights")], "is not inside"),
    "dot-dot inside the prefix": (lambda s, r: [_concepts_entry(s), _entry(s, "fused/v0002/a/../../v0001/x", b"z")],
                                  "not a plain relative path"),
    "backslash key": (lambda s, r: [_concepts_entry(s), _entry(s, "fused/v0002/..\\..\\x", b"z")],
                      "not a plain relative path"),
    "entry listed twice": (lambda s, r: [_concepts_entry(s), _concepts_entry(s)], "listed twice"),
    "no sha256": (lambda s, r: [_concepts_entry(s), pb.FileEntry(key="fused/v0002/payload.bin", size=3)],
                  "no valid sha256"),
    "bytes swapped after the manifest": (lambda s, r: _swapped(s), "does not match the manifest"),
    "size larger than the manifest": (lambda s, r: _longer(s), "bytes"),
}


def _swapped(store):
    entry = _concepts_entry(store)
    store.put_bytes("fused/v0002/payload.bin", b"original")
    good = _entry(store, "fused/v0002/payload.bin", b"original")
    store.put_bytes("fused/v0002/payload.bin", b"swapped!")  # also rewrites the sidecar: only the manifest knows
    return [entry, good]


def _longer(store):
    entry = _concepts_entry(store)
    store.put_bytes("fused/v0002/payload.bin", b"x" * 5000)
    return [entry, pb.FileEntry(key="fused/v0002/payload.bin", size=10,
                                sha256=hashlib.sha256(b"x" * 5000).hexdigest())]


@pytest.mark.parametrize("case", list(STORE_CASES))
def test_pull_from_a_hostile_file_store(case, tmp_path, monkeypatch, capsys):
    store = open_store(f"file://{tmp_path}/store")
    publish(store, _small_fused_folder(tmp_path))
    make, expect = STORE_CASES[case]
    _hostile_version(store, make(store, tmp_path))
    out = tmp_path / "out" / "pulled"
    assert_clean_error(["pull", "--store", store.url, "--out", out], tmp_path, expect, monkeypatch, capsys, out=out)
    assert not (tmp_path / "x" / "secret.txt").exists()


@pytest.mark.parametrize("case", ["LATEST names a path", "manifest is not protobuf", "version name is a path"])
def test_pull_refuses_broken_pointers(case, tmp_path, monkeypatch, capsys):
    store = open_store(f"file://{tmp_path}/store")
    publish(store, _small_fused_folder(tmp_path))
    args = ["pull", "--store", store.url, "--out", tmp_path / "pulled"]
    if case == "LATEST names a path":
        store.put_bytes(LATEST, b"../../etc")
        expect = "versions are v0001"
    elif case == "manifest is not protobuf":
        store.put_bytes(f"fused/v0001/{MANIFEST}", b"\xff\xff\xff\xff not a protobuf")
        expect = "does not decode"
    else:
        args += ["--version", "../v0001"]
        expect = "versions are v0001"
    assert_clean_error(args, tmp_path, expect, monkeypatch, capsys, out=tmp_path / "pulled")


# -------------------------------------------------------------------------------------- hostile registry


class HostileRegistry(pb_grpc.CheckpointRegistryServicer):
    """A registry that answers GetVersion with whatever manifest the test gives it."""

    def __init__(self, answer):
        self.answer = answer

    def GetVersion(self, request, context):  # noqa: N802
        return self.answer


@pytest.fixture
def hostile_registry():
    servers = []

    def start(answer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_CheckpointRegistryServicer_to_server(HostileRegistry(answer), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


@pytest.fixture
def http_files():
    """A loopback HTTP server serving fixed bytes at any path."""
    body = {"data": b""}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(body["data"])))
            self.end_headers()
            self.wfile.write(body["data"])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield body, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _manifest(entries, version="v0003") -> pb.FusedManifest:
    return pb.FusedManifest(version=version, base_fingerprint="0" * 64, method="gradient", files=entries)


def _concepts(url: str, version="v0003") -> pb.FileEntry:
    return pb.FileEntry(key=f"fused/{version}/concepts.json", size=2, sha256=hashlib.sha256(b"{}").hexdigest(),
                        url=url)


REGISTRY_CASES = {
    "file url": (lambda url: _manifest([_concepts("file:///etc/hostname")]), "not http(s)"),
    "data url": (lambda url: _manifest([_concepts("data:text/plain;base64,e30=")]), "not http(s)"),
    "traversal key": (lambda url: _manifest([_concepts(url), pb.FileEntry(key="fused/v0003/../../../../tmp/evil",
                                                                          size=2, sha256="a" * 64, url=url)]),
                      "not a plain relative path"),
    "another version than asked": (lambda url: _manifest([_concepts(url)], "v0009"), "answered version"),
    "bytes that do not match": (lambda url: _manifest([_concepts(url), pb.FileEntry(
        key="fused/v0003/payload.bin", size=14, sha256="b" * 64, url=url)]), "the manifest says 2"),
    "no concepts file": (lambda url: _manifest([pb.FileEntry(key="fused/v0003/x.bin", size=2, sha256="c" * 64,
                                                             url=url)]), "lists no concepts.json"),
}


@pytest.mark.parametrize("case", list(REGISTRY_CASES))
def test_pull_from_a_hostile_registry(case, hostile_registry, http_files, tmp_path, monkeypatch, capsys):
    body, url = http_files
    body["data"] = b"{}" if case != "bytes that do not match" else b"attacker bytes"
    make, expect = REGISTRY_CASES[case]
    address = hostile_registry(make(url + "/file"))
    version = "v0003" if case == "another version than asked" else "latest"
    out = tmp_path / "pulled"
    assert_clean_error(["pull", "--registry", address, "--insecure", "--out", out, "--version", version], tmp_path,
                       expect, monkeypatch, capsys, out=out)
    assert not Path("/tmp/evil").exists()


@pytest.mark.parametrize("flags, expect", [(["--model-only", "--lora-only"], "--model-only or --lora-only"),
                                           (["--with-state", "--lora-only"], "--with-state or --lora-only")])
def test_pull_refuses_parts_that_exclude_each_other(flags, expect, tmp_path, monkeypatch, capsys):
    assert_clean_error(["pull", "--store", f"file://{tmp_path}/store", "--out", tmp_path / "p", *flags], tmp_path,
                       expect, monkeypatch, capsys, out=tmp_path / "p")


def test_pull_from_an_unreachable_registry(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert_clean_error(["pull", "--registry", f"127.0.0.1:{port}", "--insecure", "--out", tmp_path / "p"], tmp_path,
                       "unreachable", monkeypatch, capsys, out=tmp_path / "p")


# ------------------------------------------------------------------------------------------ registry verb


def test_registry_refuses_a_port_in_use(tmp_path, monkeypatch, capsys):
    (tmp_path / "store").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_clean_error(["registry", "--store", f"file://{tmp_path}/store", "--host", "127.0.0.1", "--port",
                            str(port), "--insecure"], tmp_path, "cannot listen", monkeypatch, capsys)


@pytest.mark.parametrize("port, expect", [("70000", "not a TCP port"), ("-1", "not a TCP port"),
                                          ("http", "--port")])
def test_registry_refuses_bad_ports(port, expect, tmp_path, monkeypatch, capsys):
    (tmp_path / "store").mkdir()
    assert_clean_error(["registry", "--store", f"file://{tmp_path}/store", "--port", port, "--insecure"], tmp_path,
                       expect, monkeypatch, capsys)


def test_registry_refuses_a_bad_store_url(tmp_path, monkeypatch, capsys):
    assert_clean_error(["registry", "--store", "ftp://somewhere/x", "--port", "0"], tmp_path, "--store",
                       monkeypatch, capsys)


def test_error_printer_prints_markup_literally(tmp_path, monkeypatch, capsys):
    """A message with rich-markup brackets is printed as written (no tags eaten, no printer crash)."""
    line = assert_clean_error(["pull", "--store", "file:///[bold]x[/]y[/nope]", "--out", tmp_path / "p"], tmp_path,
                              "[bold]x[/]y[/nope]", monkeypatch, capsys, out=tmp_path / "p")
    assert line.startswith("error: ")


def test_fused_lora_with_nan_is_refused(tiny_base, fused_three, tmp_path, monkeypatch, capsys):
    from safetensors import safe_open

    src = fused_three["gradient"] / "fused_lora.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    save_file(tensors, str(tmp_path / "fused_lora.safetensors"), metadata=meta)
    out = tmp_path / "img.png"
    assert_clean_error(["sample", "--base", tiny_base, "--fused-lora", tmp_path / "fused_lora.safetensors",
                        "--prompt", "a photo", "--steps", "2", "--height", "64", "--width", "64", "--out", out],
                       tmp_path, "NaN or Inf", monkeypatch, capsys)
    assert not out.exists()


@pytest.mark.parametrize("args, expect", [(["make-toy-concepts", "{out}", "--images", "0"], "--images"),
                                          (["make-toy-concepts", "{out}", "--size", "-5"], "--size"),
                                          (["make-toy-concepts", "{out}", "--n", "99"], "--n"),
                                          (["make-tiny-base", "{out}", "--seed", "-1"], "--seed")])
def test_fixture_verbs_check_their_numbers(args, expect, tmp_path, monkeypatch, capsys):
    out = tmp_path / "made"
    assert_clean_error([a.replace("{out}", str(out)) for a in args], tmp_path, expect, monkeypatch, capsys, out=out)


@pytest.mark.parametrize("args, expect", [(["--concept", "bogus"], "--concept: 'bogus' is not a world concept"),
                                          (["--concept", "hexagon", "--seeds", "0"], "--seeds: 0 is outside"),
                                          (["--concept", "hexagon", "--grid", "{tmp}/grid.jpg"], "must end in .png")])
def test_eval_concepts_checks_its_arguments(args, expect, tmp_path, monkeypatch, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert_clean_error(["eval", "concepts", "--model", tmp_path / "none", *args], tmp_path, expect, monkeypatch,
                       capsys)


@pytest.mark.parametrize("barred", ["all", [{"name": "a"}], [{"name": "a", "client": 7}], {"name": "a"}])
def test_a_malformed_operator_removal_record_is_refused(barred):
    """A version's `removed_by_operator` that is not a list of {name, client} strings stops the round with one
    clear error (a later round would otherwise let a removed concept back in, or crash)."""
    from server.membership import Changes, Previous, operator_removals
    from shared.errors import UserError

    with pytest.raises(UserError, match="removed_by_operator must be a list"):
        operator_removals({"removed_by_operator": barred}, "v0003/concepts.json")
    kept = operator_removals({"removed_by_operator": [{"name": "a", "client": "7"}]}, "v0003/concepts.json")
    assert kept == [{"name": "a", "client": "7"}] and operator_removals({}, "x") == []
    previous = Previous("v0003", None, [{"name": "b", "client": "9"}], kept)
    changes = Changes(previous)
    changes.remove_by_operator("b")
    assert changes.barred == [{"name": "a", "client": "7"}, {"name": "b", "client": "9"}]


@pytest.mark.parametrize("change, expect", [({"preserve": 2, "preserve_prompts": ["a dog"]}, "changed by hand"),
                                            ({"preserve": "2"}, "is not a count of prompts"),
                                            ({"preserve": 1, "preserve_prompts": [""]}, "prompt 1 is empty")])
def test_fuse_from_a_fusion_whose_preservation_record_was_edited(change, expect, fused_three, tmp_path, monkeypatch,
                                                                 capsys):
    folder = _copy(fused_three["gradient"], tmp_path, "fused-a")
    info = json.loads((folder / "concepts.json").read_text())
    info.update(change)
    (folder / "concepts.json").write_text(json.dumps(info))
    args = ["fuse", "--from", folder, "--remove", "green-triangle", "--out", tmp_path / "fused-b"]
    assert_clean_error(args, tmp_path, expect, monkeypatch, capsys, out=tmp_path / "fused-b")
