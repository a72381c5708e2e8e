"""Print a markdown table from bench_zo2.py / reference_zo2.py JSONL rows."""

import json
import sys


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def tags(r) -> str:
    """' W<max_inflight>', ' packed' for packed blocks (rows before the option are unpacked),
    ' seq' for branches="sequential", ' G<n>' for n > 1 blocks per call, and a mark for rows
    of call 3's removed fori_loop experiment (branches run by a loop)."""
    w = f" W{r['max_inflight']}" if r.get("max_inflight") else ""
    w += " packed" if r.get("packed") else ""
    w += " seq" if r.get("branches") == "sequential" else ""
    w += f" G{r['blocks_per_call']}" if r.get("blocks_per_call", 1) > 1 else ""
    return w + (" (fori_loop branches)" if r.get("sequential_branches") else "")


def main(paths):
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    ours = [r for r in rows if r.get("impl") == "zo2_jax"]
    ref = [r for r in rows if r.get("impl") == "reference_zo2"]
    if ours:
        print("| model | layers | B x T | compute | storage | MeZO tok/s | ZO2 tok/s | ZO2/MeZO "
              "| ZO2 peak GB | MeZO peak GB | ZO2 host GB | T_bus ms | ZO2 / T_limit "
              "| dispatch share |")
        print("|" + "---|" * 14)
        for r in ours:
            m, z = r.get("mezo_tok_s"), r.get("zo2_tok_s")
            print(f"| {r['model']} | {r['layers']} | {r['batch']}x{r['seq']} | {r['compute']} | "
                  f"{r['storage']}{tags(r)} | {fmt(m, 0) if m else r.get('mezo_error', '-')[:30]} | "
                  f"{fmt(z, 0) if z else r.get('zo2_error', '-')[:30]} | "
                  f"{fmt(z / m) if m and z else '-'} | "
                  f"{fmt(r.get('zo2_peak_bytes', 0) / 1e9)} | "
                  f"{fmt(r.get('mezo_peak_bytes', 0) / 1e9) if m else '-'} | "
                  f"{fmt(r.get('zo2_host_peak_gb'), 1)} | "
                  f"{fmt(r.get('T_bus', 0) * 1e3, 1)} | {fmt(r.get('zo2_over_T_limit'))} | "
                  f"{fmt(r.get('zo2_dispatch_share'))} |")
        for r in ours:
            if r.get("profile") and "error" not in r["profile"]:
                pr = r["profile"]
                print(f"\nprofile {r['model']} {r['batch']}x{r['seq']} {r['storage']}: per unit of "
                      f"{pr.get('blocks_per_call', 1)} block(s) "
                      f"up {pr['up_ms']:.2f} (flat {pr['up_flat_ms']:.2f}) ms, compute "
                      f"{pr['compute_ms']:.2f} ms, down {pr['down_ms']:.2f} (flat "
                      f"{pr['down_flat_ms']:.2f}) ms, {pr['leaves']} leaves, x{pr['n_streamed']}; "
                      f"unpack {pr.get('unpack_ms', 0):.2f} ms, "
                      f"pack {pr.get('pack_ms', 0):.2f} ms (0: inside compute); "
                      f"outer {pr['outer_ms']:.1f} ms, head {pr['head_ms']:.1f} ms")
        b = ours[0]
        print(f"\npinned bandwidths (GB/s): up {b['B_up']:.1f}, down {b['B_down']:.1f}, "
              f"both {b['B_bi']:.1f}; device {b['device']}, jax {b['jax']}, {b['date']}")
    if ref:
        print("\n| reference | method | precision | B x T | tok/s | step s | peak GB | error |")
        print("|" + "---|" * 8)
        for r in ref:
            print(f"| {r.get('model')} | {r.get('method')} | {r.get('precision')} | "
                  f"{r.get('batch')}x{r.get('seq')} | {fmt(r.get('tokens_per_s'), 0)} | "
                  f"{fmt(r.get('step_s'), 3)} | {fmt((r.get('peak_gpu_bytes') or 0) / 1e9)} | "
                  f"{(r.get('error') or '')[:40]} |")


if __name__ == "__main__":
    main(sys.argv[1:])
