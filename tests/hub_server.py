"""A local, in-process stand-in for the Hugging Face Hub's HTTP API, for tests.

The project's code talks to the Hub through the real ``huggingface_hub`` client (and through
transformers / peft, which use it). Mocking that client would test our idea of its behaviour
rather than its behaviour, and there is no Hub on the test machines. So this module speaks enough
of the Hub's HTTP protocol for the real client to run against it via ``HF_ENDPOINT`` (or
``endpoint=``): repos with a commit history per ref, regular and LFS files, ``refs/pr/N`` pull
requests and discussions, tokens with read/write roles, private and gated repos, and the error
headers (``X-Error-Code``) from which the client builds its exception types.

It also injects faults (:meth:`LocalHub.fail_next`) so that tests can see what the client does
when a download is cut off or a commit gets no answer.

Only the standard library is used, so the server runs wherever the tests run. The protocol was
read off huggingface_hub 2.4 (``utils/_http.py``, ``file_download.py``, ``hf_api.py``,
``_commit_api.py``, ``lfs.py``, ``community.py``). Model repos only.
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import hashlib
import http.server
import json
import os
import re
import secrets
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

#: Files larger than this (bytes), or with one of LFS_SUFFIXES, go through LFS on preupload.
LFS_THRESHOLD = 10 * 1024
LFS_SUFFIXES = (".safetensors", ".bin")
#: Page size of the discussions listing, as on the Hub.
DISCUSSIONS_PAGE = 50

_GITATTRIBUTES = b"""*.7z filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""

