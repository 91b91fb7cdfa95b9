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


def _dur(seconds: float | None) -> str:
    """A duration, short: 4.2s, 42s, 5m02s, 3h07m, 2d04h; "-" for none."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    m, h = s // 60, s // 3600
    if m < 60:
        return f"{m}m{s % 60:02d}s"
    if h < 24:
        return f"{h}h{m % 60:02d}m"
    return f"{h // 24}d{h % 24:02d}h"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _kubernetes(k: dict[str, Any]) -> str:
    """The Kubernetes API line: ok or UNREACHABLE, for how long, the last error."""
    line = "kubernetes api " + ("ok" if k["api"] == "ok" else "UNREACHABLE")
    if k.get("for_s") is not None:
        line += f" for {_dur(k['for_s'])}"
    return line + (f": {k['error']}" if k.get("error") else "")


def _scaling(pool: dict[str, Any]) -> list[str]:
    """The pool's Deployment as the scaler sees it, its last scale events, its pod watch."""
    lines = []
    s = pool.get("scaling")
    if s:
        line = (f"deployment {s['deployment']}: current {_count(s['current'])}, "
                f"desired {_count(s['desired'])} ({s['min']}..{s['max']}, "
                f"target {s['target_builds']} builds per replica), "
                f"starting {pool.get('starting', 0)}")
        if s["victims"]:
            line += ", draining: " + ", ".join(s["victims"])
        if s["leaving"]:
            line += ", leaving: " + ", ".join(s["leaving"])
        events = ", ".join(f"{e['direction']} {e['from']}->{e['to']} {_dur(e['ago_s'])} ago"
                           for e in s["events"][:5])
        lines += [line, f"scale events (scale-down window {_dur(s['scale_down_window_s'])}): "
                        f"{events or 'none yet'}"]
    d = pool.get("discovery")
    if d:
        lines.append(f"pods: {d['pods']} in namespace {d['namespace']} matching "
                     f"{d['selector']} (resource version {d['resource_version'] or '-'})")
    return lines


def render(doc: dict[str, Any]) -> str:
    g = doc["gateway"]
    state = "draining" if g["draining"] else ("ready" if g["ready"] else "NOT READY")
    lines = [f"buildkit-gateway {g['version']}  {state}  up {g['uptime_s']:.0f}s  "
             f"clients {g['clients']}"]
    if doc.get("kubernetes"):
        lines.append(_kubernetes(doc["kubernetes"]))
    for pool in doc["pools"]:
        slots = pool["max_builds"] or "unlimited"
        lines += ["", f"pool {pool['name']} ({pool['loadbalance']}, {slots} slots per replica, "
                      f"{len(pool['queue'])} waiting)", *_scaling(pool)]
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
