"""Independent checks of tokengate's OpenAPI document (called by scripts/check-openapi.sh).

Why a second opinion next to tests/it/openapi.rs: the drift test holds real responses against
the schemas, but it reads the document with the same assumptions as the code that wrote it. A
duplicated `id` parameter on 14 operations passed it, while a validator rejected the document
and a client generator skipped those operations. So this script asks third-party tools that
know nothing of tokengate:

  spec      openapi-spec-validator (OpenAPI 3.1 meta-schema and its semantic checks)
  params    our own short rules the validators state loosely or not at all (one (name, in) per
            operation with path-level parameters merged, path parameters matching the template)
  ops       operationId on every operation and unique; every body has a schema
  client    openapi-python-client generates a client; every operation must come out as a
            function with typed request and response models, and its warnings are printed

Usage: check_openapi.py DOCUMENT WORKDIR. Prints one line per check and exits 1 on any failure.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def resolve(doc: dict, node: dict) -> dict:
    """Follows a local `$ref` (the document has no remote ones)."""
    seen = 0
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"non-local $ref {ref}")
        node = doc
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        seen += 1
        if seen > 20:
            raise ValueError(f"$ref loop at {ref}")
    return node


def operations(doc: dict):
    """(path, method, path item, operation) of every operation."""
    for path, item in doc.get("paths", {}).items():
        item = resolve(doc, item)
        for method in METHODS:
            if method in item:
                yield path, method, item, item[method]


def check_spec(doc: dict) -> list[str]:
    from openapi_spec_validator import OpenAPIV31SpecValidator

    if doc.get("openapi", "").split(".")[:2] != ["3", "1"]:
        return [f"`openapi` is {doc.get('openapi')!r}, expected 3.1.x"]
    errors = []
    for e in OpenAPIV31SpecValidator(doc).iter_errors():
        where = "/".join(str(p) for p in getattr(e, "path", []) or [])
        errors.append(f"{e.message}" + (f" (at {where})" if where else ""))
    return errors


def check_params(doc: dict) -> list[str]:
    errors = []
    for path, method, item, op in operations(doc):
        name = f"{method.upper()} {path}"
        # Operation-level parameters override path-level ones with the same (name, in); a
        # repeat *within* either list is what OpenAPI forbids.
        merged: dict[tuple[str, str], dict] = {}
        for level, params in (
            ("path item", item.get("parameters", [])),
            ("operation", op.get("parameters", [])),
        ):
            seen: set[tuple[str, str]] = set()
            for p in params:
                p = resolve(doc, p)
                key = (p.get("name"), p.get("in"))
                if key in seen:
                    errors.append(
                        f"{name}: parameter {key[0]!r} in {key[1]} repeated in the {level} list"
                    )
                seen.add(key)
                merged[key] = p
        # Names alone must be unique too: generators map parameters to identifiers.
        by_name: dict[str, list[str]] = {}
        for pname, pin in merged:
            by_name.setdefault(pname, []).append(pin)
        for pname, places in by_name.items():
            if len(places) > 1:
                errors.append(f"{name}: parameter {pname!r} declared in {places}")
        template = set(re.findall(r"{([^}]+)}", path))
        declared = {n for (n, i) in merged if i == "path"}
        for missing in sorted(template - declared):
            errors.append(f"{name}: path parameter {missing!r} not declared")
        for extra in sorted(declared - template):
            errors.append(f"{name}: path parameter {extra!r} not in the path")
        for (pname, pin), p in merged.items():
            if pin == "path" and p.get("required") is not True:
                errors.append(f"{name}: path parameter {pname!r} is not `required: true`")
            if "schema" not in p and "content" not in p:
                errors.append(f"{name}: parameter {pname!r} has no schema")
            if not p.get("description"):
                errors.append(f"{name}: parameter {pname!r} has no description")
    return errors


def check_ops(doc: dict) -> list[str]:
    errors = []
    ids: dict[str, str] = {}
    for path, method, _item, op in operations(doc):
        name = f"{method.upper()} {path}"
        oid = op.get("operationId")
        if not oid:
            errors.append(f"{name}: no operationId")
        elif oid in ids:
            errors.append(f"{name}: operationId {oid!r} also used by {ids[oid]}")
        else:
            ids[oid] = name
        if not op.get("responses"):
            errors.append(f"{name}: no responses")
        for status, resp in op.get("responses", {}).items():
            resp = resolve(doc, resp)
            for media, spec in resp.get("content", {}).items():
                if "schema" not in spec:
                    errors.append(f"{name} {status} {media}: no schema")
        body = resolve(doc, op.get("requestBody", {}))
        for media, spec in body.get("content", {}).items():
            if "schema" not in spec:
                errors.append(f"{name} request {media}: no schema")
    return errors


# --- generated client --------------------------------------------------------------------------


def _url_of(fn: ast.FunctionDef) -> tuple[str, str] | None:
    """(method, path template) from `_get_kwargs`' `{"method": ..., "url": ...}` literal."""
    for node in ast.walk(fn):
        if not isinstance(node, ast.Dict):
            continue
        entries = {
            k.value: v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)
        }
        if "method" not in entries or "url" not in entries:
            continue
        method = entries["method"].value
        url = entries["url"]
        if isinstance(url, ast.Constant):
            return method, url.value
        # "/v1/tokens/{id}".format(id=quote(str(id), safe="")): the template is the literal.
        if (
            isinstance(url, ast.Call)
            and isinstance(url.func, ast.Attribute)
            and url.func.attr == "format"
            and isinstance(url.func.value, ast.Constant)
        ):
            return method, url.func.value.value
        # f"/v1/tokens/{quote(str(id), safe='')}" (older generator versions): holes become {}.
        if isinstance(url, ast.JoinedStr):
            return method, "".join(
                v.value if isinstance(v, ast.Constant) else "{}" for v in url.values
            )
    return None


