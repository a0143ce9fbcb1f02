"""A small Hub-compatible server for the tests: repos on disk, the endpoints huggingface_hub, datasets,
transformers and peft call to push and pull, nothing else.

    python tests/hub_server.py --root /tmp/hub --port 8765      # then HF_ENDPOINT=http://127.0.0.1:8765
                                                                 #      HF_HUB_DISABLE_XET=1 HF_TOKEN=anything

The test suite starts it itself (``local_hub`` fixture in ``tests/conftest.py``): bound to 127.0.0.1 on a free
port, files in a temporary folder, stopped when the session ends. Each repo is a folder
``<root>/<type>s/<namespace>/<name>/`` holding one snapshot folder per commit (files hard-linked from the
previous snapshot) and ``refs.json`` (``main`` -> commit id, plus the commit log). Every upload is "regular"
(base64 in the commit payload) or, for binary files as on the Hub, LFS with the basic transfer (objects kept
in ``<root>/lfs/<sha256>``). There is no Xet, which is why clients need ``HF_HUB_DISABLE_XET=1``.

It answers: repo create / info / tree / paths-info, preupload, LFS batch / upload / verify, commit, file
resolve (GET with ranges, HEAD),
whoami and validate-yaml (which checks the model-card rules the Hub enforces that our cards touch: YAML
front matter that parses to a mapping, and ``license: other`` only with ``license_name`` and
``license_link``). Bodies are bounded (:data:`MAX_BODY_BYTES`); anything else answers 404 as the Hub does.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

#: Largest request body accepted (the tests push tiny datasets and models).
MAX_BODY_BYTES = 256 * 2**20
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_SHA = re.compile(r"^[0-9a-f]{40}$")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")
USER = "hlss-tester"
#: Files the Hub's default .gitattributes stores with LFS (besides anything binary or over 10 MB).
LFS_SUFFIXES = (
    ".parquet",
    ".arrow",
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".npy",
    ".png",
    ".tif",
    ".tiff",
    ".zip",
)


def _error(status: int, code: str, message: str) -> JSONResponse:
    # huggingface_hub maps X-Error-Code to its exception types (RepositoryNotFoundError, ...).
    return JSONResponse(
        {"error": message}, status_code=status, headers={"X-Error-Code": code, "X-Error-Message": message}
    )


def _blob_id(data_path: Path) -> str:
    """The git blob id of a file (what the Hub reports as `oid` / ETag for a non-LFS file)."""
    digest = hashlib.sha1()
    digest.update(f"blob {data_path.stat().st_size}\0".encode())
    with open(data_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Store:
    """Repos on disk; one lock serialises commits (reads see complete snapshots only)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.lock = threading.Lock()
        self.lfs = self.root / "lfs"
        self.lfs.mkdir(parents=True, exist_ok=True)

    def repo_dir(self, rtype: str, namespace: str, name: str) -> Path:
        return self.root / rtype / namespace / name

    def refs(self, repo: Path) -> dict | None:
        path = repo / "refs.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def snapshot(self, repo: Path, revision: str) -> tuple[str, Path] | None:
        """(commit id, snapshot folder) for ``main`` or a commit id of the repo, else None."""
        refs = self.refs(repo)
        if refs is None:
            return None
        sha = refs["main"] if revision == "main" else revision
        if not _SHA.match(sha) or not (repo / "snapshots" / sha).is_dir():
            return None
        return sha, repo / "snapshots" / sha

    def create(self, repo: Path) -> bool:
        """Create an empty repo with one initial commit; False when it exists."""
        with self.lock:
            if (repo / "refs.json").is_file():
                return False
            sha = hashlib.sha1(f"init {repo} {uuid.uuid4()}".encode()).hexdigest()
            (repo / "snapshots" / sha).mkdir(parents=True)
            self._write_refs(repo, {"main": sha, "log": [{"id": sha, "title": "initial commit"}]})
            return True

    def _write_refs(self, repo: Path, refs: dict) -> None:
        tmp = repo / f".refs.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(refs))
        os.replace(tmp, repo / "refs.json")

    def commit(self, repo: Path, operations: list[dict], title: str) -> str:
        """Apply ``file`` / ``deletedFile`` / ``deletedFolder`` operations on top of main; the new commit id."""
        with self.lock:
            refs = self.refs(repo)
            parent = repo / "snapshots" / refs["main"]
            staging = repo / f".staging-{uuid.uuid4().hex}"
            shutil.copytree(parent, staging, copy_function=os.link)
            digest = hashlib.sha1(refs["main"].encode())
            for op in operations:
                target = _inside(staging, op["path"])
                digest.update(
                    f"{op['kind']} {op['path']} {op.get('oid', '')}".encode() + op.get("content", b"")
                )
                if op["kind"] in ("file", "lfsFile"):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if target.exists():
                        target.unlink()  # a hard link: never write through it into older snapshots
                    if op["kind"] == "file":
                        target.write_bytes(op["content"])
                    else:
                        os.link(self.lfs / op["oid"], target)
                elif op["kind"] == "deletedFile" and target.is_file():
                    target.unlink()
                elif op["kind"] == "deletedFolder" and target.is_dir():
                    shutil.rmtree(target)
            sha = digest.hexdigest()
            os.replace(staging, repo / "snapshots" / sha)
            refs["main"] = sha
            refs["log"].append({"id": sha, "title": title})
            self._write_refs(repo, refs)
            return sha


