"""`buildkit-gateway status`: the /api/status document of a running gateway as a text table.

Pure formatting of the same document the status page renders; the fetch is a plain HTTP GET
(urllib: no event loop needed for one request).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def fetch(admin: str, *, timeout: float = 5.0) -> dict[str, Any]:
    url = admin.rstrip("/")
    if "://" not in url:
        url = "http://" + url
    with urllib.request.urlopen(url + "/api/status", timeout=timeout) as response:
        data: dict[str, Any] = json.load(response)
        return data


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def render(doc: dict[str, Any]) -> str:
    g = doc["gateway"]
    state = "draining" if g["draining"] else ("ready" if g["ready"] else "NOT READY")
    lines = [f"buildkit-gateway {g['version']}  {state}  up {g['uptime_s']:.0f}s  "
             f"clients {g['clients']}"]
    for pool in doc["pools"]:
        slots = pool["max_builds"] or "unlimited"
        lines += ["", f"pool {pool['name']} ({pool['loadbalance']}, {slots} slots per replica, "
                      f"{len(pool['queue'])} waiting)"]
        rows = [["REPLICA", "STATE", "BUILDS", "ADDRESS", "REASON"]]
        for r in pool["replicas"]:
            builds = f"{r['active_builds']}/{r['slots'] or '-'}"
            if r["internal_builds"]:
                builds += f" +{r['internal_builds']} internal"
            rows.append([r["id"], r["state"], builds, r["address"], r["reason"]])
        lines += _table(rows) if len(rows) > 1 else ["(no replicas)"]
        if pool["queue"]:
            rows = [["POSITION", "REF", "WAITING", "FOR"]]
            rows += [[str(w["position"]), w["ref"], f"{w['age_s']:.1f}s", w["target"] or "any"]
                     for w in pool["queue"]]
            lines += ["", *_table(rows)]
    recent = doc["recent_builds"]
    if recent:
        rows = [["RECENT BUILD", "POOL", "REPLICA", "DURATION", "RESULT"]]
        rows += [[b["ref"] + (" (internal)" if b["internal"] else ""), b["pool"], b["replica"],
                  f"{b['duration_s']:.1f}s", b["result"] or ""] for b in recent[:20]]
        lines += ["", *_table(rows)]
    return "\n".join(lines) + "\n"


def main(admin: str) -> int:
    try:
        doc = fetch(admin)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"buildkit-gateway status: cannot read {admin}/api/status: {exc}")
        return 1
    print(render(doc), end="")
    return 0
