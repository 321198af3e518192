"""Checkpoint download, resume, verification, offline import and safe loading, against a server on 127.0.0.1."""

import hashlib
import http.server
import threading
import time

import pytest
import torch

from FMOneShotLib import weights as W
from FMOneShotLib.cli import main
from FMOneShotLib.errors import FMOneShotError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append(dict(self.headers))
        mode = srv.mode
        if mode == "error":
            self.send_error(503, "Service Unavailable")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and mode != "norange":
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(srv.payload) - 1}/{len(srv.payload)}")
        else:
            self.send_response(200)
        body = srv.payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "slow":
            time.sleep(2.0)
        if mode == "truncate":  # the connection drops after half the body
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.mode, srv.payload, srv.requests = "ok", PAYLOAD, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/model.bin"
    yield srv
    srv.shutdown()
    srv.server_close()


def entry(url, sha256=DIGEST, name="test_model"):
    return W.Checkpoint(name, "model.bin", url, "Apache-2.0", sha256=sha256, description="test model")


def test_download_verifies_and_reports_progress(server, tmp_path):
    seen = []
    path = W.download(entry(server.url), tmp_path, progress=lambda done, total: seen.append((done, total)),
                      chunk=1 << 16)
    assert path == tmp_path / "test_model" / "model.bin"
    assert path.read_bytes() == PAYLOAD
    assert seen[0] == (0, len(PAYLOAD)) and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert not path.with_name("model.bin.part").exists()
    # a second call finds the verified file and does not download again
    W.download(entry(server.url), tmp_path, progress=False)
    assert len(server.requests) == 1


def test_interrupted_download_resumes_where_it_stopped(server, tmp_path):
    server.mode = "truncate"
    with pytest.raises(FMOneShotError, match="run the same download again|Cannot download"):
        W.download(entry(server.url), tmp_path, progress=False)
    part = tmp_path / "test_model" / "model.bin.part"
    assert 0 < part.stat().st_size < len(PAYLOAD)
    kept = part.stat().st_size
    server.mode = "ok"
    path = W.download(entry(server.url), tmp_path, progress=False)
    assert server.requests[-1]["Range"] == f"bytes={kept}-"
    assert path.read_bytes() == PAYLOAD


def test_server_that_ignores_the_range_restarts_cleanly(server, tmp_path):
    part = tmp_path / "test_model" / "model.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage" * 100)
    server.mode = "norange"
    assert W.download(entry(server.url), tmp_path, progress=False).read_bytes() == PAYLOAD


