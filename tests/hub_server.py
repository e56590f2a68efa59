"""A small local stand-in for the Hugging Face Hub HTTP API, for tests.

Point the real ``huggingface_hub`` client (and ``transformers``, and the ``hf`` CLI) at it with
``HF_ENDPOINT=http://127.0.0.1:PORT`` (``conftest.py`` sets it, with a temporary ``HF_HOME``, before
``huggingface_hub`` is imported; see its ``hub_server`` / ``hub_env`` fixtures).

Usage::

    with HubServer() as server:          # binds 127.0.0.1 on a free port, serves from a background thread
        server.endpoint                  # "http://127.0.0.1:PORT"
        server.store.get("model", "testuser/foo")   # in-memory repos, for white-box assertions

It serves what lopt_hf's tests do through the real clients — create a repo (and a branch), upload,
download pinned to a revision, list for ``snapshot_download`` / ``hf download``, the errors the client maps
to exceptions — and nothing more (no tags, deletion of repos or branches, commit listings, ranges).

Storage is in memory. Every commit is a full snapshot (path -> git blob sha1) with a parent pointer and a
40-hex sha computed git-style from its tree, parent, author, date and message. Revisions resolve from a
branch name, ``refs/heads/<b>``, a full commit sha or a unique sha prefix (>= 7 hex chars). ``create_repo`` makes the same system "initial commit" (with a
``.gitattributes``) that the real Hub makes, so a fresh repo already has one commit on ``main``.

Implemented (``{type}`` is ``models`` / ``datasets`` / ``spaces``; resolve URLs get a ``datasets/`` or
``spaces/`` prefix for those types; repo ids must be ``namespace/name``):

* ``GET  /api/whoami-v2`` - any bearer token is accepted (the fixtures use ``hf_test``); user ``testuser``.
  Requests without a token are accepted too (the server does no auth at all).
* ``POST /api/repos/create`` (409 + ``url`` when it exists, which ``exist_ok=True`` swallows).
* ``GET  /api/{type}/{ns}/{name}`` and ``.../revision/{rev}`` - repo info (``sha``, ``siblings``; sizes and
  ``blobId`` with ``?blobs=true``; ``cardData``/``tags`` from README.md front matter if PyYAML is importable).
* ``GET  /api/{type}/{ns}/{name}/tree/{rev}[/{path}]`` (``recursive``; single page, no pagination).
* ``POST .../preupload/{rev}`` - always answers ``uploadMode: "regular"`` (never ``lfs``), ``shouldIgnore: false``,
  and ``oid`` = git sha1 of the file already at that path (so the client skips unchanged files like on the Hub).
  Because nothing is ever "lfs", the client never goes down the LFS or Xet upload paths, whether or not
  ``hf_xet`` is installed.
* ``POST .../commit/{rev}`` - ndjson payload: ``header`` (``summary``, ``description``, ``parentCommit`` -> 412
  when it is not the branch head), ``file`` (base64), ``deletedFile``, ``deletedFolder``. Answers
  ``commitOid`` / ``commitUrl``. Committing to a missing branch -> 404 ``RevisionNotFound``.
* ``POST .../branch/{branch}`` (``startingPoint``).
* ``HEAD``/``GET /{ns}/{name}/resolve/{rev}/{path}`` - ``ETag`` (quoted git blob sha1), ``X-Repo-Commit``
  (full sha of the resolved revision), ``Content-Length``; ``Range`` is ignored (the whole file is sent).
  No redirect: content is served directly (as the Hub does for non-LFS files).
* ``POST /api/validate-yaml`` (always valid), ``GET /api/agent-harnesses`` (empty registry - the client fetches
  it from ``{ENDPOINT}`` the first time it builds a User-Agent), ``/api/telemetry/*`` (swallowed).
* Errors carry the headers the client maps to exceptions: 404 + ``X-Error-Code: RepoNotFound`` ->
  ``RepositoryNotFoundError``, ``RevisionNotFound`` -> ``RevisionNotFoundError``, ``EntryNotFound`` ->
  ``RemoteEntryNotFoundError`` (an ``EntryNotFoundError``; it also carries ``X-Repo-Commit`` so the client
  caches the non-existence under ``.no_exist/``), plus ``X-Error-Message``.

Not implemented (the server answers 501 ``NotImplemented`` or ignores the parameter): git LFS (batch API,
``lfsFile`` commit entries) and Xet storage (``xet-*-token`` routes), pull requests / ``create_pr=1``,
discussions, ``CommitOperationCopy`` of LFS files, ``super_squash``, gated/private access control (``private``
is stored and echoed only), ``.gitignore`` handling in preupload, pagination (every listing is one page),
``expand`` on tree/info, search/list endpoints (``list_models``...), Spaces runtime, collections, etc.
Big files work (they are just sent base64-inline in the commit), but everything is held in memory.

The server uses HTTP/1.0 (one request per connection), so ``stop()`` can join every handler thread and
nothing is left running; it only binds 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import re
import socketserver
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_USER = "testuser"
DEFAULT_TOKEN = "hf_test"

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# Same content as the `.gitattributes` the Hub puts in the initial commit of a new model repo (abridged).
INITIAL_GITATTRIBUTES = b"""*.7z filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""


