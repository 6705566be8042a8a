"""Model-ready text for an Execution the caller already has, in any format: so a client (the
playground) shows every rendering of one run without running the code again."""

from __future__ import annotations

from fastapi import APIRouter

from kernelbox_wire.models import RenderRequest, RenderResponse, render_options
from kernelbox_wire.render import render_message, render_text

from ..deps import Owner
from ..errors import ApiError

router = APIRouter(prefix="/v1/render", tags=["render"])


@router.post(
    "", response_model=RenderResponse, responses={401: {"description": "Missing or invalid key"}}
)
async def render(body: RenderRequest, _: Owner) -> RenderResponse:
    """The `text` an execute call with this `format` would have returned, and the tool message
    the tool endpoint would send (images of `multimodal` come from the results' data)."""
    options = render_options(body.format)
    try:
        return RenderResponse(
            text=render_text(body.execution, options),
            message=render_message(body.execution, options),
        )
    except (LookupError, ValueError, FileNotFoundError) as exc:
        # An Execution made up by the caller: outputs pointing at results it lacks, an image
        # without its data. The service's own are always consistent.
        raise ApiError(
            422, "inconsistent_execution", f"the execution cannot be rendered: {exc!r}"
        ) from None
