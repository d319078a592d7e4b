"""The benchmark's PNG chart: TTFT against prefix length, KV bytes against context length."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def write_chart(results: dict, path: Path) -> Path:
    """Draw both panels from `results` (as bench.run returns them) into `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the chart needs matplotlib: pip install -e '.[dev]'") from None

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"cold_s": ("cold", "o-"), "warm_s": ("warm follow-up", "s--")}
    for variant, rows in results["ttft"].items():
        sizes = sorted(rows, key=int)
        for key, (name, style) in styles.items():
            values = [rows[size][key] for size in sizes]
            left.plot([int(x) for x in sizes], values, style, label=f"{variant}, {name}")
    left.set_xscale("log", base=2)
    ticks = sorted({int(x) for rows in results["ttft"].values() for x in rows})
    left.set_xticks(ticks, [str(t) for t in ticks])
    left.set_yscale("log")
    left.set_xlabel("shared prefix (tokens)")
    left.set_ylabel("time to first token (s)")
    left.set_title("TTFT: cold vs warm follow-up")
    left.legend(fontsize=8)
    left.grid(True, which="both", alpha=0.3)

    kv = results["kv_cache"]
    for label, entry in kv["configs"].items():
        contexts = sorted(entry["bytes"], key=int)
        mib = [entry["bytes"][c] / 2**20 for c in contexts]
        right.plot([int(c) for c in contexts], mib, "o-", label=label)
    right.set_xscale("log", base=2)
    ticks = sorted({int(c) for entry in kv["configs"].values() for c in entry["bytes"]})
    right.set_xticks(ticks, [str(t) for t in ticks])
    right.set_xlabel("context (tokens)")
    right.set_ylabel("KV cache (MiB)")
    right.set_title(f"KV cache bytes (group size {kv['group_size']})")
    right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.3)

    model = Path(results["meta"]["model"]).name
    figure.suptitle(f"mlx-local bench: {model}, mlx-lm {results['meta']['base']}", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