def git_blob_sha1(data: bytes) -> str:
    """Same as `git hash-object` (and `huggingface_hub.utils.sha.git_hash`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts % 1 * 1000):03d}Z"


class HubError(Exception):
    """Raised by the store; turned into an HTTP error response with the Hub's error headers."""

    def __init__(self, status: int, code: str | None, message: str, repo_commit: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.repo_commit = repo_commit


@dataclass
class Commit:
    sha: str
    parent: str | None
    tree: dict[str, str]  # path -> git blob sha1 (full snapshot)
    title: str
    message: str
    author: str
    date: float


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: float
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def head(self, branch: str = "main") -> Commit:
        return self.commits[self.branches[branch]]


class HubStore:
    """Thread-safe in-memory repos + content-addressed blobs."""

    def __init__(self, user: str = DEFAULT_USER):
        self.user = user
        self.lock = threading.RLock()
        self.blobs: dict[str, bytes] = {}
        self.repos: dict[tuple[str, str], Repo] = {}

    # -- repos ---------------------------------------------------------------------------------

    def get(self, repo_type: str, repo_id: str) -> Repo:
        with self.lock:
            repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo_type} {repo_id}")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> tuple[Repo, bool]:
        """Returns (repo, created). Makes the Hub's system initial commit with a `.gitattributes`."""
        with self.lock:
            existing = self.repos.get((repo_type, repo_id))
            if existing is not None:
                return existing, False
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=time.time())
            self.repos[(repo_type, repo_id)] = repo
            self._make_commit(
                repo, "main", {".gitattributes": self._put_blob(INITIAL_GITATTRIBUTES)}, "initial commit", ""
            )
            return repo, True

    # -- revisions -----------------------------------------------------------------------------

    def resolve(self, repo: Repo, revision: str) -> Commit:
        with self.lock:
            rev = revision
            if rev.startswith("refs/heads/"):
                rev = rev[len("refs/heads/") :]
            sha = repo.branches.get(rev)
            if sha is None and re.fullmatch(r"[0-9a-f]{7,40}", rev):
                matches = [s for s in repo.commits if s.startswith(rev)]
                if len(matches) == 1:
                    sha = matches[0]
            if sha is None:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return repo.commits[sha]

    def read(self, blob_sha: str) -> bytes:
        with self.lock:
            return self.blobs[blob_sha]

    def create_branch(self, repo: Repo, branch: str, starting_point: str | None) -> None:
        with self.lock:
            if branch in repo.branches:
                raise HubError(409, None, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = self.resolve(repo, starting_point or "main").sha

    # -- commits -------------------------------------------------------------------------------

    def _put_blob(self, data: bytes) -> str:
        sha = git_blob_sha1(data)
        self.blobs[sha] = data
        return sha

    def _make_commit(self, repo: Repo, branch: str, tree: dict[str, str], title: str, message: str) -> Commit:
        parent = repo.branches.get(branch)
        date = time.time()
        tree_sha = hashlib.sha1(
            "".join(f"{path}\0{blob}\n" for path, blob in sorted(tree.items())).encode()
        ).hexdigest()
        body = (
            f"tree {tree_sha}\n"
            + (f"parent {parent}\n" if parent else "")
            + f"author {self.user} <{self.user}@users.noreply.huggingface.co> {date:.6f} +0000\n\n"
            + (f"{title}\n\n{message}" if message else title)
            + f"\n{uuid.uuid4().hex}"  # nonce: two identical commits in the same microsecond still differ
        ).encode()
        sha = hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()
        commit = Commit(sha=sha, parent=parent, tree=dict(tree), title=title, message=message, author=self.user,
                        date=date)
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return commit

    def commit(self, repo: Repo, revision: str, operations: list[dict[str, Any]]) -> Commit:
        """Apply parsed ndjson commit operations on top of branch `revision`."""
        header: dict[str, Any] = {}
        for op in operations:
            if op.get("key") == "header":
                header = op.get("value") or {}
        with self.lock:
            branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
            if branch not in repo.branches:
                if revision.startswith("refs/pr/"):
                    raise HubError(501, "NotImplemented", "Pull requests are not supported by the test Hub server")
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision} (commits go to a branch)")
            head = repo.head(branch)
            parent_commit = header.get("parentCommit")
            if parent_commit and not head.sha.startswith(parent_commit):
                raise HubError(412, None, f"A commit has happened since. Parent commit {parent_commit} is not "
                                          f"the head of {branch} ({head.sha})")
            tree = dict(head.tree)
            for op in operations:
                key, value = op.get("key"), op.get("value") or {}
                if key == "header":
                    continue
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, None, f"Unsupported encoding {value.get('encoding')!r} for {path}")
                    tree[path] = self._put_blob(base64.b64decode(value.get("content", "")))
                elif key == "deletedFile":
                    if path not in tree:
                        raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}",
                                       repo_commit=head.sha)
                    del tree[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in tree if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, "EntryNotFound", f"A folder with this name doesn't exist: {path}",
                                       repo_commit=head.sha)
                    for p in doomed:
                        del tree[p]
                elif key == "lfsFile":
                    raise HubError(501, "NotImplemented",
                                   f"LFS files are not supported by the test Hub server (got lfsFile {path!r}); "
                                   "it always answers uploadMode=regular in preupload")
                else:
                    raise HubError(400, None, f"Unknown commit operation key {key!r}")
            title = header.get("summary") or "Update files"
            return self._make_commit(repo, branch, tree, title, header.get("description") or "")