def _normalise(path: str) -> str:
    """Generators rename path parameters to identifiers; compare templates by their shape."""
    return re.sub(r"{[^}]+}", "{}", path)


def check_client(doc: dict, doc_path: Path, workdir: Path) -> tuple[list[str], list[str]]:
    """Generates the client; returns (errors, generator warnings)."""
    out = workdir / "tokengate_client"
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).with_name("openapi-python-client")
    # The generator formats its output with ruff, installed beside it in the venv.
    env = dict(os.environ, PATH=f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(
        [
            str(exe),
            "generate",
            "--path",
            str(doc_path),
            "--output-path",
            str(out),
            "--meta",
            "none",
            "--overwrite",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    output = (proc.stdout + proc.stderr).strip()
    # The generator reports what it could not generate as "Warning(s) encountered" blocks;
    # anything it says besides its progress lines is worth showing, except the offending
    # operation it dumps as indented JSON after each warning (the warning names it).
    warnings = [
        line
        for line in output.splitlines()
        if line.strip() and not line.startswith((" ", "{", "}", "Generating ", "Formatting "))
    ]
    errors = []
    if proc.returncode != 0:
        errors.append(f"openapi-python-client exited {proc.returncode}")
    if any("warning" in w.lower() for w in warnings):
        errors.append("openapi-python-client reported warnings (printed above)")
    generated: dict[tuple[str, str], tuple[Path, ast.Module]] = {}
    for py in sorted(out.glob("**/api/**/*.py")):
        if py.name == "__init__.py":
            continue
        tree = ast.parse(py.read_text())
        fns = {
            f.name: f for f in tree.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        if "_get_kwargs" in fns and (where := _url_of(fns["_get_kwargs"])):
            generated[(where[0].lower(), _normalise(where[1]))] = (py, tree)
    models = {p.stem for p in out.glob("**/models/*.py")}
    for path, method, _item, op in operations(doc):
        name = f"{method.upper()} {path} ({op.get('operationId')})"
        found = generated.get((method, _normalise(path)))
        if not found:
            errors.append(f"{name}: no generated function (operation skipped)")
            continue
        py, tree = found
        fns = {
            f.name: f for f in tree.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        for required in ("sync_detailed", "asyncio_detailed"):
            if required not in fns:
                errors.append(f"{name}: {py.name} has no `{required}`")
        if "sync_detailed" not in fns:
            continue
        args = {
            a.arg: a for a in fns["sync_detailed"].args.args + fns["sync_detailed"].args.kwonlyargs
        }
        # A request body (JSON or form) must be a generated model, not a loose dict.
        if resolve(doc, op.get("requestBody", {})).get("content"):
            ann = (
                ast.unparse(args["body"].annotation)
                if "body" in args and args["body"].annotation
                else ""
            )
            if not ann or "Any" in ann or "dict" in ann.lower():
                errors.append(f"{name}: request body is not a model (`body: {ann or '?'}`)")
        # Each documented response with a body must be parsed into a type: a model, a list or
        # a primitive, never `cast(Any, ...)` or the bare `response.json()` (what the generator
        # falls back to when a schema does not say what the body is).
        parse = fns.get("_parse_response")
        blocks = {}
        for node in ast.walk(parse) if parse else ():
            if (
                isinstance(node, ast.If)
                and isinstance(node.test, ast.Compare)
                and ast.unparse(node.test.left) == "response.status_code"
                and isinstance(node.test.comparators[0], ast.Constant)
            ):
                blocks[str(node.test.comparators[0].value)] = ast.unparse(node)
        for status, resp in op.get("responses", {}).items():
            if not resolve(doc, resp).get("content"):
                continue
            block = blocks.get(status)
            if block is None:
                errors.append(f"{name}: response {status} is not parsed")
            elif "cast(Any" in block or re.search(
                rf"response_{status} = response\.json\(\)\n", block
            ):
                errors.append(f"{name}: response {status} is untyped (`Any` or raw JSON)")
        # Every path parameter reaches the function as an argument.
        for p in op.get("parameters", []):
            p = resolve(doc, p)
            if p.get("in") == "path" and not any(
                a.lower() == re.sub(r"\W", "_", p["name"]).lower() for a in args
            ):
                errors.append(f"{name}: path parameter {p['name']!r} is not an argument")
    if not models:
        errors.append("no models generated")
    # The client must also load: every generated module imported (in a child, so a broken one
    # cannot disturb this process).
    load = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import importlib, pathlib, sys\n"
                "root = pathlib.Path(sys.argv[1])\n"
                "for py in sorted(root.rglob('*.py')):\n"
                "    mod = py.relative_to(root.parent).with_suffix('').parts\n"
                "    importlib.import_module('.'.join(p for p in mod if p != '__init__'))\n"
            ),
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=workdir,
        timeout=120,
        env=dict(env, PYTHONPATH=str(workdir)),
    )
    if load.returncode != 0:
        errors.append(f"the generated client does not import: {load.stderr.strip()[-600:]}")
    return errors, warnings


def main() -> int:
    doc_path, workdir = Path(sys.argv[1]), Path(sys.argv[2])
    doc = json.loads(doc_path.read_text())
    n_ops = sum(1 for _ in operations(doc))
    results = []
    for label, fn in (
        (
            f"spec (openapi-spec-validator {metadata.version('openapi-spec-validator')})",
            lambda: check_spec(doc),
        ),
        (
            "params (one (name, in) per operation, path parameters match the template)",
            lambda: check_params(doc),
        ),
        ("ops (operationIds present and unique, every body has a schema)", lambda: check_ops(doc)),
    ):
        errors = fn()
        results.append((label, errors))
    client_label = (
        f"client (openapi-python-client {metadata.version('openapi-python-client')}: "
        f"a typed function per operation)"
    )
    client_errors, warnings = check_client(doc, doc_path, workdir)
    if warnings:
        print("-- openapi-python-client said:")
        for w in warnings:
            print(f"   {w}")
    results.append((client_label, client_errors))
    failed = 0
    for label, errors in results:
        print(
            f"{'ok  ' if not errors else 'FAIL'} {label}"
            + ("" if not errors else f": {len(errors)} problem(s)")
        )
        for e in errors[:40]:
            print(f"       {e}")
        if len(errors) > 40:
            print(f"       ... and {len(errors) - 40} more")
        failed += bool(errors)
    print(f"python checks: {len(results) - failed}/{len(results)} passed on {n_ops} operations")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
