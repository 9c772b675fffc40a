"""Tally a pytest JUnit XML report of the conformance run: passed / failed / skipped, with reasons.

Usage: python tally.py REPORT.xml [HEADER_LINE ...]
Skips are grouped as mmdiff's own (the reasons in test_diffusers_mixin.py) or diffusers' (its decorators skip the
accelerator-only tests on CPU). Each failure is listed with the last line of its error message.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter

# tests the mixin lets pass without checking anything for these pipelines (they return early)
VACUOUS = {
    "MMDiffImageToTextPipelineFastTests.test_encode_prompt_works_in_isolation": "the captioner has no encode_prompt",
    "MMDiffImageToTextPipelineFastTests.test_num_images_per_prompt": "__call__ has no num_images_per_prompt",
    "test_StableDiffusionMixin_component": "not a StableDiffusionMixin pipeline",
    "test_xformers_attention_forwardGenerator_pass": "skipped without CUDA",
}
GPU_MARKERS = ("accelerator", "CUDA", "cuda", "XPU", "GPU")


def one_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    # pytest puts "E   ..." lines before the location; prefer the last exception line
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    line = errors[-1] if errors else (lines[0] if lines else "")
    return line if len(line) <= 400 else line[:397] + "..."


def main(path: str, header: list[str]) -> int:
    root = ET.parse(path).getroot()
    rows = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}.{case.get('name')}"
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            msg = one_line(failure.get("message")) or one_line(failure.text)
            rows.append(("failed", name, msg))
        elif skipped is not None:
            reason = (skipped.get("message") or "").removeprefix("Skipped: ").strip()
            kind = "skipped (mmdiff: inapplicable)" if reason.startswith("inapplicable") else "skipped (diffusers)"
            if kind == "skipped (diffusers)" and any(m in reason for m in GPU_MARKERS):
                kind = "skipped (diffusers: needs GPU)"
            rows.append((kind, name, reason))
        else:
            rows.append(("passed", name, ""))
    counts = Counter(kind for kind, _, _ in rows)
    out = list(header)
    out.append(
        f"TALLY: {len(rows)} tests: {counts['passed']} passed, {counts['failed']} failed, "
        f"{sum(v for k, v in counts.items() if k.startswith('skipped'))} skipped "
        f"({counts['skipped (diffusers: needs GPU)']} by diffusers: needs GPU, "
        f"{counts['skipped (mmdiff: inapplicable)']} inapplicable, {counts['skipped (diffusers)']} other)"
    )
    for kind in ("failed", "skipped (diffusers: needs GPU)", "skipped (mmdiff: inapplicable)", "skipped (diffusers)"):
        selected = [(n, m) for k, n, m in rows if k == kind]
        if selected:
            out.append(f"\n== {kind}: {len(selected)}")
            out.extend(f"  {n}: {m}" if m else f"  {n}" for n, m in sorted(selected))
    passed = sorted(n for k, n, _ in rows if k == "passed")
    out.append(f"\n== passed: {len(passed)}")
    for n in passed:
        why = VACUOUS.get(n) or VACUOUS.get(n.split(".")[-1])
        out.append(f"  {n}" + (f"  (vacuous: {why})" if why else ""))
    print("\n".join(out))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