# ---------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.0"  # one request per connection: handler threads end promptly
    timeout = 30  # socket timeout, so a stuck client can never pin a handler thread forever

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
        if self.server.hub.verbose:
            super().log_message(format, *args)

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.server.hub.endpoint

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", self.headers.get("X-Amzn-Trace-Id") or uuid.uuid4().hex)
        for key, value in (headers or {}).items():
            # header values must be latin-1 and single-line (paths in messages may be anything)
            self.send_header(key, " ".join(str(value).splitlines()).encode("latin-1", "replace").decode("latin-1"))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.repo_commit:
            headers["X-Repo-Commit"] = err.repo_commit
        self._json(err.status, {"error": err.message}, headers)

    def _dispatch(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        raw_segments = [s for s in split.path.split("/") if s != ""]
        with hub._log_lock:
            hub.requests.append((self.command, split.path))
            hub.request_headers.append({key.lower(): value for key, value in self.headers.items()})
        try:
            if raw_segments[:1] == ["api"]:
                self._route_api(raw_segments[1:])
            else:
                self._route_web(raw_segments)
        except HubError as err:
            self._error(err)
        except Exception as exc:  # pragma: no cover - surfaced to the client as a 500
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"}, {"X-Error-Message": str(exc)[:200]})
            if hub.verbose:
                raise

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch  # noqa: N815

    def _bool(self, name: str) -> bool:
        return self.query.get(name, "").lower() in ("1", "true", "yes")

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.base_url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    # -- /{ns}/{name}/resolve/{rev}/{path} ---------------------------------------------------------

    def _route_web(self, seg: list[str]) -> None:
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type = REPO_TYPES[seg[0]]
            seg = seg[1:]
        if len(seg) >= 3 and seg[1].endswith(".git"):
            raise HubError(501, "NotImplemented", "git / git-LFS endpoints are not supported by the test Hub server")
        if len(seg) < 5 or seg[2] != "resolve" or self.command not in ("GET", "HEAD"):
            raise HubError(404, None, f"Not found: {self.command} {self.path}")
        repo = self.server.hub.store.get(repo_type, f"{unquote(seg[0])}/{unquote(seg[1])}")
        commit = self.server.hub.store.resolve(repo, unquote(seg[3]))
        path = unquote("/".join(seg[4:]))
        blob = commit.tree.get(path)
        if blob is None:
            raise HubError(404, "EntryNotFound", f"Entry not found: {path}", repo_commit=commit.sha)
        data = self.server.hub.store.read(blob)
        basename = path.rsplit("/", 1)[-1].replace('"', "")
        headers = {
            "ETag": f'"{blob}"',
            "X-Repo-Commit": commit.sha,
            "Content-Disposition": f'inline; filename*=UTF-8\'\'{quote(basename)}; '
                                   f'filename="{basename.encode("ascii", "replace").decode()}";',
        }
        ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
        self._send(200, data, headers, content_type=ctype)

    # -- /api/... --------------------------------------------------------------------------------

    def _route_api(self, seg: list[str]) -> None:
        hub = self.server.hub
        store = hub.store
        method = self.command
        if seg == ["whoami-v2"] and method == "GET":
            return self._json(200, hub.whoami())
        if seg == ["validate-yaml"] and method == "POST":
            self._read_body()
            return self._json(200, {"errors": [], "warnings": []})
        if seg == ["agent-harnesses"] and method == "GET":
            return self._json(200, {"standardEnvVars": [], "harnesses": {}})
        if seg[:1] == ["telemetry"]:
            self._read_body()
            return self._json(200, {})
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if len(seg) >= 3 and seg[0] in REPO_TYPES:
            repo = store.get(REPO_TYPES[seg[0]], f"{unquote(seg[1])}/{unquote(seg[2])}")
            return self._route_repo(repo, seg[3:])
        raise HubError(404, None, f"Not found: {method} {self.path}")

    def _create_repo(self) -> None:
        store = self.server.hub.store
        payload = json.loads(self._read_body() or b"{}")
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, None, f"Unsupported repo type {repo_type!r}")
        name = payload.get("name")
        if not name or "/" in name:
            raise HubError(400, None, f"Invalid repo name {name!r}")
        repo_id = f"{payload.get('organization') or store.user}/{name}"
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        repo, created = store.create_repo(repo_type, repo_id, private=private)
        body = {"url": self._repo_url(repo), "name": repo_id, "id": repo.uid}
        if not created:
            return self._json(409, {**body, "error": f"You already created this {repo_type} repo"},
                              {"X-Error-Message": f"You already created this {repo_type} repo"})
        return self._json(200, body)

    def _route_repo(self, repo: Repo, seg: list[str]) -> None:
        store = self.server.hub.store
        method = self.command
        action = seg[0] if seg else None
        rev = unquote(seg[1]) if len(seg) >= 2 else "main"
        rest = unquote("/".join(seg[2:])) if len(seg) > 2 else ""

        if action is None and method == "GET":
            return self._json(200, self._repo_info(repo, store.resolve(repo, "main")))
        if action == "revision" and method == "GET":
            return self._json(200, self._repo_info(repo, store.resolve(repo, rev)))
        if action == "tree" and method == "GET":
            return self._json(200, self._tree(store.resolve(repo, rev), rest.strip("/"), self._bool("recursive")))
        if action == "preupload" and method == "POST":
            return self._preupload(repo, rev)
        if action == "commit" and method == "POST":
            if self._bool("create_pr"):
                raise HubError(501, "NotImplemented", "create_pr is not supported by the test Hub server")
            body = self._read_body()
            operations = [json.loads(line) for line in body.splitlines() if line.strip()]
            commit = store.commit(repo, rev, operations)
            return self._json(200, {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.sha}",
                "pullRequestUrl": None,
                "hookOutput": "",
            })
        if action == "branch" and method == "POST":
            payload = json.loads(self._read_body() or b"{}")
            store.create_branch(repo, rev, payload.get("startingPoint"))
            return self._json(200, {})
        if action in ("xet-read-token", "xet-write-token"):
            raise HubError(501, "NotImplemented", "Xet storage is not supported by the test Hub server")
        raise HubError(501, "NotImplemented", f"Not implemented by the test Hub server: {method} {self.path}")

    def _preupload(self, repo: Repo, rev: str) -> None:
        store = self.server.hub.store
        if self._bool("create_pr"):
            raise HubError(501, "NotImplemented", "create_pr is not supported by the test Hub server")
        commit = store.resolve(repo, rev)
        payload = json.loads(self._read_body() or b"{}")
        files = []
        for f in payload.get("files", []):
            files.append({
                "path": f["path"],
                "uploadMode": "regular",  # never "lfs": keeps the client off the LFS/Xet upload paths
                "shouldIgnore": False,
                "oid": commit.tree.get(f["path"]),
            })
        return self._json(200, {"files": files, "commitOid": commit.sha})

    # -- JSON shapes -----------------------------------------------------------------------------

    def _file_entry(self, commit: Commit, path: str) -> dict[str, Any]:
        blob = commit.tree[path]
        return {"type": "file", "oid": blob, "size": len(self.server.hub.store.read(blob)), "path": path}

    @staticmethod
    def _folders(commit: Commit) -> set[str]:
        out = set()
        for path in commit.tree:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                out.add("/".join(parts[:i]))
        return out

    def _folder_entry(self, commit: Commit, folder: str) -> dict[str, Any]:
        inner = sorted((p, b) for p, b in commit.tree.items() if p.startswith(folder + "/"))
        oid = hashlib.sha1("".join(f"{p}\0{b}\n" for p, b in inner).encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": folder}

    def _tree(self, commit: Commit, path: str, recursive: bool) -> list[dict[str, Any]]:
        folders = self._folders(commit)
        if path and path not in folders:
            if path in commit.tree:
                return [self._file_entry(commit, path)]
            raise HubError(404, "EntryNotFound", f"Entry not found: {path}", repo_commit=commit.sha)
        prefix = path + "/" if path else ""

        def wanted(p: str) -> bool:
            if not p.startswith(prefix) or p == path:
                return False
            return recursive or "/" not in p[len(prefix) :]

        entries = [self._folder_entry(commit, d) for d in sorted(folders) if wanted(d)]
        entries += [self._file_entry(commit, p) for p in sorted(commit.tree) if wanted(p)]
        return entries

    def _repo_info(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        store = self.server.hub.store
        blobs = self._bool("blobs")
        siblings = []
        used = 0
        for path in sorted(commit.tree):
            size = len(store.read(commit.tree[path]))
            used += size
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=size, blobId=commit.tree[path])
            siblings.append(sib)
        ns = repo.repo_id.split("/")[0]
        info: dict[str, Any] = {
            "_id": repo.uid,
            "id": repo.repo_id,
            "author": ns,
            "sha": commit.sha,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": used,
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            info["spaces"] = []
        card = _card_data(store, commit)
        if card is not None:
            info["cardData"] = card
            tags = card.get("tags")
            info["tags"] = list(tags) if isinstance(tags, list) else []
            if repo.repo_type == "model" and isinstance(card.get("library_name"), str):
                info["library_name"] = card["library_name"]
        return info


def _card_data(store: HubStore, commit: Commit) -> dict[str, Any] | None:
    blob = commit.tree.get("README.md")
    if blob is None:
        return None
    text = store.read(blob).decode("utf-8", errors="replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return None
    try:
        import yaml
    except ImportError:  # pragma: no cover
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # handler threads are tracked and joined by server_close()
    block_on_close = True
    hub: "HubServer"

    def server_bind(self) -> None:
        # HTTPServer.server_bind() calls socket.getfqdn() (a resolver lookup); we only ever serve 127.0.0.1.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class HubServer:
    """The fake Hub: `start()` binds 127.0.0.1:`port` (0 = free port) and serves from a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, user: str = DEFAULT_USER, verbose: bool = False):
        self.host = host
        self.port = port
        self.verbose = verbose
        self.store = HubStore(user=user)
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.request_headers: list[dict[str, str]] = []  # lower-cased headers of every request, same order
        self._log_lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def repo_id(self, prefix: str = "repo") -> str:
        """A fresh, unused repo id in the server user's namespace."""
        return f"{self.store.user}/{prefix}-{uuid.uuid4().hex[:12]}"

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        """What a push left at the head of ``main``: path → bytes, without the Hub's own
        ``.gitattributes`` ({} when the repo was never created)."""
        with self.store.lock:
            repo = self.store.repos.get((repo_type, repo_id))
            if repo is None:
                return {}
            tree = repo.head().tree
        return {path: self.store.read(sha) for path, sha in tree.items() if path != ".gitattributes"}

    def whoami(self) -> dict[str, Any]:
        user = self.store.user
        return {
            "type": "user",
            "id": "0" * 24,
            "name": user,
            "fullname": "Test User",
            "email": f"{user}@example.com",
            "emailVerified": True,
            "isPro": False,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
        }

    def start(self) -> "HubServer":
        if self._httpd is not None:
            return self
        self._httpd = _Server((self.host, self.port), _Handler)
        self._httpd.hub = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"hub-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()  # joins the handler threads (block_on_close)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover - manual use: python tests/hub_server.py [port]
    import sys

    srv = HubServer(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0, verbose=True).start()
    print(f"HF_ENDPOINT={srv.endpoint}  (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
