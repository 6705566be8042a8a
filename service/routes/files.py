"""Files in a session's working directory (images the code displayed are in `outputs/`).

Paths are relative to the working directory; absolute paths, `..` and symlinks that lead
out of it are refused (sandbox.files walks every component without following links).
"""

from __future__ import annotations

import asyncio
import mimetypes
from datetime import UTC, datetime

from fastapi import APIRouter, Depends, Request, Response

from kernelbox.models import FileEntry
from sandbox import files

from ..auth import require_owner
from ..errors import ApiError
from .sessions import ERRORS, manager

router = APIRouter(prefix="/v1/sessions/{session_id}/files", tags=["files"])

BAD_PATH = {400: {"description": "Absolute path, '..', or a path through a symlink"}}


def _workdir(request: Request, session_id: str, owner: str):
    return manager(request).get(session_id, owner).session.workdir


def _file_owner(request: Request, session_id: str, owner: str):
    return manager(request).get(session_id, owner).session.kernel.proc.file_owner


@router.get("", response_model=list[FileEntry], responses=ERRORS)
async def list_files(
    session_id: str, request: Request, owner: str = Depends(require_owner)
) -> list[FileEntry]:
    root = _workdir(request, session_id, owner)
    found = await asyncio.to_thread(files.list_files, root)
    return [
        FileEntry(path=f.path, size=f.size, modified=datetime.fromtimestamp(f.modified, UTC))
        for f in found
    ]


@router.put(
    "/{path:path}",
    status_code=201,
    response_model=FileEntry,
    responses={**ERRORS, **BAD_PATH, 413: {"description": "Larger than the file size limit"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def put_file(
    session_id: str, path: str, request: Request, owner: str = Depends(require_owner)
) -> FileEntry:
    """Upload raw bytes; parent directories are created."""
    root = _workdir(request, session_id, owner)
    files.split_relative(path)  # refuse bad paths before reading the body
    data = await request.body()  # at most max_file_bytes: see body_limit.py
    file_owner = _file_owner(request, session_id, owner)
    await asyncio.to_thread(files.write_file, root, path, data, owner=file_owner)
    return FileEntry(path=path, size=len(data), modified=datetime.now(UTC))


@router.get(
    "/{path:path}",
    responses={**ERRORS, **BAD_PATH, 200: {"content": {"application/octet-stream": {}}}},
    response_class=Response,
)
async def get_file(
    session_id: str, path: str, request: Request, owner: str = Depends(require_owner)
) -> Response:
    root = _workdir(request, session_id, owner)
    limit = request.app.state.settings.max_file_bytes
    try:
        data = await asyncio.to_thread(files.read_file, root, path, limit)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ApiError(404, "not_found", f"no file {path!r} in session {session_id}") from None
    media = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return Response(data, media_type=media)


@router.delete("/{path:path}", status_code=204, responses={**ERRORS, **BAD_PATH})
async def delete_file(
    session_id: str, path: str, request: Request, owner: str = Depends(require_owner)
) -> Response:
    root = _workdir(request, session_id, owner)
    try:
        await asyncio.to_thread(files.delete_file, root, path)
    except (FileNotFoundError, NotADirectoryError):
        raise ApiError(404, "not_found", f"no file {path!r} in session {session_id}") from None
    except IsADirectoryError:
        raise ApiError(400, "bad_path", f"{path!r} is a directory") from None
    return Response(status_code=204)
