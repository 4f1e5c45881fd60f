"""The real huggingface_hub client (and transformers / peft on top of it) against LocalHub.

Other tests trust tests/hub_server.py to answer like the Hub does. These pin that down with the
very client the project ships with, so that a client upgrade that changes the protocol, or a
server change that drifts from it, fails here with a clear name rather than somewhere downstream.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    file_download,
    hf_api,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_server import LocalHub

ALICE = "hf_alice_write"
ALICE_READ = "hf_alice_read"
BOB = "hf_bob_write"
BIG = bytes(range(256)) * 800  # 200 KiB, LFS by size and by suffix
SMALL_JSON = b'{"hidden_size": 8}\n'

# huggingface_hub's LFS upload passes a file object as data=, which httpx2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """A LocalHub with users alice (write and read tokens) and bob, and a client set up to
    reach it: Xet off (else uploads go to /xet-write-token), offline mode off (CI exports
    HF_HUB_OFFLINE=1), and no stored token that could leak into anonymous calls."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # read at import
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # what is_offline_mode() returns
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    tokens = {ALICE: ("alice", "write"), ALICE_READ: ("alice", "read"), BOB: ("bob", "write")}
    with LocalHub(tmp_path / "hub", tokens=tokens) as server:
        yield server


@pytest.fixture
def hub_env(hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalHub:
    """Also point the client's import-time defaults at the hub, for code that takes no
    ``endpoint=`` (transformers, peft, ModelCard, and module-level helpers bound to the global
    HfApi), as HF_ENDPOINT would have done had it been set before the import."""
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    url_template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url_template)
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))
    return hub


def _api(hub: LocalHub, token: str | bool = ALICE) -> HfApi:
    return HfApi(endpoint=hub.url, token=token)


def _make_model_repo(hub: LocalHub, repo_id: str = "alice/model") -> str:
    """Create ``repo_id`` over HTTP and commit a regular file and an LFS file in one commit."""
    api = _api(hub)
    api.create_repo(repo_id)
    info = api.create_commit(
        repo_id,
        [
            CommitOperationAdd("config.json", SMALL_JSON),
            CommitOperationAdd("weights/model.safetensors", BIG),
        ],
        commit_message="add weights",
    )
    return info.oid


def _status(err: pytest.ExceptionInfo[HfHubHTTPError]) -> int:
    return err.value.response.status_code


