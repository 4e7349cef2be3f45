"""The comparison's report: several runs merged into one, the sweep's hours at the measured speeds,
and Markdown with the ratios to the original method (``x reference``) and to kdlib's online step."""

from __future__ import annotations

from typing import Sequence

from kdlib.bench import FEATURE_DESCRIPTIONS, Result, header_lines, peak_memory_note
from kdlib.errors import KdlibError
from kdlib.grid import EXPERIMENTS, parse

PATHS = ("reference", "kdlib", "cached")
GRID_PRESET = "colab-a100"  # the preset whose shapes are the study shapes' (batch 64 x 128, hidden features)


def grid_estimate(results: Sequence[Result], preset_name: str = GRID_PRESET) -> dict:
    """Hours of ``preset_name``'s whole sweep (``kdlib.plan``: its token budget per run, its seeds,
    its evaluations) at the measured speeds: per path, and "best" (the top-k cache for the
    output-only experiments where it was measured). A path with an experiment unmeasured has no total."""
    from kdlib.plan import plan

    speed = {(r.exp, r.path): r.tokens_per_s for r in results}
    out = {}
    for path in PATHS + ("best",):
        measured = {}
        for exp in EXPERIMENTS:
            options = [speed.get((exp, p)) for p in (("cached", "kdlib") if path == "best" else (path,))]
            if path == "cached" and not parse(exp).output_only:
                options = [speed.get((exp, "kdlib"))]
            options = [x for x in options if x]
            if options:
                measured[exp] = max(options)
        if len(measured) == len(EXPERIMENTS):
            p = plan(preset_name, measured=measured, teacher_source="cache" if path in ("cached", "best") else None)
            out[path] = p.total_hours
    return out


def merge_reports(reports: Sequence[dict], command: str = "") -> dict:
    """One report from several of the same shapes and machine (paths measured in separate runs,
    such as the reference in one device call and kdlib in another, or ``python -m kdlib bench``'s
    report with a reference run): their train rows in grid order, their other sections. Refuses
    reports of different shapes or devices."""
    if not reports:
        raise KdlibError("nothing to merge: give bench.json files")
    first = reports[0]
    for r in reports[1:]:
        for key in ("shapes", "device", "feature"):
            if r.get(key) != first.get(key):
                raise KdlibError(f"cannot merge benchmark reports with different {key}: "
                                 f"{first.get(key)!r} and {r.get(key)!r}")
        if r["machine"].get("gpu", r["machine"]["cpu"]) != first["machine"].get("gpu", first["machine"]["cpu"]):
            raise KdlibError("cannot merge benchmark reports from different machines")
    merged = {**first, "command": command or first["command"],
              "merged_from": [r["command"] for r in reports]}
    rows = {(row["exp"], row["path"]): row for r in reports for row in r.get("train", [])}
    order = {e: i for i, e in enumerate(EXPERIMENTS)}
    merged["train"] = sorted(rows.values(), key=lambda x: (order.get(x["exp"], len(order)), x["exp"],
                                                           PATHS.index(x["path"])))
    for section in ("divergence", "prep"):
        found = [r[section] for r in reports if section in r]
        if found:
            merged[section] = found[-1]
        else:
            merged.pop(section, None)
    if first["shapes"]["name"] == "study" and merged["train"]:
        merged["grid_hours"] = grid_estimate([Result(**row) for row in merged["train"]])
    if not merged["train"]:
        merged.pop("train")
    return merged


def to_markdown(report: dict) -> str:
    """The report as Markdown: machine, command, then one table per section."""
    lines = header_lines(report)
    if "train" in report:
        lines += _train_table(report)
    if "divergence" in report:
        lines += _divergence_table(report["divergence"])
    if "prep" in report:
        p = report["prep"]
        lines += [f"Data preparation: {p['chars'] / 1e6:.1f} MB of text, tokenizer {p['tokenizer']}: "
                  f"{p['tokens_per_s']:,.0f} tokens/s ({p['chars_per_s'] / 1e6:.2f} MB/s, {p['threads']} threads); "
                  f"WikiText-103 (~540 MB) extrapolated: {p['wikitext103_minutes']:.1f} min", ""]
    return "\n".join(lines)


def _train_table(report: dict) -> list[str]:
    rows = report["train"]
    by = {(r["exp"], r["path"]): r for r in rows}
    lines = ["| experiment | path | tokens/s | ms/step | peak MiB | MFU | x reference | cached / kdlib |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = by.get((r["exp"], "reference"))
        online = by.get((r["exp"], "kdlib"))
        x_ref = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref and r["path"] != "reference" else ""
        x_cached = f"{r['tokens_per_s'] / online['tokens_per_s']:.2f}" if online and r["path"] == "cached" else ""
        util = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['exp']} | {r['path']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
                     f"{r['peak_mem_mib']:,.0f} | {util} | {x_ref} | {x_cached} |")
    lines += ["", peak_memory_note(report) + " The feature-map experiments' reference trains on attention maps "
              f"(as the notebook did), kdlib on {FEATURE_DESCRIPTIONS[report['feature']]}."]
    hours = report.get("grid_hours", {})
    if hours:
        from kdlib.config import preset, preset_seeds

        p = preset(GRID_PRESET)
        lines += ["", f"The {GRID_PRESET} sweep (14 experiments x {len(preset_seeds(GRID_PRESET))} seeds, "
                  f"{p.train.max_tokens:,} tokens a run, with its evaluations: `python -m kdlib plan`) at these "
                  "speeds: " + ", ".join(f"{k} {v:,.1f} h" for k, v in hours.items())]
    return lines + [""]


def _divergence_table(rows: Sequence[dict]) -> list[str]:
    lines = ["| divergence | implementation | N x V | ms (fwd+bwd) | peak MiB | x one [N,V] f32 | "
             "memory / dense | time / dense |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['divergence']} | {r['impl']} | {r['n']:,} x {r['v']:,} | {r['ms']:.1f} | "
                     f"{r['peak_mib']:,.0f} | {r['x_nv_f32']:.2f} | {r['mem_vs_dense']:.3f} | "
                     f"{r['time_vs_dense']:.2f} |")
    if any(r["impl"] == "liger" for r in rows):
        lines += ["", "liger: Liger-Kernel's Triton loss, fed log-probabilities computed outside it "
                  "(two more [N, V] tensors than its fused best case)."]
    return lines + [""]
