"""Files in a session's working directory (images the code displayed are in `outputs/`).

Paths are relative to the working directory; absolute paths, `..` and symlinks that lead
out of it are refused, and so is anything but a regular file (see sandbox/files.py, through
which every access goes: bounded, off the event loop, never following a link).
"""

from __future__ import annotations

import mimetypes
from datetime import UTC, datetime

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from kernelbox_server.sandbox import files
from kernelbox_wire.models import FileEntry

from ..deps import App, Owner
from ..errors import ApiError
from .sessions import ERRORS

router = APIRouter(prefix="/v1/sessions/{session_id}/files", tags=["files"])

BAD_PATH = {400: {"description": "Absolute path, '..', or a path through a symlink"}}


def _no_file(path: str, session_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no file {path!r} in session {session_id}")


@router.get("", response_model=list[FileEntry], responses=ERRORS)
async def list_files(
    session_id: str, response: Response, application: App, owner: Owner
) -> list[FileEntry]:
    """Regular files, by path; at most 10,000 entries and 64 levels are looked at (the
    `X-Kernelbox-Truncated: true` header says some were left out)."""
    listing = await application.files(session_id, owner).list()
    if listing.truncated:
        response.headers["X-Kernelbox-Truncated"] = "true"
    return [
        FileEntry(path=f.path, size=f.size, modified=datetime.fromtimestamp(f.modified, UTC))
        for f in listing.files
    ]


@router.put(
    "/{path:path}",
    status_code=201,
    response_model=FileEntry,
    responses={
        **ERRORS,
        **BAD_PATH,
        413: {"description": "Larger than the file size limit"},
        507: {"description": "The session's disk is full"},
    },
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
    session_id: str, path: str, request: Request, application: App, owner: Owner
) -> FileEntry:
    """Upload raw bytes; parent directories are created."""
    target = application.files(session_id, owner)
    files.split_relative(path)  # refuse bad paths before reading the body
    data = await request.body()  # at most max_file_bytes: see body_limit.py
    try:
        await target.write(path, data)
    except files.NotARegularFile:
        raise ApiError(400, "bad_path", f"{path!r} exists and is not a regular file") from None
    except IsADirectoryError:
        raise ApiError(400, "bad_path", f"{path!r} is a directory") from None
    return FileEntry(path=path, size=len(data), modified=datetime.now(UTC))


@router.get(
    "/{path:path}",
    responses={**ERRORS, **BAD_PATH, 200: {"content": {"application/octet-stream": {}}}},
    response_class=Response,
)
async def get_file(session_id: str, path: str, application: App, owner: Owner) -> Response:
    """The file's bytes, streamed as they are read (at most its size when it was opened)."""
    try:
        size, body = await application.files(session_id, owner).stream(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise _no_file(path, session_id) from None
    media = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return StreamingResponse(body, media_type=media, headers={"Content-Length": str(size)})


@router.delete("/{path:path}", status_code=204, responses={**ERRORS, **BAD_PATH})
async def delete_file(session_id: str, path: str, application: App, owner: Owner) -> Response:
    try:
        await application.files(session_id, owner).delete(path)
    except (FileNotFoundError, NotADirectoryError):
        raise _no_file(path, session_id) from None
    except IsADirectoryError:
        raise ApiError(400, "bad_path", f"{path!r} is a directory") from None
    return Response(status_code=204)