def test_checksum_mismatch_is_refused_and_deleted(server, tmp_path):
    with pytest.raises(FMOneShotError, match="deleted and not loaded"):
        W.download(entry(server.url, sha256="0" * 64), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the file nor the folder made for it is left


def test_server_error_and_timeout_give_clear_messages(server, tmp_path):
    server.mode = "error"
    with pytest.raises(FMOneShotError, match="HTTP 503.*weights import"):
        W.download(entry(server.url), tmp_path, progress=False)
    server.mode = "slow"
    with pytest.raises(FMOneShotError, match="Cannot download .*timed out. Nothing was written"):
        W.download(entry(server.url), tmp_path, progress=False, timeout=0.5)
    assert list(tmp_path.iterdir()) == []  # no empty .part, no empty folder


def test_refused_download_leaves_the_cache_as_it_was(tmp_path):
    """Nothing listens on the port: the message claims no partial file, and no empty folder is left."""
    cache = tmp_path / "cache"
    with pytest.raises(FMOneShotError) as err:
        W.download(entry("http://127.0.0.1:9/model.bin"), cache, progress=False, timeout=5)
    assert "Nothing was written." in str(err.value) and ".part" not in str(err.value)
    assert not cache.exists()
    partial = cache / "test_model" / "model.bin.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 10)
    with pytest.raises(FMOneShotError, match=r"The partial file .*model.bin.part \(10 bytes\) is kept.*resumes"):
        W.download(entry("http://127.0.0.1:9/model.bin"), cache, progress=False, timeout=5)
    assert partial.read_bytes() == b"x" * 10


def test_unpublished_digest_is_pinned_on_first_download_and_checked_after(server, tmp_path):
    e = entry(server.url, sha256=None)
    path = W.download(e, tmp_path, progress=False)
    assert W.expected_digest(e, path) == DIGEST
    assert W.verify(e, tmp_path) == path
    path.write_bytes(PAYLOAD[:-10])  # damaged later (another size, so not the memoised check)
    with pytest.raises(FMOneShotError, match="damaged"):
        W.verify(e, tmp_path)


def test_opt_in_licence_must_be_accepted(server, tmp_path):
    e = W.Checkpoint("lic", "model.bin", server.url, "DINOv3 License", opt_in=True, description="DINOv3")
    with pytest.raises(FMOneShotError, match="accept-licence"):
        W.download(e, tmp_path, progress=False)
    assert server.requests == []
    assert W.download(e, tmp_path, progress=False, accept_licence=True).read_bytes() == PAYLOAD


def test_import_checks_the_published_digest(tmp_path, monkeypatch):
    sam = W.REGISTRY["sam_vit_b"]
    fake = W.Checkpoint(sam.name, sam.file, sam.url, sam.licence, sha256=DIGEST, description=sam.description)
    monkeypatch.setitem(W.REGISTRY, "sam_vit_b", fake)
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    good.write_bytes(PAYLOAD)
    bad.write_bytes(PAYLOAD[:1000])  # truncated
    cache = tmp_path / "cache"
    with pytest.raises(FMOneShotError, match="nothing was imported"):
        W.import_file(bad, "sam_vit_b", cache)
    assert not W.is_present("sam_vit_b", cache)
    path = W.import_file(good, "sam_vit_b", cache)
    assert path == cache / "sam_vit_b" / "sam_vit_b_01ec64.pth" and path.read_bytes() == PAYLOAD
    assert W.verify("sam_vit_b", cache) == path


def test_missing_checkpoint_says_which_file_where_to_get_it_and_where_to_put_it(tmp_path):
    with pytest.raises(FMOneShotError) as err:
        W.verify("sam_vit_b", tmp_path)
    text = str(err.value)
    assert "sam_vit_b_01ec64.pth" in text and W.REGISTRY["sam_vit_b"].url in text
    assert str(tmp_path / "sam_vit_b" / "sam_vit_b_01ec64.pth") in text and "weights import" in text


def test_registry_holds_the_published_facts_only():
    sam = {e.file: e.sha256 for e in W.REGISTRY.values() if e.name.startswith("sam_")}
    assert sam["sam_vit_b_01ec64.pth"].startswith("ec2df627") and sam["sam_vit_h_4b8939.pth"].startswith("a7bf3b02")
    timm_entries = [e for e in W.REGISTRY.values() if e.timm_name]
    assert timm_entries and all(e.sha256 is None for e in timm_entries)  # no invented digests
    from timm.models import get_pretrained_cfg

    # the file timm itself reads for the model (CLIP's QuickGELU variant reads the plain CLIP file)
    assert all(e.url == f"https://huggingface.co/{get_pretrained_cfg(e.timm_name).hf_hub_id}/resolve/main/"
               "model.safetensors" for e in timm_entries)
    assert [e.name for e in W.REGISTRY.values() if e.opt_in] == ["d3s16", "d3b16"]


def test_loading_is_safe_and_refuses_damaged_files(tmp_path):
    from safetensors.torch import save_file

    state = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(state, tmp_path / "ok.pth")
    save_file(state, str(tmp_path / "ok.safetensors"))
    assert torch.equal(W.load_state_dict(tmp_path / "ok.pth")["w"], state["w"])
    assert torch.equal(W.load_state_dict(tmp_path / "ok.safetensors")["w"], state["w"])
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes()[:40])
    with pytest.raises(FMOneShotError, match="damaged"):
        W.load_state_dict(tmp_path / "cut.safetensors")

    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    torch.save({"w": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(FMOneShotError, match="Cannot read the checkpoint"):
        W.load_state_dict(tmp_path / "evil.pth")


def test_cli_weights_list_import_verify(tmp_path, capsys, monkeypatch):
    sam = W.REGISTRY["sam_vit_b"]
    monkeypatch.setitem(W.REGISTRY, "sam_vit_b", W.Checkpoint(sam.name, sam.file, sam.url, sam.licence,
                                                              sha256=DIGEST, description=sam.description))
    cache = tmp_path / "cache"
    src = tmp_path / "sam_vit_b_01ec64.pth"
    src.write_bytes(PAYLOAD)
    assert main(["weights", "import", str(src), "--name", "sam_vit_b", "--cache", str(cache)]) == 0
    assert main(["weights", "verify", "--cache", str(cache)]) == 0
    assert "sam_vit_b: ok" in capsys.readouterr().out
    assert main(["weights", "list", "--json", "--cache", str(cache)]) == 0
    rows = {r["name"]: r for r in __import__("json").loads(capsys.readouterr().out)}
    assert rows["sam_vit_b"]["present"] and not rows["sam_vit_h"]["present"]
    (cache / "sam_vit_b" / sam.file).write_bytes(PAYLOAD[:-1])  # damaged in the cache
    assert main(["weights", "verify", "sam_vit_b", "--cache", str(cache)]) == 1
    assert "damaged" in capsys.readouterr().out


def test_cli_weights_list_keeps_every_row_in_its_columns(tmp_path, capsys):
    """The table's columns are as wide as their longest entry: sam2_base_plus (14 characters) pushed its row's
    model, presence and check out of line with the others."""
    assert main(["weights", "list", "--cache", str(tmp_path / "cache")]) == 0
    header, *lines = capsys.readouterr().out.splitlines()[1:]
    starts = [header.index(title) for title in ("model", "present", "checked by", "licence")]
    assert len(lines) == len(W.status(tmp_path / "cache")) and any(" sam2_base_plus " in line for line in lines)
    for line in lines:
        name = line.split()[0]
        row = next(r for r in W.status(tmp_path / "cache") if r["name"] == name)
        cells = [line[a:b].rstrip() for a, b in zip([2, *starts], [*starts, None])]
        assert cells[:4] == [name, row["description"], "no", row["check"]], line
        assert all(line[k - 1] == " " for k in starts), line


@pytest.fixture
def tiny_d2s14(monkeypatch, tmp_path):
    """d2s14's registry entry on timm's tiny 'test_vit' architecture (no published digest, like the real
    one), and files of it: a good one (random weights), a truncated, an empty, and another architecture's."""
    import timm
    from safetensors.torch import save_file

    monkeypatch.setitem(W.REGISTRY, "d2s14", W.Checkpoint("d2s14", "model.safetensors", "http://127.0.0.1:9/none",
                                                          "Apache-2.0", timm_name="test_vit", description="tiny ViT"))
    files = {}
    for name, arch, classes in (("good", "test_vit", 0), ("other", "test_vit2", 0), ("with_head", "test_vit", 10)):
        model = timm.create_model(arch, pretrained=False, num_classes=classes)
        files[name] = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(files[name]))
    data = files["good"].read_bytes()
    files["truncated"] = tmp_path / "truncated.safetensors"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"] = tmp_path / "empty.safetensors"
    files["empty"].write_bytes(b"")
    return files


@pytest.mark.parametrize("bad", ["truncated", "empty", "other"])
def test_a_broken_checkpoint_is_never_imported_or_pinned(tiny_d2s14, tmp_path, capsys, bad):
    cache = tmp_path / "cache"
    code = main(["weights", "import", str(tiny_d2s14[bad]), "--name", "d2s14", "--cache", str(cache)])
    err = capsys.readouterr().err
    assert code == 2 and "nothing was imported" in err and len(err.strip().splitlines()) == 1
    assert not W.is_present("d2s14", cache) and not list(cache.rglob("*.sha256"))
    assert W.resolve_backend("auto", cache)[0] == "offline"
    path = W.import_file(tiny_d2s14["good"], "d2s14", cache)
    assert W.verify("d2s14", cache) == path and W.expected_digest(W.REGISTRY["d2s14"], path) == W.sha256_of(path)


def test_a_broken_download_is_deleted_not_pinned(tiny_d2s14, server, tmp_path):
    server.payload = tiny_d2s14["truncated"].read_bytes()  # complete transfer of a truncated file
    with pytest.raises(FMOneShotError, match="does not fit|not a checkpoint"):
        W.download("d2s14", tmp_path, url=server.url, progress=False)
    assert not (tmp_path / "d2s14").exists()  # nothing kept, not even the folder the download created


def test_a_bad_pin_is_reported_with_its_replacement_and_replaced_by_import(tiny_d2s14, tmp_path, capsys,
                                                                          monkeypatch):
    """A truncated file pinned by an older FMOneShot: verify and loading name the command that replaces it,
    and importing the good file over it works without --force, and leaves a working, pinned checkpoint."""
    from FMOneShotLib import models

    cache = tmp_path / "cache"
    path = W.local_path(W.REGISTRY["d2s14"], cache)
    path.parent.mkdir(parents=True)
    path.write_bytes(tiny_d2s14["truncated"].read_bytes())
    path.with_name(path.name + ".sha256").write_text(f"{W.sha256_of(path)}  model.safetensors\n", encoding="utf-8")
    assert main(["weights", "verify", "d2s14", "--cache", str(cache)]) == 1
    assert "weights import FILE --name d2s14" in capsys.readouterr().out
    monkeypatch.setenv("FMONESHOT_CACHE", str(cache))
    monkeypatch.setattr(models, "_MODELS", {})
    with pytest.raises(FMOneShotError, match="weights import FILE --name d2s14"):
        models.timm_vit("d2s14")  # what --backend auto / d2s14 would load
    assert main(["weights", "import", str(tiny_d2s14["good"]), "--name", "d2s14", "--cache", str(cache)]) == 0
    assert path.read_bytes() == tiny_d2s14["good"].read_bytes()
    assert main(["weights", "verify", "d2s14", "--cache", str(cache)]) == 0
    assert models.timm_vit("d2s14").patch_embed.proj.weight.shape[0] == 64  # it loads into the architecture
    # a working cached file is not replaced by another without --force
    assert main(["weights", "import", str(tiny_d2s14["other"]), "--name", "d2s14", "--cache", str(cache)]) == 2
    assert path.read_bytes() == tiny_d2s14["good"].read_bytes()


def test_a_checkpoint_with_its_classifier_head_is_imported_and_loads(tiny_d2s14, tmp_path, monkeypatch):
    """timm's files can carry the classifier head (CLIP's projection): the extractor has none, so the head is
    neither required nor refused, and the rest loads strictly."""
    from FMOneShotLib import models

    cache = tmp_path / "cache"
    W.import_file(tiny_d2s14["with_head"], "d2s14", cache)
    monkeypatch.setenv("FMONESHOT_CACHE", str(cache))
    monkeypatch.setattr(models, "_MODELS", {})
    model = models.timm_vit("d2s14")
    good = W.load_state_dict(tiny_d2s14["with_head"])
    assert torch.equal(model.patch_embed.proj.weight, good["patch_embed.proj.weight"])
