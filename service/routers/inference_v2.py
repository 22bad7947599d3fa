"""The Open Inference Protocol (KServe v2) under /v2, for tritonclient, perf_analyzer and
KServe: three models per checkpoint, `<model>-generate`, `<model>-encode` and `<model>-decode`.

Thin adapters over service/inference.py: generate rows go through the same `settings_of` and
`sample_images` as POST /generate (rows of one label and consecutive seeds are one request
there: row i of SEED s gives /generate's pixels for seed s), encode and decode through the
same collector batches as POST /encode and /decode. Tensors come as JSON or in the binary
tensor data extension (tritonclient's default); outputs go back the way each asks. Errors are
the protocol's `{"error": "<message>"}`; the native API's 422s are 400s here.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets

import numpy as np
from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field, ValidationError
from starlette.responses import Response

from .. import __version__
from ..deps import service_of
from ..errors import ServiceError, v2_error
from ..inference import check_grids, sample_images, settings_of
from ..lengths import parse_length
from ..registry import ModelEntry
from ..schemas import MAX_NAME, MAX_SEED, GenerateRequest
from .protocol_route import ProtocolError, error_responses, protocol_route

OPERATIONS = ("generate", "encode", "decode")
HEADER_LENGTH = "Inference-Header-Content-Length"
DTYPES = {"UINT8": np.dtype("<u1"), "INT64": np.dtype("<i8")}
SAMPLING = ("temperature", "top_k", "top_p", "cfg_scale")
EXTENSIONS = ["binary_tensor_data", "model_configuration"]


def bad(message: str) -> ProtocolError:
    return ProtocolError(400, "invalid_request", message)


router = APIRouter(prefix="/v2", tags=["open inference protocol"],
                   route_class=protocol_route(v2_error))
health_router = APIRouter(prefix="/v2", tags=["open inference protocol"],
                          route_class=protocol_route(v2_error))


# ---- the contract, as /docs shows it ---------------------------------------------------
class V2Error(BaseModel):
    error: str


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any length.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    name: str | None = None
    ready: bool


class RequestTensor(BaseModel):
    name: str = Field(max_length=64)
    shape: list[int] = Field(max_length=8)
    datatype: str = Field(max_length=16)
    parameters: dict[str, int | float | str | bool] | None = None
    data: list | None = Field(None, description="Row-major, flat or nested; absent when the "
                              "tensor is in the binary part (parameters.binary_data_size).")


class RequestedOutput(BaseModel):
    name: str = Field(max_length=64)
    parameters: dict[str, int | float | str | bool] | None = None


class InferenceRequest(BaseModel):
    id: str | None = Field(None, max_length=256)
    parameters: dict[str, int | float | str | bool] | None = Field(None, description=(
        "generate: temperature, top_k, top_p, cfg_scale (as in POST /generate), n (rows when "
        "neither LABEL nor SEED is sent); every model: binary_data_output."))
    inputs: list[RequestTensor] = Field(max_length=8)
    outputs: list[RequestedOutput] | None = Field(None, max_length=8)


class ResponseTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, int] | None = None
    data: list | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, int] | None = None
    outputs: list[ResponseTensor]


_BINARY = {"schema": {"type": "string", "format": "binary"}, "description": (
    "The JSON header (its length in the Inference-Header-Content-Length header), then the "
    "tensors' bytes in order.")}
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": InferenceRequest.model_json_schema(
        ref_template="#/components/schemas/{model}")},
    "application/octet-stream": _BINARY}}}
NAME = Path(max_length=MAX_NAME + 16, examples=["mnist-generate"])


# ---- what the models take and give ------------------------------------------------------
def _split(name: str, svc) -> tuple[ModelEntry, str]:
    """"<model>-<operation>" -> (the loaded model, the operation); 404 for anything else."""
    base, _, op = name.rpartition("-")
    entry = svc.models.get(base) if op in OPERATIONS else None
    if entry is None or (op == "generate" and not entry.can_generate):
        raise ServiceError(404, "model_not_found", f"no model named {name!r}; loaded: "
                           f"{', '.join(_names(svc))}")
    return entry, op


def _names(svc) -> list[str]:
    return [f"{e.name}-{op}" for e in svc.models.values() for op in OPERATIONS
            if op != "generate" or e.can_generate]


def _signature(entry: ModelEntry, op: str) -> tuple[list[dict], list[dict]]:
    h, w = entry.image_size
    image = {"name": "IMAGE", "datatype": "UINT8", "shape": [-1, h, w, entry.channels]}
    if op == "generate":
        image["shape"] = [-1, -1, -1, entry.channels]  # a larger canvas is wider
        return ([{"name": "LABEL", "datatype": "INT64", "shape": [-1]},
                 {"name": "SEED", "datatype": "INT64", "shape": [-1]}],
                [image, {"name": "TOKENS", "datatype": "INT64", "shape": [-1, -1, -1]}])
    tokens = {"name": "TOKENS", "datatype": "INT64", "shape": [-1, -1, -1]}
    return ([image], [tokens]) if op == "encode" else ([tokens], [image])


def _metadata(entry: ModelEntry, op: str) -> dict:
    inputs, outputs = _signature(entry, op)
    return {"name": f"{entry.name}-{op}", "versions": ["1"], "platform": "pytorch",
            "inputs": inputs, "outputs": outputs}


def _config(entry: ModelEntry, op: str) -> dict:
    """Triton's model configuration (perf_analyzer reads it): no server-side batching
    dimension, inputs and outputs as in the metadata; LABEL and SEED optional."""
    inputs, outputs = _signature(entry, op)

    def tensor(t: dict, optional: bool = False) -> dict:
        out = {"name": t["name"], "data_type": f"TYPE_{t['datatype']}", "dims": t["shape"]}
        return {**out, "optional": True} if optional else out

    return {"name": f"{entry.name}-{op}", "platform": "pytorch", "backend": "taming",
            "max_batch_size": 0, "input": [tensor(t, op == "generate") for t in inputs],
            "output": [tensor(t) for t in outputs]}


# ---- health and metadata ----------------------------------------------------------------
@health_router.get("/health/live", summary="KServe v2: liveness", response_model=Live)
async def server_live() -> Response:
    return _json({"live": True})


@health_router.get("/health/ready", summary="KServe v2: readiness (models loaded, warmed up)",
                   response_model=Ready, responses=error_responses(V2Error, 503))
async def server_ready(request: Request) -> Response:
    service_of(request).check_ready()
    return _json({"ready": True})


@router.get("", summary="KServe v2: server metadata", response_model=ServerMetadata,
            responses=error_responses(V2Error, 401))
async def server_metadata() -> Response:
    return _json({"name": "taming-server", "version": __version__, "extensions": EXTENSIONS})


@router.get("/models/{name}", summary="KServe v2: model metadata",
            response_model=ModelMetadata, responses=error_responses(V2Error, 400, 401, 404))
async def model_metadata(request: Request, name: str = NAME) -> Response:
    return _json(_metadata(*_model(request, name)))


@router.get("/models/{name}/config", summary="Triton: model configuration",
            responses=error_responses(V2Error, 400, 401, 404))
async def model_configuration(request: Request, name: str = NAME) -> Response:
    return _json(_config(*_model(request, name)))


@router.get("/models/{name}/ready", summary="KServe v2: model readiness",
            response_model=Ready, responses=error_responses(V2Error, 400, 401, 404, 503))
async def model_ready(request: Request, name: str = NAME) -> Response:
    entry, op = _model(request, name)
    service_of(request).check_ready()
    return _json({"name": f"{entry.name}-{op}", "ready": True})


@router.post("/models/{name}/infer", summary="KServe v2: inference",
             openapi_extra=INFER_BODY, response_model=InferenceResponse,
             responses={200: {"content": {"application/octet-stream": _BINARY}},
                        **error_responses(V2Error, 400, 401, 404, 413, 415, 503, 504)})
async def infer(request: Request, name: str = NAME) -> Response:
    svc = service_of(request)
    entry, op = _model(request, name)
    svc.check_room(entry, op)
    req, inputs = _parse(await request.body(), request.headers)
    params = dict(req.parameters or {})
    binary_all = params.pop("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise bad("parameters.binary_data_output must be true or false")
    signature = {t["name"]: t for t in _signature(entry, op)[0]}
    for t in req.inputs:
        spec = signature.get(t.name)
        if spec is None:
            raise bad(f"model {name!r} has no input {t.name!r}; its inputs: "
                      f"{', '.join(signature)}")
        if t.datatype != spec["datatype"]:
            raise bad(f"input {t.name!r} is {spec['datatype']}, not {t.datatype}")
        if len(t.shape) != len(spec["shape"]) or any(
                s not in (-1, d) for s, d in zip(spec["shape"], t.shape, strict=True)):
            raise bad(f"input {t.name!r} has shape {t.shape}; the model takes {spec['shape']}")
    if op == "generate":
        seed, tensors = await _generate(request, svc, entry, inputs, params)
    else:
        if params:
            raise bad(f"model {name!r} takes no parameters {sorted(params)}")
        (given,) = inputs.values() if len(inputs) == 1 else (None,)
        if given is None:
            raise bad(f"model {name!r} takes one input, {', '.join(signature)}")
        seed, tensors = None, await _tokenizer(request, svc, entry, op, given)
    wanted = _outputs(req, tensors, binary_all)
    return _answer(f"{entry.name}-{op}", req.id, seed, wanted)


# ---- helpers -----------------------------------------------------------------------------
def _json(obj: dict) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")).encode(),
                    media_type="application/json")


def _model(request: Request, name: str) -> tuple[ModelEntry, str]:
    entry, op = _split(name, service_of(request))
    service_of(request).model(entry.name, request)  # the access log's model
    return entry, op


def _parse(body: bytes, headers) -> tuple[InferenceRequest, dict[str, np.ndarray]]:
    """The JSON header and the binary part -> the request and its input arrays by name."""
    if headers.get("content-encoding", "identity").lower() != "identity":
        raise ServiceError(415, "unsupported_media_type", "compressed request bodies are not "
                           "supported; send them uncompressed")
    given = headers.getlist(HEADER_LENGTH.lower())
    if len(given) > 1:
        raise bad(f"{HEADER_LENGTH} is given {len(given)} times; send it once")
    if not given:
        head, rest = body, b""
    else:
        size = parse_length(given[0])
        if size is None or size > len(body):
            shown = given[0] if len(given[0]) <= 40 else given[0][:40] + "..."
            raise bad(f"{HEADER_LENGTH} {shown!r} is not a length within the body "
                      f"({len(body)} bytes): send the JSON header's length in ASCII digits")
        head, rest = body[:size], body[size:]
    try:
        req = InferenceRequest.model_validate_json(head)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise bad(f"bad inference request: {where}: {err['msg']}") from None
    except RecursionError:
        raise bad("bad inference request: nested too deeply") from None
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for t in req.inputs:
        if t.name in inputs:
            raise bad(f"input {t.name!r} is given twice")
        dtype = DTYPES.get(t.datatype)
        if dtype is None:
            raise bad(f"input {t.name!r}: datatype {t.datatype} is not one this server takes "
                      f"({', '.join(DTYPES)})")
        if any(d < 0 for d in t.shape):
            raise bad(f"input {t.name!r}: shape {t.shape} has a negative dimension")
        count = math.prod(t.shape)
        nbytes = (t.parameters or {}).get("binary_data_size")
        if nbytes is not None:
            if type(nbytes) is not int:
                raise bad(f"input {t.name!r}: binary_data_size must be an integer")
            if t.data is not None:
                raise bad(f"input {t.name!r} has both data and binary_data_size")
            if nbytes != count * dtype.itemsize or offset + nbytes > len(rest):
                raise bad(f"input {t.name!r}: binary_data_size {nbytes} does not hold shape "
                          f"{t.shape} of {t.datatype} within the binary part")
            inputs[t.name] = np.frombuffer(rest, dtype, count, offset).reshape(t.shape).copy()
            offset += nbytes
        elif t.data is not None:
            inputs[t.name] = _from_json(t.name, t.data, dtype, t.shape)
        else:
            raise bad(f"input {t.name!r} has neither data nor binary_data_size")
    if offset != len(rest):
        raise bad(f"the binary part holds {len(rest) - offset} bytes no input claims")
    return req, inputs


def _from_json(name: str, data: list, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    try:
        arr = np.asarray(data)
    except ValueError:
        raise bad(f"input {name!r}: data is ragged") from None
    if arr.size and arr.dtype.kind not in "iu":
        raise bad(f"input {name!r}: data must be integers")
    if arr.size != math.prod(shape):
        raise bad(f"input {name!r}: {arr.size} values for shape {shape}")
    info = np.iinfo(dtype)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise bad(f"input {name!r}: values out of the range of its datatype")
    return arr.astype(dtype).reshape(shape)


async def _generate(request: Request, svc, entry: ModelEntry, inputs: dict[str, np.ndarray],
                    params: dict) -> tuple[int, dict[str, np.ndarray]]:
    """Rows of LABEL and SEED (either may be absent) -> one /generate request per run of
    rows with one label and consecutive seeds, admitted together."""
    n = params.pop("n", None)
    unknown = set(params) - set(SAMPLING)
    if unknown:
        raise bad(f"unknown parameters {sorted(unknown)}; generate takes "
                  f"{', '.join((*SAMPLING, 'n', 'binary_data_output'))}")
    lengths = {len(a) for a in inputs.values()}
    if len(lengths) > 1:
        raise bad("LABEL and SEED must have one value per row, as many of each")
    if lengths and n is not None:
        raise bad("parameters.n is for requests without LABEL and SEED: rows are their length")
    rows = lengths.pop() if lengths else (1 if n is None else n)
    if type(rows) is int and rows > 0:  # the whole request must fit the queue's bound
        svc.check_room(entry, "generate", rows)
    try:
        first = GenerateRequest.model_validate({"n": rows, **params})  # one check, with names
    except ValidationError as e:
        err = e.errors()[0]
        raise bad(f"parameters.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    if "SEED" in inputs:
        seeds = inputs["SEED"]
        if seeds.min() < 0 or seeds.max() > MAX_SEED - rows:
            raise bad(f"SEED values must lie in [0, {MAX_SEED - rows}]")
        seeds = seeds.tolist()
    else:
        start = secrets.randbelow(2**31)
        seeds = list(range(start, start + rows))
    labels = inputs["LABEL"].tolist() if "LABEL" in inputs else [None] * rows
    runs: list[tuple[int, int]] = []  # [lo, hi) of rows that /generate makes as one request
    for i in range(rows):
        if runs and labels[i] == labels[i - 1] and seeds[i] == seeds[i - 1] + 1:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    requests = [first.model_copy(update={"model": entry.name, "n": hi - lo, "seed": seeds[lo],
                                         "label": labels[lo]}) for lo, hi in runs]
    payloads = [settings_of(svc, entry, r) for r in requests]  # all checked before any runs
    tasks = [asyncio.ensure_future(sample_images(request, svc, entry, p)) for p in payloads]
    try:
        results = await asyncio.gather(*tasks)
    finally:
        for t in tasks:  # one failed: the others leave the engine (their slots free up)
            t.cancel()
    tokens = np.concatenate([t for t, _ in results])
    images = np.concatenate([im for _, im in results])
    grid = payloads[0].grid
    return seeds[0], {"IMAGE": images, "TOKENS": tokens.reshape(len(tokens), *grid)}


async def _tokenizer(request: Request, svc, entry: ModelEntry, op: str, given: np.ndarray
                     ) -> dict[str, np.ndarray]:
    """encode: pixels at the model's size -> token grids; decode: grids -> pixels."""
    s = svc.settings
    if len(given) == 0 or len(given) > s.max_images:
        raise bad(f"{len(given)} rows; send 1 to {s.max_images} per request")
    if op == "encode":
        out = await svc.run(request, entry, "encode", None, np.ascontiguousarray(given),
                            len(given))
        return {"TOKENS": out["tokens"].astype(np.int64, copy=False)}
    grids = check_grids(given.tolist(), entry.codebook_size, entry.max_grid, s.max_images)
    out = await svc.run(request, entry, "decode", tuple(grids.shape[1:]), grids, len(grids))
    return {"IMAGE": out["images"]}