def test_whoami_with_and_without_token(hub: LocalHub) -> None:
    me = _api(hub).whoami()
    assert me["name"] == "alice"
    assert me["auth"]["accessToken"]["role"] == "write"
    assert _api(hub, ALICE_READ).whoami()["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as bad:
        _api(hub, "hf_not_a_token").whoami()
    assert _status(bad) == 401
    anonymous = httpx2.get(f"{hub.url}/api/whoami-v2")
    assert anonymous.status_code == 401


def test_create_repo_and_exist_ok(hub: LocalHub) -> None:
    api = _api(hub)
    url = api.create_repo("alice/fresh")
    assert url == f"{hub.url}/alice/fresh"
    assert url.repo_id == "alice/fresh"
    with pytest.raises(HfHubHTTPError) as again:
        api.create_repo("alice/fresh")
    assert _status(again) == 409
    assert api.create_repo("alice/fresh", exist_ok=True).repo_id == "alice/fresh"
    # Like the Hub, a new repo has one commit holding .gitattributes.
    assert list(hub.files("alice/fresh")) == [".gitattributes"]
    assert [c["title"] for c in hub.commits("alice/fresh")] == ["initial commit"]
    with pytest.raises(HfHubHTTPError) as foreign:
        _api(hub, BOB).create_repo("alice/bobs")
    assert _status(foreign) == 403


def test_commit_regular_and_lfs_then_download(hub: LocalHub, tmp_path: Path) -> None:
    oid = _make_model_repo(hub)
    served = hub.requests
    assert ("POST", "/alice/model.git/info/lfs/objects/batch") in served
    assert any(m == "PUT" and p.startswith("/lfs-upload/") for m, p in served)
    assert hub.files("alice/model") == {
        ".gitattributes": hub.files("alice/model")[".gitattributes"],
        "config.json": SMALL_JSON,
        "weights/model.safetensors": BIG,
    }
    assert hub.commits("alice/model")[0]["oid"] == oid

    for name, content in (("config.json", SMALL_JSON), ("weights/model.safetensors", BIG)):
        path = hf_hub_download(
            "alice/model", name, endpoint=hub.url, cache_dir=tmp_path / "cache", token=False
        )
        assert Path(path).read_bytes() == content
        assert f"snapshots/{oid}/" in Path(path).as_posix()

    folder = snapshot_download(
        "alice/model",
        endpoint=hub.url,
        cache_dir=tmp_path / "snap",
        allow_patterns=["*.json"],
        token=False,
    )
    assert sorted(p.name for p in Path(folder).rglob("*") if p.is_file()) == ["config.json"]
    folder = snapshot_download("alice/model", endpoint=hub.url, cache_dir=tmp_path / "all")
    assert (Path(folder) / "weights/model.safetensors").read_bytes() == BIG


def test_model_info_and_listing(hub: LocalHub) -> None:
    oid = _make_model_repo(hub)
    api = _api(hub, False)
    info = api.model_info("alice/model")
    assert info.sha == oid
    assert info.private is False and info.gated is False
    assert {s.rfilename for s in info.siblings or []} == {
        ".gitattributes",
        "config.json",
        "weights/model.safetensors",
    }
    detailed = api.model_info("alice/model", files_metadata=True)
    sizes = {s.rfilename: (s.size, s.lfs) for s in detailed.siblings or []}
    size, lfs = sizes["weights/model.safetensors"]
    assert size == len(BIG) and lfs is not None
    assert lfs.sha256 == hashlib.sha256(BIG).hexdigest()
    assert sizes["config.json"] == (len(SMALL_JSON), None)
    assert sorted(api.list_repo_files("alice/model")) == [
        ".gitattributes",
        "config.json",
        "weights/model.safetensors",
    ]
    tree = list(api.list_repo_tree("alice/model", path_in_repo="weights"))
    assert [t.path for t in tree] == ["weights/model.safetensors"]
    assert api.model_info("alice/model", revision=oid).sha == oid
    commits = api.list_repo_commits("alice/model")
    assert [c.title for c in commits] == ["add weights", "initial commit"]
    assert commits[0].authors == ["alice"]


def test_pull_request_and_discussion_flow(hub: LocalHub, tmp_path: Path) -> None:
    main_oid = _make_model_repo(hub)
    bob = _api(hub, BOB)
    pr = bob.create_commit(
        "alice/model",
        [
            CommitOperationAdd("adapter_config.json", b'{"r": 4}'),
            CommitOperationDelete("config.json"),
        ],
        commit_message="Add adapter",
        commit_description="Please merge",
        create_pr=True,
    )
    assert pr.pr_num == 1 and pr.pr_revision == "refs/pr/1"
    assert pr.pr_url == f"{hub.url}/alice/model/discussions/1"
    assert hub.commits("alice/model")[0]["oid"] == main_oid  # main untouched
    assert hub.pull_requests("alice/model") == [
        {"num": 1, "title": "Add adapter", "status": "open", "ref": "refs/pr/1", "author": "bob"}
    ]
    path = hf_hub_download(
        "alice/model",
        "adapter_config.json",
        revision="refs/pr/1",
        endpoint=hub.url,
        cache_dir=tmp_path / "cache",
        token=False,
    )
    assert Path(path).read_bytes() == b'{"r": 4}'
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(
            "alice/model",
            "adapter_config.json",
            endpoint=hub.url,
            cache_dir=tmp_path / "cache",
            token=False,
        )

    alice = _api(hub)
    details = alice.get_discussion_details("alice/model", 1)
    assert details.is_pull_request and details.status == "open"
    assert details.target_branch == "refs/heads/main"
    assert details.git_reference == "refs/pr/1"
    assert details.conflicting_files == []
    assert "adapter_config.json" in (details.diff or "")
    assert [e.type for e in details.events] == ["comment", "commit"]

    comment = bob.comment_discussion("alice/model", 1, "ping")
    assert comment.content == "ping" and comment.author == "bob"
    question = bob.create_discussion("alice/model", "A question", description="why?")
    assert question.num == 2 and not question.is_pull_request
    with pytest.raises(HfHubHTTPError) as not_owner:
        bob.change_discussion_status("alice/model", 2, "closed")
    assert _status(not_owner) == 403
    closed = alice.change_discussion_status("alice/model", 2, "closed", comment="answered")
    assert closed.new_status == "closed"
    listed = list(alice.get_repo_discussions("alice/model"))
    assert [(d.num, d.status, d.is_pull_request) for d in listed] == [
        (2, "closed", False),
        (1, "open", True),
    ]
    assert [d.num for d in alice.get_repo_discussions("alice/model", discussion_status="open")] == [
        1
    ]

    refs = alice.list_repo_refs("alice/model", include_pull_requests=True)
    assert [b.name for b in refs.branches] == ["main"]
    assert [(r.ref, r.target_commit) for r in refs.pull_requests or []] == [("refs/pr/1", pr.oid)]

    with pytest.raises(HfHubHTTPError) as bob_merges:
        bob.merge_pull_request("alice/model", 1)
    assert _status(bob_merges) == 403
    alice.merge_pull_request("alice/model", 1)
    files = hub.files("alice/model")
    assert files["adapter_config.json"] == b'{"r": 4}' and "config.json" not in files
    assert hub.commits("alice/model")[0]["title"] == "Add adapter (#1)"
    merged = alice.get_discussion_details("alice/model", 1)
    assert (
        merged.status == "merged"
        and merged.merge_commit_oid == hub.commits("alice/model")[0]["oid"]
    )
    assert hub.discussions("alice/model") == [
        {
            "num": 1,
            "title": "Add adapter",
            "is_pr": True,
            "status": "merged",
            "author": "bob",
            "comments": ["Please merge", "ping"],
        },
        {
            "num": 2,
            "title": "A question",
            "is_pr": False,
            "status": "closed",
            "author": "bob",
            "comments": ["why?", "answered"],
        },
    ]


def test_commit_onto_pr_ref_and_parent_commit(hub: LocalHub) -> None:
    _make_model_repo(hub)
    api = _api(hub)
    opened = api.create_pull_request("alice/model", "Empty draft")
    assert opened.num == 1 and opened.status == "draft"
    api.create_commit(
        "alice/model",
        [CommitOperationAdd("notes.txt", b"pushed to the PR")],
        commit_message="onto the PR",
        revision="refs/pr/1",
    )
    assert hub.files("alice/model", "refs/pr/1")["notes.txt"] == b"pushed to the PR"
    assert "notes.txt" not in hub.files("alice/model")
    assert hub.pull_requests("alice/model")[0]["status"] == "open"

    stale = hub.commits("alice/model")[-1]["oid"]
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_commit(
            "alice/model",
            [CommitOperationAdd("late.txt", b"x")],
            commit_message="late",
            parent_commit=stale,
        )
    assert _status(conflict) == 412
    assert "late.txt" not in hub.files("alice/model")


def test_not_found_errors(hub: LocalHub, tmp_path: Path) -> None:
    _make_model_repo(hub)
    api = _api(hub, False)
    cache = tmp_path / "cache"
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/nope", "config.json", endpoint=hub.url, cache_dir=cache, token=False)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/model", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(
            "alice/model",
            "config.json",
            revision="no-such-branch",
            endpoint=hub.url,
            cache_dir=cache,
            token=False,
        )
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/model", "nope.json", endpoint=hub.url, cache_dir=cache, token=False)
    assert not api.file_exists("alice/model", "nope.json")
    assert api.file_exists("alice/model", "config.json")
    assert not api.repo_exists("alice/nope")


def test_private_repo_is_hidden(hub: LocalHub, tmp_path: Path) -> None:
    _api(hub).create_repo("alice/secret", private=True)
    _api(hub).upload_file(path_or_fileobj=b"s", path_in_repo="s.txt", repo_id="alice/secret")
    cache = tmp_path / "cache"
    for token in (False, BOB):
        with pytest.raises(RepositoryNotFoundError) as hidden:
            _api(hub, token).model_info("alice/secret")
        assert not isinstance(hidden.value, GatedRepoError)
        assert _status(hidden) == (401 if token is False else 404)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("alice/secret", "s.txt", endpoint=hub.url, cache_dir=cache, token=token)
    assert _api(hub, ALICE_READ).model_info("alice/secret").private is True
    path = hf_hub_download("alice/secret", "s.txt", endpoint=hub.url, cache_dir=cache, token=ALICE)
    assert Path(path).read_bytes() == b"s"


def test_gated_repo(hub: LocalHub, tmp_path: Path) -> None:
    hub.create_repo("alice/gated", gated=True)
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "config.json").write_bytes(SMALL_JSON)
    hub.upload_folder("alice/gated", tmp_path / "up")
    assert _api(hub, False).model_info("alice/gated").gated == "auto"
    cache = tmp_path / "cache"
    for token, status in ((False, 401), (BOB, 403)):
        with pytest.raises(GatedRepoError) as gated:
            hf_hub_download(
                "alice/gated", "config.json", endpoint=hub.url, cache_dir=cache, token=token
            )
        assert _status(gated) == status
    hub.grant_access("alice/gated", "bob")
    path = hf_hub_download(
        "alice/gated", "config.json", endpoint=hub.url, cache_dir=cache, token=BOB
    )
    assert Path(path).read_bytes() == SMALL_JSON