def _inside(base: Path, relative: str) -> Path:
    """``base / relative``, refusing paths that leave ``base``."""
    target = (base / relative).resolve()
    if not relative or relative.startswith("/") or base.resolve() not in target.parents:
        raise ValueError(f"invalid path in repo: {relative!r}")
    return target


def _entries(snapshot: Path, sub: str, recursive: bool) -> list[dict]:
    base = snapshot / sub if sub else snapshot
    if not base.is_dir():
        return []
    found = base.rglob("*") if recursive else base.iterdir()
    out = []
    for path in sorted(found):
        rel = path.relative_to(snapshot).as_posix()
        if path.is_dir():
            out.append(
                {"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": 0, "path": rel}
            )
        else:
            out.append({"type": "file", "oid": _blob_id(path), "size": path.stat().st_size, "path": rel})
    return out


def _card_data(snapshot: Path) -> dict | None:
    readme = snapshot / "README.md"
    if not readme.is_file():
        return None
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.read_text(encoding="utf-8"), re.S)
    return yaml.safe_load(match.group(1)) if match else None


def create_app(root: str | os.PathLike) -> FastAPI:
    """The FastAPI app serving the repos under ``root``."""
    store = Store(root)
    app = FastAPI(title="hlss_hf test hub")

    @app.middleware("http")
    async def bounded(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and int(length) > MAX_BODY_BYTES:
            return _error(413, "PayloadTooLarge", f"body over {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    def locate(rtype: str, namespace: str, name: str, revision: str = "main"):
        if rtype not in REPO_TYPES:
            return None, _error(404, "RepoNotFound", f"unknown repo type {rtype}")
        repo = store.repo_dir(rtype, namespace, name)
        if store.refs(repo) is None:
            return None, _error(404, "RepoNotFound", f"Repository {namespace}/{name} not found")
        found = store.snapshot(repo, urllib.parse.unquote(revision))
        if found is None:
            return None, _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return (repo, *found), None

    @app.get("/api/whoami-v2")
    def whoami():
        return {
            "type": "user",
            "name": USER,
            "fullname": USER,
            "orgs": [],
            "auth": {"accessToken": {"role": "write"}},
        }

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request):
        payload = await request.json()
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", payload.get("content", ""), re.S)
        if match is None:
            return {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            meta = yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            return _error(400, "InvalidYaml", f"Invalid YAML in README.md: {error}")
        if not isinstance(meta, dict):
            return _error(400, "InvalidYaml", "README.md metadata must be a mapping")
        if meta.get("license") == "other" and not (meta.get("license_name") and meta.get("license_link")):
            return _error(
                400, "InvalidYaml", '"license_name" and "license_link" are required when license is "other"'
            )
        return {"warnings": []}

    @app.post("/api/repos/create")
    async def create_repo(request: Request):
        payload = await request.json()
        rtype = f"{payload.get('type') or 'model'}s"
        namespace, name = payload.get("organization") or USER, payload.get("name", "")
        if rtype not in REPO_TYPES or not _NAME.match(name) or not _NAME.match(namespace):
            return _error(400, "BadRequest", f"invalid repo {namespace}/{name}")
        prefix = "" if rtype == "models" else f"/{rtype}"
        url = f"{str(request.base_url).rstrip('/')}{prefix}/{namespace}/{name}"
        if not store.create(store.repo_dir(rtype, namespace, name)):
            return JSONResponse({"error": "You already created this repo", "url": url}, status_code=409)
        return {"url": url, "name": f"{namespace}/{name}", "id": uuid.uuid4().hex}

    def info(rtype: str, namespace: str, name: str, revision: str):
        found, error = locate(rtype, namespace, name, revision)
        if error:
            return error
        _, sha, snapshot = found
        files = [e for e in _entries(snapshot, "", True) if e["type"] == "file"]
        return {
            "id": f"{namespace}/{name}",
            "_id": hashlib.md5(f"{rtype}/{namespace}/{name}".encode()).hexdigest()[:24],
            "author": namespace,
            "sha": sha,
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "createdAt": "2026-01-01T00:00:00.000Z",
            "cardData": _card_data(snapshot),
            "siblings": [{"rfilename": e["path"], "size": e["size"], "blobId": e["oid"]} for e in files],
        }

    @app.get("/api/{rtype}/{namespace}/{name}")
    def repo_info(rtype: str, namespace: str, name: str):
        return info(rtype, namespace, name, "main")

    @app.get("/api/{rtype}/{namespace}/{name}/revision/{revision:path}")
    def repo_info_at(rtype: str, namespace: str, name: str, revision: str):
        return info(rtype, namespace, name, revision)

    @app.get("/api/{rtype}/{namespace}/{name}/tree/{revision}")
    @app.get("/api/{rtype}/{namespace}/{name}/tree/{revision}/{sub:path}")
    def tree(rtype: str, namespace: str, name: str, revision: str, sub: str = "", recursive: bool = False):
        found, error = locate(rtype, namespace, name, revision)
        if error:
            return error
        _, _, snapshot = found
        if sub and not (snapshot / sub).is_dir():
            return _error(404, "EntryNotFound", f"{sub} does not exist on {revision}")
        return _entries(snapshot, sub.strip("/"), recursive)

    @app.post("/api/{rtype}/{namespace}/{name}/paths-info/{revision}")
    async def paths_info(rtype: str, namespace: str, name: str, revision: str, request: Request):
        found, error = locate(rtype, namespace, name, revision)
        if error:
            return error
        _, _, snapshot = found
        form = urllib.parse.parse_qs((await request.body()).decode())
        out = []
        for rel in form.get("paths", []):
            path = snapshot / rel
            if path.is_file():
                out.append({"type": "file", "oid": _blob_id(path), "size": path.stat().st_size, "path": rel})
            elif path.is_dir():
                out.append(
                    {
                        "type": "directory",
                        "oid": hashlib.sha1(rel.encode()).hexdigest(),
                        "size": 0,
                        "path": rel,
                    }
                )
        return out

    @app.post("/api/{rtype}/{namespace}/{name}/preupload/{revision}")
    async def preupload(rtype: str, namespace: str, name: str, revision: str, request: Request):
        found, error = locate(rtype, namespace, name, revision)
        if error:
            return error
        _, _, snapshot = found
        files = (await request.json()).get("files", [])
        out = []
        for item in files:
            existing = snapshot / item["path"]
            oid = _blob_id(existing) if existing.is_file() else None
            binary = b"\0" in base64.b64decode(item.get("sample", "")) or item.get("size", 0) > 10 * 2**20
            mode = "lfs" if binary or item["path"].lower().endswith(LFS_SUFFIXES) else "regular"
            out.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": out, "commitOid": found[1]}

    @app.post("/api/{rtype}/{namespace}/{name}/commit/{revision}")
    async def commit(rtype: str, namespace: str, name: str, revision: str, request: Request):
        found, error = locate(rtype, namespace, name, revision)
        if error:
            return error
        repo = found[0]
        title, operations = "", []
        for line in (await request.body()).splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                title = value.get("summary", "")
            elif key == "file":
                operations.append(
                    {"kind": "file", "path": value["path"], "content": base64.b64decode(value["content"])}
                )
            elif key == "lfsFile":
                if (
                    not re.match(r"^[0-9a-f]{64}$", value.get("oid", ""))
                    or not (store.lfs / value["oid"]).is_file()
                ):
                    return _error(400, "BadRequest", f"LFS object of {value.get('path')} was not uploaded")
                operations.append({"kind": "lfsFile", "path": value["path"], "oid": value["oid"]})
            elif key in ("deletedFile", "deletedFolder"):
                operations.append({"kind": key, "path": value["path"].rstrip("/")})
            else:  # copyFile: not needed by the tests
                return _error(400, "BadRequest", f"unsupported commit operation {key!r}")
        try:
            for op in operations:
                _inside(repo, op["path"])
        except ValueError as err:
            return _error(400, "BadRequest", str(err))
        sha = store.commit(repo, operations, title)
        prefix = "" if rtype == "models" else f"/{rtype}"
        return {
            "commitUrl": f"{str(request.base_url).rstrip('/')}{prefix}/{namespace}/{name}/commit/{sha}",
            "commitOid": sha,
            "pullRequestUrl": None,
        }

    async def lfs_batch(rtype: str, namespace: str, name: str, request: Request):
        found, error = locate(rtype, namespace, name)
        if error:
            return error
        base = str(request.base_url).rstrip("/")
        objects = []
        for item in (await request.json()).get("objects", []):
            oid, size = str(item.get("oid", "")), int(item.get("size", 0))
            if not re.match(r"^[0-9a-f]{64}$", oid):
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "invalid oid"}})
            elif (store.lfs / oid).is_file():
                objects.append({"oid": oid, "size": size})  # no actions: already there
            else:
                actions = {
                    "upload": {"href": f"{base}/lfs-upload/{oid}"},
                    "verify": {"href": f"{base}/lfs-verify"},
                }
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        return {"transfer": "basic", "objects": objects}

    @app.post("/datasets/{namespace}/{name}.git/info/lfs/objects/batch")
    async def lfs_batch_dataset(namespace: str, name: str, request: Request):
        return await lfs_batch("datasets", namespace, name, request)

    @app.post("/{namespace}/{name}.git/info/lfs/objects/batch")
    async def lfs_batch_model(namespace: str, name: str, request: Request):
        return await lfs_batch("models", namespace, name, request)

    @app.put("/lfs-upload/{oid}")
    async def lfs_upload(oid: str, request: Request):
        if not re.match(r"^[0-9a-f]{64}$", oid):
            return _error(400, "BadRequest", "invalid oid")
        tmp = store.lfs / f".{oid}.{uuid.uuid4().hex}.tmp"
        digest, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as handle:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        return _error(413, "PayloadTooLarge", f"body over {MAX_BODY_BYTES} bytes")
                    digest.update(chunk)
                    handle.write(chunk)
            if digest.hexdigest() != oid:
                return _error(400, "BadRequest", "content does not match its sha256")
            os.replace(tmp, store.lfs / oid)
        finally:
            tmp.unlink(missing_ok=True)
        return Response(status_code=200)

    @app.post("/lfs-verify")
    async def lfs_verify(request: Request):
        oid = str((await request.json()).get("oid", ""))
        if not re.match(r"^[0-9a-f]{64}$", oid) or not (store.lfs / oid).is_file():
            return _error(404, "EntryNotFound", f"LFS object {oid} not found")
        return {"ok": True}

    def resolve(rtype: str, namespace: str, name: str, revision: str, path: str, request: Request):
        found, error = locate(rtype, namespace, name, revision)
        if error:
            return error
        _, sha, snapshot = found
        file = snapshot / path
        if not file.is_file():
            return _error(404, "EntryNotFound", f"{path} does not exist on {revision}")
        size = file.stat().st_size
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{_blob_id(file)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        start, end, status = 0, size - 1, 200
        ranged = re.match(r"bytes=(\d*)-(\d*)$", request.headers.get("range", ""))
        if ranged and (ranged.group(1) or ranged.group(2)):
            if ranged.group(1):
                start = int(ranged.group(1))
                end = min(int(ranged.group(2)), size - 1) if ranged.group(2) else size - 1
            else:
                start = max(size - int(ranged.group(2)), 0)
            if start > end:
                return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(end - start + 1 if size else 0)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        with open(file, "rb") as handle:
            handle.seek(start)
            body = handle.read(end - start + 1) if size else b""
        return Response(content=body, status_code=status, headers=headers)

    @app.api_route("/datasets/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve_dataset(namespace: str, name: str, revision: str, path: str, request: Request):
        return resolve("datasets", namespace, name, revision, path, request)

    @app.api_route("/spaces/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve_space(namespace: str, name: str, revision: str, path: str, request: Request):
        return resolve("spaces", namespace, name, revision, path, request)

    @app.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve_model(namespace: str, name: str, revision: str, path: str, request: Request):
        return resolve("models", namespace, name, revision, path, request)

    return app


class LocalHub:
    """The server running in a background thread of this process, on 127.0.0.1 and a free port.

    Args:
        root (`str` or `PathLike`): where the repos live.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(
            create_app(self.root),
            log_level="warning",
            limit_concurrency=64,
            timeout_keep_alive=5,
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self, timeout: float = 20.0) -> LocalHub:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the local Hub server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a process that talks to this server (and to nothing else)."""
        env = dict(os.environ if base is None else base)
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.pop(name, None)
        env.update(
            HF_ENDPOINT=self.url,
            HF_HUB_DISABLE_XET="1",
            HF_TOKEN="hf_local_test_token",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_ETAG_TIMEOUT="30",
        )
        return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder holding the repos")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    uvicorn.run(create_app(args.root), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
