"""Salesforce (pure): Leads upserted by an external id field through sObject Collections,
activities and the hand-off as completed Tasks on the Lead, as the REST API takes them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from leadwerk_crm_bridge.config import Connector
from leadwerk_crm_bridge.domain.sync import contact_fields, merged

FIELDS: dict[str, str | None] = {
    "email": "Email", "first_name": "FirstName", "last_name": "LastName",
    "company": "Company", "phone": "Phone", "role": "Title", "industry": "Industry",
    "country": "Country", "city": "City", "website": "Website",
    "company.annual_revenue": "AnnualRevenue", "company.size": "NumberOfEmployees",
    # Custom fields the org's admin creates once (see the crm-bridge README).
    "score": "Leadwerk_Score__c", "grade": "Leadwerk_Grade__c",
    "rating": "Leadwerk_Rating__c", "stage": "Leadwerk_Stage__c",
    "first_touch.source": "Leadwerk_First_Touch_Source__c",
}
LEAD_STATUS: dict[str, str | None] = {
    "lead": "Open - Not Contacted", "mql": "Open - Not Contacted",
    "sal": "Working - Contacted", "sql": "Working - Contacted",
    "recycled": "Closed - Not Converted", "disqualified": "Closed - Not Converted",
}
#: A Lead cannot be saved without these; Salesforce's own web-to-lead placeholders.
REQUIRED = {"LastName": "[not provided]", "Company": "[not provided]"}
SUBJECT_LIMIT = 255


def lead_record(connector: Connector, contact: Mapping[str, Any],
                contact_id: str) -> dict[str, Any]:
    """One record of ``PATCH …/composite/sobjects/{sobject}/{external id field}``."""
    fields = contact_fields(contact)
    record: dict[str, Any] = {"attributes": {"type": connector.sobject},
                              connector.external_id_field: contact_id}
    for ours, theirs in merged(FIELDS, connector.fields).items():
        value = fields.get(ours)
        if value is not None and not isinstance(value, dict):
            record[theirs] = value if isinstance(value, int | float | bool) \
                else ";".join(map(str, value)) if isinstance(value, list) else str(value)
    stage = fields.get("stage")
    status = merged(LEAD_STATUS, connector.lead_status).get(str(stage)) if stage else None
    if status:
        record["Status"] = status
    owner = fields.get("owner")
    if isinstance(owner, str) and owner in connector.owners:
        record["OwnerId"] = connector.owners[owner]
    if connector.sobject == "Lead":
        for name, placeholder in REQUIRED.items():
            record.setdefault(name, placeholder)
    return record


def task_record(who_id: str, *, subject: str, description: str | None,
                date: str) -> dict[str, Any]:
    """A completed Task on the Lead's activity timeline (``date``: YYYY-MM-DD)."""
    record: dict[str, Any] = {"attributes": {"type": "Task"}, "WhoId": who_id,
                              "Subject": subject[:SUBJECT_LIMIT], "ActivityDate": date,
                              "Status": "Completed", "Priority": "Normal"}
    if description:
        record["Description"] = description
    return record


def handoff_description(data: Mapping[str, Any]) -> str:
    contact = data.get("contact") or {}
    lines = [f"Handed to sales by Leadwerk: {data.get('reason') or 'sales-ready'}"]
    facts = [f"{name} {contact[name]}" for name in ("rating", "score", "stage")
             if contact.get(name) is not None]
    if facts:
        lines.append(", ".join(facts))
    if data.get("summary"):
        lines.append(f"Recent activity: {data['summary']}")
    return "\n".join(lines)


def results(answer: Any, count: int) -> list[tuple[str | None, str | None]]:
    """(record id, error) per record of a collection answer, in the request's order."""
    if not isinstance(answer, list):
        return [(None, "Salesforce answered without a result per record")] * count
    out: list[tuple[str | None, str | None]] = []
    for result in answer[:count]:
        if isinstance(result, dict) and result.get("success"):
            out.append((str(result.get("id")), None))
        else:
            errors = result.get("errors") if isinstance(result, dict) else None
            message = "; ".join(f"{e.get('statusCode')}: {e.get('message')}"
                                for e in errors or [] if isinstance(e, dict))
            out.append((None, message or "Salesforce refused the record"))
    out.extend([(None, "no result for this record")] * (count - len(out)))
    return out
