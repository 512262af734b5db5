"""The Salesforce emulator's routes: REST, Collections, Composite, SOQL, getUpdated/getDeleted, Bulk 2.0, limits."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx

from crmsync.emulators.base import json_response, request_json
from crmsync.emulators.salesforce_soql import SoqlError, comparable, parse
from crmsync.emulators.salesforce_wire import VERSIONS, Refused, err, parse_time, sf_time, to_csv

if TYPE_CHECKING:
    from crmsync.emulators.salesforce import SalesforceEmulator

V = r"/services/data/v(?P<ver>\d+\.\d)"
TIMES = ("SystemModstamp", "CreatedDate", "LastModifiedDate")
MAX_COLLECTION = 200
MAX_COMPOSITE = 25
DELETED_REACH = 15 * 86400
ROLLED_BACK = "Record rolled back because not all records were valid and the request was using AllOrNone header"
HALTED = "The transaction was rolled back since another operation in the same transaction failed."
_REF = re.compile(r"@\{([A-Za-z0-9_]+)\.([A-Za-z0-9_.\[\]]+)\}")


def register(emu: SalesforceEmulator) -> None:
    def versioned(handler: Any) -> Any:
        def wrapped(request: httpx.Request, ver: str, **kw: str) -> httpx.Response:
            if ver not in VERSIONS:
                status = 410 if float(ver) < float(VERSIONS[0]) else 404
                return emu.error_response(status, f"API version {ver} is not available", code="NOT_FOUND")
            try:
                return handler(request, ver, **kw)
            except Refused as exc:
                return emu.answer([err(exc.message, exc.code, exc.fields)], exc.status)
            except SoqlError as exc:
                return emu.answer([err(str(exc), "MALFORMED_QUERY")], 400)

        return wrapped

    def route(method: str, path: str, handler: Any, name: str) -> None:
        emu.route(method, V + path, versioned(handler), name=name)

    def sobject_or_404(name: str) -> str:
        for s in emu.data:
            if s.lower() == name.lower():
                return s
        raise Refused(
            404, f"The requested resource does not exist: sObject type '{name}' is not supported.", "NOT_FOUND"
        )

    def shape(sobject: str, record: dict[str, Any], fields: list[str] | None, ver: str) -> dict[str, Any]:
        known = emu.fields_of(sobject)
        names = fields or ["Id", *[f[0] for f in emu.schema[sobject]], *TIMES, "IsDeleted"]
        out: dict[str, Any] = {
            "attributes": {"type": sobject, "url": f"/services/data/v{ver}/sobjects/{sobject}/{record['Id']}"}
        }
        for name in names:
            canon = next((s for s in ("Id", *TIMES, "IsDeleted") if s.lower() == name.lower()), None)
            if canon is None:
                spec = known.get(name.lower())
                if spec is None:
                    raise Refused(400, f"No such column '{name}' on entity '{sobject}'.", "INVALID_FIELD")
                canon = spec[0]
            value = record.get(canon)
            out[canon] = sf_time(value) if canon in TIMES and value is not None else value
        return out

    def getter(record: dict[str, Any], name: str) -> Any:
        for key in record:
            if key.lower() == name.lower():
                value = record[key]
                return datetime.fromtimestamp(value, UTC) if key in TIMES else value
        return None

    def run_query(q: str, *, all_rows: bool) -> tuple[str, list[dict[str, Any]], Any]:
        query = parse(q, getter)
        if not any(s.lower() == query.sobject.lower() for s in emu.data):
            raise Refused(400, f"sObject type '{query.sobject}' is not supported.", "INVALID_TYPE")
        sobject = sobject_or_404(query.sobject)
        known = emu.fields_of(sobject)
        for name in [*query.fields, *(o[0] for o in query.order)]:
            if name.lower() not in known and name not in ("Id", *TIMES, "IsDeleted"):
                raise Refused(400, f"No such column '{name}' on entity '{sobject}'.", "INVALID_FIELD")
        rows = [
            r
            for r in emu.data[sobject].values()
            if (all_rows or not r["IsDeleted"]) and (query.where is None or query.where(r))
        ]
        for name, desc in reversed(query.order):
            rows.sort(key=lambda r, n=name: (getter(r, n) is None, comparable(getter(r, n))), reverse=desc)
        if query.limit is not None:
            rows = rows[: query.limit]
        return sobject, rows, query

    def page(
        sobject: str, ids: list[str], fields: list[str], offset: int, batch: int, ver: str, total: int
    ) -> dict[str, Any]:
        chunk = ids[offset : offset + batch]
        records = [shape(sobject, emu.data[sobject][i], fields, ver) for i in chunk]
        doc: dict[str, Any] = {"totalSize": total, "done": offset + batch >= len(ids), "records": records}
        if not doc["done"]:
            loc = f"01g{len(emu.cursors):09d}"
            emu.cursors[loc] = ids
            emu.cursors[loc + ":meta"] = [sobject, *fields]
            doc["nextRecordsUrl"] = f"/services/data/v{ver}/query/{loc}-{offset + batch}"
        return doc

    def batch_size(request: httpx.Request) -> int:
        m = re.search(r"batchSize=(\d+)", request.headers.get("sforce-query-options", ""))
        return min(2000, max(200, int(m.group(1)))) if m else 2000

    def query(request: httpx.Request, ver: str, all_rows: bool = False) -> httpx.Response:
        q = request.url.params.get("q")
        if not q:
            return emu.answer([err("A query string must be provided.", "MALFORMED_QUERY")], 400)
        sobject, rows, parsed = run_query(q, all_rows=all_rows)
        if parsed.count:
            return emu.answer({"totalSize": len(rows), "done": True, "records": []})
        ids = [r["Id"] for r in rows]
        return emu.answer(page(sobject, ids, parsed.fields, 0, batch_size(request), ver, len(ids)))

    def query_more(request: httpx.Request, ver: str, loc: str, offset: str) -> httpx.Response:
        ids = emu.cursors.get(loc)
        if ids is None:
            return emu.answer([err("invalid query locator", "INVALID_QUERY_LOCATOR")], 400)
        sobject, *fields = emu.cursors[loc + ":meta"]
        return emu.answer(page(sobject, ids, fields, int(offset), batch_size(request), ver, len(ids)))

    route("GET", r"/query/?", query, "query read")
    route("GET", r"/queryAll/?", lambda r, ver: query(r, ver, all_rows=True), "queryAll read")
    route("GET", r"/query/(?P<loc>01g\d+)-(?P<offset>\d+)", query_more, "query more read")
    route("GET", r"/queryAll/(?P<loc>01g\d+)-(?P<offset>\d+)", query_more, "queryAll more read")

    # -- versions, limits, describe ----------------------------------------------------------------
    def versions(request: httpx.Request) -> httpx.Response:
        return json_response([{"label": f"v{v}", "url": f"/services/data/v{v}", "version": v} for v in VERSIONS])

    emu.route("GET", r"/services/data/?", versions, name="versions")

    def limits(request: httpx.Request, ver: str) -> httpx.Response:
        return emu.answer(
            {
                "DailyApiRequests": {"Max": emu.daily_limit, "Remaining": max(0, emu.daily_limit - emu.api_used)},
                "DailyBulkV2QueryJobs": {"Max": 10000, "Remaining": 10000 - len(emu.jobs)},
                "DailyBulkV2QueryFileStorageMB": {"Max": 976562, "Remaining": 976562},
            }
        )

    route("GET", r"/limits/?", limits, "limits")

    def describe(request: httpx.Request, ver: str, obj: str) -> httpx.Response:
        sobject = sobject_or_404(obj)
        fields = [
            {
                "name": "Id",
                "label": "Record ID",
                "type": "id",
                "nillable": False,
                "createable": False,
                "updateable": False,
                "externalId": False,
                "unique": False,
                "custom": False,
                "length": 18,
                "defaultedOnCreate": True,
                "picklistValues": [],
            }
        ]
        for name, kind, required, updateable, extra in emu.schema[sobject]:
            fields.append(
                {
                    "name": name,
                    "label": name.replace("__c", "").replace("_", " "),
                    "type": kind,
                    "nillable": not required,
                    "createable": not extra.get("readonly"),
                    "updateable": updateable and not extra.get("readonly"),
                    "externalId": bool(extra.get("external")),
                    "unique": bool(extra.get("external")),
                    "custom": name.endswith("__c"),
                    "length": 255 if kind in ("string", "email", "phone", "url", "combobox") else 0,
                    "defaultedOnCreate": name in ("OwnerId", "Status", "Priority", "TaskSubtype"),
                    "picklistValues": [
                        {"value": v, "label": v, "active": True, "defaultValue": False} for v in extra.get("values", [])
                    ],
                    "referenceTo": ["Account"] if name == "AccountId" else [],
                }
            )
        for name in ("SystemModstamp", "CreatedDate", "LastModifiedDate"):
            fields.append(
                {
                    "name": name,
                    "label": name,
                    "type": "datetime",
                    "nillable": False,
                    "createable": False,
                    "updateable": False,
                    "externalId": False,
                    "unique": False,
                    "custom": False,
                    "length": 0,
                    "defaultedOnCreate": True,
                    "picklistValues": [],
                }
            )
        return emu.answer(
            {
                "name": sobject,
                "label": sobject,
                "createable": True,
                "updateable": True,
                "queryable": True,
                "keyPrefix": sobject and emu.new_id(sobject)[:3],
                "fields": fields,
            }
        )

    route("GET", r"/sobjects/(?P<obj>\w+)/describe/?", describe, "describe")

    def describe_global(request: httpx.Request, ver: str) -> httpx.Response:
        return emu.answer(
            {
                "encoding": "UTF-8",
                "maxBatchSize": 200,
                "sobjects": [{"name": s, "label": s, "queryable": True} for s in emu.data],
            }
        )

    route("GET", r"/sobjects/?", describe_global, "describe global")

    # -- getUpdated / getDeleted -----------------------------------------------------------------
    def span(request: httpx.Request) -> tuple[float, float]:
        start = parse_time(request.url.params.get("start", "") or "")
        end = parse_time(request.url.params.get("end", "") or "")
        if start is None or end is None or end < start:
            raise Refused(400, "start and end must be dateTimes with start before end", "INVALID_REPLICATION_DATE")
        return start // 60 * 60, end // 60 * 60  # seconds are ignored

    def updated(request: httpx.Request, ver: str, obj: str) -> httpx.Response:
        sobject = sobject_or_404(obj)
        start, end = span(request)
        ids = [r["Id"] for r in emu.data[sobject].values() if not r["IsDeleted"] and start <= r["SystemModstamp"] < end]
        return emu.answer({"ids": ids, "latestDateCovered": sf_time(end)})

    def deleted(request: httpx.Request, ver: str, obj: str) -> httpx.Response:
        sobject = sobject_or_404(obj)
        start, end = span(request)
        earliest = emu.now() - DELETED_REACH
        rows = [
            {"id": i, "deletedDate": sf_time(w)} for s, i, w in emu.deleted_log if s == sobject and start <= w < end
        ]
        return emu.answer(
            {
                "deletedRecords": rows,
                "earliestDateAvailable": sf_time(max(earliest, emu.purged_before)),
                "latestDateCovered": sf_time(end),
            }
        )

    route("GET", r"/sobjects/(?P<obj>\w+)/updated/?", updated, "getUpdated read")
    route("GET", r"/sobjects/(?P<obj>\w+)/deleted/?", deleted, "getDeleted read")

    # -- sObject REST ------------------------------------------------------------------------------
    def body_of(request: httpx.Request) -> dict[str, Any]:
        doc = request_json(request)
        if not isinstance(doc, dict):
            raise Refused(400, "The request body is not a JSON object", "JSON_PARSER_ERROR")
        return doc

    def create(request: httpx.Request, ver: str, obj: str) -> httpx.Response:
        sobject = sobject_or_404(obj)
        record = emu.create(sobject, body_of(request))
        return emu.answer({"id": record["Id"], "success": True, "errors": []}, 201)

    def read(request: httpx.Request, ver: str, obj: str, rid: str) -> httpx.Response:
        sobject = sobject_or_404(obj)
        fields = [f for f in (request.url.params.get("fields") or "").split(",") if f] or None
        return emu.answer(shape(sobject, emu._live(sobject, rid), fields, ver))

    def patch(request: httpx.Request, ver: str, obj: str, rid: str) -> httpx.Response:
        emu.update(sobject_or_404(obj), rid, body_of(request))
        return emu.answer(None, 204)

    def remove(request: httpx.Request, ver: str, obj: str, rid: str) -> httpx.Response:
        emu.delete(sobject_or_404(obj), rid)
        return emu.answer(None, 204)

    def by_external(request: httpx.Request, ver: str, obj: str, ext: str, value: str) -> httpx.Response:
        sobject = sobject_or_404(obj)
        spec = emu.fields_of(sobject).get(ext.lower())
        if spec is None:
            raise Refused(404, f"Provided external ID field does not exist or is not accessible: {ext}", "NOT_FOUND")
        found = [
            r
            for r in emu.data[sobject].values()
            if not r["IsDeleted"] and str(r.get(spec[0]) or "").lower() == value.lower()
        ]
        if not found:
            raise Refused(404, "The requested resource does not exist", "NOT_FOUND")
        if len(found) > 1:
            return emu.answer([f"/services/data/v{ver}/sobjects/{sobject}/{r['Id']}" for r in found], 300)
        return emu.answer(shape(sobject, found[0], None, ver))

    def upsert(request: httpx.Request, ver: str, obj: str, ext: str, value: str) -> httpx.Response:
        sobject = sobject_or_404(obj)
        status, record = emu._upsert(sobject, ext, value, body_of(request))
        if status == 300:
            return emu.answer([f"/services/data/v{ver}/sobjects/{sobject}/{i}" for i in record["matches"]], 300)
        if status == 200 and emu.upsert_204:
            return emu.answer(None, 204)
        return emu.answer({"id": record["Id"], "success": True, "errors": [], "created": status == 201}, status)

    route("POST", r"/sobjects/(?P<obj>\w+)/?", create, "sobject create")
    route("GET", r"/sobjects/(?P<obj>\w+)/(?P<rid>[A-Za-z0-9]{15,18})", read, "sobject read")
    route("PATCH", r"/sobjects/(?P<obj>\w+)/(?P<rid>[A-Za-z0-9]{15,18})", patch, "sobject update")
    route("DELETE", r"/sobjects/(?P<obj>\w+)/(?P<rid>[A-Za-z0-9]{15,18})", remove, "sobject delete")
    route("GET", r"/sobjects/(?P<obj>\w+)/(?P<ext>\w+)/(?P<value>[^/]+)", by_external, "sobject by external id read")
    route("PATCH", r"/sobjects/(?P<obj>\w+)/(?P<ext>\w+)/(?P<value>[^/]+)", upsert, "sobject upsert")

    # -- Collections -------------------------------------------------------------------------------
    def item_error(exc: Refused) -> dict[str, Any]:
        error = {"statusCode": exc.code, "message": exc.message, "fields": exc.fields, **exc.extra}
        return {"success": False, "errors": [error]}

    def collection(request: httpx.Request, op: Any, *, upsert_result: bool = False) -> httpx.Response:
        doc = body_of(request)
        records = doc.get("records")
        if not isinstance(records, list) or not records:
            raise Refused(400, "records is required", "INVALID_FIELD")
        if len(records) > MAX_COLLECTION:
            raise Refused(400, f"Maximum number of records is {MAX_COLLECTION}", "EXCEEDED_ID_LIMIT")
        all_or_none = bool(doc.get("allOrNone"))
        out: list[dict[str, Any]] = []
        undo: list[tuple[str, str]] = []
        for rec in records:
            if not isinstance(rec, dict):
                out.append(
                    {
                        "success": False,
                        "errors": [{"statusCode": "INVALID_FIELD", "message": "not a record", "fields": []}],
                    }
                )
                continue
            if emu.faults.partial_rate and emu.rng.random() < emu.faults.partial_rate:
                exc = Refused(400, "unable to obtain exclusive access to this record", "UNABLE_TO_LOCK_ROW")
                out.append({"id": None, **item_error(exc)})
                continue
            try:
                answer = op(rec)
            except Refused as exc:
                out.append({"id": None, **item_error(exc)})
                continue
            if answer.pop("_created", False):
                undo.append((answer.pop("_sobject"), answer["id"]))
            answer.pop("_sobject", None)
            out.append(answer)
        if all_or_none and any(not a["success"] for a in out):
            for sobject, rid in undo:
                emu.data[sobject].pop(rid, None)
            out = [
                a
                if not a["success"]
                else {
                    "id": None,
                    "success": False,
                    "errors": [
                        {
                            "statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                            "message": ROLLED_BACK,
                            "fields": [],
                        }
                    ],
                }
                for a in out
            ]
        return emu.answer(out)

    def typed(rec: dict[str, Any]) -> str:
        kind = (rec.get("attributes") or {}).get("type")
        if not kind:
            raise Refused(400, "When creating or updating an sObject, attributes.type is required", "INVALID_TYPE")
        return sobject_or_404(str(kind))

    def coll_create(request: httpx.Request, ver: str) -> httpx.Response:
        def op(rec: dict[str, Any]) -> dict[str, Any]:
            if rec.get("id") or rec.get("Id"):
                raise Refused(400, "cannot specify Id in an insert call", "INVALID_FIELD_FOR_INSERT_UPDATE")
            sobject = typed(rec)
            made = emu.create(sobject, rec)
            return {"id": made["Id"], "success": True, "errors": [], "_created": True, "_sobject": sobject}

        return collection(request, op)

    def coll_update(request: httpx.Request, ver: str) -> httpx.Response:
        def op(rec: dict[str, Any]) -> dict[str, Any]:
            sobject = typed(rec)
            rid = str(rec.get("id") or rec.get("Id") or "")
            body = {k: v for k, v in rec.items() if k not in ("id", "Id")}
            emu.update(sobject, rid, body)
            return {"id": rid, "success": True, "errors": []}

        return collection(request, op)

    def coll_upsert(request: httpx.Request, ver: str, obj: str, ext: str) -> httpx.Response:
        sobject = sobject_or_404(obj)

        def op(rec: dict[str, Any]) -> dict[str, Any]:
            if typed(rec) != sobject:
                raise Refused(400, "all records must be of the type in the URL", "INVALID_TYPE")
            value = next((v for k, v in rec.items() if k.lower() == ext.lower()), None)
            if value in (None, ""):
                raise Refused(400, f"Missing external ID value for {ext}", "MISSING_ARGUMENT", [ext])
            body = {k: v for k, v in rec.items() if k.lower() != ext.lower()}
            status, made = emu._upsert(sobject, ext, str(value), body)
            if status == 300:
                raise Refused(
                    300, f"More than one record found for external id field {ext}", "DUPLICATE_EXTERNAL_ID", [ext]
                )
            return {
                "id": made["Id"],
                "success": True,
                "errors": [],
                "created": status == 201,
                "_created": status == 201,
                "_sobject": sobject,
            }

        return collection(request, op)

    def coll_retrieve(request: httpx.Request, ver: str, obj: str) -> httpx.Response:
        sobject = sobject_or_404(obj)
        ids = [i for i in (request.url.params.get("ids") or "").split(",") if i]
        fields = [f for f in (request.url.params.get("fields") or "").split(",") if f] or None
        out = []
        for rid in ids:
            record = emu.data[sobject].get(rid)
            out.append(shape(sobject, record, fields, ver) if record and not record["IsDeleted"] else None)
        return emu.answer(out)

    def coll_delete(request: httpx.Request, ver: str) -> httpx.Response:
        out = []
        for rid in [i for i in (request.url.params.get("ids") or "").split(",") if i]:
            sobject = emu.sobject_of(rid)
            try:
                if sobject is None:
                    raise Refused(404, "entity is deleted", "ENTITY_IS_DELETED")
                emu.delete(sobject, rid)
                out.append({"id": rid, "success": True, "errors": []})
            except Refused as exc:
                out.append({"id": rid, **item_error(exc)})
        return emu.answer(out)

    route("POST", r"/composite/sobjects/?", coll_create, "collections create")
    route("PATCH", r"/composite/sobjects/?", coll_update, "collections update")
    route("DELETE", r"/composite/sobjects/?", coll_delete, "collections delete")
    route("PATCH", r"/composite/sobjects/(?P<obj>\w+)/(?P<ext>\w+)/?", coll_upsert, "collections upsert")
    route("GET", r"/composite/sobjects/(?P<obj>\w+)/?", coll_retrieve, "collections retrieve read")

    # -- Composite ---------------------------------------------------------------------------------
    def composite(request: httpx.Request, ver: str) -> httpx.Response:
        doc = body_of(request)
        subs = doc.get("compositeRequest")
        if not isinstance(subs, list) or not subs or len(subs) > MAX_COMPOSITE:
            raise Refused(400, f"compositeRequest takes 1 to {MAX_COMPOSITE} subrequests", "INVALID_BATCH_REQUEST")
        results: dict[str, Any] = {}
        out = []
        halted = False

        def resolve(text: str) -> str:
            def one(m: re.Match[str]) -> str:
                value: Any = results.get(m.group(1))
                for part in m.group(2).split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                if value is None:
                    raise Refused(400, f"reference {m.group(0)} cannot be resolved", "INVALID_REFERENCE")
                return str(value)

            return _REF.sub(one, text)

        for sub in subs:
            ref = str(sub.get("referenceId") or "")
            if halted:
                out.append(
                    {
                        "body": [
                            err(
                                HALTED,
                                "PROCESSING_HALTED",
                            )
                        ],
                        "httpHeaders": {},
                        "httpStatusCode": 400,
                        "referenceId": ref,
                    }
                )
                continue
            try:
                url = resolve(str(sub.get("url") or ""))
                body = json.loads(resolve(json.dumps(sub["body"]))) if sub.get("body") is not None else None
                inner = httpx.Request(
                    str(sub.get("method") or "GET"),
                    f"{request.url.scheme}://{request.url.netloc.decode()}{url}",
                    json=body,
                    headers={"authorization": request.headers.get("authorization", "")},
                )
                matched = emu._match(inner)
                if matched is None:
                    raise Refused(404, f"no route for {inner.method} {inner.url.path}", "NOT_FOUND")
                inner.read()
                response = matched[0](inner, **matched[1])
            except Refused as exc:
                response = emu.answer([err(exc.message, exc.code, exc.fields)], exc.status)
            answer = json.loads(response.content) if response.content else None
            if response.status_code < 300 and isinstance(answer, dict):
                results[ref] = answer
            elif doc.get("allOrNone"):
                halted = True
            out.append({"body": answer, "httpHeaders": {}, "httpStatusCode": response.status_code, "referenceId": ref})
        return emu.answer({"compositeResponse": out})

    route("POST", r"/composite/?", composite, "composite")

    # -- Bulk API 2.0 query jobs -------------------------------------------------------------------
    def job_info(job: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in job.items() if not k.startswith("_")}

    def job_create(request: httpx.Request, ver: str) -> httpx.Response:
        doc = body_of(request)
        if doc.get("operation") not in ("query", "queryAll") or not doc.get("query"):
            raise Refused(400, "operation must be query or queryAll, with a query", "INVALIDJOB")
        sobject, rows, parsed = run_query(str(doc["query"]), all_rows=doc["operation"] == "queryAll")
        if parsed.order:
            pass  # accepted, as current versions do
        job_id = f"750{len(emu.jobs) + 1:015d}"
        emu.jobs[job_id] = {
            "id": job_id,
            "operation": doc["operation"],
            "object": sobject,
            "createdById": emu.users[0],
            "createdDate": sf_time(emu.now()),
            "state": "UploadComplete",
            "concurrencyMode": "Parallel",
            "contentType": "CSV",
            "apiVersion": float(ver),
            "lineEnding": "LF",
            "columnDelimiter": "COMMA",
            "_ids": [r["Id"] for r in rows],
            "_fields": parsed.fields,
            "_polls": 0,
        }
        return emu.answer(job_info(emu.jobs[job_id]))

    def job(job_id: str) -> dict[str, Any]:
        found = emu.jobs.get(job_id)
        if found is None:
            raise Refused(404, "The requested resource does not exist", "NOT_FOUND")
        return found

    def job_get(request: httpx.Request, ver: str, jid: str) -> httpx.Response:
        found = job(jid)
        if found["state"] == "UploadComplete":
            found["_polls"] += 1
            if found["_polls"] >= emu.bulk_polls:
                found["state"] = "JobComplete"
                found["numberRecordsProcessed"] = len(found["_ids"])
        return emu.answer(job_info(found))

    def job_results(request: httpx.Request, ver: str, jid: str) -> httpx.Response:
        found = job(jid)
        if found["state"] != "JobComplete":
            raise Refused(400, f"job {jid} is {found['state']}", "INVALIDJOBSTATE")
        if float(ver) != found["apiVersion"]:
            raise Refused(409, "the job's results must be read with the API version that created it", "INVALIDVERSION")
        locator = request.url.params.get("locator") or ""
        try:
            offset = int(base64.b64decode(locator).decode()) if locator else 0
        except ValueError:
            raise Refused(400, "invalid locator", "INVALID_LOCATOR") from None
        size = int(request.url.params.get("maxRecords") or 50_000)
        ids = found["_ids"][offset : offset + size]
        sobject, fields = found["object"], found["_fields"]
        rows = []
        for rid in ids:
            record = emu.data[sobject].get(rid)
            if record is not None:
                row = shape(sobject, record, fields, ver)
                rows.append({k: (v.replace(".000+0000", ".000Z") if k in TIMES and v else v) for k, v in row.items()})
        nxt = offset + size
        headers = {
            "Content-Type": "text/csv",
            "Sforce-NumberOfRecords": str(len(rows)),
            "Sforce-Locator": base64.b64encode(str(nxt).encode()).decode() if nxt < len(found["_ids"]) else "null",
            "Sforce-Limit-Info": f"api-usage={emu.api_used}/{emu.daily_limit}",
        }
        return httpx.Response(200, content=to_csv(rows, fields).encode(), headers=headers)

    def job_delete(request: httpx.Request, ver: str, jid: str) -> httpx.Response:
        job(jid)
        emu.jobs.pop(jid)
        return emu.answer(None, 204)

    def job_abort(request: httpx.Request, ver: str, jid: str) -> httpx.Response:
        found = job(jid)
        if body_of(request).get("state") == "Aborted" and found["state"] != "JobComplete":
            found["state"] = "Aborted"
        return emu.answer(job_info(found))

    route("POST", r"/jobs/query/?", job_create, "bulk query create read")
    route("GET", r"/jobs/query/(?P<jid>750\d+)/?", job_get, "bulk query job")
    route("GET", r"/jobs/query/(?P<jid>750\d+)/results/?", job_results, "bulk query results")
    route("DELETE", r"/jobs/query/(?P<jid>750\d+)/?", job_delete, "bulk query delete read")
    route("PATCH", r"/jobs/query/(?P<jid>750\d+)/?", job_abort, "bulk query abort read")

    # -- OAuth -------------------------------------------------------------------------------------
    emu.route("GET", r"/services/oauth2/authorize", lambda r: emu._authorize(r), name="oauth authorize")
    emu.route("POST", r"/services/oauth2/token", lambda r: emu._token(r), name="oauth token")

    def revoke(request: httpx.Request) -> httpx.Response:
        form = dict(httpx.QueryParams(request.content.decode()))
        emu.tokens.pop(form.get("token", ""), None)
        emu.refresh_tokens.pop(form.get("token", ""), None)
        return httpx.Response(200)

    emu.route("POST", r"/services/oauth2/revoke", revoke, name="oauth revoke token")
