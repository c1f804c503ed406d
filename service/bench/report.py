"""Benchmark results -> target ratios, a Markdown report and PNG plots."""

from __future__ import annotations

from pathlib import Path

OURS, BASE = "lstm-serve", "baseline"
MEMORY, REDIS_1, REDIS_2 = "memory, 1 worker", "redis, 1 worker", "redis, 2 workers"  # run.REDIS_SETUPS


def point(results: dict, server: str, workload: str, concurrency: int) -> dict | None:
    return next(
        (
            p
            for p in results["points"]
            if (p["server"], p["workload"], p["concurrency"]) == (server, workload, concurrency)
        ),
        None,
    )


def ratio_target(name: str, value: float | None, floor: float, higher_is_better: bool = True) -> dict:
    """A target row. margin: how far past the goal, >= 1 when met (measured/floor, or ceiling/measured)."""
    met = None if value is None else (value >= floor if higher_is_better else value <= floor)
    margin = None
    if value is not None and value > 0:
        margin = round(value / floor if higher_is_better else floor / value, 2)
    return {
        "target": name,
        "value": None if value is None else round(value, 3),
        "floor" if higher_is_better else "ceiling": floor,
        "met": met,
        "margin": margin,
    }


def throughput_ratio(results: dict, workload: str, ours_workload: str, c: int) -> float | None:
    ours, base = point(results, OURS, ours_workload, c), point(results, BASE, workload, c)
    return ours["throughput"] / base["throughput"] if ours and base and base["throughput"] else None


def p50_ratio(results: dict, workload: str, c: int) -> float | None:
    ours, base = point(results, OURS, workload, c), point(results, BASE, workload, c)
    return ours["p50_ms"] / base["p50_ms"] if ours and base and base["p50_ms"] else None


def redis_point(results: dict, setup: str, workload: str, sessions: int) -> dict | None:
    return next(
        (
            r
            for r in results.get("redis") or []
            if (r["setup"], r["workload"], r["concurrency"]) == (setup, workload, sessions)
        ),
        None,
    )


def redis_vs_memory(results: dict, setup: str, workload: str, sessions: int) -> float | None:
    """A set-up's frames/s over one worker with sessions in memory, same workload and sessions."""
    ours, memory = redis_point(results, setup, workload, sessions), redis_point(results, MEMORY, workload, sessions)
    return ours["throughput"] / memory["throughput"] if ours and memory and memory["throughput"] else None


