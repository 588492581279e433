"""One Markdown table row from `gve plugin inspect -o json` on stdin; argv[1] is
the plugin's source language."""
import json
import sys

v = json.load(sys.stdin)
mib = lambda b: b / (1 << 20)
p = v["plugin"]
print(
    f"| {p['name']} | {sys.argv[1]} | {mib(v['component-bytes']):.2f} MiB "
    f"| {v['compile-ms']:.0f} ms | {v['instantiate-ms']:.2f} ms | {v['info-ms']:.2f} ms "
    f"| {mib(v['memory-bytes']):.2f} MiB |"
)
