#!/usr/bin/env python3
"""Turns criterion's estimates into a markdown table (bench/results/*.md)."""
import json, os, platform, subprocess, sys, datetime

root = sys.argv[1]
rows = []
for group in sorted(os.listdir(root)):
    gdir = os.path.join(root, group)
    if not os.path.isdir(gdir) or group == "report":
        continue
    for bench in sorted(os.listdir(gdir)):
        est = os.path.join(gdir, bench, "new", "estimates.json")
        bjson = os.path.join(gdir, bench, "new", "benchmark.json")
        if not os.path.exists(est):
            continue
        e = json.load(open(est))
        name = json.load(open(bjson)).get("function_id", bench) if os.path.exists(bjson) else bench
        med = e["median"]["point_estimate"]
        lo, hi = e["median"]["confidence_interval"]["lower_bound"], e["median"]["confidence_interval"]["upper_bound"]
        rows.append((group, name, med, lo, hi))

def fmt(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"

cpu = "unknown"
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
except OSError:
    pass
rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
print(f"# Plugin host benchmarks\n")
print(f"Measured {datetime.date.today()} on {os.cpu_count()} cores ({cpu}), {rustc}, `{platform.system()} {platform.release()}`.")
print("Produced by `bash bench/run.sh`; the promises are in docs/SPEC.md.\n")
print("| group | benchmark | median | 95% CI of the median |")
print("|---|---|---|---|")
for g, n, med, lo, hi in rows:
    print(f"| {g} | {n} | {fmt(med)} | {fmt(lo)} – {fmt(hi)} |")