def test_writes_need_the_owners_write_token(hub: LocalHub) -> None:
    _make_model_repo(hub)
    before = hub.commits("alice/model")
    add = [CommitOperationAdd("x.txt", b"x")]
    for token in (ALICE_READ, BOB):
        with pytest.raises(HfHubHTTPError) as denied:
            _api(hub, token).create_commit("alice/model", add, commit_message="sneaky")
        assert _status(denied) == 403
        assert "error" in denied.value.response.json()
    with pytest.raises(HfHubHTTPError) as read_only_pr:
        _api(hub, ALICE_READ).create_commit("alice/model", add, commit_message="pr", create_pr=True)
    assert _status(read_only_pr) == 403
    assert hub.commits("alice/model") == before
    assert hub.pull_requests("alice/model") == []


def test_download_cut_off_midway_resumes(
    hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body cut short (FIN after 50 KB): http_get catches the RemoteProtocolError and resumes
    with a Range request, so the download succeeds with the right bytes."""
    monkeypatch.setattr(file_download, "time", SimpleNamespace(sleep=lambda _s: None))
    _make_model_repo(hub)
    hub.fail_next("GET", r"/resolve/main/weights/model\.safetensors$", after_bytes=50_000)
    cache = tmp_path / "cache"
    path = hf_hub_download(
        "alice/model",
        "weights/model.safetensors",
        endpoint=hub.url,
        cache_dir=cache,
        token=False,
    )
    assert Path(path).read_bytes() == BIG
    gets = [p for m, p in hub.requests if m == "GET" and p.endswith("model.safetensors")]
    assert len(gets) == 2  # the cut one, then the resumed one
    _assert_cache_clean(cache)


def test_download_reset_or_never_answered_raises_and_leaves_no_file(
    hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection reset (RST) is an httpx ReadError, which http_get does not retry: the
    download raises. A GET cut before any byte on every try exhausts http_get's 5 resumes and
    raises RemoteProtocolError. Cuts after some bytes are resumed again and again (each byte
    received resets the retry budget). In no case is a partial file left in the cache."""
    monkeypatch.setattr(file_download, "time", SimpleNamespace(sleep=lambda _s: None))
    _make_model_repo(hub)
    cache = tmp_path / "cache"
    target = r"/resolve/main/weights/model\.safetensors$"

    def download() -> str:
        return hf_hub_download(
            "alice/model", "weights/model.safetensors", endpoint=hub.url, cache_dir=cache
        )

    def gets() -> int:
        return sum(1 for m, p in hub.requests if m == "GET" and p.endswith("model.safetensors"))

    hub.fail_next("GET", target, mode="reset", after_bytes=50_000)
    with pytest.raises(httpx2.ReadError):
        download()
    assert gets() == 1
    _assert_cache_clean(cache, expect_blob=False)

    hub.fail_next("GET", target, after_bytes=0, times=100)
    with pytest.raises(httpx2.RemoteProtocolError):
        download()
    assert gets() == 1 + 6  # first try and 5 resumes
    _assert_cache_clean(cache, expect_blob=False)
    hub.clear_faults()

    hub.fail_next("GET", target, after_bytes=30_000, times=4)
    assert Path(download()).read_bytes() == BIG
    assert gets() == 7 + 5
    _assert_cache_clean(cache)


def _assert_cache_clean(cache: Path, *, expect_blob: bool = True) -> None:
    """No temporary file left, and every final blob holds whole, correct content."""
    leftovers = [p for p in cache.rglob("*") if p.name.endswith(".incomplete")]
    assert leftovers == []
    blobs = [p for p in cache.rglob("blobs/*") if p.is_file()]
    assert bool(blobs) == expect_blob
    for blob in blobs:
        content = blob.read_bytes()
        assert blob.name in (
            hashlib.sha256(content).hexdigest(),
            hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest(),
        )


def test_commit_dropped_without_answer_changes_nothing(hub: LocalHub) -> None:
    _make_model_repo(hub)
    before_files, before_commits = hub.files("alice/model"), hub.commits("alice/model")
    hub.fail_next("POST", r"/api/models/alice/model/commit/main$")
    api = _api(hub)
    add = [CommitOperationAdd("extra.safetensors", b"\0" * 20_000)]
    with pytest.raises(httpx2.RemoteProtocolError):
        api.create_commit("alice/model", add, commit_message="lost")
    assert hub.files("alice/model") == before_files
    assert hub.commits("alice/model") == before_commits
    # The blob reached the LFS store, so the retry skips the upload and commits.
    add = [CommitOperationAdd("extra.safetensors", b"\0" * 20_000)]
    api.create_commit("alice/model", add, commit_message="again")
    assert hub.files("alice/model")["extra.safetensors"] == b"\0" * 20_000
    puts = [p for m, p in hub.requests if m == "PUT"]
    assert len(puts) == 2  # BIG, then the extra file once


def test_injected_status(hub: LocalHub) -> None:
    _make_model_repo(hub)
    hub.fail_next("GET", r"^/api/models/alice/model$", mode="status", status=503)
    with pytest.raises(HfHubHTTPError) as down:
        _api(hub).model_info("alice/model")
    assert _status(down) == 503
    assert _api(hub).model_info("alice/model").id == "alice/model"


def test_keep_alive_head_then_get(hub: LocalHub) -> None:
    """A HEAD answer carries Content-Length but no body, so the next request on the same
    connection is read correctly (the client pools connections)."""
    _make_model_repo(hub)
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=5)
    try:
        path = "/alice/model/resolve/main/config.json"
        conn.request("HEAD", path)
        head = conn.getresponse()
        assert head.status == 200 and head.read() == b""
        assert head.getheader("Content-Length") == str(len(SMALL_JSON))
        assert head.getheader("X-Repo-Commit") == hub.commits("alice/model")[0]["oid"]
        conn.request("GET", path, headers={"Range": "bytes=2-"})
        part = conn.getresponse()
        assert part.status == 206 and part.read() == SMALL_JSON[2:]
        conn.request("HEAD", "/alice/model/resolve/main/missing.json")
        missing = conn.getresponse()
        assert missing.status == 404 and missing.read() == b""
        assert missing.getheader("X-Error-Code") == "EntryNotFound"
        conn.request("GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {ALICE}"})
        assert json.loads(conn.getresponse().read())["name"] == "alice"
    finally:
        conn.close()


