"""The report: targets, verdicts and the markdown table of one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cost

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def shown(path: Path) -> str:
    """A path for the results file: relative to the repository, so no machine path lands."""
    try:
        return str(path.resolve().relative_to(REPO.resolve()))
    except ValueError:
        return path.name


TARGETS = {
    "cpu_ms_per_delivery": 4.0,
    "throughput_ratio": 12.0,
    "loop_lag_p99_ms": 5.0,
    "peak_rss_mb": 150.0,
    "fastcgi_overhead_ms": 1.0,
}


# --- report ----------------------------------------------------------------------------------


def add_ceilings(res: dict[str, Any]) -> None:
    """Per consumer: the throughput this machine could give at the CPU the run measured (all
    cores ÷ consumer + processor + backend CPU per delivery), and that as a ratio to the
    naive consumer's measured rate. A ratio target above it cannot be met on this machine."""
    cores = res["machine"].get("cores") or 1
    naive = res.get("naive")
    for kind in ("naive", "worker", "lean", "fastcgi", "naive_native", "lean_native"):
        consumer = res.get(kind)
        base = res.get("naive_native") if kind.endswith("_native") else naive
        if not consumer:
            continue
        cpu_ms = sum(
            float(consumer.get(key) or 0)
            for key in (
                "cpu_ms_per_delivery",
                "processor_cpu_ms_per_delivery",
                "backend_cpu_ms_per_delivery",
            )
        )
        if cpu_ms <= 0:
            continue
        consumer["all_cpu_ms_per_delivery"] = round(cpu_ms, 2)
        consumer["cpu_ceiling_per_s"] = round(cores * 1000 / cpu_ms, 1)
        if base:
            consumer["cpu_ceiling_ratio"] = round(
                consumer["cpu_ceiling_per_s"] / base["throughput_per_s"], 2
            )