def _outputs(req: InferenceRequest, tensors: dict[str, np.ndarray], binary_all: bool
             ) -> list[tuple[str, np.ndarray, bool]]:
    """(name, array, binary) of each output asked for: all of them when none is named."""
    if not req.outputs:
        return [(name, arr, binary_all) for name, arr in tensors.items()]
    wanted = []
    for o in req.outputs:
        if o.name not in tensors:
            raise bad(f"no output {o.name!r}; the model gives {', '.join(tensors)}")
        p = dict(o.parameters or {})
        binary = p.pop("binary_data", binary_all)
        if p or not isinstance(binary, bool):
            raise bad(f"output {o.name!r}: only parameters.binary_data (true or false) is "
                      "supported")
        wanted.append((o.name, tensors[o.name], binary))
    return wanted


def _answer(model: str, rid: str | None, seed: int | None,
            wanted: list[tuple[str, np.ndarray, bool]]) -> Response:
    outputs, blobs = [], []
    for name, arr, binary in wanted:
        dtype = "UINT8" if arr.dtype == np.uint8 else "INT64"
        arr = arr.astype(DTYPES[dtype], copy=False)
        out = {"name": name, "datatype": dtype, "shape": list(arr.shape)}
        if binary:
            blob = np.ascontiguousarray(arr).tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = arr.reshape(-1).tolist()
        outputs.append(out)
    body = {"model_name": model, "model_version": "1", "outputs": outputs}
    if rid is not None:
        body["id"] = rid
    if seed is not None:
        body["parameters"] = {"seed": seed}
    head = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(b"".join([head, *blobs]), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(head))})