def test_direct_api_and_reopen(hub: LocalHub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"a")
    (src / "sub" / "b.bin").write_bytes(b"b")
    oid = hub.upload_folder("alice/direct", src, message="direct upload")
    assert hub.commits("alice/direct")[0] == {
        **hub.commits("alice/direct")[0],
        "oid": oid,
        "title": "direct upload",
    }
    assert hub.files("alice/direct", oid)["sub/b.bin"] == b"b"
    with pytest.raises(FileExistsError):
        hub.create_repo("alice/direct")
    hub.stop()
    reopened = LocalHub(hub.root).start()
    try:
        assert reopened.files("alice/direct")["a.txt"] == b"a"
        assert reopened.commits("alice/direct")[0]["oid"] == oid
    finally:
        reopened.stop()


def test_model_card_push_and_load(hub_env: LocalHub) -> None:
    hub = hub_env
    _api(hub).create_repo("alice/carded")
    card = ModelCard.from_template(ModelCardData(license="mit", tags=["lora"]), model_id="x")
    info: Any = card.push_to_hub("alice/carded", token=ALICE, create_pr=True)
    assert info.pr_num == 1 and info.pr_revision == "refs/pr/1"
    assert ("POST", "/api/validate-yaml") in hub.requests
    with pytest.raises(EntryNotFoundError):  # main has no card yet; the PR has it
        ModelCard.load("alice/carded", token=ALICE)
    assert ModelCard(hub.files("alice/carded", "refs/pr/1")["README.md"].decode()).data.license == (
        "mit"
    )
    _api(hub).merge_pull_request("alice/carded", 1)
    assert ModelCard.load("alice/carded").data.tags == ["lora"]
    assert _api(hub).model_info("alice/carded").card_data["license"] == "mit"