def verdicts(res: dict[str, Any]) -> list[dict[str, Any]]:
    naive = res.get("naive")
    add_ceilings(res)
    rows: list[dict[str, Any]] = []

    def row(
        name: str,
        value: float | None,
        target: float,
        unit: str,
        *,
        higher_better: bool = False,
    ) -> None:
        ok = None if value is None else (value >= target if higher_better else value <= target)
        rows.append(
            {
                "target": name,
                "value": value,
                "limit": target,
                "unit": unit,
                "op": "≥" if higher_better else "≤",
                "met": ok,
            }
        )

    clients = {
        "worker": "botocore client",
        "lean": "lean client",
        "fastcgi": "lean client, fastcgi transport",
        "lean_native": "lean client; both on the compiled processor",
    }
    for kind, client in clients.items():
        consumer = res.get(kind)
        base = res.get("naive_native") if kind.endswith("_native") else naive
        if not consumer:
            continue
        if base:
            ratio = round(consumer["throughput_per_s"] / base["throughput_per_s"], 2)
            res[f"throughput_ratio_{kind}"] = ratio
            row(
                f"throughput vs naive consumer ({client})",
                ratio,
                TARGETS["throughput_ratio"],
                "×",
                higher_better=True,
            )
        row(
            f"worker CPU per delivery ({client})",
            consumer["cpu_ms_per_delivery"],
            TARGETS["cpu_ms_per_delivery"],
            "ms",
        )
    spawn = res.get("spawn_lag")
    if spawn:
        row(
            "event-loop lag p99 while processors start (spawn_lag.py, spawner helper)",
            spawn["helper"]["p99_ms"],
            TARGETS["loop_lag_p99_ms"],
            "ms",
        )
    if res.get("rss"):
        row(
            f"peak RSS, {res['rss']['mails']} × {res['rss']['mail_mib']:.0f} MiB mails",
            res["rss"]["vm_hwm_peak_mb"],
            TARGETS["peak_rss_mb"],
            "MB",
        )
    fc, exec_lean = res.get("fastcgi"), res.get("lean") or res.get("worker")
    if fc and exec_lean:
        over = round(fc["run_minus_own_ms_p50"] - exec_lean["run_minus_own_ms_p50"], 2)
        res["fastcgi_overhead_ms"] = over
        row(
            "fastcgi overhead per delivery (vs exec, p50)",
            over,
            TARGETS["fastcgi_overhead_ms"],
            "ms",
        )
    fair = res.get("fairness")
    if fair:
        row(
            "lone store's latency under a flood, in flood deliveries (test bound)",
            fair.get("lone_latency_in_deliveries"),
            10.0,
            "deliveries",
        )
    return rows


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        (
            f"mailflow bench, {m['at']}: {m['cpu'] or 'unknown CPU'}, {m['cores']} cores,"
            f" load average at start {', '.join(f'{x:.2f}' for x in m['load_avg_at_start'])};"
            f" Python {m['python']}, PHP {m['php'] or '(none: Python processor)'}."
        ),
        (
            f"Backend: {res['backend']}. N={res['params']['n']}, concurrency"
            f" {res['params']['concurrency']}, processor sleeps {res['params']['processor_ms']}"
            f" ms, ≤ {res['params']['depth']} messages in the system."
        ),
        "",
        "| target | measured | limit | met |",
        "|---|---:|---:|:-:|",
    ]
    for v in res["targets"]:
        met = {True: "yes", False: "**no**", None: "–"}[v["met"]]
        lines.append(
            f"| {v['target']} | {fmt(v['value'])} {v['unit']} |"
            f" {v['op']} {fmt(v['limit'])} {v['unit']} | {met} |"
        )
    cols = [
        c
        for c in ("naive", "worker", "lean", "fastcgi", "naive_native", "lean_native")
        if res.get(c)
    ]
    fields = [
        ("throughput_per_s", "steady-state throughput (/s)"),
        ("cpu_ms_per_delivery", "consumer CPU per delivery (ms, own process)"),
        ("pre_ms_p50", "received → processor start, p50 (ms)"),
        ("pre_ms_p99", "received → processor start, p99 (ms)"),
        ("post_ms_p50", "processor exit → outcome recorded, p50 (ms)"),
        ("post_ms_p99", "processor exit → outcome recorded, p99 (ms)"),
        ("claim_fetch_ms_p50", "  of which claim + S3 fetch, p50 (ms)"),
        ("spawn_to_script_ms_p50", "  of which spawn → script's first line, p50 (ms)"),
        ("run_minus_own_ms_p50", "transport time beyond the script's own, p50 (ms)"),
        ("queued_ms_p50", "waiting for a run slot (prefetched), p50 (ms)"),
        ("processor_occupancy", "processors running, mean (of the concurrency)"),
        ("runqueue_wait_ms_per_delivery", "waiting for a CPU per delivery (ms, schedstat)"),
        ("loop_lag_p99_ms", "event-loop lag p99 (ms)"),
        ("loop_lag_max_ms", "event-loop lag max (ms)"),
        ("canary_lag_p99_ms", "control canary's lag p99 (ms, machine noise)"),
        ("vm_hwm_mb", "peak RSS (MB)"),
        ("processor_cpu_ms_per_delivery", "processor CPU per delivery (ms, children or php-fpm)"),
        ("backend_cpu_ms_per_delivery", "backend CPU per delivery (ms, all its processes)"),
        ("backend_ceiling_per_s", "busiest backend process's ceiling, one core (/s)"),
        ("aws_calls_per_delivery_total", "AWS calls per delivery"),
        ("all_cpu_ms_per_delivery", "all CPU per delivery: consumer + processor + backend (ms)"),
        ("cpu_ceiling_per_s", "ceiling at that CPU: all cores of this machine (/s)"),
        ("cpu_ceiling_ratio", "  the ceiling as a ratio to the naive consumer (×)"),
    ]
    lines += ["", "| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for key, label in fields:
        lines.append(f"| {label} | " + " | ".join(fmt(res[c].get(key)) for c in cols) + " |")
    spawn = res.get("spawn_lag")
    if spawn:
        lines += [
            "",
            (
                f"Event-loop lag while processors start ({spawn['runs']} × {spawn['command']!r},"
                f" {spawn['concurrency']} at a time; mean of two interleaved runs each), p99:"
                f" spawner helper {fmt(spawn['helper']['p99_ms'])} ms"
                + (
                    f" (processors at nice 0: {fmt(spawn['helper_nice0']['p99_ms'])} ms)"
                    if "helper_nice0" in spawn
                    else ""
                )
                + f", thread spawner"
                f" {fmt(spawn['thread']['p99_ms'])} ms, asyncio.create_subprocess_exec"
                f" {fmt(spawn['asyncio']['p99_ms'])} ms. (The throughput runs' own loop lag"
                " above is what a CPU-starved worker sees on this box: the backends, the"
                " processors and the worker share its cores.)"
            ),
        ]
    if res.get("rss"):
        r = res["rss"]
        lines += [
            "",
            (
                f"RSS: {r['mails']} mails of {r['mail_mib']} MiB ({', '.join(r['statuses'])}),"
                f" {r['max_concurrent_processors']} processors alive at once: VmHWM"
                f" {r['vm_hwm_peak_mb']} MB (idle worker: {r['vm_hwm_idle_mb']} MB)."
            ),
        ]
    if res.get("fairness"):
        f = res["fairness"]
        lines += [
            "",
            (
                f"Fairness: {f['flood']} mails of one store (max_in_flight_per_key=1) through"
                f" {f.get('workers', 1)} worker processes, then one mail of another store:"
                f" the store's runs overlapped {fmt(f.get('flood_overlaps'))} times; its latency"
                f" {fmt(f['lone_latency_ms'])} ms = {fmt(f['lone_latency_in_deliveries'])}"
                f" flood deliveries ({fmt(f['flood_per_delivery_ms_p50'])} ms each);"
                f" {f['flood_done_before_lone']} flood mails finished before it."
                f" Workers: {json.dumps(f['worker_stats'])}."
            ),
        ]
    for c in cols:
        by_process = res[c].get("backend_cpu_ms_per_delivery_by_process")
        if by_process:
            lines.append(
                f"\nBackend CPU per {c} delivery: "
                + ", ".join(f"{name} {ms:.2f} ms" for name, ms in by_process.items())
                + f"; requests per delivery: {json.dumps(res[c].get('aws_calls_per_delivery'))}."
            )
    if res.get("cost"):
        lines += cost.markdown(res["cost"])
    if res.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(res["skipped"])]
    return "\n".join(lines) + "\n"
