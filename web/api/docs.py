"""The OpenAPI document and a page that renders it: Swagger UI, whose files come from the
flask-openapi3-swagger package (served from here, so the page works offline and under the
pages' Content-Security-Policy: no inline script, no CDN)."""

from __future__ import annotations

from pathlib import Path

import flask_openapi3_swagger
from flask import Blueprint, Response, jsonify, render_template

from web.api import bp
from web.api.openapi import openapi_document

#: Swagger UI's script and styles, as the package ships them.
SWAGGER_UI = Path(flask_openapi3_swagger.__file__).parent / "templates" / "swagger"
assets = Blueprint(
    "swagger_ui", __name__, static_folder=str(SWAGGER_UI), static_url_path="/api/docs/assets"
)


@bp.get("/api/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document())


@bp.get("/api/docs")
def api_docs() -> str:
    return render_template("api_docs.html")