def test_transformers_and_peft_from_pretrained(hub_env: LocalHub, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftConfig
    from transformers import AutoConfig, LlamaConfig

    hub = hub_env
    src = tmp_path / "src"
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(src)
    LoraConfig(
        r=4, target_modules=["q_proj"], base_model_name_or_path="alice/tiny"
    ).save_pretrained(str(src))
    first = hub.upload_folder("alice/tiny", src)
    (src / "config.json").write_text(
        json.dumps({**json.loads((src / "config.json").read_text()), "hidden_size": 32})
    )
    hub.upload_folder("alice/tiny", src, message="wider")
    cache = tmp_path / "tf-cache"
    assert AutoConfig.from_pretrained("alice/tiny", cache_dir=cache).hidden_size == 32
    old = AutoConfig.from_pretrained("alice/tiny", revision=first, cache_dir=cache)
    assert old.hidden_size == 16
    peft_config = PeftConfig.from_pretrained("alice/tiny", revision=first, cache_dir=cache)
    assert peft_config.r == 4
    assert os.listdir(cache)


def test_branches_settings_paths_info_rename_delete(hub: LocalHub, tmp_path: Path) -> None:
    _make_model_repo(hub)
    api = _api(hub)
    api.create_branch("alice/model", branch="dev")
    api.create_branch("alice/model", branch="dev", exist_ok=True)
    api.upload_file(
        path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id="alice/model", revision="dev"
    )
    assert "dev.txt" in hub.files("alice/model", "dev") and "dev.txt" not in hub.files(
        "alice/model"
    )
    assert {b.name for b in api.list_repo_refs("alice/model").branches} == {"main", "dev"}
    api.delete_branch("alice/model", branch="dev")
    assert [b.name for b in api.list_repo_refs("alice/model").branches] == ["main"]

    infos = api.get_paths_info("alice/model", ["config.json", "weights", "absent"])
    assert [(type(i).__name__, i.path) for i in infos] == [
        ("RepoFile", "config.json"),
        ("RepoFolder", "weights"),
    ]

    src = tmp_path / "src"
    src.mkdir()
    (src / "new.json").write_text("{}")
    api.upload_folder(
        repo_id="alice/model", folder_path=src, delete_patterns=["weights/*"], commit_message="swap"
    )
    assert sorted(hub.files("alice/model")) == [".gitattributes", "config.json", "new.json"]

    api.create_discussion("alice/model", "Typo in title")
    assert api.rename_discussion("alice/model", 1, "Fixed title").new_title == "Fixed title"
    assert hub.discussions("alice/model")[0]["title"] == "Fixed title"

    api.update_repo_settings("alice/model", private=True)
    with pytest.raises(RepositoryNotFoundError):
        _api(hub, False).model_info("alice/model")
    api.delete_repo("alice/model")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/model")