def summary(results: dict) -> list[dict]:
    rows = []
    ours64, base64 = point(results, OURS, "classify", 64), point(results, BASE, "classify", 64)
    rows.append(
        ratio_target(
            "classify, 64 clients: req/s vs baseline (our load generator)",
            throughput_ratio(results, "classify", "classify", 64),
            4.0,
        )
    )
    if ours64 and base64:
        rows.append(
            ratio_target(
                "classify, 64 clients: p99 vs baseline's",
                ours64["p99_ms"] / base64["p99_ms"],
                1.0,
                higher_is_better=False,
            )
        )
    rows.append(
        ratio_target(
            "stream, 256 sessions, HTTP: frames/s vs baseline HTTP",
            throughput_ratio(results, "stream-http", "stream-http", 256),
            2.0,
        )
    )
    rows.append(
        ratio_target(
            "stream, 256 sessions, WebSocket, a new session per sequence: frames/s vs baseline WebSocket",
            throughput_ratio(results, "stream-ws", "stream-ws", 256),
            2.5,
        )
    )
    rows.append(
        ratio_target(
            "stream, 256 sessions, WebSocket, steady streams of 20 sequences: frames/s vs baseline WebSocket",
            throughput_ratio(results, "stream-ws-steady", "stream-ws-steady", 256),
            2.5,
        )
    )
    for workload, title, ceiling in (
        ("stream-ws", "stream over WebSocket, 1 session: p50 vs baseline's WebSocket", 1.0),
        ("stream-http", "stream over HTTP (a step), 1 client: p50 vs baseline's", 0.8),
        ("classify", "classify, 1 client: p50 vs baseline's", 0.8),
    ):
        if (value := p50_ratio(results, workload, 1)) is not None:
            rows.append(ratio_target(title, value, ceiling, higher_is_better=False))
    replay = {r["t"]: r for r in results.get("replay", [])}
    if 1 in replay and 1000 in replay:
        rows.append(
            ratio_target(
                "session step at t=1000 vs t=1",
                replay[1000]["stateful_step_p50_ms"] / replay[1]["stateful_step_p50_ms"],
                1.2,
                higher_is_better=False,
            )
        )
        rows.append(
            {
                "target": "stateless replay at t=1000 vs t=1 (grows with t)",
                "value": round(replay[1000]["stateless_p50_ms"] / replay[1]["stateless_p50_ms"], 1),
                "met": None,
                "margin": None,
            }
        )
    classify = [
        p
        for p in results["points"]
        if p["server"] == OURS and p["workload"] == "classify" and p.get("fraction_of_onnxruntime") is not None
    ]
    if classify:
        saturated = max(classify, key=lambda p: p["throughput"])
        rows.append(
            ratio_target(
                f"classify at saturation (c={saturated['concurrency']}, batch "
                f"{saturated['mean_batch_size']:.1f}): share of onnxruntime in-process at the same batch",
                saturated["fraction_of_onnxruntime"],
                0.6,
            )
        )
    levels = sorted({r["concurrency"] for r in results.get("redis") or []})
    if levels:
        sessions = 64 if 64 in levels else levels[-1]
        for setup, floor in ((REDIS_1, 0.7), (REDIS_2, 1.0)):
            ratios = [redis_vs_memory(results, setup, w, sessions) for w in ("stream-http", "stream-ws")]
            rows.append(
                ratio_target(
                    f"sessions in Redis, {sessions} sessions, {setup.split(', ')[1]}: HTTP steps/s and WebSocket "
                    "frames/s vs one worker in memory (the lower of the two; load generator on the same machine)",
                    None if None in ratios else min(r for r in ratios if r is not None),
                    floor,
                )
            )
        two_workers = redis_vs_memory(results, REDIS_2, "classify", sessions)
        if two_workers is not None:
            rows.append(
                {
                    "target": f"classify, {sessions} clients, 2 workers on Redis vs 1 worker: req/s (no goal: what a "
                    "second worker process adds on this machine)",
                    "value": round(two_workers, 3),
                    "met": None,
                    "margin": None,
                }
            )
    return rows


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    lines = [
        "## Targets",
        "",
        "margin: how far past the goal (measured/floor, or ceiling/measured); below 1 is short of it.",
        "",
        "| target | measured | goal | met | margin |",
        "|---|---|---|---|---|",
    ]
    for row in results["summary"]:
        goal = f">= {row['floor']}" if "floor" in row else (f"<= {row['ceiling']}" if "ceiling" in row else "–")
        met = {True: "yes", False: "**no**", None: "–"}[row["met"]]
        margin = "–" if row.get("margin") is None else f"{row['margin']:.2f}x"
        lines.append(f"| {row['target']} | {fmt(row['value'])} | {goal} | {met} | {margin} |")
    lines += per_call_lines(results.get("onnxruntime_per_call_us"))
    lines += [
        "",
        "## Points",
        "",
        "| server | workload | concurrency | req/s | p50 ms | p90 ms | p99 ms | errors | mean batch | "
        "queue wait ms | onnxruntime in-process /s | server CPU % | load gen CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["points"]:
        lines.append(
            f"| {p['server']} | {p['workload']} | {p['concurrency']} | {p['throughput']:.0f} | {fmt(p['p50_ms'])} | "
            f"{fmt(p['p90_ms'])} | {fmt(p['p99_ms'])} | {p['errors']} | {fmt(p.get('mean_batch_size'), 1)} | "
            f"{fmt(p.get('mean_queue_wait_ms'))} | {fmt(p.get('onnxruntime_items_per_s'), 0)} | "
            f"{fmt(p['server_cpu_pct'], 0)} | {fmt(p['loadgen_cpu_pct'], 0)} |"
        )
    if results.get("replay"):
        lines += [
            "",
            "## Stateless replay versus a session step (p50)",
            "",
            "| frames of history t | request body | re-send all t frames (ms) | one session step (ms) |",
            "|---|---|---|---|",
        ]
        for r in results["replay"]:
            lines.append(
                f"| {r['t']} | {r['body_bytes']:,} B | {r['stateless_p50_ms']:.2f} | {r['stateful_step_p50_ms']:.2f} |"
            )
    if any(results.get("wrk") or []):
        lines += [
            "",
            "## Load generator check: the classify point again with wrk",
            "",
            "| server | connections | wrk req/s | wrk p99 | wrk errors | our load generator req/s |",
            "|---|---|---|---|---|---|",
        ]
        for w in filter(None, results["wrk"]):
            ours = point(results, w["server"], "classify", w["connections"])
            lines.append(
                f"| {w['server']} | {w['connections']} | {w['requests_per_s']:.0f} | {w['p99']} | "
                f"{w['errors']} | {ours['throughput']:.0f} |"
                if ours
                else ""
            )
    lines += redis_table(results) + open_loop_table(results)
    cfg = results["config"]
    lines += [
        "",
        f"{cfg['warmup_s']:g} s warm-up + {cfg['duration_s']:g} s measured per point, in "
        f"{cfg.get('rounds', 1)} rounds alternating with the servers it is compared with (A B, B A, ...), "
        f"loopback, {results['machine']['cpus']} CPUs, whole run {results['wall_s']} s.",
        "",
    ]
    return "\n".join(lines)


def per_call_lines(per_call: dict | None) -> list[str]:
    if not per_call:
        return []
    return [
        "",
        f"onnxruntime in-process, one intra-op thread, a batch of one: {per_call['step']:.0f} us per call for one "
        f"step from a carried state, {per_call['sequence']:.0f} us for one whole test sequence. Every request a "
        "server runs alone pays this, whichever server: the floor under the one-client latencies.",
    ]


def redis_table(results: dict) -> list[str]:
    if not results.get("redis"):
        return []
    lines = [
        "",
        "## Sessions in Redis",
        "",
        "Classify (one test sequence per request) and the stream workloads (one frame per message, a new session "
        "per sequence) against lstm-serve started three ways, all running, measured in alternating rounds: one "
        "worker with sessions in memory, one worker on Redis, two workers on Redis (a private redis-server, no "
        "persistence). Classify keeps no state: its rows show what a second worker process adds, which needs Redis "
        "only so that workers share sessions. The load generator runs on the same machine.",
        "",
        "| set-up | workload | clients (sessions) | req/s (classify), frames/s | vs memory, 1 worker | p50 ms | "
        "p99 ms | errors | "
        "lstm-serve CPU % | redis CPU % | load gen CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["redis"]:
        versus = redis_vs_memory(results, r["setup"], r["workload"], r["concurrency"])
        lines.append(
            f"| {r['setup']} | {r['workload']} | {r['concurrency']} | {r['throughput']:.0f} | {fmt(versus)} | "
            f"{fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {r['errors']} | {fmt(r['server_cpu_pct'], 0)} | "
            f"{fmt(r.get('redis_cpu_pct'), 0)} | {fmt(r['loadgen_cpu_pct'], 0)} |"
        )
    return lines


def open_loop_table(results: dict) -> list[str]:
    if not results.get("open_loop"):
        return []
    cfg = results["config"]
    lines = [
        "",
        "## Open loop: one model step",
        "",
        f"Single-frame WebSocket messages sent at the offered rate whatever the replies ({cfg['open_loop_arrivals']} "
        f"arrivals, round robin over {cfg['open_loop_sessions']} sessions), latency from each message's scheduled "
        "send time, so a server or load generator that falls behind shows as latency (no coordinated omission). "
        "achieved: replies per second in the measured window. A server's ladder stops after the first rate it "
        "does not keep up with (replies > 10% short, p99 > 200 ms, errors or unanswered messages); unanswered "
        "messages count with the latency they had reached when the run ended. p50 from the actual send and the "
        "generator's lag (actual minus scheduled send) tell the load generator's share of the latency.",
        "",
        "| server | offered /s | achieved /s | p50 ms | p90 ms | p99 ms | max ms | unanswered | errors | "
        "p50 from the actual send ms | generator lag p99 ms | server CPU % | load gen CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["open_loop"]:
        lines.append(
            f"| {r['server']} | {r['offered_per_s']:.0f} | {r['achieved_per_s']:.0f} | {fmt(r['p50_ms'])} | "
            f"{fmt(r['p90_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['max_ms'])} | {r['unanswered']} | {r['errors']} | "
            f"{fmt(r['p50_from_send_ms'])} | {fmt(r['generator_lag_p99_ms'])} | {fmt(r['server_cpu_pct'], 0)} | "
            f"{fmt(r['loadgen_cpu_pct'], 0)} |"
        )
    return lines


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("classify", "classify"), ("stream-http", "stream over HTTP"), ("stream-ws", "stream over WebSocket")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for column, (workload, title) in enumerate(series):
        for server, style in ((OURS, "o-"), (BASE, "s--")):
            points = sorted(
                (p for p in results["points"] if p["server"] == server and p["workload"] == workload),
                key=lambda p: p["concurrency"],
            )
            if not points:
                continue
            c = [p["concurrency"] for p in points]
            axes[0, column].plot(c, [p["throughput"] for p in points], style, label=server)
            axes[1, column].plot(c, [p["p99_ms"] for p in points], style, label=server)
        axes[0, column].set_title(title)
        axes[0, column].set_ylabel("requests/s" if workload == "classify" else "frames/s")
        axes[1, column].set_ylabel("p99 latency (ms)")
        for row in (0, 1):
            axes[row, column].set_xscale("log", base=2)
            axes[row, column].set_xlabel("concurrent clients" if workload == "classify" else "concurrent sessions")
            axes[row, column].legend()
            axes[row, column].grid(alpha=0.3)
        axes[1, column].set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "throughput_latency.png", dpi=90)
    plt.close(fig)

    if results.get("replay"):
        fig, ax = plt.subplots(figsize=(6, 4))
        t = [r["t"] for r in results["replay"]]
        ax.plot(t, [r["stateless_p50_ms"] for r in results["replay"]], "s--", label="re-send all t frames")
        ax.plot(t, [r["stateful_step_p50_ms"] for r in results["replay"]], "o-", label="one session step")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("frames of history t")
        ax.set_ylabel("p50 latency of the prediction after frame t (ms)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "replay.png", dpi=90)
        plt.close(fig)

    if results.get("open_loop"):
        fig, (latency, achieved) = plt.subplots(1, 2, figsize=(12, 4.5))
        for server, colour in ((OURS, "C0"), (BASE, "C1")):
            rows = sorted((r for r in results["open_loop"] if r["server"] == server), key=lambda r: r["offered_per_s"])
            if not rows:
                continue
            offered = [r["offered_per_s"] for r in rows]
            latency.plot(offered, [r["p50_ms"] for r in rows], "o-", color=colour, label=f"{server} p50")
            latency.plot(offered, [r["p99_ms"] for r in rows], "s--", color=colour, label=f"{server} p99")
            achieved.plot(offered, [r["achieved_per_s"] for r in rows], "o-", color=colour, label=server)
        offered = sorted({r["offered_per_s"] for r in results["open_loop"]})
        achieved.plot(offered, offered, ":", color="grey", label="offered (keeping up)")
        latency.set_title("one model step, open loop: latency from the scheduled send")
        latency.set_ylabel("latency (ms)")
        latency.set_yscale("log")
        achieved.set_title("replies per second")
        achieved.set_ylabel("achieved (req/s)")
        achieved.set_yscale("log")
        for ax in (latency, achieved):
            ax.set_xscale("log")
            ax.set_xlabel("offered load (req/s)")
            ax.legend()
            ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        fig.savefig(out / "open_loop.png", dpi=90)
        plt.close(fig)

    if results.get("redis"):
        setups = list(dict.fromkeys(r["setup"] for r in results["redis"]))
        groups = list(dict.fromkeys((r["workload"], r["concurrency"]) for r in results["redis"]))
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(setups)
        for k, setup in enumerate(setups):
            heights = [(redis_point(results, setup, w, c) or {"throughput": 0})["throughput"] for w, c in groups]
            ax.bar([g + k * width for g in range(len(groups))], heights, width, label=setup)
        ax.set_xticks([g + width * (len(setups) - 1) / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{w}, {c} {'clients' if w == 'classify' else 'sessions'}" for w, c in groups])
        ax.set_ylabel("requests/s (classify), frames/s")
        ax.set_title("one worker in memory vs one and two on Redis")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(out / "redis.png", dpi=90)
        plt.close(fig)