_PR_REF = re.compile(r"^refs/pr/(\d+)$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _key(repo_id: str, repo_type: str = "model") -> str:
    """Where a repo is kept: its id for a model repo, ``datasets/ID`` for a dataset repo."""
    if repo_type not in ("model", "dataset"):
        raise ValueError(f"LocalHub hosts model and dataset repos, not {repo_type!r}")
    return repo_id if repo_type == "model" else f"datasets/{repo_id}"


def _name(key: str) -> str:
    """A repo's id (owner/name) from where it is kept."""
    return key.removeprefix("datasets/")


def _owner(key: str) -> str:
    return _name(key).split("/")[0]


def _now() -> str:
    """The Hub's timestamp format, which huggingface_hub's parse_datetime expects."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_id(data: bytes) -> str:
    """The git object id of a blob (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def _is_lfs_path(path: str, size: int) -> bool:
    return size > LFS_THRESHOLD or path.endswith(LFS_SUFFIXES)


def _flag(query: dict[str, list[str]], name: str) -> bool:
    values = query.get(name)
    return bool(values) and values[-1].lower() in ("1", "true", "yes", "on")


def _check_path(path: Any) -> str:
    """Reject paths the Hub would reject (absolute, empty parts, '..')."""
    if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _front_matter(text: str) -> dict[str, Any] | None:
    """Parse the YAML front matter of a README when it is trivial (``key: scalar`` lines and
    ``key:`` followed by ``- item`` lines); None otherwise. Stdlib only, so no real YAML."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    try:
        end = next(i for i, line in enumerate(lines[1:], 1) if line.strip() == "---")
    except StopIteration:
        return None

    def scalar(raw: str) -> Any:
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            return raw[1:-1]
        if raw in ("true", "True"):
            return True
        if raw in ("false", "False"):
            return False
        if re.fullmatch(r"-?\d+", raw):
            return int(raw)
        if raw.startswith(("[", "{", "|", ">", "&", "*", "!")):
            raise ValueError(raw)
        return raw

    data: dict[str, Any] = {}
    key: str | None = None
    try:
        for line in lines[1:end]:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            item = re.fullmatch(r"\s*- (.*)", line)
            if item is not None:
                if key is None or not isinstance(data[key], list):
                    return None
                data[key].append(scalar(item.group(1)))
                continue
            pair = re.fullmatch(r"([A-Za-z0-9_.-]+):(.*)", line)
            if pair is None:
                return None
            key, value = pair.group(1), pair.group(2)
            data[key] = scalar(value) if value.strip() else []
    except ValueError:
        return None
    return data


class HubError(Exception):
    """An HTTP error answer: status, message, and the X-Error-Code the client maps to a type."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


@dataclass
class _Request:
    method: str
    path: str  # raw (still quoted) URL path, no query
    query: dict[str, list[str]]
    headers: Message
    body: bytes


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    #: Content-Length to announce instead of len(body): a HEAD answer, whose body is not sent
    length: int | None = None

    @classmethod
    def json(
        cls, data: Any, status: int = 200, content_type: str = "application/json"
    ) -> _Response:
        return cls(status, json.dumps(data).encode(), {"Content-Type": content_type})

    @classmethod
    def error(cls, err: HubError) -> _Response:
        # Header values must be latin-1 and one line.
        safe = err.message.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")
        headers = {"Content-Type": "application/json", "X-Error-Message": safe, **err.headers}
        if err.code is not None:
            headers["X-Error-Code"] = err.code
        body = json.dumps({"error": err.message, **err.extra}).encode()
        return cls(err.status, body, headers)


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    mode: str
    status: int
    after_bytes: int
    remaining: int
    seconds: float = 0.0


@dataclass(frozen=True)
class _Who:
    user: str
    role: str


class LocalHub:
    """An in-process Hub server over a folder.

    Repo state (commits with full file trees, refs, discussions) is kept in memory and mirrored
    to ``root/repos/NS/NAME/repo.json``; file contents are content-addressed by sha256 under
    ``root/blobs``. A LocalHub opened on an existing root picks its repos up again. One lock
    guards all state, so concurrent client threads (LFS uploads run in parallel) are safe.
    """

    def __init__(
        self,
        root: Path,
        port: int = 0,
        tokens: dict[str, tuple[str, str]] | None = None,
    ) -> None:
        self.root = Path(root)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.requests: list[tuple[str, str]] = []
        self._tokens: dict[str, tuple[str, str]] = {}
        for token, (user, role) in (tokens or {}).items():
            self.add_token(token, user, role)
        self._lock = threading.RLock()
        self._repos: dict[str, dict[str, Any]] = {}
        self._faults: list[_Fault] = []
        self.stalled = threading.Event()  #: set when a "stall" fault begins
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        states = [
            *self.root.glob("repos/*/*/repo.json"),
            *self.root.glob("repos/datasets/*/*/repo.json"),
        ]
        for state in sorted(states):
            repo = json.loads(state.read_text())
            self._repos[repo["id"]] = repo

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> LocalHub:
        """Bind 127.0.0.1 and serve from a daemon thread; ``url`` then holds the real port."""
        if self._server is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut the kept-alive connections, so no handler thread lingers."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------ direct access

    def add_token(self, token: str, user: str, role: str = "write") -> None:
        """Accept ``Authorization: Bearer TOKEN`` as ``user`` with role "read" or "write"."""
        if role not in ("read", "write"):
            raise ValueError(f"role must be 'read' or 'write', not {role!r}")
        self._tokens[token] = (user, role)

    def create_repo(
        self,
        repo_id: str,
        *,
        private: bool = False,
        gated: bool = False,
        repo_type: str = "model",
    ) -> None:
        """Create a repo directly (no HTTP), with the Hub's initial .gitattributes commit.
        ``repo_type`` "dataset" makes a dataset repo (read-only over HTTP: info, tree, files)."""
        key = _key(repo_id, repo_type)
        with self._lock:
            if key in self._repos:
                raise FileExistsError(f"repo {key} already exists")
            self._new_repo(key, private=private, gated=gated, author=_owner(key))

    def grant_access(self, repo_id: str, user: str) -> None:
        """Let ``user`` download files from gated repo ``repo_id`` (its owner always can)."""
        with self._lock:
            repo = self._get_repo(repo_id)
            if user not in repo["granted"]:
                repo["granted"].append(user)
            self._save(repo)

    def set_visibility(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        gated: bool | None = None,
        repo_type: str = "model",
    ) -> None:
        """Change a repo's private / gated flags directly."""
        with self._lock:
            repo = self._get_repo(_key(repo_id, repo_type))
            if private is not None:
                repo["private"] = private
            if gated is not None:
                repo["gated"] = gated
            self._save(repo)

    def upload_folder(
        self,
        repo_id: str,
        folder: Path,
        message: str = "upload",
        revision: str = "main",
        repo_type: str = "model",
    ) -> str:
        """Commit every file under ``folder`` (added or overwritten; others kept) directly,
        creating a public repo if missing. Skips ``.git`` and ``.cache`` folders. Returns the
        commit sha."""
        repo_id = _key(repo_id, repo_type)
        folder = Path(folder)
        files: dict[str, bytes] = {}
        for file in sorted(folder.rglob("*")):
            rel = file.relative_to(folder)
            if file.is_file() and rel.parts[0] not in (".git", ".cache"):
                files[rel.as_posix()] = file.read_bytes()
        with self._lock:
            if repo_id not in self._repos:
                self._new_repo(repo_id, private=False, gated=False, author=_owner(repo_id))
            repo = self._repos[repo_id]
            head, ref = self._resolve(repo, revision)
            if ref is None:
                raise ValueError(f"cannot commit onto a commit sha ({revision})")
            tree = dict(self._tree(repo, head))
            for path, data in files.items():
                tree[path] = self._entry(data, lfs=_is_lfs_path(path, len(data)))
            oid = self._commit(repo, [head], tree, message, "", _owner(repo_id))
            repo["refs"][ref] = oid
            self._on_pr_commit(repo, ref, oid, message, _owner(repo_id))
            self._save(repo)
            return oid

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """path -> content at ``revision`` (a branch, "refs/pr/N" or a commit sha)."""
        with self._lock:
            repo = self._get_repo(repo_id)
            head, _ = self._resolve(repo, revision)
            tree = dict(self._tree(repo, head))
        return {path: self._read_blob(entry["sha256"]) for path, entry in sorted(tree.items())}

    def commits(self, repo_id: str, revision: str = "main") -> list[dict[str, Any]]:
        """Commits reachable from ``revision``, newest first:
        {"oid", "title", "message", "author", "date", "parents"}."""
        with self._lock:
            repo = self._get_repo(repo_id)
            head, _ = self._resolve(repo, revision)
            return [
                {key: c[key] for key in ("oid", "title", "message", "author", "date", "parents")}
                for c in self._history(repo, head)
            ]

    def pull_requests(self, repo_id: str) -> list[dict[str, Any]]:
        """{"num", "title", "status", "ref", "author"} for each PR, oldest first."""
        with self._lock:
            repo = self._get_repo(repo_id)
            return [
                {
                    "num": d["num"],
                    "title": d["title"],
                    "status": d["status"],
                    "ref": f"refs/pr/{d['num']}",
                    "author": d["author"],
                }
                for d in repo["discussions"]
                if d["is_pr"]
            ]

    def discussions(self, repo_id: str) -> list[dict[str, Any]]:
        """All discussions incl. PRs, oldest first:
        {"num", "title", "is_pr", "status", "author", "comments": [raw text, ...]}."""
        with self._lock:
            repo = self._get_repo(repo_id)
            return [
                {
                    "num": d["num"],
                    "title": d["title"],
                    "is_pr": d["is_pr"],
                    "status": d["status"],
                    "author": d["author"],
                    "comments": [
                        e["data"]["latest"]["raw"] for e in d["events"] if e["type"] == "comment"
                    ],
                }
                for d in repo["discussions"]
            ]

    def fail_next(
        self,
        method: str,
        path_regex: str,
        *,
        mode: str = "drop",
        status: int = 500,
        after_bytes: int = 0,
        times: int = 1,
        seconds: float = 0.0,
    ) -> None:
        """Fault injection for the next ``times`` requests whose method is ``method`` ("*" for
        any) and whose URL path (raw or unquoted, no query) matches ``path_regex`` (re.search).

        mode "drop": a GET gets its real status and headers and ``after_bytes`` bytes of the
        body, then the connection is closed (FIN); any other method is read and then closed
        without an answer. mode "reset": the same but the socket is reset (RST). mode "status":
        the answer is ``status`` with a JSON error body. mode "stall": the request is carried
        out, then the answer waits ``seconds`` (a client killed meanwhile never learns that its
        commit landed); :attr:`stalled` is set when a stall begins. mode "lost": the request is
        carried out and the connection closed without an answer (a commit that landed, its
        answer dropped).
        """
        if mode not in ("drop", "reset", "status", "stall", "lost"):
            raise ValueError(f"unknown fault mode {mode!r}")
        with self._lock:
            self._faults.append(
                _Fault(
                    method.upper(),
                    re.compile(path_regex),
                    mode,
                    status,
                    after_bytes,
                    times,
                    seconds,
                )
            )

    def clear_faults(self) -> None:
        """Forget the faults not yet triggered."""
        with self._lock:
            self._faults.clear()

    # -------------------------------------------------------------- storage

    def _repo_dir(self, repo_id: str) -> Path:
        return self.root / "repos" / repo_id

    def _save(self, repo: dict[str, Any]) -> None:
        target = self._repo_dir(repo["id"]) / "repo.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{secrets.token_hex(4)}.tmp")
        tmp.write_text(json.dumps(repo))
        os.replace(tmp, target)

    def _store_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        target = self.root / "blobs" / sha
        if not target.exists():
            tmp = target.with_name(f"{sha}.{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return sha

    def _has_blob(self, sha: str) -> bool:
        return bool(_SHA256.match(sha)) and (self.root / "blobs" / sha).is_file()

    def _read_blob(self, sha: str) -> bytes:
        return (self.root / "blobs" / sha).read_bytes()

    def _entry(self, data: bytes, *, lfs: bool) -> dict[str, Any]:
        sha = self._store_blob(data)
        oid = _git_blob_id(_lfs_pointer(sha, len(data)) if lfs else data)
        return {"sha256": sha, "size": len(data), "lfs": lfs, "oid": oid}

    def _lfs_entry(self, sha: str, size: int) -> dict[str, Any]:
        return {
            "sha256": sha,
            "size": size,
            "lfs": True,
            "oid": _git_blob_id(_lfs_pointer(sha, size)),
        }

    def _new_repo(self, repo_id: str, *, private: bool, gated: bool, author: str) -> dict[str, Any]:
        name = repo_id.removeprefix("datasets/")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise HubError(400, f"Invalid repo id {repo_id!r}")
        now = _now()
        repo: dict[str, Any] = {
            "id": repo_id,
            "private": private,
            "gated": gated,
            "granted": [],
            "created_at": now,
            "seq": 0,
            "refs": {},
            "commits": {},
            "discussions": [],
        }
        tree = {".gitattributes": self._entry(_GITATTRIBUTES, lfs=False)}
        repo["refs"]["refs/heads/main"] = self._commit(repo, [], tree, "initial commit", "", author)
        self._repos[repo_id] = repo
        self._save(repo)
        return repo

    def _commit(
        self,
        repo: dict[str, Any],
        parents: list[str],
        tree: dict[str, dict[str, Any]],
        title: str,
        message: str,
        author: str,
    ) -> str:
        repo["seq"] += 1
        date = _now()
        files = sorted((p, e["oid"]) for p, e in tree.items())
        material = json.dumps(
            [repo["id"], repo["seq"], parents, files, title, message, author, date]
        )
        oid = hashlib.sha1(material.encode()).hexdigest()
        repo["commits"][oid] = {
            "oid": oid,
            "seq": repo["seq"],
            "parents": parents,
            "tree": tree,
            "title": title,
            "message": message,
            "author": author,
            "date": date,
        }
        return oid

    def _get_repo(self, repo_id: str) -> dict[str, Any]:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: dict[str, Any], revision: str) -> tuple[str, str | None]:
        """(commit oid, full ref name or None when ``revision`` is a commit sha)."""
        refs = repo["refs"]
        for ref in (revision, f"refs/heads/{revision}"):
            if ref.startswith("refs/") and ref in refs:
                return refs[ref], ref
        if _SHA1.match(revision) and revision in repo["commits"]:
            return revision, None
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _tree(self, repo: dict[str, Any], oid: str) -> dict[str, dict[str, Any]]:
        tree: dict[str, dict[str, Any]] = repo["commits"][oid]["tree"]
        return tree

    def _history(self, repo: dict[str, Any], head: str) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        pending = [head]
        while pending:
            oid = pending.pop()
            if oid in seen:
                continue
            seen[oid] = repo["commits"][oid]
            pending.extend(seen[oid]["parents"])
        return sorted(seen.values(), key=lambda c: c["seq"], reverse=True)

    def _discussion(self, repo: dict[str, Any], num: str | int) -> dict[str, Any]:
        for d in repo["discussions"]:
            if str(d["num"]) == str(num):
                return d
        raise HubError(404, f"Discussion {num} not found")

    def _event(self, kind: str, author: str, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": secrets.token_hex(12),
            "type": kind,
            "createdAt": _now(),
            "author": {"name": author, "type": "user", "fullname": author},
            "data": data,
        }

    def _comment_event(self, author: str, text: str) -> dict[str, Any]:
        data = {
            "edited": False,
            "hidden": False,
            "latest": {"raw": text, "html": text, "updatedAt": _now(), "author": {"name": author}},
            "numEdits": 0,
            "editors": [author],
            "reactions": [],
            "identifiedLanguage": {"language": "en", "probability": 1.0},
            "isReport": False,
        }
        return self._event("comment", author, data)

    def _open_discussion(
        self,
        repo: dict[str, Any],
        title: str,
        description: str,
        author: str,
        *,
        is_pr: bool,
        status: str,
        target: str = "refs/heads/main",
    ) -> dict[str, Any]:
        num = len(repo["discussions"]) + 1
        d: dict[str, Any] = {
            "num": num,
            "title": title,
            "is_pr": is_pr,
            "status": status,
            "author": author,
            "created_at": _now(),
            "events": [],
            "target": target,
            "base": None,
            "merge_commit": None,
        }
        if description:
            d["events"].append(self._comment_event(author, description))
        if is_pr:
            base = repo["refs"][target]
            d["base"] = base
            repo["refs"][f"refs/pr/{num}"] = base
        repo["discussions"].append(d)
        return d

    def _on_pr_commit(
        self, repo: dict[str, Any], ref: str, oid: str, title: str, author: str
    ) -> None:
        match = _PR_REF.match(ref)
        if match is None:
            return
        d = self._discussion(repo, match.group(1))
        d["events"].append(self._event("commit", author, {"subject": title, "oid": oid}))
        if d["status"] == "draft":
            d["status"] = "open"

    # ------------------------------------------------------------------ auth

    def _who(self, req: _Request) -> _Who | None:
        header = req.headers.get("Authorization")
        if not header:
            return None
        token = header[7:].strip() if header.lower().startswith("bearer ") else header.strip()
        found = self._tokens.get(token)
        if found is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return _Who(*found)

    def _readable(self, repo_id: str, who: _Who | None) -> dict[str, Any]:
        """The repo, or the error the Hub gives for a missing or hidden (private) repo."""
        repo = self._get_repo(repo_id)
        if repo["private"] and (who is None or who.user != _owner(repo_id)):
            status = 401 if who is None else 404
            raise HubError(status, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _require_write(self, who: _Who | None) -> _Who:
        if who is None:
            raise HubError(401, "You must be authenticated (a write token is needed)")
        if who.role != "write":
            raise HubError(403, f"The token of {who.user} has a read-only role")
        return who

    def _require_owner(self, repo_id: str, who: _Who | None) -> _Who:
        who = self._require_write(who)
        if who.user != _owner(repo_id):
            raise HubError(403, f"You don't have the rights to write to {repo_id} (as {who.user})")
        return who

    def _require_contributor(self, repo: dict[str, Any], who: _Who | None) -> _Who:
        """Owner, or any write token on a public repo (opening PRs/discussions, commenting)."""
        if repo["private"]:
            return self._require_owner(repo["id"], who)
        return self._require_write(who)

    def _check_gated(self, repo: dict[str, Any], who: _Who | None) -> None:
        if not repo["gated"]:
            return
        if who is not None and (who.user == _owner(repo["id"]) or who.user in repo["granted"]):
            return
        kind = "dataset" if repo["id"].startswith("datasets/") else "model"
        message = (
            f"Access to {kind} {_name(repo['id'])} is restricted. You must have access to it and be"
            " authenticated to access it. Please log in."
        )
        raise HubError(401 if who is None else 403, message, "GatedRepo")

    # --------------------------------------------------------------- routing

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method not in ("*", method):
                    continue
                if fault.pattern.search(path) or fault.pattern.search(unquote(path)):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _handle(self, req: _Request) -> _Response:
        try:
            return self._route(req)
        except HubError as err:
            return _Response.error(err)
        except Exception as err:  # a bug here should show, not hang the client
            import traceback

            traceback.print_exc(file=sys.stderr)
            return _Response.error(HubError(500, f"LocalHub internal error: {err!r}"))

    def _route(self, req: _Request) -> _Response:
        raw = req.path.strip("/").split("/") if req.path.strip("/") else []
        segs = [unquote(s) for s in raw]
        m = req.method
        if segs == ["api", "whoami-v2"] and m == "GET":
            return self._whoami(req)
        if segs == ["api", "repos", "create"] and m == "POST":
            return self._api_create_repo(req)
        if segs == ["api", "repos", "delete"] and m == "DELETE":
            return self._api_delete_repo(req)
        if segs == ["api", "validate-yaml"] and m == "POST":
            return _Response.json({})
        if len(segs) >= 4 and segs[0] == "api" and segs[1] == "models":
            return self._route_repo_api(req, f"{segs[2]}/{segs[3]}", segs[4:])
        if len(segs) >= 4 and segs[0] == "api" and segs[1] == "datasets" and m in ("GET", "POST"):
            rest = segs[4:]  # dataset repos are read-only here: info, tree, paths-info
            if not rest or rest[0] in ("revision", "tree", "paths-info"):
                return self._route_repo_api(req, f"datasets/{segs[2]}/{segs[3]}", rest)
        if (
            len(segs) >= 6
            and segs[0] == "datasets"
            and segs[3] == "resolve"
            and m in ("GET", "HEAD")
        ):
            path = "/".join(segs[5:])
            return self._resolve_file(req, f"datasets/{segs[1]}/{segs[2]}", segs[4], path)
        if len(segs) == 2 and segs[0] == "lfs-upload" and m == "PUT":
            return self._lfs_put(req, segs[1])
        if (
            len(segs) == 6
            and segs[1].endswith(".git")
            and segs[2:] == ["info", "lfs", "objects", "batch"]
            and m == "POST"
        ):
            return self._lfs_batch(req, f"{segs[0]}/{segs[1][: -len('.git')]}")
        if len(segs) >= 5 and segs[2] == "resolve" and m in ("GET", "HEAD"):
            path = "/".join(segs[4:])
            return self._resolve_file(req, f"{segs[0]}/{segs[1]}", segs[3], path)
        print(f"LocalHub: no endpoint for {m} {req.path}", file=sys.stderr)
        return _Response.error(HubError(404, f"LocalHub has no endpoint for {m} {req.path}"))

    def _route_repo_api(self, req: _Request, repo_id: str, rest: list[str]) -> _Response:
        m = req.method
        if not rest and m == "GET":
            return self._model_info(req, repo_id, None)
        head = rest[0] if rest else ""
        if head == "revision" and len(rest) == 2 and m == "GET":
            return self._model_info(req, repo_id, rest[1])
        if head == "tree" and len(rest) >= 2 and m == "GET":
            return self._list_tree(req, repo_id, rest[1], "/".join(rest[2:]))
        if head == "paths-info" and len(rest) == 2 and m == "POST":
            return self._paths_info(req, repo_id, rest[1])
        if head == "preupload" and len(rest) == 2 and m == "POST":
            return self._preupload(req, repo_id, rest[1])
        if head == "commit" and len(rest) == 2 and m == "POST":
            return self._api_commit(req, repo_id, rest[1])
        if head == "commits" and len(rest) == 2 and m == "GET":
            return self._list_commits(req, repo_id, rest[1])
        if head == "refs" and len(rest) == 1 and m == "GET":
            return self._list_refs(req, repo_id)
        if head == "branch" and len(rest) == 2 and m in ("POST", "DELETE"):
            return self._branch(req, repo_id, rest[1])
        if head == "settings" and len(rest) == 1 and m == "PUT":
            return self._settings(req, repo_id)
        if head == "discussions":
            if len(rest) == 1 and m == "GET":
                return self._list_discussions(req, repo_id)
            if len(rest) == 1 and m == "POST":
                return self._create_discussion(req, repo_id)
            if len(rest) == 2 and m == "GET":
                return self._discussion_details(req, repo_id, rest[1])
            if len(rest) == 3 and m == "POST":
                return self._discussion_action(req, repo_id, rest[1], rest[2])
        print(f"LocalHub: no endpoint for {m} {req.path}", file=sys.stderr)
        return _Response.error(HubError(404, f"LocalHub has no endpoint for {m} {req.path}"))

    @staticmethod
    def _body_json(req: _Request) -> dict[str, Any]:
        if not req.body:
            return {}
        try:
            data = json.loads(req.body)
        except ValueError as err:
            raise HubError(400, f"Body is not JSON: {err}") from err
        if not isinstance(data, dict):
            raise HubError(400, "Body must be a JSON object")
        return data

    # ------------------------------------------------------------- endpoints

    def _whoami(self, req: _Request) -> _Response:
        who = self._who(req)
        if who is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return _Response.json(
            {
                "type": "user",
                "id": hashlib.sha1(who.user.encode()).hexdigest()[:24],
                "name": who.user,
                "fullname": who.user,
                "email": None,
                "emailVerified": False,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "t", "role": who.role, "createdAt": _now()},
                },
            }
        )

    def _api_create_repo(self, req: _Request) -> _Response:
        who = self._require_write(self._who(req))
        body = self._body_json(req)
        if body.get("type", "model") != "model":
            raise HubError(400, "LocalHub only hosts model repos")
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise HubError(400, "Missing repo name")
        namespace = body.get("organization") or who.user
        repo_id = f"{namespace}/{name}"
        if namespace != who.user:
            raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
        private = bool(body.get("private")) or body.get("visibility") in ("private", "protected")
        with self._lock:
            if repo_id in self._repos:
                # The client's exist_ok reads "url" from the 409 body, as the Hub sends it.
                url = f"{self.url}/{repo_id}"
                raise HubError(409, "You already created this model repo", extra={"url": url})
            self._new_repo(repo_id, private=private, gated=False, author=who.user)
        return _Response.json({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _api_delete_repo(self, req: _Request) -> _Response:
        who = self._who(req)
        body = self._body_json(req)
        repo_id = f"{body.get('organization') or (who.user if who else '')}/{body.get('name')}"
        with self._lock:
            self._readable(repo_id, who)
            self._require_owner(repo_id, who)
            del self._repos[repo_id]
            (self._repo_dir(repo_id) / "repo.json").unlink(missing_ok=True)
        return _Response.json({})

    def _settings(self, req: _Request, repo_id: str) -> _Response:
        who = self._who(req)
        body = self._body_json(req)
        with self._lock:
            repo = self._readable(repo_id, who)
            self._require_owner(repo_id, who)
            if "private" in body:
                repo["private"] = bool(body["private"])
            if "visibility" in body:
                repo["private"] = body["visibility"] in ("private", "protected")
            if "gated" in body:
                repo["gated"] = body["gated"] not in (False, None, "false")
            self._save(repo)
        return _Response.json({})

    def _file_json(self, path: str, entry: dict[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"]}
        if entry["lfs"]:
            pointer = _lfs_pointer(entry["sha256"], entry["size"])
            data["lfs"] = {
                "oid": entry["sha256"],
                "size": entry["size"],
                "pointerSize": len(pointer),
            }
        data["path"] = path
        return data

    @staticmethod
    def _dir_json(path: str, tree: dict[str, dict[str, Any]]) -> dict[str, Any]:
        below = sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(path + "/"))
        oid = hashlib.sha1(json.dumps(below).encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": path}

    def _model_info(self, req: _Request, repo_id: str, revision: str | None) -> _Response:
        who = self._who(req)
        with self._lock:
            repo = self._readable(repo_id, who)
            oid, _ = self._resolve(repo, revision or "main")
            commit = repo["commits"][oid]
            tree = dict(commit["tree"])
        blobs = _flag(req.query, "blobs")
        siblings = []
        for path in sorted(tree):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry = tree[path]
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    pointer = _lfs_pointer(entry["sha256"], entry["size"])
                    sibling["lfs"] = {
                        "sha256": entry["sha256"],
                        "size": entry["size"],
                        "pointerSize": len(pointer),
                    }
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": _name(repo_id),
            "modelId": _name(repo_id),
            "author": _owner(repo_id),
            "sha": oid,
            "lastModified": commit["date"],
            "createdAt": repo["created_at"],
            "private": repo["private"],
            "gated": "auto" if repo["gated"] else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
        }
        if "README.md" in tree:
            card = _front_matter(
                self._read_blob(tree["README.md"]["sha256"]).decode("utf-8", "replace")
            )
            if card is not None:
                info["cardData"] = card
                tags = card.get("tags")
                info["tags"] = (
                    [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []
                )
                for key in ("library_name", "pipeline_tag"):
                    if isinstance(card.get(key), str):
                        info[key] = card[key]
        return _Response.json(info)

    def _list_tree(self, req: _Request, repo_id: str, revision: str, path: str) -> _Response:
        who = self._who(req)
        with self._lock:
            repo = self._readable(repo_id, who)
            oid, _ = self._resolve(repo, revision)
            tree = dict(self._tree(repo, oid))
        recursive = _flag(req.query, "recursive")
        prefix = path.strip("/")
        if prefix in tree:
            return _Response.json([self._file_json(prefix, tree[prefix])])
        if prefix and not any(p.startswith(prefix + "/") for p in tree):
            raise HubError(
                404,
                f"{prefix} does not exist on {revision}",
                "EntryNotFound",
                {"X-Repo-Commit": oid},
            )
        start = prefix + "/" if prefix else ""
        files: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for p in sorted(tree):
            if not p.startswith(start):
                continue
            parts = p[len(start) :].split("/")
            if recursive:
                for i in range(1, len(parts)):
                    dirs.add(start + "/".join(parts[:i]))
                files.append(self._file_json(p, tree[p]))
            elif len(parts) == 1:
                files.append(self._file_json(p, tree[p]))
            else:
                dirs.add(start + parts[0])
        entries = [self._dir_json(d, tree) for d in sorted(dirs)] + files
        return _Response.json(entries)

    def _paths_info(self, req: _Request, repo_id: str, revision: str) -> _Response:
        who = self._who(req)
        ctype = req.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = self._body_json(req).get("paths", [])
        else:
            paths = parse_qs(req.body.decode(), keep_blank_values=True).get("paths", [])
        with self._lock:
            repo = self._readable(repo_id, who)
            oid, _ = self._resolve(repo, revision)
            tree = dict(self._tree(repo, oid))
        out = []
        for p in paths if isinstance(paths, list) else [paths]:
            p = str(p).strip("/")
            if p in tree:
                out.append(self._file_json(p, tree[p]))
            elif any(q.startswith(p + "/") for q in tree):
                out.append(self._dir_json(p, tree))
        return _Response.json(out)

    def _write_access(
        self, repo: dict[str, Any], who: _Who | None, ref: str | None, create_pr: bool
    ) -> _Who:
        """Who may write: the owner; with create_pr any write token on a public repo; on a PR
        ref also the PR's author."""
        if create_pr:
            return self._require_contributor(repo, who)
        match = _PR_REF.match(ref or "")
        if (
            match is not None
            and who is not None
            and who.role == "write"
            and self._discussion(repo, match.group(1))["author"] == who.user
        ):
            return who
        return self._require_owner(repo["id"], who)

    def _preupload(self, req: _Request, repo_id: str, revision: str) -> _Response:
        who = self._who(req)
        body = self._body_json(req)
        with self._lock:
            repo = self._readable(repo_id, who)
            oid, ref = self._resolve(repo, revision)
            self._write_access(repo, who, ref, _flag(req.query, "create_pr"))
            tree = dict(self._tree(repo, oid))
        answer = []
        for f in body.get("files", []):
            path, size = f.get("path"), f.get("size", 0)
            lfs = _is_lfs_path(str(path), int(size))
            item: dict[str, Any] = {
                "path": path,
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
            }
            entry = tree.get(str(path))
            if entry is not None and entry["lfs"] == lfs:
                item["oid"] = entry["sha256"] if lfs else entry["oid"]
            answer.append(item)
        return _Response.json({"files": answer, "commitOid": oid})

    def _lfs_batch(self, req: _Request, repo_id: str) -> _Response:
        who = self._who(req)
        body = self._body_json(req)
        with self._lock:
            repo = self._readable(repo_id, who)
            # The batch call does not say whether a PR is being opened: any write token on a
            # public repo may store blobs (they are content-addressed, and only a commit uses them).
            self._require_contributor(repo, who)
        if body.get("operation") != "upload":
            raise HubError(400, "LocalHub only supports the LFS upload operation")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _SHA256.match(oid) or not isinstance(size, int):
                raise HubError(400, f"Invalid LFS object {obj!r}")
            item: dict[str, Any] = {"oid": oid, "size": size}
            if not self._has_blob(oid):
                item["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{oid}", "expires_in": 3600}
                }
            objects.append(item)
        return _Response.json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_put(self, req: _Request, oid: str) -> _Response:
        actual = hashlib.sha256(req.body).hexdigest()
        if actual != oid:
            raise HubError(400, f"sha256 mismatch: url says {oid}, body is {actual}")
        self._store_blob(req.body)
        return _Response(200, b"", {})

    def _api_commit(self, req: _Request, repo_id: str, revision: str) -> _Response:
        who = self._who(req)
        create_pr = _flag(req.query, "create_pr")
        lines = []
        for raw_line in req.body.splitlines():
            if raw_line.strip():
                try:
                    lines.append(json.loads(raw_line))
                except ValueError as err:
                    raise HubError(400, f"Commit body line is not JSON: {err}") from err
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit body must start with a header line")
        header = lines[0].get("value") or {}
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise HubError(400, "The commit needs a summary")
        description = header.get("description") or ""
        with self._lock:
            repo = self._readable(repo_id, who)
            head, ref = self._resolve(repo, revision)
            writer = self._write_access(repo, who, ref, create_pr)
            if ref is None:
                raise HubError(400, f"Cannot commit onto a commit sha ({revision}); use a branch")
            pr_match = _PR_REF.match(ref)
            closed = ("merged", "closed")
            if (
                pr_match
                and not create_pr
                and self._discussion(repo, pr_match[1])["status"] in closed
            ):
                raise HubError(400, f"Pull request {ref} is not open")
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                raise HubError(
                    412,
                    f"parentCommit {parent} is not the head of {revision} ({head}): someone"
                    " committed in between",
                )
            tree = self._apply_operations(dict(self._tree(repo, head)), lines[1:])
            answer: dict[str, Any] = {}
            if create_pr:
                target = ref if ref.startswith("refs/heads/") else "refs/heads/main"
                d = self._open_discussion(
                    repo, summary, description, writer.user, is_pr=True, status="open"
                )
                d["target"], d["base"] = target, head
                ref = f"refs/pr/{d['num']}"
                repo["refs"][ref] = head
                answer["pullRequestUrl"] = f"{self.url}/{repo_id}/discussions/{d['num']}"
            oid = self._commit(repo, [head], tree, summary, description, writer.user)
            repo["refs"][ref] = oid
            self._on_pr_commit(repo, ref, oid, summary, writer.user)
            self._save(repo)
        answer.update(commitUrl=f"{self.url}/{repo_id}/commit/{oid}", commitOid=oid, success=True)
        return _Response.json(answer)

    def _apply_operations(
        self, tree: dict[str, dict[str, Any]], lines: list[dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """Apply the commit's file operations to ``tree`` (a copy), or raise without side
        effects on the repo (blobs stored on the way are content-addressed, so harmless)."""
        for line in lines:
            key, value = line.get("key"), line.get("value") or {}
            if key == "file":
                path = _check_path(value.get("path"))
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                try:
                    data = base64.b64decode(value.get("content", ""), validate=True)
                except ValueError as err:
                    raise HubError(400, f"Bad base64 content for {path}") from err
                tree[path] = self._entry(data, lfs=False)
            elif key == "lfsFile":
                path = _check_path(value.get("path"))
                sha = str(value.get("oid", ""))
                if value.get("algo", "sha256") != "sha256" or not self._has_blob(sha):
                    raise HubError(400, f"LFS object {sha} for {path} was not uploaded")
                size = (self.root / "blobs" / sha).stat().st_size
                if value.get("size") is not None and value["size"] != size:
                    raise HubError(400, f"LFS object {sha} has size {size}, not {value['size']}")
                tree[path] = self._lfs_entry(sha, size)
            elif key == "deletedFile":
                path = _check_path(value.get("path"))
                if path not in tree:
                    raise HubError(
                        404, f"A file with this name doesn't exist: {path}", "EntryNotFound"
                    )
                del tree[path]
            elif key == "deletedFolder":
                path = _check_path(str(value.get("path", "")).rstrip("/"))
                doomed = [p for p in tree if p.startswith(path + "/")]
                if not doomed:
                    raise HubError(
                        404, f"A folder with this name doesn't exist: {path}", "EntryNotFound"
                    )
                for p in doomed:
                    del tree[p]
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        return tree

    def _list_commits(self, req: _Request, repo_id: str, revision: str) -> _Response:
        who = self._who(req)
        with self._lock:
            repo = self._readable(repo_id, who)
            head, _ = self._resolve(repo, revision)
            history = self._history(repo, head)
        return _Response.json(
            [
                {
                    "id": c["oid"],
                    "title": c["title"],
                    "message": c["message"],
                    "authors": [{"user": c["author"], "avatar": ""}],
                    "date": c["date"],
                    "parents": c["parents"],
                }
                for c in history
            ]
        )

    def _list_refs(self, req: _Request, repo_id: str) -> _Response:
        who = self._who(req)
        with self._lock:
            repo = self._readable(repo_id, who)
            refs = dict(repo["refs"])
        branches, prs = [], []
        for ref, oid in sorted(refs.items()):
            if ref.startswith("refs/heads/"):
                branches.append(
                    {"name": ref[len("refs/heads/") :], "ref": ref, "targetCommit": oid}
                )
            elif _PR_REF.match(ref):
                prs.append({"name": ref, "ref": ref, "targetCommit": oid})
        prs.sort(key=lambda r: int(r["ref"].rsplit("/", 1)[1]))
        data: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if _flag(req.query, "include_prs"):
            data["pullRequests"] = prs
        return _Response.json(data)

    def _branch(self, req: _Request, repo_id: str, branch: str) -> _Response:
        who = self._who(req)
        body = self._body_json(req)
        ref = f"refs/heads/{branch}"
        with self._lock:
            repo = self._readable(repo_id, who)
            self._require_owner(repo_id, who)
            if req.method == "DELETE":
                if ref not in repo["refs"] or branch == "main":
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                del repo["refs"][ref]
            else:
                if ref in repo["refs"]:
                    raise HubError(409, f"Reference {ref} already exists")
                oid, _ = self._resolve(repo, str(body.get("startingPoint") or "main"))
                repo["refs"][ref] = oid
            self._save(repo)
        return _Response.json({})

    def _discussion_json(self, repo: dict[str, Any], d: dict[str, Any]) -> dict[str, Any]:
        return {
            "num": d["num"],
            "title": d["title"],
            "status": d["status"],
            "isPullRequest": d["is_pr"],
            "createdAt": d["created_at"],
            "author": {"name": d["author"], "type": "user", "fullname": d["author"]},
            "repo": {"name": repo["id"], "type": "model"},
            "pinned": False,
            "locked": False,
            "numComments": sum(1 for e in d["events"] if e["type"] == "comment"),
            "topReactions": [],
        }

    def _list_discussions(self, req: _Request, repo_id: str) -> _Response:
        who = self._who(req)
        kind = (req.query.get("type") or ["all"])[-1]
        status = (req.query.get("status") or ["all"])[-1]
        authors = req.query.get("author")
        author = authors[-1] if authors else None
        page = int((req.query.get("p") or ["0"])[-1] or 0)
        with self._lock:
            repo = self._readable(repo_id, who)
            every = list(reversed(repo["discussions"]))  # newest first, as on the Hub
            chosen = [
                d
                for d in every
                if (kind == "all" or d["is_pr"] == (kind == "pull_request"))
                and (
                    status == "all"
                    or (status == "open" and d["status"] in ("open", "draft"))
                    or (status == "closed" and d["status"] in ("closed", "merged"))
                )
                and (author is None or d["author"] == author)
            ]
            start = page * DISCUSSIONS_PAGE
            items = [
                self._discussion_json(repo, d) for d in chosen[start : start + DISCUSSIONS_PAGE]
            ]
            closed = sum(1 for d in every if d["status"] in ("closed", "merged"))
        return _Response.json(
            {
                "discussions": items,
                "count": len(chosen),
                "start": start,
                "numClosedDiscussions": closed,
            }
        )

    def _create_discussion(self, req: _Request, repo_id: str) -> _Response:
        who = self._who(req)
        body = self._body_json(req)
        title = str(body.get("title") or "").strip()
        if len(title) < 3:
            raise HubError(400, "The title must be at least 3 characters long")
        is_pr = bool(body.get("pullRequest"))
        with self._lock:
            repo = self._readable(repo_id, who)
            writer = self._require_contributor(repo, who)
            d = self._open_discussion(
                repo,
                title,
                str(body.get("description") or ""),
                writer.user,
                is_pr=is_pr,
                status="draft" if is_pr else "open",
            )
            self._save(repo)
        return _Response.json(
            {
                "num": d["num"],
                "pullRequest": is_pr,
                "url": f"{self.url}/{repo_id}/discussions/{d['num']}",
                "ref": f"refs/pr/{d['num']}" if is_pr else None,
            }
        )

    def _pr_trees(
        self, repo: dict[str, Any], d: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(base tree, PR head tree, target head tree)."""
        base = self._tree(repo, d["base"])
        head = self._tree(repo, repo["refs"][f"refs/pr/{d['num']}"])
        target = self._tree(repo, repo["refs"].get(d["target"], d["base"]))
        return base, head, target

    @staticmethod
    def _conflicts(base: dict[str, Any], head: dict[str, Any], target: dict[str, Any]) -> list[str]:
        out = []
        for path in sorted(set(base) | set(head) | set(target)):
            b, h, t = (x.get(path, {}).get("oid") for x in (base, head, target))
            if h != b and t != b and h != t:
                out.append(path)
        return out

    def _diff(self, base: dict[str, Any], head: dict[str, Any]) -> str:
        chunks = []
        for path in sorted(set(base) | set(head)):
            old, new = base.get(path), head.get(path)
            if (old or {}).get("oid") == (new or {}).get("oid"):
                continue
            chunks.append(f"diff --git a/{path} b/{path}\n")
            texts: list[str | None] = []
            for entry in (old, new):
                if entry is None:
                    texts.append("")
                    continue
                data = (
                    _lfs_pointer(entry["sha256"], entry["size"])
                    if entry["lfs"]
                    else self._read_blob(entry["sha256"])
                )
                texts.append(None if b"\0" in data else data.decode("utf-8", "replace"))
            if texts[0] is None or texts[1] is None:
                chunks.append(f"Binary files a/{path} and b/{path} differ\n")
                continue
            lines = difflib.unified_diff(
                texts[0].splitlines(keepends=True),
                texts[1].splitlines(keepends=True),
                fromfile=f"a/{path}" if old else "/dev/null",
                tofile=f"b/{path}" if new else "/dev/null",
            )
            chunks.extend(line if line.endswith("\n") else line + "\n" for line in lines)
        return "".join(chunks)

    def _discussion_details(self, req: _Request, repo_id: str, num: str) -> _Response:
        who = self._who(req)
        with self._lock:
            repo = self._readable(repo_id, who)
            d = self._discussion(repo, num)
            data = self._discussion_json(repo, d)
            data["events"] = list(d["events"])
            if d["is_pr"]:
                base, head, target = self._pr_trees(repo, d)
                data["changes"] = {"base": d["target"]}
                if d["merge_commit"]:
                    data["changes"]["mergeCommitId"] = d["merge_commit"]
                data["filesWithConflicts"] = (
                    [] if d["status"] == "merged" else self._conflicts(base, head, target)
                )
                if _flag(req.query, "diff"):
                    data["diff"] = self._diff(base, head)
        return _Response.json(data)

    def _discussion_action(self, req: _Request, repo_id: str, num: str, action: str) -> _Response:
        who = self._who(req)
        body = self._body_json(req)
        with self._lock:
            repo = self._readable(repo_id, who)
            d = self._discussion(repo, num)
            if action == "comment":
                writer = self._require_contributor(repo, who)
                text = str(body.get("comment") or "")
                if not text.strip():
                    raise HubError(400, "The comment is empty")
                event = self._comment_event(writer.user, text)
                d["events"].append(event)
                answer = {"newMessage": event}
            elif action == "title":
                writer = self._require_write(who)
                if writer.user not in (d["author"], repo_id.split("/")[0]):
                    raise HubError(403, "Only the author or the repo owner can rename")
                title = str(body.get("title") or "").strip()
                event = self._event("title-change", writer.user, {"from": d["title"], "to": title})
                d["title"] = title
                d["events"].append(event)
                answer = {"newTitle": event}
            elif action == "status":
                writer = self._require_owner(repo_id, who)
                status = body.get("status")
                if status not in ("open", "closed"):
                    raise HubError(400, f"Invalid status {status!r}")
                if d["status"] == "merged":
                    raise HubError(400, "This pull request is already merged")
                if body.get("comment"):
                    d["events"].append(self._comment_event(writer.user, str(body["comment"])))
                event = self._event("status-change", writer.user, {"status": status})
                d["status"] = status
                d["events"].append(event)
                answer = {"newStatus": event}
            elif action == "merge":
                writer = self._require_owner(repo_id, who)
                answer = {"newStatus": self._merge(repo, d, writer, str(body.get("comment") or ""))}
            else:
                print(f"LocalHub: no endpoint for {req.method} {req.path}", file=sys.stderr)
                raise HubError(404, f"LocalHub has no discussion action {action!r}")
            self._save(repo)
        return _Response.json(answer)

    def _merge(self, repo: dict[str, Any], d: dict[str, Any], writer: _Who, comment: str) -> Any:
        """Squash the PR onto its target branch (one new commit titled "TITLE (#N)")."""
        if not d["is_pr"]:
            raise HubError(400, f"Discussion {d['num']} is not a pull request")
        if d["status"] in ("merged", "closed"):
            raise HubError(400, f"Pull request {d['num']} is {d['status']}")
        base, head, target = self._pr_trees(repo, d)
        conflicts = self._conflicts(base, head, target)
        if conflicts:
            raise HubError(409, f"Cannot merge: conflicting files {', '.join(conflicts)}")
        tree = dict(target)
        for path in set(base) | set(head):
            if base.get(path, {}).get("oid") != head.get(path, {}).get("oid"):
                if path in head:
                    tree[path] = head[path]
                else:
                    tree.pop(path, None)
        target_head = repo["refs"][d["target"]]
        oid = self._commit(
            repo, [target_head], tree, f"{d['title']} (#{d['num']})", "", d["author"]
        )
        repo["refs"][d["target"]] = oid
        if comment:
            d["events"].append(self._comment_event(writer.user, comment))
        event = self._event("status-change", writer.user, {"status": "merged"})
        d["events"].append(event)
        d["status"] = "merged"
        d["merge_commit"] = oid
        return event

    def _resolve_file(self, req: _Request, repo_id: str, revision: str, path: str) -> _Response:
        who = self._who(req)
        with self._lock:
            repo = self._readable(repo_id, who)
            self._check_gated(repo, who)
            oid, _ = self._resolve(repo, revision)
            entry = self._tree(repo, oid).get(path)
        if entry is None:
            raise HubError(
                404,
                f"Entry not found: {path} at {revision}",
                "EntryNotFound",
                {"X-Repo-Commit": oid},
            )
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "X-Repo-Commit": oid,
            "ETag": f'"{entry["oid"]}"',
        }
        if entry["lfs"]:
            headers["X-Linked-Etag"] = f'"{entry["sha256"]}"'
            headers["X-Linked-Size"] = str(entry["size"])
        if req.method == "HEAD":
            return _Response(200, b"", headers, length=entry["size"])  # HEAD: no body read
        data = self._read_blob(entry["sha256"])
        rng = req.headers.get("Range")
        if rng:
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            if match is None or not (match.group(1) or match.group(2)):
                raise HubError(
                    416,
                    f"Unsupported range {rng}",
                    headers={"Content-Range": f"bytes */{len(data)}"},
                )
            if match.group(1):
                first = int(match.group(1))
                last = min(int(match.group(2)), len(data) - 1) if match.group(2) else len(data) - 1
            else:  # suffix range: the last N bytes
                first, last = max(len(data) - int(match.group(2)), 0), len(data) - 1
            if first >= len(data) or first > last:
                raise HubError(
                    416,
                    f"Range {rng} not satisfiable for {len(data)} bytes",
                    headers={"Content-Range": f"bytes */{len(data)}"},
                )
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            return _Response(206, data[first : last + 1], headers)
        return _Response(200, data, headers)


class _Handler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive: every answer has a Content-Length, HEAD answers have no body,
    and every request body is read in full before answering (else the next request on the
    connection would start inside it)."""

    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 120
    hub: LocalHub

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after the chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        hub = self.hub
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        split = urlsplit(self.path)
        req = _Request(
            self.command,
            split.path,
            parse_qs(split.query, keep_blank_values=True),
            self.headers,
            body,
        )
        with hub._lock:
            hub.requests.append((req.method, req.path))
        fault = hub._take_fault(req.method, req.path)
        if fault is not None and fault.mode == "stall":
            resp = hub._handle(req)
            hub.stalled.set()
            time.sleep(fault.seconds)
            with contextlib.suppress(OSError):
                self._send(resp)
            return
        if fault is not None and fault.mode == "lost":
            hub._handle(req)
            self._abort(reset=False)
            return
        if fault is not None and fault.mode != "status" and req.method != "GET":
            self._abort(reset=fault.mode == "reset")
            return
        if fault is not None and fault.mode == "status":
            resp = _Response.error(HubError(fault.status, f"LocalHub injected a {fault.status}"))
        else:
            resp = hub._handle(req)
        if fault is not None and fault.mode != "status":
            self._send(resp, limit=fault.after_bytes)
            self._abort(reset=fault.mode == "reset")
            return
        self._send(resp)

    def _send(self, resp: _Response, limit: int | None = None) -> None:
        self.send_response(resp.status)
        for name, value in resp.headers.items():
            self.send_header(name, value)
        length = resp.length if resp.length is not None else len(resp.body)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body if limit is None else resp.body[:limit])
        self.wfile.flush()

    def _abort(self, *, reset: bool) -> None:
        """Close without finishing the answer: FIN (drop) or RST (reset)."""
        self.close_connection = True
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with self.hub._lock:
                self.hub._connections.discard(self.connection)
            os.close(self.connection.detach())

    do_GET = _serve
    do_HEAD = _serve
    do_POST = _serve
    do_PUT = _serve
    do_DELETE = _serve
    do_PATCH = _serve
