"""Figures 4 and 5: small requests under wrk's load, and their slowest while a WAV converts."""

from __future__ import annotations

import statistics
import threading
import time

from bench.client import JSON_HEADERS, Client
from bench.core import BITRATE_KBPS, Bench, Row, audio_bytes, log
from bench.uploads import wav_stream
from bench.wrk import WRK_SCRIPT, ensure_wrk, run_wrk

USER_BODY = '{"name": "bench"}'


def measure_small_requests(bench: Bench) -> None:
    plan = bench.plan
    log("4. small requests with wrk")
    wrk = ensure_wrk()
    script = bench.workdir / "bench.lua"
    script.write_text(WRK_SCRIPT)
    # a record of about download_bytes: a CBR MP3 holds BITRATE_KBPS * 1000 / 8 bytes a second
    seconds = plan.download_bytes / (BITRATE_KBPS * 1000 / 8)
    _, record = bench.client.upload(bench.user, *wav_stream(audio_bytes(seconds)))
    bench.download_url = record["url"]
    base = bench.stack.base_url
    runs = {
        "create_user": (f"{base}/users", {"BENCH_METHOD": "POST", "BENCH_BODY": USER_BODY}),
        "download": (bench.download_url, {"BENCH_METHOD": "GET"}),
    }  # fmt: skip
    for name, (url, env) in runs.items():
        for _ in range(plan.warmups):
            run_wrk(wrk, script, url, plan, min(3.0, plan.wrk_seconds), env)
        results = []
        with bench.cpu.measure(bench.noise, name):
            for _ in range(plan.wrk_rounds):
                results.append(run_wrk(wrk, script, url, plan, plan.wrk_seconds, env))
        # Each figure is the median over the rounds: one round's p99 is set by its worst few
        # hundred responses, and one stall of the disk lifts it for the whole round
        # (docs/performance.md, "What limits create_user").
        rps = statistics.median(r.rps for r in results)
        p99s = [r.p99_ms for r in results]
        p99 = statistics.median(p99s)
        p99_range = f"rounds {min(p99s):.0f} to {max(p99s):.0f} ms"
        errors = sum(r.errors for r in results)
        bench.details.append(
            f"{name} (in the order run): " + "; ".join(
                f"{r.rps:.0f}/s p50 {r.p50_ms:.1f} ms p99 {r.p99_ms:.1f} ms "
                f"max {r.max_ms:.0f} ms ({r.requests} requests, {r.errors} errors)"
                for r in results
            )
        )  # fmt: skip
        note = f"{errors} errors" if errors else ""
        if name == "create_user":
            bench.rows += [
                Row(f"4a. POST /users, {plan.connections} connections (median of rounds)",
                    f"{rps:.0f}/s", "≥ 2000/s", rps / 2000, rps >= 2000 and errors == 0, note),
                Row("4b. POST /users p99 latency (median of rounds)",
                    f"{p99:.1f} ms ({p99_range})", "< 50 ms", p99 / 50, p99 < 50),
            ]  # fmt: skip
        else:
            bench.rows.append(
                Row(f"4c. GET /record of {plan.download_bytes / 1e6:g} MB, "
                    f"{plan.connections} connections (one record, repeated; median of rounds)",
                    f"{rps:.0f}/s (p99 {p99:.0f} ms)", "≥ 500/s", rps / 500,
                    rps >= 500 and errors == 0, note)
            )  # fmt: skip


def measure_stalls(bench: Bench) -> None:
    log("5. latency of small requests while a WAV converts")
    done = threading.Event()
    latencies: dict[str, list[float]] = {"create_user": [], "download": []}
    failures: list[str] = []
    download_path = "/" + bench.download_url.split("/", 3)[3]
    client = bench.client

    def probe(name: str) -> None:
        with Client(client.host, client.port, timeout=30) as own:
            while not done.is_set():
                start = time.perf_counter()
                if name == "create_user":
                    status, _ = own.request("POST", "/users", b'{"name": "probe"}', JSON_HEADERS)
                else:
                    status, _ = own.request("GET", download_path)
                latencies[name].append(time.perf_counter() - start)
                if status >= 300:
                    failures.append(f"{name}: {status}")
                time.sleep(0.01)

    probes = [threading.Thread(target=probe, args=(n,), daemon=True) for n in latencies]
    with bench.cpu.measure(bench.noise, "stalls"):
        for t in probes:
            t.start()
        time.sleep(0.5)  # probes running before the upload starts
        upload_time = client.upload_file(bench.user, bench.wav)
        done.set()
        for t in probes:
            t.join()
    for name, values in latencies.items():
        worst = max(values) * 1000
        bench.details.append(
            f"{name} during a {upload_time:.1f} s upload: {len(values)} requests, "
            f"median {statistics.median(values) * 1000:.1f} ms, max {worst:.1f} ms"
        )
        bench.rows.append(
            Row(
                f"5. slowest {'POST /users' if name == 'create_user' else 'GET /record'} "
                "while a WAV converts",
                f"{worst:.1f} ms ({len(values)} requests)",
                "< 50 ms",
                worst / 50,
                worst < 50 and not failures,
                "; ".join(failures[:3]),
            )
        )
