"""Benchmark results -> target ratios, a Markdown report and PNG plots."""

from __future__ import annotations

from pathlib import Path

OURS, BASE = "lstm-serve", "baseline"


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
    met = None if value is None else (value >= floor if higher_is_better else value <= floor)
    return {
        "target": name,
        "value": None if value is None else round(value, 3),
        "floor" if higher_is_better else "ceiling": floor,
        "met": met,
    }


def throughput_ratio(results: dict, workload: str, ours_workload: str, c: int) -> float | None:
    ours, base = point(results, OURS, ours_workload, c), point(results, BASE, workload, c)
    return ours["throughput"] / base["throughput"] if ours and base and base["throughput"] else None


def summary(results: dict) -> list[dict]:
    rows = []
    ours64, base64 = point(results, OURS, "classify", 64), point(results, BASE, "classify", 64)
    rows.append(
        ratio_target(
            "classify, 64 clients: req/s vs baseline", throughput_ratio(results, "classify", "classify", 64), 3.0
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
            "stream, 256 sessions, WebSocket, a new session per sequence: frames/s vs baseline HTTP",
            throughput_ratio(results, "stream-http", "stream-ws", 256),
            5.0,
        )
    )
    rows.append(
        ratio_target(
            "stream, 256 sessions, WebSocket, steady streams of 20 sequences: frames/s vs baseline HTTP",
            throughput_ratio(results, "stream-http", "stream-ws-steady", 256),
            5.0,
        )
    )
    for workload in ("classify", "stream-http"):
        ours1, base1 = point(results, OURS, workload, 1), point(results, BASE, workload, 1)
        if ours1 and base1:
            rows.append(
                ratio_target(
                    f"{workload}, 1 client: p50 vs baseline's",
                    ours1["p50_ms"] / base1["p50_ms"],
                    1.1,
                    higher_is_better=False,
                )
            )
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
                f"{saturated['mean_batch_size']:.1f}): share of onnxruntime in-process",
                saturated["fraction_of_onnxruntime"],
                0.25,
            )
        )
    return rows


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    lines = ["## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for row in results["summary"]:
        goal = f">= {row['floor']}" if "floor" in row else (f"<= {row['ceiling']}" if "ceiling" in row else "–")
        met = {True: "yes", False: "**no**", None: "–"}[row["met"]]
        lines.append(f"| {row['target']} | {fmt(row['value'])} | {goal} | {met} |")
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
    cfg = results["config"]
    lines += [
        "",
        f"{cfg['warmup_s']:g} s warm-up + {cfg['duration_s']:g} s measured per point, loopback, "
        f"{results['machine']['cpus']} CPUs, whole run {results['wall_s']} s.",
        "",
    ]
    return "\n".join(lines)


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
