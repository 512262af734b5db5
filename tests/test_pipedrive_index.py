"""The person index a push reads from the person list instead of searching each email or phone."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from crmsync.providers.pipedrive.index import PAGES_PER_KEY, PersonIndex


class Company:
    """Persons in pages of ``size``, as ``/api/v2/persons`` walks them; counts what was read."""

    def __init__(self, n: int, size: int = 500) -> None:
        self.persons = [_person(i + 1, f"p{i}@x.org", f"+1555{i:07d}") for i in range(n)]
        self.size = size
        self.pages = 0
        self.catch_ups = 0
        self.fail_at: int | None = None

    def walk(self, params: dict[str, Any]) -> Iterator[tuple[list[dict[str, Any]], str | None]]:
        if "updated_since" in params:
            self.catch_ups += 1
            yield [p for p in self.persons if p.get("new")], None
            return
        for start in range(0, max(1, len(self.persons)), self.size):
            self.pages += 1
            if self.fail_at == self.pages:
                raise RuntimeError("HTTP 503")
            more = start + self.size < len(self.persons)
            yield self.persons[start : start + self.size], ("c" if more else None)


def _person(pid: int, email: str, phone: str, **extra: Any) -> dict[str, Any]:
    return {"id": pid, "emails": [{"value": email, "primary": True}], "phones": [{"value": phone}], **extra}


def test_a_small_company_is_read_once_and_answers_every_key_without_a_search() -> None:
    company = Company(1200)
    index = PersonIndex(company.walk)
    found, rest = index.find("email", ["P3@X.org", "nobody@x.org", "p1199@x.org"] + [f"n{i}@y" for i in range(9)])
    assert found == {"P3@X.org": "4", "p1199@x.org": "1200"} and rest == []
    assert index.complete and company.pages == 3
    found, rest = index.find("phone", ["+15550000007"])
    assert found == {"+15550000007": "8"} and rest == [] and company.pages == 3 and company.catch_ups == 1


def test_a_company_too_big_for_the_push_costs_a_bounded_read_and_the_rest_is_searched() -> None:
    company = Company(100_000, size=500)
    index = PersonIndex(company.walk)
    keys = [f"p{i}@x.org" for i in range(40)] + [f"p{99_000 + i}@x.org" for i in range(60)]
    found, rest = index.find("email", keys)
    assert company.pages == int(len(keys) * PAGES_PER_KEY) == 25 and not index.complete
    assert set(found) == set(keys[:40]) and rest == keys[40:]  # read: answered; not read yet: searched


def test_a_failed_page_ends_the_walk_and_every_later_key_is_searched() -> None:
    company = Company(5000, size=500)
    company.fail_at = 2
    index = PersonIndex(company.walk)
    with pytest.raises(RuntimeError):
        index.find("email", [f"k{i}" for i in range(20)])
    found, rest = index.find("email", ["p1@x.org", "p4999@x.org"] + [f"k{i}" for i in range(40)])
    assert found == {"p1@x.org": "2"} and "p4999@x.org" in rest and not index.complete and index.broken


def test_a_person_created_after_the_read_is_found_by_the_catch_up_and_ties_go_to_the_oldest() -> None:
    company = Company(10)
    index = PersonIndex(company.walk)
    assert index.find("email", ["late@x.org"]) == ({}, ["late@x.org"])  # one key pays for no page: searched
    assert index.find("email", ["late@x.org", "a", "b", "c"]) == ({}, [])  # four pay for one: read whole
    # Created meanwhile (by someone else, or by a create of this push whose answer was lost).
    company.persons.append(_person(11, "late@x.org", "+19990000000", new=True))
    company.persons.append(_person(12, "p2@x.org", "+19990000001", new=True))
    found, rest = index.find("email", ["late@x.org", "p2@x.org"])
    assert found == {"late@x.org": "11", "p2@x.org": "3"} and rest == []
